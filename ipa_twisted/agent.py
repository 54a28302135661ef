"""The agent's state: node, token, command results, extensions; and command execution.

The agent calls nothing above it: what it asks of the service tree (stop, lockdown, a
heartbeat after an async command) it announces as events the services subscribe to
(``stop_wanted``, ``lockdown_wanted``, ``async_finished``), and its extensions are given
to it (``ipa_twisted.tap`` passes ``default_extensions()``).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ipa_twisted import __version__, errors
from ipa_twisted.commands import (CommandResult, CommandResults, CommandStatus, run_command,
                                  split_command, validate_params)
from ipa_twisted.config import AgentConfig, ConfigError
from ipa_twisted.context import HardwareContext
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.process import ProcessRunner
from ipa_twisted.when import Observers, When

if TYPE_CHECKING:
    from ipa_twisted.metrics import Metrics

MIN_TOKEN_LENGTH = 32

LOOKUP_POLICY: dict[str, str] = {
    "agent_md5_checksum_enable": "md5_enabled",
    "permitted_image_formats": "permitted_image_formats",
    "disable_deep_image_inspection": "disable_deep_image_inspection",
    "enable_bios_bootloader_install": "enable_bios_bootloader_install",
    "agent_skip_bmc_detect": "skip_bmc_detect",
    "tls_min_version": "tls_min_version",
    "tls_cipher_suites": "tls_cipher_suites",
}
"""Lookup ``config`` keys (as Ironic 39 sends them) and the option each one sets."""

LOOKUP_ONLY_ENABLES = frozenset({"enable_bios_bootloader_install", "agent_skip_bmc_detect",
                                 "tls_min_version", "tls_cipher_suites"})
"""Keys applied only when true or non-empty, as the reference agent does: Ironic's
``false`` or empty value keeps the agent's own setting."""

LOOKUP_GROUPS: dict[str, str] = {
    "metrics": "metrics_",
    "metrics_statsd": "metrics_",
    "agent_containers": "container_",
}
"""Lookup ``config`` groups, and the prefix that turns their keys into option names."""
STOP_DELAY = 0.5
"""Seconds between answering a command that stops the agent and stopping it."""


class CommandGroup(Protocol):
    """What the agent needs of an extension (``ipa_twisted.extensions.base.Extension``)."""

    @property
    def name(self) -> str:
        """The extension's name, the part of a command's name before the dot."""

    def command(self, name: str) -> tuple[Any, Any]:
        """The spec and bound method of command ``name``."""


class Extensions(Mapping[str, CommandGroup]):
    """The agent's extensions by name. A factory with a ``name`` attribute (a class, or
    ``ipa_twisted.extensions.ExtensionOnDemand``) is called when its extension is first
    looked up; any other is called at once to learn the name."""

    def __init__(self, agent: Agent,
                 factories: Iterable[Callable[[Agent], CommandGroup]]) -> None:
        self._agent = agent
        self._made: dict[str, CommandGroup] = {}
        self._factories: dict[str, Callable[[Agent], CommandGroup] | None] = {}
        for make in factories:
            name = getattr(make, "name", None)
            if isinstance(name, str) and name:
                self._factories[name] = make
            else:
                made = make(agent)
                self._factories[made.name] = None
                self._made[made.name] = made

    def __getitem__(self, name: str) -> CommandGroup:
        made = self._made.get(name)
        if made is None:
            make = self._factories[name]
            assert make is not None
            made = self._made[name] = make(self._agent)
        return made

    def __iter__(self) -> Iterator[str]:
        return iter(self._factories)

    def __len__(self) -> int:
        return len(self._factories)


