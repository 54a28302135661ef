"""``python -m tests.sandboxed_iscsi SPEC``: an iSCSI target of the agent, and a client of it.

Run by ``tests/test_iscsi_ext.py`` inside the disk sandbox *and* a private network
namespace (``unshare --net``), so tgtd's portals (0.0.0.0:3260 and the one asked for) and
its control socket (on a private tmpfs /run) are seen by nothing else. It:

1. brings ``lo`` up and mounts a tmpfs on /run;
2. runs ``iscsi.start_iscsi_target`` through the agent (``SPEC["params"]``) on
   ``SPEC["device"]``;
3. lists the targets with ``tgtadm --mode target --op show``;
4. logs in with qemu's user-space initiator (libiscsi) and copies the LUN to
   ``SPEC["copy_to"]`` (``qemu-img convert iscsi://127.0.0.1:PORT/IQN/1``) when
   ``SPEC["copy_to"]`` is set;
5. cleans up as ``image.install_bootloader`` does (targets deleted, tgtd stopped);
6. kills whatever tgtd is left in this network namespace, reaps it (this process is made
   the child subreaper first: tgtd daemonizes, and orphans must not become zombies of an
   init that does not reap), and prints one JSON line.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred

from ipa_twisted.agent import Agent
from ipa_twisted.config import AgentConfig
from ipa_twisted.extensions import default_extensions
from ipa_twisted.hardware.dispatch import HardwareManagers
from ipa_twisted.process import ProcessExecutionError, ProcessRunner
from tests.processes import poll
from tests.sandboxed_agent import LoopManager


def _tgtd_here() -> list[int]:
    """tgtd processes in this network namespace."""
    ours = os.readlink("/proc/self/ns/net")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != "tgtd":
                    continue
            if os.readlink(f"/proc/{entry}/ns/net") == ours:
                found.append(int(entry))
        except OSError:
            continue
    return found


PR_SET_CHILD_SUBREAPER = 36


def _reap() -> None:
    """Reap orphans (daemons) reparented to this process."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


async def main(reactor: Any, spec: dict[str, Any]) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    runner = ProcessRunner(reactor, reactor)
    report: dict[str, Any] = {}
    try:
        await runner.execute("ip", "link", "set", "lo", "up")
        await runner.execute("mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", "tmpfs",
                             "/run")
        manager = LoopManager(spec["device"], "bios")
        agent = Agent(AgentConfig(), reactor, runner,
                      managers=HardwareManagers([(manager, 3)]), reactor=reactor,
                      extensions=default_extensions())
        result = await agent.execute_command("iscsi.start_iscsi_target", spec["params"])
        await result.wait()
        serialized = result.serialize()
        report["status"] = serialized["command_status"]
        report["result"] = serialized["command_result"]
        report["error"] = serialized["command_error"]
        if report["status"] != "SUCCEEDED":
            return
        out, _ = await runner.execute("tgtadm", "--lld", "iscsi", "--mode", "target",
                                      "--op", "show")
        report["show"] = out.decode()
        iqn = report["result"]["iscsi_target_iqn"]
        port = spec["params"].get("portal_port") or 3260
        if spec.get("copy_to"):
            try:
                await runner.execute("qemu-img", "convert", "-f", "raw", "-O", "raw",
                                     f"iscsi://127.0.0.1:{port}/{iqn}/1", spec["copy_to"],
                                     timeout=120)
                report["copied"] = True
            except ProcessExecutionError as e:
                report["copied"] = False
                report["copy_error"] = str(e)
        extension = agent.extensions["iscsi"]
        await extension.clean_up_started_target(spec["device"])  # type: ignore[attr-defined]
        try:
            await poll(lambda: not _tgtd_here(), timeout=10)
            report["tgtd_stopped"] = True
        except AssertionError:
            report["tgtd_stopped"] = False
    finally:
        leftovers = _tgtd_here()
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        report["killed"] = leftovers
        try:
            await poll(lambda: not _tgtd_here(), timeout=10)
        except AssertionError:
            report["still_running"] = _tgtd_here()
        _reap()
        print(json.dumps(report, default=str))


if __name__ == "__main__":
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, json.loads(sys.argv[1]))))
