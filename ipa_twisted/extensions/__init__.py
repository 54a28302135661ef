"""The agent's extensions: each one a group of commands (``<extension>.<command>``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ipa_twisted.extensions.base import Extension


def default_extensions() -> list[type[Extension]]:
    """Every extension the agent serves."""
    from ipa_twisted.extensions.flow import FlowExtension
    from ipa_twisted.extensions.image import ImageExtension
    from ipa_twisted.extensions.iscsi import ISCSIExtension
    from ipa_twisted.extensions.log import LogExtension
    from ipa_twisted.extensions.poll import PollExtension
    from ipa_twisted.extensions.rescue import RescueExtension
    from ipa_twisted.extensions.standby import StandbyExtension
    from ipa_twisted.extensions.steps import CleanExtension, DeployExtension, ServiceExtension
    from ipa_twisted.extensions.system import SystemExtension
    return [CleanExtension, DeployExtension, FlowExtension, ImageExtension, ISCSIExtension,
            LogExtension, PollExtension, RescueExtension, ServiceExtension, StandbyExtension,
            SystemExtension]
