"""A real Ironic on 127.0.0.1 for integration tests: API and conductor in one ``ironic`` process.

Ironic runs from its own virtualenv, ``.venv-ironic`` (made by ``tests/ironic/setup-ironic.sh``),
standalone: no Keystone (``auth_strategy=noauth``), no message bus (``rpc_transport=none``), a
SQLite database, and the test-only hardware type ``ipa-test`` (``tests/ironic/
ironic_test_driver``): fake boot and power, noop management, the ``direct`` deploy (or
``custom-agent``: only the agent's own deploy steps, no image). Nothing
in that configuration reaches beyond this machine, and Ironic never asks our agent to power
off or reboot the machine the tests run on: nodes are enrolled with
``deploy_forces_oob_reboot`` (power off through the fake power interface, after a ``sync``),
the ``agent`` power interface is not enabled, and automated cleaning is off with the erase
steps at priority 0 (``automated_clean=True`` turns it on, with the erase steps at the
priorities the agent gives them, as Ironic's defaults are: ``erase_devices_metadata`` 99,
``erase_devices`` 10).

Typical use, in a ``TestCase`` (``skip_reason(macs=True, loop_devices=True)`` first)::

    ironic = await start_ironic(self, directory, fast_track=True)   # stopped in cleanup
    uuid = await ironic.enroll_node(physical_macs())
    agent = start_agent(self, ironic, directory, sandbox=[loop])    # or no disk sandbox
    node = await ironic.wait_for_state(uuid, "active", timeout=120)

Lookup only finds a node in a state that waits for an agent (``wait call-back``, ``clean
wait``, ``inspect wait``, ``rescue wait``...), unless ``restrict_lookup=False``, or with
``fast_track=True``, which also allows ``enroll``, ``manageable`` and ``available`` and makes
Ironic record the heartbeats of an agent that is already running (no reboot before steps).
Without fast track every provisioning action begins with a (fake) reboot that wipes the
agent's token, so start the agent only once the node waits for it, as a real machine would
boot its ramdisk.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import treq
from twisted.internet import reactor

from ipa_twisted.testing.sandbox import LoopDevice, loop_devices_unavailable
from tests.processes import ROOT, Child, free_port, physical_macs, sleep

IRONIC_VENV = os.path.join(ROOT, ".venv-ironic")
HARDWARE_TYPE = "ipa-test"
MICROVERSION = "1.81"
FAILED_STATES = frozenset({"deploy failed", "clean failed", "inspect failed", "rescue failed",
                           "unrescue failed", "service failed", "adopt failed", "error"})

# Runs Ironic as the leader of a new process group (so stop() can signal its workers too),
# killed by the kernel if the test process dies first (PR_SET_PDEATHSIG).
_EXEC_AS_GROUP_LEADER = (
    "import ctypes, os, signal, sys\n"
    "os.setsid()\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n")


def skip_reason(*, macs: bool = False, tools: Sequence[str] = (),
                loop_devices: bool = False) -> str | None:
    """Why tests with a real Ironic cannot run here, or None if they can.

    ``macs``: the node is looked up by this machine's physical MACs, so there must be one;
    ``tools``: programs the test runs; ``loop_devices``: the agent runs in the disk sandbox.
    """
    if not os.access(os.path.join(IRONIC_VENV, "bin", "ironic"), os.X_OK):
        return "no real Ironic: run tests/ironic/setup-ironic.sh (makes .venv-ironic)"
    if os.geteuid() != 0:
        return "the agent driven by a real Ironic needs root (hardware inventory)"
    if macs and not physical_macs():
        return "no physical network interface to look the node up by"
    if loop_devices:
        return loop_devices_unavailable(tools)
    missing = [tool for tool in tools if shutil.which(tool) is None]
    return f"missing tools: {', '.join(missing)}" if missing else None


class IronicError(AssertionError):
    """Ironic answered a request with an unexpected status."""

    def __init__(self, message: str, code: int, body: Any) -> None:
        super().__init__(message)
        self.code, self.body = code, body


def fault_string(body: Any) -> str:
    """The message of an Ironic error answer (a JSON fault inside ``error_message``)."""
    if isinstance(body, dict) and isinstance(body.get("error_message"), str):
        try:
            return str(json.loads(body["error_message"]).get("faultstring"))
        except (ValueError, AttributeError):
            return body["error_message"]
    return repr(body)


class RealIronic:
    """One standalone Ironic, its SQLite database, configuration and log in ``directory``."""

    def __init__(self, directory: str, *, restrict_lookup: bool = True,
                 fast_track: bool = False, require_tls: bool = True,
                 heartbeat_timeout: int = 30, callback_timeout: int = 300,
                 automated_clean: bool = False, hardware_type: str = HARDWARE_TYPE,
                 options: Mapping[str, Mapping[str, object]] | None = None) -> None:
        """``heartbeat_timeout`` is ``[api]ramdisk_heartbeat_timeout``, which Ironic hands the
        agent at lookup (it beats every 0.3 to 0.6 of it). ``callback_timeout`` bounds every
        ``* wait`` state. ``automated_clean``: ``provide`` cleans the node through the agent
        (see the module docstring). ``options`` adds to or overrides the configuration, by
        section. ``hardware_type``: ``ipa-test`` (fake power and boot) or ``redfish`` (a
        Redfish BMC: ``redfish`` power and management, ``redfish-virtual-media`` boot, the
        ``agent`` inspect interface by default; ``driver_info`` names the BMC)."""
        self.hardware_type = hardware_type
        self.directory = os.path.abspath(directory)
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}"
        self.config_path = os.path.join(self.directory, "ironic.conf")
        self.log_path = os.path.join(self.directory, "ironic.log")
        self._state = os.path.join(self.directory, "state")
        self._restrict_lookup, self._fast_track = restrict_lookup, fast_track
        self._require_tls, self._heartbeat_timeout = require_tls, heartbeat_timeout
        self._callback_timeout = callback_timeout
        self._automated_clean = automated_clean
        self._options = options or {}
        self._child: Child | None = None

    # -- configuration ----------------------------------------------------------------------
    def config(self) -> dict[str, dict[str, object]]:
        """The configuration ``start()`` writes, by section."""
        state, timeout = self._state, self._callback_timeout
        sections: dict[str, dict[str, object]] = {
            "DEFAULT": {
                "auth_strategy": "noauth",
                "rpc_transport": "none",
                "host": "ipa-twisted-test-conductor",
                "my_ip": "127.0.0.1",
                "debug": True,
                "log_file": self.log_path,
                "state_path": state,
                "tempdir": os.path.join(state, "tmp"),
                "graceful_shutdown_timeout": 5,
                "force_raw_images": False,
                "enabled_hardware_types": HARDWARE_TYPE,
                "enabled_boot_interfaces": "fake,fake-rescue",
                "enabled_deploy_interfaces": "direct,custom-agent,fake",
                "enabled_management_interfaces": "noop",
                "enabled_power_interfaces": "fake",
                "enabled_inspect_interfaces": "agent,no-inspect",
                "default_inspect_interface": "no-inspect",
                "enabled_network_interfaces": "noop",
                "enabled_raid_interfaces": "no-raid,agent",
                "enabled_rescue_interfaces": "no-rescue,agent",
                "enabled_storage_interfaces": "noop",
                "enabled_vendor_interfaces": "no-vendor",
                "enabled_bios_interfaces": "no-bios",
                "enabled_console_interfaces": "no-console",
                "enabled_firmware_interfaces": "no-firmware",
            },
            "api": {
                "host_ip": "127.0.0.1",
                "port": self.port,
                "restrict_lookup": self._restrict_lookup,
                "ramdisk_heartbeat_timeout": self._heartbeat_timeout,
            },
            "database": {"connection": "sqlite:///" + os.path.join(self.directory,
                                                                  "ironic.sqlite")},
            "conductor": {
                "automated_clean": False,
                "deploy_callback_timeout": timeout,
                "clean_callback_timeout": timeout,
                "rescue_callback_timeout": timeout,
                "service_callback_timeout": timeout,
                "inspect_wait_timeout": timeout,
                "check_provision_state_interval": 2,
                "check_rescue_state_interval": 2,
                "power_state_change_timeout": 10,
                "soft_power_off_timeout": 30,
                "graceful_shutdown_timeout": 5,
            },
            "agent": {
                "require_tls": self._require_tls,
                "image_download_source": "http",
                # Ironic 39 reads this in a retry decorator at import, before the
                # configuration file is loaded: it stays at its default (6 s) whatever is
                # set here. Kept so a later Ironic that reads it at call time polls faster,
                # the same for both agents.
                "command_wait_interval": 1,
                "post_deploy_get_power_state_retries": 2,
                "post_deploy_get_power_state_retry_interval": 1,
                "deploy_logs_local_path": os.path.join(self.directory, "deploy-logs"),
                "certificates_path": os.path.join(state, "certificates"),
            },
            "deploy": {
                "fast_track": self._fast_track,
                "fast_track_timeout": min(self._heartbeat_timeout, 300),
                "http_root": os.path.join(state, "httpboot"),
                "erase_devices_priority": 0,
                "erase_devices_metadata_priority": 0,
                "configdrive_use_object_store": False,
            },
            "service_catalog": {"auth_type": "none", "endpoint_override": self.api_url},
            "dhcp": {"dhcp_provider": "none"},
            "nova": {"send_power_notifications": False},
            "oslo_concurrency": {"lock_path": os.path.join(state, "locks")},
        }
        if self.hardware_type == "redfish":
            sections["DEFAULT"].update({
                "enabled_hardware_types": "redfish",
                "enabled_boot_interfaces": "redfish-virtual-media",
                "enabled_management_interfaces": "redfish",
                "enabled_power_interfaces": "redfish",
                "default_inspect_interface": "agent",
                "enabled_deploy_interfaces": "direct",
                "isolinux_bin": "/usr/lib/ISOLINUX/isolinux.bin",
                "ldlinux_c32": "/usr/lib/syslinux/modules/bios/ldlinux.c32",
            })
            sections["redfish"] = {"use_swift": False}
        if self._automated_clean:
            sections["conductor"]["automated_clean"] = True
            for step in ("erase_devices_priority", "erase_devices_metadata_priority"):
                del sections["deploy"][step]          # the agent's own priorities
        for section, values in self._options.items():
            sections.setdefault(section, {}).update(values)
        return sections

    def _write_config(self) -> None:
        with open(self.config_path, "w") as f:
            for section, values in self.config().items():
                f.write(f"[{section}]\n")
                for key, value in values.items():
                    f.write(f"{key} = {str(value).lower() if isinstance(value, bool) else value}\n")
                f.write("\n")

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k in ("HOME", "LANG", "LC_ALL")}
        env["PATH"] = os.path.join(IRONIC_VENV, "bin") + os.pathsep + os.environ.get("PATH", "")
        env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"   # eventlet's, on every start
        return env

    # -- life cycle -------------------------------------------------------------------------
    async def start(self, timeout: float = 60) -> None:
        """Write the configuration, create the database, start Ironic and wait until its
        conductor serves the test hardware type."""
        for path in (self.directory, self._state, os.path.join(self._state, "tmp"),
                     os.path.join(self._state, "locks")):
            os.makedirs(path, exist_ok=True)
        self._write_config()
        shutil.copyfile(await self._schema(), os.path.join(self.directory, "ironic.sqlite"))
        self._child = Child([os.path.join(IRONIC_VENV, "bin", "python"), "-c",
                             _EXEC_AS_GROUP_LEADER, os.path.join(IRONIC_VENV, "bin", "ironic"),
                             "--config-file", self.config_path], env=self._env())
        try:
            await self._wait_until_ready(self._child, timeout)
        except BaseException:
            await self.stop()
            raise

    async def _wait_until_ready(self, child: Child, timeout: float) -> None:
        deadline = reactor.seconds() + timeout
        while not await self._serves_test_hardware():
            if child.ended.called:
                raise AssertionError(f"Ironic exited ({child.exit_code}) on start-up:\n"
                                     f"{child.output.decode(errors='replace')[-2000:]}"
                                     f"{self.log_excerpt()}")
            if reactor.seconds() > deadline:
                raise AssertionError(f"Ironic not ready within {timeout}s{self.log_excerpt()}")
            await sleep(0.1)

    async def _serves_test_hardware(self) -> bool:
        try:
            code, body = await self.request("GET", "/v1/drivers?type=dynamic", timeout=2)
        except Exception:
            return False
        return code == 200 and self.hardware_type in {d["name"] for d in body["drivers"]}

    async def _schema(self) -> str:
        """An empty database with Ironic's schema, made once per install of .venv-ironic."""
        template = os.path.join(IRONIC_VENV, "schema-template.sqlite")
        if os.path.exists(template):
            return template
        making = os.path.join(self.directory, "schema.sqlite")
        config = os.path.join(self.directory, "dbsync.conf")
        with open(config, "w") as f:
            f.write(f"[database]\nconnection = sqlite:///{making}\n")
        dbsync = Child([os.path.join(IRONIC_VENV, "bin", "ironic-dbsync"), "--config-file",
                        config, "create_schema"], env=self._env())
        if await dbsync.ended != 0:
            raise AssertionError(f"ironic-dbsync failed:\n{dbsync.output.decode()[-3000:]}")
        os.replace(making, template)                     # atomic: parallel runs agree
        return template

    async def stop(self) -> None:
        """Stop Ironic and every process it started; remove its state, keep log and config."""
        child, self._child = self._child, None
        if child is not None:
            group = child.process.pid
            if not child.ended.called:
                _signal_group(group, signal.SIGTERM)
                guard = reactor.callLater(10, _signal_group, group, signal.SIGKILL)
                await child.ended
                if guard.active():
                    guard.cancel()
            _signal_group(group, signal.SIGKILL)         # workers outliving the parent
        shutil.rmtree(self._state, ignore_errors=True)
        for name in ("ironic.sqlite", "schema.sqlite", "dbsync.conf"):
            if os.path.exists(os.path.join(self.directory, name)):
                os.remove(os.path.join(self.directory, name))

    # -- the log ----------------------------------------------------------------------------
    def log_lines(self, *levels: str) -> list[str]:
        """Lines of Ironic's log at these levels (default ERROR), in order; oslo.log gives
        each line of a traceback the prefix of its message."""
        wanted = set(levels or ("ERROR",))
        try:
            with open(self.log_path, errors="replace") as f:
                return [line.rstrip("\n") for line in f if _level(line) in wanted]
        except FileNotFoundError:
            return []

    def log_excerpt(self, lines: int = 40) -> str:
        """Ironic's last errors and warnings, for assertion messages."""
        found = self.log_lines("ERROR", "WARNING")
        return (f"\n--- Ironic log {self.log_path}, last errors and warnings:\n"
                + "\n".join(found[-lines:]))

    # -- REST -------------------------------------------------------------------------------
    async def request(self, method: str, path: str, json: Any = None,
                      microversion: str = MICROVERSION, *,
                      expect: Iterable[int] | None = None,
                      timeout: float = 30) -> tuple[int, Any]:
        """``(status, decoded JSON or None)`` for ``method`` on ``path`` (``/v1/...``);
        IronicError if ``expect`` is given and does not hold the status."""
        headers = {"X-OpenStack-Ironic-API-Version": microversion,
                   "Accept": "application/json"}
        response = await treq.request(method, self.api_url + path, json=json,
                                      headers=headers, timeout=timeout, persistent=False)
        content = await response.content()
        body = _json_or_text(content)
        if expect is not None and response.code not in set(expect):
            raise IronicError(f"{method} {path} answered {response.code}: "
                              f"{fault_string(body)}{self.log_excerpt(10)}", response.code, body)
        return response.code, body

    async def node(self, uuid: str) -> dict[str, Any]:
        """The node's current record."""
        return (await self.request("GET", f"/v1/nodes/{uuid}", expect=[200]))[1]

    async def set_provision_state(self, uuid: str, target: str, **body: Any) -> None:
        """Ask for a provision state change (``manage``, ``provide``, ``active``, ``clean``,
        ``inspect``, ``deleted``...); the change happens in the background."""
        await self.request("PUT", f"/v1/nodes/{uuid}/states/provision",
                           {"target": target, **body}, expect=[202])

    async def set_power_state(self, uuid: str, target: str, timeout: float = 30) -> None:
        """``power on``, ``power off``, ``rebooting``; waits for the fake power to follow.
        Wipes the agent's token and URL, as a reboot of a real machine would."""
        await self.request("PUT", f"/v1/nodes/{uuid}/states/power", {"target": target},
                           expect=[202])
        wanted = "power on" if target == "rebooting" else target
        await self._wait(uuid, lambda n: n["power_state"] == wanted and
                         n["target_power_state"] is None, f"power {wanted!r}", timeout)

    async def enroll_node(self, macs: Sequence[str],
                          driver_info: Mapping[str, Any] | None = None,
                          properties: Mapping[str, Any] | None = None,
                          instance_info: Mapping[str, Any] | None = None, *,
                          state: str = "available", power: str | None = "power on",
                          timeout: float = 60, **fields: Any) -> str:
        """Create a node of the test hardware type with a port per MAC, take it to ``state``
        (``enroll``, ``manageable`` or ``available``) and its (fake) power to ``power``.

        ``fields`` are more node fields (``name``, ``deploy_interface``, ``inspect_interface``,
        ...). ``driver_info`` adds to ``deploy_forces_oob_reboot: true``, which keeps Ironic
        from asking the agent to power off the machine (it uses the fake power instead)."""
        oob = {"deploy_forces_oob_reboot": True} if self.hardware_type == HARDWARE_TYPE else {}
        body = {"driver": self.hardware_type,
                "driver_info": {**oob, **(driver_info or {})},
                "properties": dict(properties or {}),
                "instance_info": dict(instance_info or {}), **fields}
        uuid: str = (await self.request("POST", "/v1/nodes", body, expect=[201]))[1]["uuid"]
        for mac in macs:
            await self.request("POST", "/v1/ports", {"node_uuid": uuid, "address": mac},
                               expect=[201])
        if state in ("manageable", "available"):
            # enroll -> verifying -> manageable: validates the interfaces, syncs power.
            await self.set_provision_state(uuid, "manage")
            await self.wait_for_state(uuid, "manageable", timeout)
        if power is not None:
            await self.set_power_state(uuid, power, timeout)
        if state == "available":
            # manageable -> cleaning -> available: no cleaning, as automated_clean is off.
            await self.set_provision_state(uuid, "provide")
            await self.wait_for_state(uuid, "available", timeout)
        elif state not in ("enroll", "manageable"):
            raise ValueError(f"enroll_node cannot reach {state!r}")
        return uuid

    async def deploy(self, uuid: str, instance_info: Mapping[str, Any] | None = None,
                     configdrive: str | Mapping[str, Any] | None = None, **body: Any) -> None:
        """Add ``instance_info`` to the node and ask for ``active``: without fast track, an
        available node goes through ``deploying`` to ``wait call-back``, where it waits for
        the agent. For ``direct``: ``image_source`` an http URL (handed to the agent as is:
        ``[agent]image_download_source=http``) with ``image_os_hash_algo`` and
        ``image_os_hash_value`` (or ``image_checksum``), and ``root_device`` hints naming a
        scratch device: the agent writes the image to the disk they select."""
        if instance_info:
            patch = [{"op": "add", "path": f"/instance_info/{key}", "value": value}
                     for key, value in instance_info.items()]
            await self.request("PATCH", f"/v1/nodes/{uuid}", patch, expect=[200])
        if configdrive is not None:
            body["configdrive"] = configdrive
        await self.set_provision_state(uuid, "active", **body)

    async def wait_for_state(self, uuid: str, state: str, timeout: float = 60) -> dict[str, Any]:
        """The node once its provision state is ``state``; AssertionError with its
        ``last_error`` and Ironic's log if it fails or does not get there in ``timeout``."""
        return await self._wait(uuid, lambda n: n["provision_state"] == state,
                                f"provision state {state!r}", timeout,
                                failed=lambda n: n["provision_state"] in FAILED_STATES
                                and state not in FAILED_STATES)

    async def _wait(self, uuid: str, done: Callable[[dict[str, Any]], bool], what: str,
                    timeout: float,
                    failed: Callable[[dict[str, Any]], bool] = lambda node: False,
                    ) -> dict[str, Any]:
        deadline = reactor.seconds() + timeout
        while True:
            node = await self.node(uuid)
            if done(node):
                return node
            if failed(node) or reactor.seconds() > deadline:
                reason = "failed" if failed(node) else f"not reached in {timeout}s"
                raise AssertionError(
                    f"node {uuid}: {what} {reason}; provision state {node['provision_state']!r}"
                    f" (target {node['target_provision_state']!r}), power "
                    f"{node['power_state']!r}, last_error: {node['last_error']!r}"
                    f"{self.log_excerpt()}")
            await sleep(0.25)


