"""The burn-in steps (``ipa_twisted.hardware.generic.burnin``): on a FakeRunner answering with
outputs recorded from the real tools (``tests/burnin_recordings.py``), then with the real
stress-ng, fio on a loop device in the disk sandbox, and fio's net engine between two runs inside a network
namespace the test makes."""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SkipTest, TestCase

from ipa_twisted.config import AgentConfig
from ipa_twisted.context import HardwareContext
from ipa_twisted.errors import CleaningError, CommandExecutionError
from ipa_twisted.hardware.generic import burnin
from ipa_twisted.hardware.generic.burnin import BurnIn
from ipa_twisted.hardware.generic.manager import GenericHardwareManager
from ipa_twisted.hardware.inventory import BlockDevice
from ipa_twisted.process import ProcessRunner, descendants
from ipa_twisted.testing.fake_process import Exit, FakeRunner
from ipa_twisted.testing.sandbox import (LoopOnlyRunner, attach_loop_devices,
                                         loop_devices_unavailable, sandbox_argv, sandbox_env)
from tests import burnin_recordings as rec
from tests import netns


class Disks:
    """A DiskSource listing the given disks."""

    def __init__(self, *names: str) -> None:
        self.devices = [BlockDevice(name=name, model="disk", size=8 << 20, rotational=False,
                                    serial=f"serial-{os.path.basename(name)}")
                        for name in names]

    async def list_block_devices(self, include_partitions: bool = False) -> list[BlockDevice]:
        return list(self.devices)

    def is_read_only(self, name: str) -> bool:
        return False

    def is_virtual_media(self, device: BlockDevice) -> bool:
        return False


def node(**driver_info: Any) -> dict[str, Any]:
    return {"uuid": "node-1", "driver_info": driver_info, "properties": {}}


def smart(status: str) -> bytes:
    """smartctl -ja's JSON reduced to the field read (its path as in smartctl 7.3's output
    for an ATA disk; no SMART disk here to record it from)."""
    return json.dumps({"ata_smart_data": {"self_test": {"status": {"string": status}}}}
                      ).encode()


