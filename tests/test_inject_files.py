"""Tests for the inject_files deploy step (ipa_twisted.deploy.inject).

Unit tests use a FakeRunner whose ``mount`` fills the mount point with a fake partition's
files and whose ``umount`` keeps what was written (with modes) and empties it. The real
test (root) runs the step through the agent in the disk sandbox on a loop device with two
ext4 partitions, then reads the result with ``debugfs`` (read-only, nothing mounted).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import sys
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.static import Data

from ipa_twisted import errors
from ipa_twisted.deploy.inject import INJECT_FILES_STEP, inject_files, validate_files
from ipa_twisted.hardware.interface import HardwareManager
from ipa_twisted.context import HardwareContext
from ipa_twisted.process import ProcessRunner
from ipa_twisted.testing.fake_process import Exit, FakeRunner
from ipa_twisted.testing.fake_system import FakeSystem
from ipa_twisted.testing.sandbox import (attach_loop_devices, loop_devices_unavailable,
                                         run_in_sandbox)

MiB = 1 << 20


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Manager(HardwareManager):
    """Installs on ``device``; its ``inject_files`` step is ``deploy.inject``'s."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.asked_for_device = 0

    def evaluate_hardware_support(self) -> int:
        return 1

    async def install_device(self) -> str:
        self.asked_for_device += 1
        return self.device

    async def inject_files(self, node: Any, ports: Any, files: Any = None,
                           verify_ca: bool = True) -> None:
        await inject_files(self.context, node, ports, files, verify_ca,
                           install_device=self.install_device)


