"""The first stage: the configuration start-up goes on with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from twisted.python.failure import Failure

from ipa_twisted.agent import Agent
from ipa_twisted.config import AgentConfig
from ipa_twisted.process import ProcessRunner
from ipa_twisted.startup.tree import Stage

Remerge = Callable[[Mapping[str, str]], tuple[AgentConfig, list[str]]]
"""The configuration merged again with virtual media parameters ranked above the kernel
command line (``ipa_twisted.options.config_from_options``), and its warnings."""


class ConfigResolution(Stage[AgentConfig]):
    """Virtual media parameters (booted from one), then mDNS (``api_url`` or
    ``inspection_callback_url`` is ``mdns``): it says where Ironic is and may override
    settings. The agent adopts the result; ``done`` fires with it."""

    def __init__(self, agent: Agent, runner: ProcessRunner, reactor: Any, remerge: Remerge,
                 fatal: Callable[[Failure], object] | None = None, *,
                 vmedia_params: Callable[[AgentConfig], Awaitable[Mapping[str, str]]]
                 | None = None,
                 resolve_mdns: Callable[[AgentConfig], Awaitable[AgentConfig]] | None = None
                 ) -> None:
        super().__init__(fatal)
        self._agent, self._runner, self._reactor = agent, runner, reactor
        self._remerge = remerge
        self._vmedia_params = vmedia_params or self._read_vmedia
        self._resolve_mdns = resolve_mdns or self._discover

    async def _read_vmedia(self, config: AgentConfig) -> Mapping[str, str]:
        from ipa_twisted.startup.hardware import udev_triggered
        from ipa_twisted.vmedia import get_vmedia_params
        await udev_triggered(self._reactor)   # the ramdisk's devices announced to udev
        return await get_vmedia_params(self._runner, config)

    async def _discover(self, config: AgentConfig) -> AgentConfig:
        from ipa_twisted.net.mdns import resolve_mdns_urls
        return await resolve_mdns_urls(config, self._reactor)

    async def run(self) -> AgentConfig:
        params = await self._vmedia_params(self._agent.config)
        if params:
            self.log.info("Virtual media parameters: {names}", names=sorted(params))
            merged, warnings = self._remerge(params)
            for warning in warnings:
                self.log.warn("Configuration: {warning}", warning=warning)
            self._agent.config = merged
        config = self._agent.config
        if "mdns" in (config.api_url, config.inspection_callback_url):
            self._agent.config = await self._resolve_mdns(config)
        return self._agent.config