class BurnInUnitTests(TestCase):

    def setUp(self) -> None:
        self.clock = Clock()
        self.progress: list[Any] = []

    def burnin(self, runner: FakeRunner, disks: Disks | None = None) -> BurnIn:
        context = HardwareContext(AgentConfig(), runner, self.clock, None,
                                  report_progress=self.progress.append)
        return BurnIn(context, disks or Disks("/dev/sda"))

    # -- step lists --------------------------------------------------------------------------
    def test_step_lists_as_the_reference(self) -> None:
        manager = GenericHardwareManager()
        manager.bind(HardwareContext(AgentConfig(), FakeRunner(), self.clock, None))
        clean = {s["step"]: s for s in manager.get_clean_steps({}, [])}
        service = {s["step"]: s for s in manager.get_service_steps({}, [])}
        names = {"burnin_cpu", "burnin_gpu", "burnin_disk", "burnin_memory", "burnin_network"}
        for name in names:
            self.assertEqual(clean[name], {"step": name, "priority": 0, "interface": "deploy",
                                           "reboot_requested": False, "abortable": True})
            self.assertTrue(callable(getattr(manager, name)))
        self.assertEqual(names - {"burnin_disk"}, {n for n in service if n in names})
        self.assertNotIn("burnin_disk", service)
        self.assertNotIn("burnin_cpu", {s["step"] for s in manager.get_deploy_steps({}, [])})

    # -- stress-ng ----------------------------------------------------------------------------
    async def test_cpu_defaults(self) -> None:
        runner = FakeRunner({("stress-ng",): (b"", rec.STRESS_NG_CPU_STDERR)})
        await self.burnin(runner).stress_ng(node(), "cpu")
        [call] = runner.calls
        self.assertEqual(call.argv, ("stress-ng", "--cpu", "0", "--timeout", "86400",
                                     "--metrics-brief"))
        self.assertEqual(call.kwargs["timeout"], 86400 + burnin.GRACE)
        [progress] = self.progress
        self.assertEqual(progress.serialize()["state"], "done")
        self.assertEqual(progress.serialize()["percent"], 100.0)

    async def test_cpu_from_driver_info(self) -> None:
        runner = FakeRunner({("stress-ng",): (b"", rec.STRESS_NG_CPU_STDERR)})
        await self.burnin(runner).stress_ng(
            node(agent_burnin_cpu_timeout=5, agent_burnin_cpu_cpu=2,
                 agent_burnin_cpu_outputfile="/var/log/cpu.log"), "cpu")
        self.assertEqual(runner.argvs, [("stress-ng", "--cpu", "2", "--timeout", "5",
                                         "--metrics-brief", "--log-file", "/var/log/cpu.log")])

    async def test_memory_vm_stressor(self) -> None:
        runner = FakeRunner({("stress-ng",): (b"", rec.STRESS_NG_VM_STDERR)})
        await self.burnin(runner).stress_ng(node(agent_burnin_vm_timeout=3), "vm")
        self.assertEqual(runner.argvs, [("stress-ng", "--vm", "0", "--timeout", "3",
                                         "--vm-bytes", "98%", "--metrics-brief")])
        runner = FakeRunner({("stress-ng",): (b"", rec.STRESS_NG_VM_STDERR)})
        await self.burnin(runner).stress_ng(
            node(**{"agent_burnin_vm_vm": 1, "agent_burnin_vm_vm-bytes": "10%"}), "vm")
        self.assertEqual(runner.argvs[0][2], "1")
        self.assertIn(("--vm-bytes", "10%"), list(zip(runner.argvs[0], runner.argvs[0][1:])))

    async def test_stress_ng_failure_and_absence(self) -> None:
        runner = FakeRunner({("stress-ng",): Exit(1, b"", b"Invalid number abc\n")})
        with self.assertRaisesRegex(CommandExecutionError, r"stress-ng \(cpu\) failed"):
            await self.burnin(runner).stress_ng(node(agent_burnin_cpu_timeout="abc"), "cpu")
        self.assertIsNone(runner.calls[0].kwargs["timeout"])  # not a number: no kill timer
        self.assertEqual(self.progress[-1].serialize()["state"], "failed")
        runner = FakeRunner(missing=["stress-ng"])
        with self.assertRaisesRegex(CommandExecutionError, "stress-ng not found"):
            await self.burnin(runner).stress_ng(node(), "vm")

    def test_progress_while_running(self) -> None:
        runner = FakeRunner({("stress-ng",): (b"", rec.STRESS_NG_CPU_STDERR)}, hold=True)
        done = Deferred.fromCoroutine(
            self.burnin(runner).stress_ng(node(agent_burnin_cpu_timeout=100), "cpu"))
        self.clock.advance(25)
        state = self.progress[0].serialize()
        self.assertEqual((state["state"], state["phase"], state["percent"], state["elapsed"]),
                         ("running", "stress-ng (cpu)", 25.0, 25.0))
        self.assertEqual(state["command"][0], "stress-ng")
        runner.release()
        self.successResultOf(done)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the progress log loop stopped

    def test_abort_stops_the_tool_and_the_progress(self) -> None:
        """Ironic aborts the (abortable) step: the command's Deferred is cancelled."""
        runner = FakeRunner({("fio",): rec.FIO_NET_WRITER_STDOUT}, hold=True)
        done = Deferred.fromCoroutine(self.burnin(runner).fio_network(node(
            agent_burnin_fio_network_config={"role": "writer", "partner": "b"})))
        self.assertEqual(runner.pending, 1)
        done.cancel()
        self.failureResultOf(done)
        self.assertEqual(self.progress[0].serialize()["state"], "failed")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    # -- fio on disks ---------------------------------------------------------------------------
    async def test_fio_disk_every_disk(self) -> None:
        runner = FakeRunner({("fio",): rec.FIO_DISK_STDOUT})
        await self.burnin(runner, Disks("/dev/sda", "/dev/nvme0n1")).fio_disk(
            node(agent_burnin_fio_disk_runtime=30, agent_burnin_fio_disk_loops=1,
                 agent_burnin_fio_disk_outputfile="/tmp/fio.json"))
        [argv] = runner.argvs
        self.assertEqual(argv[:24], (
            "fio", "--rw", "readwrite", "--bs", "4k", "--direct", "1", "--ioengine", "libaio",
            "--iodepth", "32", "--verify", "crc32c", "--verify_dump", "1",
            "--continue_on_error", "verify", "--loops", "1", "--runtime", "30",
            "--time_based", "--output-format", "json"))
        self.assertEqual(argv[24:], ("--output", "/tmp/fio.json", "--name", "/dev/sda",
                                     "--name", "/dev/nvme0n1"))
        self.assertIsNone(runner.calls[0].kwargs["timeout"])

    async def test_fio_disk_skips_protected_disks(self) -> None:
        runner = FakeRunner({("fio",): rec.FIO_DISK_STDOUT})
        info = node()
        info["properties"] = {"skip_block_devices": [{"name": "/dev/sdb"}]}
        await self.burnin(runner, Disks("/dev/sda", "/dev/sdb")).fio_disk(info)
        self.assertNotIn("/dev/sdb", runner.argvs[0])
        self.assertIn("/dev/sda", runner.argvs[0])

    async def test_fio_disk_failure(self) -> None:
        runner = FakeRunner({("fio",): Exit(1, b"", b"fio: verify failed\n")})
        with self.assertRaisesRegex(CommandExecutionError, r"fio \(disk\) failed"):
            await self.burnin(runner).fio_disk(node())

    def test_smart_long_self_test(self) -> None:
        statuses = {"/dev/sda": [smart("Self-test routine in progress"),
                                 smart("Self-test routine completed without error")],
                    "/dev/sdb": [rec.SMARTCTL_NO_SMART_JSON]}

        def status(argv: tuple[str, ...]) -> Any:
            answers = statuses[argv[-1]]
            return answers.pop(0) if len(answers) > 1 else answers[0]

        runner = FakeRunner({("fio",): rec.FIO_DISK_STDOUT, ("smartctl", "-t", "long"): b"",
                             ("smartctl", "-ja"): status})
        done = Deferred.fromCoroutine(self.burnin(runner, Disks("/dev/sda", "/dev/sdb"))
                                      .fio_disk(node(agent_burnin_fio_disk_smart_test=True)))
        self.assertNoResult(done)  # sda's test still runs
        self.clock.advance(burnin.SMART_POLL_INTERVAL)
        self.successResultOf(done)
        self.assertEqual([a for a in runner.argvs if a[1] == "-t"],
                         [("smartctl", "-t", "long", "/dev/sda"),
                          ("smartctl", "-t", "long", "/dev/sdb")])

    async def test_smart_failures(self) -> None:
        runner = FakeRunner({("fio",): rec.FIO_DISK_STDOUT, ("smartctl", "-t", "long"): b"",
                             ("smartctl", "-ja"): smart("Completed: read failure")})
        with self.assertRaisesRegex(CleaningError, "SMART test failed for /dev/sda"):
            await self.burnin(runner).fio_disk(node(agent_burnin_fio_disk_smart_test=True))
        runner = FakeRunner({("fio",): rec.FIO_DISK_STDOUT,
                             ("smartctl", "-t", "long"): Exit(4)})
        with self.assertRaisesRegex(CleaningError, "failed to start SMART self test on "
                                                   "/dev/sda"):
            await self.burnin(runner).fio_disk(node(agent_burnin_fio_disk_smart_test=True))

    # -- fio over the network -------------------------------------------------------------------
    def test_network_writer_then_reader(self) -> None:
        runner = FakeRunner({("fio", "--ioengine", "net"): rec.FIO_NET_WRITER_STDOUT})
        done = Deferred.fromCoroutine(self.burnin(runner).fio_network(node(
            agent_burnin_fio_network_config={"role": "writer", "partner": "10.0.0.2"},
            agent_burnin_fio_network_runtime=10,
            agent_burnin_fio_network_outputfile="/tmp/net")))
        self.assertEqual(len(runner.calls), 1)   # the reader waits for the partner's writer
        self.assertEqual(self.progress[0].serialize()["percent"], 0.0)
        self.clock.advance(burnin.NETWORK_READER_CYCLE)
        self.successResultOf(done)
        common = ("fio", "--ioengine", "net", "--port", "9000", "--fill_device", "1",
                  "--group_reporting", "--gtod_reduce", "1", "--numjobs", "16")
        self.assertEqual(runner.argvs, [
            (*common, "--name", "writer", "--rw", "write", "--runtime", "10", "--time_based",
             "--listen", "--output-format", "json", "--output", "/tmp/net.writer"),
            (*common, "--name", "reader", "--rw", "read", "--hostname", "10.0.0.2",
             "--output-format", "json", "--output", "/tmp/net.reader")])

    def test_reader_waits_for_its_writer(self) -> None:
        attempts = [Exit(16, rec.FIO_NET_REFUSED_STDOUT), rec.FIO_NET_READER_STDOUT]
        runner = FakeRunner({("fio", "--ioengine", "net"): lambda argv: (
            attempts.pop(0) if "reader" in argv else rec.FIO_NET_WRITER_STDOUT)})
        done = Deferred.fromCoroutine(self.burnin(runner).fio_network(node(
            agent_burnin_fio_network_config={"role": "reader", "partner": "host-a"})))
        self.assertEqual(runner.calls, [])   # the writer's jobs are given time to listen
        self.clock.advance(burnin.NETWORK_READER_CYCLE)
        self.assertEqual(len(runner.calls), 1)   # refused: waits again
        self.clock.advance(burnin.NETWORK_READER_CYCLE)
        self.successResultOf(done)
        self.assertEqual([a[13] for a in runner.argvs], ["reader", "reader", "writer"])

    async def test_writer_failure_is_not_retried(self) -> None:
        runner = FakeRunner({("fio",): Exit(16)})
        with self.assertRaisesRegex(CommandExecutionError, r"fio \(network\) failed"):
            await self.burnin(runner).fio_network(node(
                agent_burnin_fio_network_config={"role": "writer", "partner": "b"}))
        self.assertEqual(len(runner.calls), 1)

    async def test_network_configuration_errors(self) -> None:
        runner = FakeRunner()
        cases = [
            (node(agent_burnin_fio_network_pairing_backend_url="etcd3+http://etcd:2379"),
             "dynamic pairing through a coordination backend .* is not supported"),
            (node(), "missing agent_burnin_fio_network_pairing_backend_url"),
            (node(agent_burnin_fio_network_config={"role": "boss", "partner": "b"}),
             "unknown role: boss"),
            (node(agent_burnin_fio_network_config={"role": "reader"}), "failed to find partner"),
            (node(agent_burnin_fio_network_config="writer"), "must be an object"),
        ]
        for info, message in cases:
            with self.assertRaisesRegex(CleaningError, message):
                await self.burnin(runner).fio_network(info)
        self.assertEqual(runner.calls, [])

    # -- gpu-burn -------------------------------------------------------------------------------
    async def test_gpu_burn_not_installed(self) -> None:
        runner = FakeRunner()
        missing = os.path.abspath(self.mktemp())
        with self.assertRaisesRegex(CommandExecutionError, f"{missing}/gpu_burn is not "
                                    "installed .*agent_burnin_gpu_install_dir"):
            await self.burnin(runner).gpu_burn(node(agent_burnin_gpu_install_dir=missing))
        self.assertEqual(runner.calls, [])

    async def test_gpu_burn_count_and_run(self) -> None:
        install = os.path.abspath(self.mktemp())
        os.makedirs(install)
        with open(os.path.join(install, "gpu_burn"), "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(os.path.join(install, "gpu_burn"), 0o755)
        listing = b"ID 0: NVIDIA A100, 40536MB\nID 1: NVIDIA A100, 40536MB\n"
        runner = FakeRunner({("env", f"--chdir={install}", "./gpu_burn", "-l"): listing,
                             ("env", f"--chdir={install}", "./gpu_burn", "-m"): b"OK\n"})
        info = node(agent_burnin_gpu_install_dir=install, agent_burnin_gpu_count=2,
                    agent_burnin_gpu_timeout=60)
        await self.burnin(runner).gpu_burn(info)
        self.assertEqual(runner.argvs[-1], ("env", f"--chdir={install}", "./gpu_burn", "-m",
                                            "95%", "60"))
        info["driver_info"]["agent_burnin_gpu_count"] = 3
        with self.assertRaisesRegex(CleaningError, "2 found but 3 expected"):
            await self.burnin(runner).gpu_burn(info)


class RealToolTests(TestCase):
    """stress-ng and fio run for real, for a few seconds."""

    timeout = 120

    def setUp(self) -> None:
        self.real = ProcessRunner(reactor, reactor)
        self.progress: list[Any] = []

    def context(self, runner: Any) -> HardwareContext:
        return HardwareContext(AgentConfig(), runner, reactor, reactor,
                               report_progress=self.progress.append)

    async def test_stress_ng_cpu_and_memory(self) -> None:
        if shutil.which("stress-ng") is None:
            raise SkipTest("needs stress-ng (Debian package stress-ng)")
        manager = GenericHardwareManager()
        manager.bind(self.context(self.real))
        started = reactor.seconds()
        await manager.burnin_cpu(node(agent_burnin_cpu_timeout=2, agent_burnin_cpu_cpu=1), [])
        await manager.burnin_memory(node(**{"agent_burnin_vm_timeout": 1,
                                            "agent_burnin_vm_vm": 1,
                                            "agent_burnin_vm_vm-bytes": "32M"}), [])
        self.assertGreaterEqual(reactor.seconds() - started, 3)
        self.assertEqual([p.serialize()["state"] for p in self.progress], ["done", "done"])
        with self.assertRaisesRegex(CommandExecutionError, r"stress-ng \(cpu\) failed"):
            await manager.burnin_cpu(node(agent_burnin_cpu_timeout="soon"), [])

    async def test_abort_kills_stress_ng_and_its_workers(self) -> None:
        if shutil.which("stress-ng") is None:
            raise SkipTest("needs stress-ng (Debian package stress-ng)")
        manager = GenericHardwareManager()
        manager.bind(self.context(self.real))
        step = Deferred.fromCoroutine(manager.burnin_cpu(node(agent_burnin_cpu_timeout=60,
                                                              agent_burnin_cpu_cpu=1), []))
        await deferLater(reactor, 1.0)
        workers = descendants(os.getpid())
        self.assertGreaterEqual(len(workers), 2)   # stress-ng and its cpu worker
        started = reactor.seconds()
        step.cancel()
        with self.assertRaises(CancelledError):
            await step
        await deferLater(reactor, 0.5)
        self.assertLess(reactor.seconds() - started, 10)
        self.assertEqual([pid for pid in workers if _alive(pid)], [])
        self.assertEqual(self.progress[0].serialize()["state"], "failed")

    async def test_fio_on_a_loop_device(self) -> None:
        reason = loop_devices_unavailable(["fio"])
        if reason is not None:
            raise SkipTest(reason)
        workdir = os.path.abspath(self.mktemp())
        [loop] = await attach_loop_devices(self.real, workdir, [16 << 20], self.addCleanup)
        # fio runs in the disk sandbox (a /dev holding only the loop device), and may name
        # no other device (LoopOnlyRunner).
        sandboxed = Wrapping(self.real, lambda argv: sandbox_argv([loop], argv), sandbox_env())
        runner = LoopOnlyRunner(sandboxed, [loop.path])
        outputfile = os.path.join(workdir, "fio.json")
        await BurnIn(self.context(runner), Disks(loop.path)).fio_disk(
            node(agent_burnin_fio_disk_runtime=2, agent_burnin_fio_disk_loops=1,
                 agent_burnin_fio_disk_outputfile=outputfile))
        with open(outputfile) as f:
            report = json.load(f)
        [job] = report["jobs"]
        self.assertEqual(job["jobname"], loop.path)
        self.assertEqual(job["error"], 0)
        self.assertGreater(job["write"]["io_bytes"], 0)
        self.assertGreater(job["read"]["io_bytes"], 0)
        self.assertEqual(runner.refused, [])


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a parent that does not reap is dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] != b"Z"