def _json_or_text(content: bytes) -> Any:
    if not content:
        return None
    try:
        return json.loads(content)
    except ValueError:
        return content.decode(errors="replace")


def _level(line: str) -> str | None:
    """The level of an oslo.log line: ``2026-01-02 03:04:05.678 1234 ERROR name [...] ...``."""
    fields = line.split(" ", 4)
    return fields[3] if len(fields) > 4 and fields[2].isdigit() else None


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass


__all__ = ["FAILED_STATES", "HARDWARE_TYPE", "IRONIC_VENV", "IronicError", "MICROVERSION",
           "RealIronic", "fault_string", "skip_reason"]


async def start_ironic(test: Any, directory: str, **options: Any) -> RealIronic:
    """A started ``RealIronic(directory/ironic, **options)``, stopped in ``test``'s cleanup."""
    ironic = RealIronic(os.path.join(directory, "ironic"), **options)
    await ironic.start()
    test.addCleanup(ironic.stop)
    return ironic


async def set_up_one_disk_node(test: Any, disk_size: int, tools: Sequence[str] = ()) -> None:
    """``test``'s set-up for a real Ironic driving a sandboxed agent with one loop disk:
    skips with the reason when it cannot run; sets ``dir``, ``runner``, ``loop`` and
    ``ironic`` (restricted lookup, 10 s heartbeat timeout)."""
    from ipa_twisted.process import ProcessRunner
    from ipa_twisted.testing.sandbox import attach_loop_devices
    reason = skip_reason(macs=True, tools=tools, loop_devices=True)
    if reason:
        raise test.skipTest(reason)
    test.dir = os.path.abspath(test.mktemp())
    test.runner = ProcessRunner(reactor, reactor)
    test.loop = (await attach_loop_devices(test.runner, os.path.join(test.dir, "disks"),
                                           [disk_size], test.addCleanup))[0]
    test.ironic = await start_ironic(test, test.dir, restrict_lookup=True,
                                     heartbeat_timeout=10)


def start_agent(test: Any, ironic: RealIronic, directory: str, *, name: str = "agent",
                config: str = "", wrap: Callable[[list[str]], list[str]] | None = None,
                env: dict[str, str] | None = None, debug: bool = True,
                sandbox: Sequence[LoopDevice] | None = None) -> Child:
    """A real ``twistd ipa`` looking ``ironic`` up, on a free port of 127.0.0.1.

    ``config`` adds ``[DEFAULT]`` lines; power commands are harmless and the kernel command
    line is empty. ``wrap`` rewrites the argv (a network namespace); ``sandbox`` runs it in
    the disk sandbox with those loop devices, its only disks (``include_loop_devices``);
    ``env`` replaces ``tests.processes.child_env()``. The process is killed in ``test``'s
    cleanup.
    """
    from tests.processes import start_agent as start
    return start(test, directory, api_url=ironic.api_url, name=name, config=config,
                 wrap=wrap, env=env, debug=debug, sandbox=sandbox)