class Partitions:
    """Fake ``mount``/``umount``: each partition's files survive between mounts."""

    def __init__(self, contents: dict[str, dict[str, bytes]]) -> None:
        self.contents = contents
        self.modes: dict[str, dict[str, int]] = {}
        self.where: dict[str, str] = {}

    def mount(self, argv: tuple[str, ...]) -> bytes | Exit:
        source, target = argv[-2], argv[-1]
        if source not in self.contents:
            return Exit(32, b"", b"mount: wrong fs type")
        self.where[target] = source
        for relative, data in self.contents[source].items():
            path = os.path.join(target, relative)
            if relative.endswith("/"):
                os.makedirs(path, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        return b""

    def umount(self, argv: tuple[str, ...]) -> bytes:
        target = argv[-1]
        source = self.where.pop(target)
        files: dict[str, bytes] = {}
        modes: dict[str, int] = {}
        for directory, subdirectories, names in os.walk(target):
            for name in subdirectories:
                path = os.path.join(directory, name)
                relative = os.path.relpath(path, target) + "/"
                files[relative] = b""
                modes[relative] = stat.S_IMODE(os.stat(path).st_mode)
            for name in names:
                path = os.path.join(directory, name)
                with open(path, "rb") as f:
                    files[os.path.relpath(path, target)] = f.read()
                modes[os.path.relpath(path, target)] = stat.S_IMODE(os.stat(path).st_mode)
        self.contents[source], self.modes[source] = files, modes
        for entry in os.listdir(target):
            path = os.path.join(target, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        return b""


PARTED = """BYT;
{dev}/sda:10737418240B:scsi:512:512:gpt:QEMU HARDDISK:;
1:1048576B:1074790399B:1073741824B:ext4:boot:;
2:1074790400B:2148532223B:1073741824B:::lvm;
3:2148532224B:10737401855B:8588869632B:ext4:root:;
"""


class InjectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fake = FakeSystem(self.mktemp())
        self.dev = self.fake.dev_path
        for name in ("sda", "sda1", "sda2", "sda3"):
            self.fake.write(f"dev/{name}", "")
        self.partitions = Partitions({
            f"{self.dev}/sda1": {"grub/grub.cfg": b"menuentry"},
            f"{self.dev}/sda3": {"etc/hostname": b"old\n", "etc/ssh/": b""}})
        self.runner = FakeRunner({
            ("parted",): PARTED.format(dev=self.dev),
            ("mount",): self.partitions.mount, ("umount",): self.partitions.umount,
            ("blkid", "-p"): b""})
        self.clock = Clock()
        self.manager = Manager(f"{self.dev}/sda")
        self.manager.bind(HardwareContext(self.fake.config(), self.runner, self.clock,
                                          self.clock))

    def inject(self, files: Any, node: Any = None) -> None:
        self.successResultOf(Deferred.fromCoroutine(
            self.manager.inject_files(node or {"properties": {}}, [], files)))

    def test_step(self) -> None:
        self.assertEqual(INJECT_FILES_STEP["step"], "inject_files")
        self.assertEqual(INJECT_FILES_STEP["priority"], 0)
        self.assertEqual(INJECT_FILES_STEP["interface"], "deploy")
        self.assertEqual(set(INJECT_FILES_STEP["argsinfo"]), {"files", "verify_ca"})

    def test_deploy_step_priority_is_the_option(self) -> None:
        from ipa_twisted.hardware.generic.manager import GenericHardwareManager
        generic = GenericHardwareManager(udev=lambda name: {})
        context = HardwareContext(self.fake.config(), self.runner, self.clock, self.clock)
        generic.bind(context)

        def priority() -> int:
            [step] = [s for s in generic.get_deploy_steps({}, [])
                      if s["step"] == "inject_files"]
            self.assertEqual(step["argsinfo"], INJECT_FILES_STEP["argsinfo"])
            return int(step["priority"])

        self.assertEqual(priority(), 0)                 # default: only when Ironic asks
        context.config = context.config.merged({"inject_files_priority": "45"}, "test")
        self.assertEqual(priority(), 45)                # read where the steps are listed
        self.assertEqual(INJECT_FILES_STEP["priority"], 0)
        [service] = [s for s in generic.get_service_steps({}, [])
                     if s["step"] == "inject_files"]
        self.assertEqual(service["priority"], 0)        # service steps: the operator orders

    def test_found_by_path_with_modes(self) -> None:
        self.inject([{"path": "/etc/ssh/sshd_config.d/ipa.conf", "content": b64("Port 2\n"),
                      "mode": 0o600, "dirmode": 0o700}])
        root = self.partitions.contents[f"{self.dev}/sda3"]
        modes = self.partitions.modes[f"{self.dev}/sda3"]
        self.assertEqual(root["etc/ssh/sshd_config.d/ipa.conf"], b"Port 2\n")
        self.assertEqual(modes["etc/ssh/sshd_config.d/ipa.conf"], 0o600)
        self.assertEqual(modes["etc/ssh/sshd_config.d/"], 0o700)
        self.assertEqual(root["etc/hostname"], b"old\n")
        mounted = [argv[-2] for argv in self.runner.argvs if argv[0] == "mount"]
        # sda1 has no /etc, sda2 is LVM (skipped), sda3 has it: then written there.
        self.assertEqual(mounted, [f"{self.dev}/sda1", f"{self.dev}/sda3",
                                   f"{self.dev}/sda3"])
        self.assertEqual(len([a for a in self.runner.argvs if a[0] == "umount"]), 3)

    def test_partition_number_string_and_node_property(self) -> None:
        node = {"properties": {"inject_files": [
            {"path": "/a.txt", "partition": 1, "content": b64("a")}]}}
        self.inject([{"path": "/b.txt", "partition": "1", "content": b64("b"),
                      "mode": 0o644}], node)
        boot = self.partitions.contents[f"{self.dev}/sda1"]
        self.assertEqual((boot["a.txt"], boot["b.txt"]), (b"a", b"b"))

    def test_partition_by_uuid_label_and_path(self) -> None:
        self.runner.answers[("blkid", "-p", "-o", "export", f"{self.dev}/sda3")] = \
            b"UUID=AAAA-1111\nLABEL=root\nPART_ENTRY_UUID=0000-0003\n"
        for spec in ("UUID=aaaa-1111", "LABEL=root", "root", "PARTUUID=0000-0003",
                     "0000-0003", f"{self.dev}/sda3"):
            self.inject([{"path": "/spec", "partition": spec, "content": b64(spec)}])
            self.assertEqual(self.partitions.contents[f"{self.dev}/sda3"]["spec"],
                             spec.encode())
        failure = self.failureResultOf(Deferred.fromCoroutine(self.manager.inject_files(
            {}, [], [{"path": "/x", "partition": "LABEL=nope", "content": ""}])))
        self.assertIsInstance(failure.value, errors.DeviceNotFound)

    def test_delete(self) -> None:
        self.inject([{"path": "/etc/hostname", "deleted": True},
                     {"path": "/etc/never-there", "deleted": True}])
        self.assertNotIn("etc/hostname", self.partitions.contents[f"{self.dev}/sda3"])

    def test_no_partition_has_the_path(self) -> None:
        failure = self.failureResultOf(Deferred.fromCoroutine(self.manager.inject_files(
            {}, [], [{"path": "/srv/data/x", "content": b64("x")}])))
        self.assertIsInstance(failure.value, errors.DeviceNotFound)
        self.assertIn("No partition found with path /srv", str(failure.value))

    def test_links_out_of_the_partition_are_refused(self) -> None:
        self.partitions.contents[f"{self.dev}/sda1"]["escape"] = b""
        original = self.partitions.mount

        def mount(argv: tuple[str, ...]) -> bytes | Exit:
            result = original(argv)
            link = os.path.join(argv[-1], "escape")
            os.unlink(link)
            os.symlink("/etc", link)
            return result
        self.runner.answers[("mount",)] = mount
        failure = self.failureResultOf(Deferred.fromCoroutine(self.manager.inject_files(
            {}, [], [{"path": "/escape/passwd", "partition": 1, "content": b64("x")}])))
        self.assertIsInstance(failure.value, errors.CommandExecutionError)
        self.assertIn("outside its partition", str(failure.value))

    def test_nothing_to_do(self) -> None:
        self.inject(None)
        self.assertEqual(self.runner.argvs, [])
        self.assertEqual(self.manager.asked_for_device, 0)

    def test_validation(self) -> None:
        bad = [{"path": "/x", "content": "", "size": 1},
               {"content": "eA=="},
               {"path": "/rootfile", "content": "eA=="},
               {"path": "/etc/dir/", "content": "eA=="},
               {"path": "/etc/x", "content": "eA==", "deleted": True},
               {"path": "/etc/x", "content": "eA==", "mode": "0644"},
               {"path": "/etc/../x", "content": "eA=="},
               {"path": "etc/x", "content": "eA=="},
               "not an object"]
        with self.assertRaises(errors.InvalidCommandParamsError) as caught:
            validate_files([], bad)
        message = str(caught.exception)
        for part in ("unexpected fields", "expected a path", "requires \"partition\"",
                     "directories not supported", "content cannot be used with deleted",
                     "mode must be a number", "must not contain '..'",
                     "path must be absolute", "expected an object"):
            self.assertIn(part, message)
        self.assertRaises(errors.InvalidCommandParamsError, validate_files, {}, [])
        failure = self.failureResultOf(Deferred.fromCoroutine(self.manager.inject_files(
            {}, [], [{"path": "/etc/x", "content": "not base64!"}])))
        self.assertIsInstance(failure.value, errors.InvalidCommandParamsError)


class UrlContentTests(TestCase):
    async def test_content_from_a_url_formatted_with_the_node(self) -> None:
        self.assertEqual(await self.inject_from_url(verify_ca=True), [True])

    async def test_unverified_download_uses_the_agents_unverified_client(self) -> None:
        """verify_ca false: the agent's one unverified client, not one built per file."""
        self.assertEqual(await self.inject_from_url(verify_ca=False), [False])

    async def inject_from_url(self, verify_ca: bool) -> list[bool]:
        """Inject /motd from a URL; which clients were asked for (their ``verify``)."""
        fake = FakeSystem(self.mktemp())
        for name in ("sda", "sda1"):
            fake.write(f"dev/{name}", "")
        partitions = Partitions({f"{fake.dev_path}/sda1": {}})
        runner = FakeRunner({
            ("parted",): ("BYT;\n{dev}/sda:1073741824B:scsi:512:512:gpt:x:;\n"
                          "1:1048576B:1073741823B:1072693248B:ext4::;\n").format(
                dev=fake.dev_path),
            ("mount",): partitions.mount, ("umount",): partitions.umount})
        site = Resource()
        node_dir = Resource()
        site.putChild(b"n-1", node_dir)
        node_dir.putChild(b"motd", Data(b"hello from the server\n", "text/plain"))
        treq = StubTreq(site)
        asked: list[bool] = []

        def http_client(*, verify: bool = True) -> StubTreq:
            asked.append(verify)
            return treq

        manager = Manager(f"{fake.dev_path}/sda")
        manager.bind(HardwareContext(fake.config(), runner, reactor, reactor,
                                     http_client=http_client))
        await manager.inject_files({"uuid": "n-1", "properties": {}}, [], [
            {"path": "/motd", "partition": 1,
             "content": "http://files.example/{node[uuid]}/motd"}], verify_ca=verify_ca)
        self.assertEqual(partitions.contents[f"{fake.dev_path}/sda1"]["motd"],
                         b"hello from the server\n")
        return asked


class RealInjectTests(TestCase):
    timeout = 300

    def setUp(self) -> None:
        reason = loop_devices_unavailable()
        for tool in ("parted", "partprobe", "mkfs.ext4", "debugfs", "blkid", "mount"):
            if reason is None and shutil.which(tool) is None:
                reason = f"{tool} is not installed"
        if reason is not None:
            raise SkipTest(reason)
        self.runner = ProcessRunner(reactor, reactor)

    async def debugfs(self, partition: str, request: str) -> str:
        out, _ = await self.runner.execute("debugfs", "-R", request, partition)
        return out.decode(errors="replace")

    async def test_inject_into_ext4_partitions(self) -> None:
        loop, = await attach_loop_devices(self.runner, os.path.abspath(self.mktemp()),
                                          [96 * MiB], self.addCleanup)
        await self.runner.execute("parted", "-s", loop.path, "--", "mklabel", "gpt",
                                  "mkpart", "data", "ext4", "1MiB", "33MiB",
                                  "mkpart", "root", "ext4", "33MiB", "100%")
        await self.runner.execute("partprobe", loop.path)
        data, root = loop.path + "p1", loop.path + "p2"
        tree = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(tree, "etc"))
        with open(os.path.join(tree, "etc", "hostname"), "w") as f:
            f.write("image\n")
        await self.runner.execute("mkfs.ext4", "-q", "-L", "data", data)
        await self.runner.execute("mkfs.ext4", "-q", "-d", tree, root)
        node = {"uuid": "n-1", "properties": {"inject_files": [
            {"path": "/etc/hostname", "content": b64("node-1\n")}]}}
        files = [
            {"path": "/etc/ipa/injected.conf", "content": b64("key=value\n"),
             "mode": 0o640, "dirmode": 0o750},
            {"path": "/hello.txt", "partition": 1, "content": b64("hello\n"),
             "mode": 0o600, "owner": 1000, "group": 1001},
            {"path": "/by-label.txt", "partition": "LABEL=data", "content": b64("label\n")}]
        spec = {"device": loop.path, "step": "inject_files", "node": node,
                "params": {"files": files}}
        out, err = await run_in_sandbox(self.runner, [loop], [
            sys.executable, "-m", "tests.sandboxed_agent", json.dumps(spec)], timeout=120)
        lines = out.decode().strip().splitlines()
        self.assertTrue(lines, err.decode(errors="replace")[-3000:])
        outcome = json.loads(lines[-1])
        self.assertEqual(outcome["status"], "SUCCEEDED",
                         f"{outcome}\n{err.decode(errors='replace')[-3000:]}")
        self.assertEqual(await self.debugfs(root, "cat /etc/hostname"), "node-1\n")
        self.assertEqual(await self.debugfs(root, "cat /etc/ipa/injected.conf"),
                         "key=value\n")
        self.assertIn("Mode:  0640", await self.debugfs(root, "stat /etc/ipa/injected.conf"))
        self.assertIn("Mode:  0750", await self.debugfs(root, "stat /etc/ipa"))
        self.assertEqual(await self.debugfs(data, "cat /hello.txt"), "hello\n")
        hello = await self.debugfs(data, "stat /hello.txt")
        self.assertIn("Mode:  0600", hello)
        self.assertIn("User:  1000", hello)
        self.assertIn("Group:  1001", hello)
        self.assertEqual(await self.debugfs(data, "cat /by-label.txt"), "label\n")