class Wrapping:
    """A runner whose programs run wrapped (in a network namespace, in the disk sandbox)."""

    def __init__(self, runner: ProcessRunner, wrap: Callable[[Sequence[str]], list[str]],
                 env: dict[str, str] | None = None) -> None:
        self._runner, self._wrap, self._env = runner, wrap, env

    def which(self, name: str) -> str | None:
        return self._runner.which(name)

    def execute(self, *argv: str, **kwargs: Any) -> Deferred[tuple[bytes, bytes]]:
        if self._env is not None:
            kwargs["env"] = {**self._env, **kwargs.get("env", {})}
        return self._runner.execute(*self._wrap(argv), **kwargs)


class NetworkBurnInTests(TestCase):
    """Two burn-ins paired statically, across a veth pair between two namespaces."""

    timeout = 120

    async def test_writer_and_reader_swap(self) -> None:
        reason = netns.skip_reason("fio")
        if reason is not None:
            raise SkipTest(reason)
        real = ProcessRunner(reactor, reactor)
        a, b = await netns.make_namespace(self), await netns.make_namespace(self)
        veth_a, veth_b = netns.unique("bia"), netns.unique("bib")
        await netns.ip("link", "add", veth_a, "netns", a, "type", "veth", "peer", "name",
                       veth_b, "netns", b)
        for ns, veth, address in ((a, veth_a, "10.99.15.1/24"), (b, veth_b, "10.99.15.2/24")):
            await netns.ip("-n", ns, "addr", "add", address, "dev", veth)
            await netns.ip("-n", ns, "link", "set", veth, "up")
            await netns.ip("-n", ns, "link", "set", "lo", "up")
        outputs = os.path.abspath(self.mktemp())
        os.makedirs(outputs)
        sides: list[Deferred[None]] = []
        for ns, role, partner in ((a, "writer", "10.99.15.2"), (b, "reader", "10.99.15.1")):
            in_ns = Wrapping(real, functools.partial(netns.in_namespace, ns))
            burnin_ = BurnIn(HardwareContext(AgentConfig(), in_ns, reactor, reactor), Disks())
            burnin_.reader_cycle = 0.5
            sides.append(Deferred.fromCoroutine(burnin_.fio_network(node(
                agent_burnin_fio_network_config={"role": role, "partner": partner},
                agent_burnin_fio_network_runtime=2,
                agent_burnin_fio_network_outputfile=os.path.join(outputs, ns)))))
        for side in sides:
            self.addCleanup(side.cancel)   # a side left waiting after the other failed
        for side in sides:
            await side
        moved = {}
        for ns, first, second in ((a, "writer", "reader"), (b, "reader", "writer")):
            for role in (first, second):
                with open(os.path.join(outputs, f"{ns}.{role}")) as f:
                    [job] = json.load(f)["jobs"]
                moved[ns, role] = job["write" if role == "writer" else "read"]["io_bytes"]
        self.assertTrue(all(moved.values()), moved)
