"""The agent's extensions: each one a group of commands (``<extension>.<command>``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ipa_twisted.agent import Agent
    from ipa_twisted.extensions.base import Extension

_EXTENSIONS = (
    ("clean", "steps", "CleanExtension"),
    ("deploy", "steps", "DeployExtension"),
    ("flow", "flow", "FlowExtension"),
    ("image", "image", "ImageExtension"),
    ("iscsi", "iscsi", "ISCSIExtension"),
    ("log", "log", "LogExtension"),
    ("poll", "poll", "PollExtension"),
    ("rescue", "rescue", "RescueExtension"),
    ("service", "steps", "ServiceExtension"),
    ("standby", "standby", "StandbyExtension"),
    ("system", "system", "SystemExtension"),
)
"""(name, module under ``ipa_twisted.extensions``, class) of every extension served."""


class ExtensionOnDemand:
    """Makes one extension, importing its module only then: an agent that is never sent
    one of its commands never loads its code (each idle agent in a fleet saves the
    memory)."""

    def __init__(self, name: str, module: str, attribute: str) -> None:
        self.name = name
        self._module = "ipa_twisted.extensions." + module
        self._attribute = attribute

    def load(self) -> type[Extension]:
        """The extension's class."""
        extension: type[Extension] = getattr(importlib.import_module(self._module),
                                             self._attribute)
        if extension.name != self.name:
            raise RuntimeError(f"{self._module}.{self._attribute} is named "
                               f"{extension.name!r}, not {self.name!r}")
        return extension

    def __call__(self, agent: Agent) -> Extension:
        return self.load()(agent)

    def __repr__(self) -> str:
        return f"<extension {self.name} ({self._module}.{self._attribute})>"


def default_extensions() -> list[ExtensionOnDemand]:
    """Every extension the agent serves, each made when first used."""
    return [ExtensionOnDemand(*spec) for spec in _EXTENSIONS]