class Agent:
    """Everything the API and the extensions share about this agent's run."""

    log = Logger()

    def __init__(self, config: AgentConfig, clock: IReactorTime, runner: ProcessRunner,
                 managers: HardwareManagers | None = None,
                 extensions: Iterable[Callable[[Agent], CommandGroup]] = (),
                 reactor: Any = None, http_client: Callable[[], Any] | None = None) -> None:
        self.clock = clock
        self.reactor = reactor if reactor is not None else clock
        self.context = HardwareContext(config, runner, clock, self.reactor,
                                       http_client=http_client,
                                       report_progress=self.report_progress)
        """What hardware code is given; it holds the configuration in force and the
        runner."""
        self.version = __version__
        self.started_at = clock.seconds()
        self.node: dict[str, Any] | None = None
        self.managers: HardwareManagers | None = None
        self._managers_waiting: list[Deferred[HardwareManagers]] = []
        if managers is not None:
            self.set_managers(managers)
        self.agent_token: str | None = config.agent_token or None
        self.heartbeat_timeout = config.heartbeat_timeout
        self.lookup_config: dict[str, Any] = {}
        self.results = CommandResults()
        self._running_async: CommandResult | None = None
        self._sync_in_flight: list[CommandResult] = []
        self.async_finished: Observers[CommandResult] = Observers()
        """Notified when an async command has ended (Ironic is told at once)."""
        self.stop_wanted: When[None] = When()
        """Fires when the whole agent should stop, the current answer sent (rescue)."""
        self.lockdown_wanted: When[None] = When()
        """Fires when the API should close and heartbeats stop, the process kept
        (lockdown), the current answer sent."""
        self.locked_down = False
        self.extensions = Extensions(self, extensions)
        """The extensions by name; one given with a ``name`` is made when first used."""

    @cached_property
    def metrics(self) -> Metrics:
        """The statsd metrics of commands; made (and its module imported) at the first."""
        from ipa_twisted.metrics import Metrics
        return Metrics(self.reactor)

    @property
    def config(self) -> AgentConfig:
        """The configuration in force (virtual media, mDNS and lookup may change it); held
        by the hardware context, so that managers see what the agent sees."""
        return self.context.config

    @config.setter
    def config(self, config: AgentConfig) -> None:
        self.context.config = config

    @property
    def runner(self) -> ProcessRunner:
        """What runs programs for the agent (the hardware context's)."""
        return self.context.runner  # type: ignore[return-value]

    @runner.setter
    def runner(self, runner: ProcessRunner) -> None:
        self.context.runner = runner

    def hardware_context(self) -> HardwareContext:
        """What hardware code needs: config, runner, clock, HTTP client, progress reports."""
        return self.context

    def set_managers(self, managers: HardwareManagers) -> None:
        """Adopt the loaded hardware managers and release whoever waits for them."""
        self.managers = managers
        self.context.dispatch = managers.dispatch_to_managers
        if self.node is not None:
            managers.cache_node(self.node)
        waiting, self._managers_waiting = self._managers_waiting, []
        for waiter in waiting:
            waiter.callback(managers)

    async def get_managers(self) -> HardwareManagers:
        """The hardware managers, once loaded."""
        if self.managers is not None:
            return self.managers
        waiter: Deferred[HardwareManagers] = Deferred(self._managers_waiting.remove)
        self._managers_waiting.append(waiter)
        return await waiter

    # -- status and identity ----------------------------------------------------------------

    @property
    def standalone(self) -> bool:
        """Whether the agent runs without lookup and heartbeats."""
        return self.config.standalone

    def get_status(self) -> dict[str, Any]:
        """``{started_at, version}`` as the reference agent answers on /v1/status."""
        return {"started_at": self.started_at, "version": self.version}

    def get_node_uuid(self) -> str:
        """The node's UUID; UnknownNodeError before lookup."""
        if not self.node or "uuid" not in self.node:
            raise errors.UnknownNodeError()
        return str(self.node["uuid"])

    def validate_agent_token(self, token: str | None) -> bool:
        """Whether ``token`` matches ours, compared in constant time.

        Without a token of our own (standalone, or an Ironic that issues none) only a
        request without a token passes, as with the reference agent.
        """
        if self.agent_token is None:
            return not token
        if not token:
            return False
        return hmac.compare_digest(token.encode("utf-8", "replace"),
                                   self.agent_token.encode("utf-8"))

    def process_lookup_data(self, content: Mapping[str, Any]) -> None:
        """Adopt the node and configuration Ironic returned from lookup (or set_node_info)."""
        node = content.get("node")
        if not isinstance(node, dict) or not node.get("uuid"):
            raise errors.InvalidCommandParamsError("Lookup data must hold node.uuid")
        config = content.get("config") or {}
        if not isinstance(config, dict):
            raise errors.InvalidCommandParamsError("Lookup data config must be an object")
        self.node = node
        self.lookup_config = {k: v for k, v in config.items() if k != "agent_token"}
        timeout = config.get("heartbeat_timeout")
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
            self.heartbeat_timeout = float(timeout)
        token = config.get("agent_token")
        if isinstance(token, str) and token:
            if len(token) >= MIN_TOKEN_LENGTH:
                self.agent_token = token
            elif token == "******" and self.agent_token is None:
                # As the reference agent: Ironic handed this boot's token to an agent
                # before us (we were restarted outside Ironic's process), so no command
                # can ever be authenticated. Whoever holds the token could drive a node
                # nobody watches: make the agent unreachable instead.
                self.log.error("Ironic says the agent token was already handed out and "
                               "this agent has none (restarted outside Ironic's control?): "
                               "locking down; reboot the node through Ironic to recover")
                self.request_lockdown()
            elif token == "******":
                self.log.info("Ironic says the agent token was already handed out; "
                              "keeping the configured one")
            else:
                self.log.warn("Ignoring an agent token shorter than {length} characters",
                              length=MIN_TOKEN_LENGTH)
        self.apply_lookup_policy(config)
        if self.managers is not None:
            self.managers.cache_node(node)
        self.log.info("Node {uuid} adopted; heartbeat timeout {timeout}s",
                      uuid=node["uuid"], timeout=self.heartbeat_timeout)

    def apply_lookup_policy(self, config: Mapping[str, Any]) -> None:
        """Adopt the policies in lookup's ``config`` through the one override path.

        Each key of ``LOOKUP_POLICY`` (and each option of the ``metrics``,
        ``metrics_statsd`` and ``agent_containers`` groups) becomes the option it names;
        ``null`` means "not set by Ironic". A bad value or an unknown group option is
        logged and ignored: a newer conductor must not strand the node.
        """
        changes: dict[str, Any] = {}
        for key, option in LOOKUP_POLICY.items():
            value = config.get(key)
            if value is None or (key in LOOKUP_ONLY_ENABLES and not value):
                continue
            changes[option] = value
        for group, prefix in LOOKUP_GROUPS.items():
            values = config.get(group)
            if not isinstance(values, dict):
                continue
            for key, value in values.items():
                if value is not None:
                    changes[prefix + key] = value
        current = self.config
        for option, value in changes.items():
            try:
                current = current.merged({option: value}, "Ironic's lookup answer")
            except ConfigError as e:
                self.log.warn("Ignoring a lookup setting: {error}", error=str(e))
        applied = {k: getattr(current, k) for k in changes
                   if getattr(current, k, None) != getattr(self.config, k, None)}
        if applied:
            self.log.info("Policy from Ironic's lookup: {changes}", changes=applied)
        self.config = current

    # -- commands ---------------------------------------------------------------------------

    def list_command_results(self) -> list[CommandResult]:
        """Every kept command result, oldest first."""
        return self.results.all()

    def get_command_result(self, result_id: str) -> CommandResult:
        """The result with ``result_id`` (404 if unknown)."""
        return self.results.get(result_id)

    def _resolve(self, full_name: Any, params: Any) -> tuple[Any, Any]:
        extension_name, command_name = split_command(full_name)
        extension = self.extensions.get(extension_name)
        if extension is None:
            raise errors.RequestedObjectNotFoundError("Extension", extension_name)
        spec, method = extension.command(command_name)
        if not isinstance(params, dict):
            raise errors.InvalidCommandParamsError("Command params must be an object")
        validate_params(method, params)
        if spec.validator is not None:
            spec.validator(extension, **params)
        return spec, method

    def check_command(self, full_name: Any, params: Any) -> None:
        """Raise what ``execute_command`` would for a bad name or bad parameters."""
        self._resolve(full_name, params)

    async def execute_command(self, full_name: Any, params: Any) -> CommandResult:
        """Run ``ext.cmd`` with ``params``; sync commands are done when this returns.

        400/404 errors for bad names or parameters are raised before anything runs; 409
        (AgentIsBusy) while an async command runs, or an async one is asked for while a
        sync one is running. A command's own failure is a FAILED result, not an error.
        """
        spec, method = self._resolve(full_name, params)
        if self.locked_down:
            raise errors.CommandExecutionError("The agent is locked down")
        running = self._running_async
        if running is not None and not running.is_done():
            raise errors.AgentIsBusy(running.command_name)
        if spec.is_async and self._sync_in_flight:
            raise errors.AgentIsBusy(self._sync_in_flight[-1].command_name)
        result = CommandResult(spec.name, params, spec.is_async, spec.answer_within)
        self.results.add(result)
        self.log.info("Executing command {command}", command=full_name)
        if spec.is_async:
            self._running_async = result
            finished = Deferred.fromCoroutine(self._run_measured(method, params, result))
            finished.addBoth(lambda _: self.async_finished.notify(result))
            return result
        self._sync_in_flight.append(result)
        sync_run = Deferred.fromCoroutine(self._run_measured(method, params, result))

        def sync_done(outcome: Any) -> Any:
            self._sync_in_flight.remove(result)
            return outcome
        sync_run.addBoth(sync_done)
        sync_run.addErrback(lambda f: self.log.failure(
            "Command {command} ended unexpectedly", f, command=full_name))
        # A caller that stops waiting (an API client that hangs up or times out) does not
        # stop the command, as with the reference agent: half-done steps (a firmware or
        # boot-entry write, a sync) are worse than a late result, which stays listed.
        await result.wait()
        return result

    async def _run_measured(self, method: Any, params: dict[str, Any],
                            result: CommandResult) -> CommandResult:
        """Run the command, timing it and counting failures in the metrics."""
        uuid = self.node.get("uuid") if self.node else None
        started = self.clock.seconds()
        await run_command(method, params, result)
        name = f"ironic_python_agent.commands.{result.command_name}"
        self.metrics.timing(self.config, uuid, name, (self.clock.seconds() - started) * 1000)
        if result.command_status is not CommandStatus.SUCCEEDED:
            self.metrics.counter(self.config, uuid, name + ".failed")
        return result

    async def execute_nested(self, full_name: Any, params: Any) -> CommandResult:
        """Run a command on behalf of another (a flow): no busy rule, not listed."""
        spec, method = self._resolve(full_name, params)
        result = CommandResult(spec.name, params, spec.is_async)
        return await run_command(method, params, result)

    def request_stop(self) -> None:
        """Stop the agent soon, after the answer in progress has been sent."""
        self.clock.callLater(STOP_DELAY, self.stop_wanted.fire, None)

    def request_lockdown(self) -> None:
        """Refuse commands from now on; close the API after this answer is sent."""
        self.locked_down = True
        self.clock.callLater(STOP_DELAY, self.lockdown_wanted.fire, None)

    def report_progress(self, progress: Any) -> None:
        """Show ``progress`` (with ``serialize()``) on the command running now."""
        running = self._running_async
        if running is not None and not running.is_done():
            running.progress = progress
        elif self._sync_in_flight:
            self._sync_in_flight[-1].progress = progress
