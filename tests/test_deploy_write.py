"""Tests for ipa_twisted.deploy.write (write_image_to_disk), partition images and config drives.

Layouts are checked on loop devices on sparse files (root only; skipped otherwise); the
image pipeline is replaced by a writer that copies a small prepared image.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import shutil
import uuid as uuidlib
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from ipa_twisted.config import AgentConfig
from ipa_twisted.encoding import to_jsonable
from ipa_twisted.deploy.write import partition_layout, write_image_to_disk
from ipa_twisted.errors import InstanceDeployFailure
from ipa_twisted.blockdev import disks
from ipa_twisted.hardware.generic.manager import GenericHardwareManager
from ipa_twisted.context import HardwareContext
from ipa_twisted.deploy import configdrive as cd
from ipa_twisted.deploy import configdrive_fs
from ipa_twisted.deploy.partition import (PartitionLayout, get_node_boot_mode,
                                          get_partition_table_type_from_specs,
                                          parse_capabilities, parted_argv, plan_partitions)
from ipa_twisted.process import ProcessRunner
from ipa_twisted.testing.sandbox import (LoopDevice, LoopOnlyRunner, attach_loop_devices,
                                         loop_devices_unavailable)
from tests.configdrive_iso import META_DATA, make_iso

MiB = 1 << 20
TOOLS = ("parted", "sgdisk", "wipefs", "mkfs.ext4", "mkfs.vfat", "mkswap", "blkid",
         "partprobe")


class SpecTests(SynchronousTestCase):
    def test_parse_capabilities(self) -> None:
        self.assertEqual(parse_capabilities({"capabilities": {"boot_mode": "uefi"}}),
                         {"boot_mode": "uefi"})
        self.assertEqual(parse_capabilities({"capabilities": '{"disk_label": "gpt"}'}),
                         {"disk_label": "gpt"})
        self.assertEqual(parse_capabilities({"capabilities": "boot_mode:bios,disk_label:gpt"}),
                         {"boot_mode": "bios", "disk_label": "gpt"})
        self.assertEqual(parse_capabilities({"capabilities": "[1]"}), {})
        self.assertEqual(parse_capabilities({}), {})
        self.assertEqual(parse_capabilities(None), {})

    def test_boot_mode(self) -> None:
        sys_path = self.mktemp()
        os.makedirs(sys_path)
        self.assertEqual(get_node_boot_mode({}, sys_path=sys_path), "bios")
        os.makedirs(os.path.join(sys_path, "firmware", "efi"))
        self.assertEqual(get_node_boot_mode({}, sys_path=sys_path), "uefi")
        self.assertEqual(get_node_boot_mode({"instance_info": {"deploy_boot_mode": "BIOS"}},
                                            sys_path=sys_path), "bios")
        self.assertEqual(get_node_boot_mode(
            {"properties": {"capabilities": "boot_mode:bios"},
             "instance_info": {"capabilities": {"secure_boot": "true"}}},
            sys_path=sys_path), "uefi")
        self.assertEqual(get_node_boot_mode(
            {"driver_internal_info": {"deploy_boot_mode": "bios"}}, sys_path=sys_path), "bios")
        self.assertEqual(get_node_boot_mode({}, sys_path=sys_path, fallback="bios"), "bios")
        self.assertEqual(get_node_boot_mode({"instance_info": {"deploy_boot_mode": "x"}},
                                            sys_path=sys_path), "uefi")

    def test_disk_label(self) -> None:
        node: dict[str, Any] = {"instance_info": {"deploy_boot_mode": "bios"},
                                "properties": {"capabilities": "disk_label:gpt"}}
        self.assertEqual(get_partition_table_type_from_specs(node), "gpt")
        node["instance_info"]["capabilities"] = {"disk_label": "msdos"}
        self.assertEqual(get_partition_table_type_from_specs(node), "msdos")
        node["instance_info"]["deploy_boot_mode"] = "uefi"
        self.assertEqual(get_partition_table_type_from_specs(node), "gpt")
        self.assertEqual(get_partition_table_type_from_specs(
            {"instance_info": {"deploy_boot_mode": "bios"}}), "msdos")

    def test_layout_from_image_info(self) -> None:
        layout = partition_layout(
            {"root_mb": 100, "swap_mb": 10, "ephemeral_mb": 0, "deploy_boot_mode": "bios",
             "disk_label": "gpt", "preserve_ephemeral": True}, {},
            configdrive_size=MiB + 1, cpu_arch="x86_64")
        self.assertEqual(layout, PartitionLayout(
            root_mb=100, swap_mb=10, configdrive_mb=2, boot_mode="bios", disk_label="gpt",
            cpu_arch="x86_64", preserve_ephemeral=True))

    def test_boot_partition_sizes_given(self) -> None:
        layout = partition_layout({"root_mb": 100, "deploy_boot_mode": "uefi"}, {},
                                  cpu_arch="x86_64", efi_system_partition_mb=1024,
                                  bios_boot_partition_mb=4)
        self.assertEqual((layout.efi_system_partition_mb, layout.bios_boot_partition_mb),
                         (1024, 4))
        self.assertEqual(plan_partitions(layout)[0].size_mb, 1024)

    def test_plans(self) -> None:
        def roles(**kw: Any) -> list[tuple[str, int, tuple[str, ...]]]:
            return [(p.role, p.size_mb, p.flags)
                    for p in plan_partitions(PartitionLayout(root_mb=100, **kw))]
        self.assertEqual(roles(swap_mb=8, ephemeral_mb=16, configdrive_mb=1), [
            ("ephemeral", 16, ()), ("swap", 8, ()), ("configdrive", 1, ()),
            ("root", 100, ("boot",))])
        self.assertEqual(roles(disk_label="gpt"), [("BIOS Boot partition", 1, ("bios_grub",)),
                                                   ("root", 100, ())])
        self.assertEqual(roles(boot_mode="uefi", disk_label="msdos"), [
            ("efi system partition", 550, ("boot",)), ("root", 100, ())])
        self.assertEqual(roles(cpu_arch="ppc64le"), [("PReP Boot partition", 8,
                                                      ("boot", "prep")), ("root", 100, ())])
        self.assertRaises(InstanceDeployFailure, plan_partitions, PartitionLayout(
            root_mb=1, swap_mb=1, ephemeral_mb=1, configdrive_mb=1, cpu_arch="ppc64"))

    def test_parted_argv(self) -> None:
        layout = PartitionLayout(root_mb=0, swap_mb=8, disk_label="gpt")
        self.assertEqual(parted_argv("/dev/sdz", "gpt", plan_partitions(layout)), [
            "parted", "-a", "optimal", "-s", "/dev/sdz", "--", "unit", "MiB", "mklabel", "gpt",
            "mkpart", "primary", "1", "2", "set", "1", "bios_grub", "on",
            "mkpart", "primary", "linux-swap", "2", "10",
            "mkpart", "primary", "10", "100%"])


def _gzip_b64(data: bytes) -> str:
    return base64.b64encode(gzip.compress(data)).decode()


class DecodeConfigdriveTests(SynchronousTestCase):
    def test_base64_of_gzip(self) -> None:
        image = b"ISO" * 1000
        self.assertEqual(cd.decode_configdrive(_gzip_b64(image).encode(), downloaded=False),
                         image)
        wrapped = "\n".join(_gzip_b64(image)[i:i + 76] for i in range(0, 3000, 76))
        self.assertEqual(cd.decode_configdrive(wrapped.encode(), downloaded=True), image)

    def test_base64_without_gzip(self) -> None:
        self.assertEqual(cd.decode_configdrive(base64.b64encode(b"raw"), downloaded=False),
                         b"raw")

    def test_not_base64(self) -> None:
        binary = b"\x00CD001\xff" * 10
        self.assertEqual(cd.decode_configdrive(binary, downloaded=True), binary)
        with self.assertRaises(InstanceDeployFailure) as caught:
            cd.decode_configdrive(b"not base64!", downloaded=False)
        self.assertIn("not base64 encoded", str(caught.exception))

    def test_bounded(self) -> None:
        bomb = base64.b64encode(gzip.compress(bytes(10 * MiB)))
        with self.assertRaises(InstanceDeployFailure) as caught:
            cd.decode_configdrive(bomb, downloaded=False, limit=MiB)
        self.assertIn("exceeds maximum limit", str(caught.exception))
        self.assertRaises(InstanceDeployFailure, cd.decode_configdrive,
                          base64.b64encode(bytes(MiB + 1)), downloaded=False, limit=MiB)
        self.assertRaises(InstanceDeployFailure, cd.decode_configdrive,
                          base64.b64encode(gzip.compress(b"x"))[:-8], downloaded=False)
        self.assertRaises(InstanceDeployFailure, cd.decode_configdrive, b"", downloaded=False)

    def test_is_url(self) -> None:
        self.assertTrue(cd.is_url(" HTTPS://cd.example/x"))
        self.assertFalse(cd.is_url("H4sIAAAA"))
        self.assertFalse(cd.is_url(b"http://x"))


class GetConfigdriveTests(TestCase):
    def context(self) -> HardwareContext:
        return HardwareContext(AgentConfig(), ProcessRunner(reactor, reactor), reactor, reactor)

    async def test_url_fetched(self) -> None:
        fetched: list[str] = []

        async def fetch(url: str) -> bytes:
            fetched.append(url)
            return _gzip_b64(b"drive").encode()
        self.assertEqual(await cd.get_configdrive(self.context(), "http://cd/x ", fetch=fetch),
                         b"drive")
        self.assertEqual(fetched, ["http://cd/x"])

    async def test_download_failure(self) -> None:
        async def fetch(url: str) -> bytes:
            raise ConnectionRefusedError("nobody home")
        with self.assertRaises(InstanceDeployFailure) as caught:
            await cd.get_configdrive(self.context(), "https://cd/x", fetch=fetch)
        self.assertIn("Can't download the configdrive content from 'https://cd/x'",
                      str(caught.exception))

    async def test_inline(self) -> None:
        self.assertEqual(await cd.get_configdrive(self.context(), _gzip_b64(b"inline")),
                         b"inline")


class LoopTestCase(TestCase):
    timeout = 180

    def setUp(self) -> None:
        reason = loop_devices_unavailable(TOOLS)
        if reason is not None:
            raise SkipTest(reason)
        self.real = ProcessRunner(reactor, reactor)
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.written: list[str] = []

    async def loop(self, size: int, sector_size: int | None = None) -> LoopDevice:
        [device] = await attach_loop_devices(self.real, os.path.join(self.workdir, "disks"),
                                             [size], self.addCleanup,
                                             sector_size=sector_size)
        return device

    async def pipeline_context(self, loop: LoopDevice, **config: Any) -> tuple[
            HardwareContext, str]:
        """A context whose writer is the real pipeline, and the URL of ``self.workdir``."""
        from twisted.web.server import Site
        from twisted.web.static import File

        from ipa_twisted.http import make_http_client, make_pool
        port: Any = reactor.listenTCP(0, Site(File(self.workdir)),  # type: ignore[arg-type]
                                      interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = make_pool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        agent_config = AgentConfig(image_download_connection_retries=0, **config)
        http = make_http_client(reactor, agent_config, pool=pool)
        context = HardwareContext(agent_config, LoopOnlyRunner(self.real, [loop.path]),
                                  reactor, reactor, http_client=lambda: http,
                                  report_progress=lambda progress: None)
        return context, f"http://127.0.0.1:{port.getHost().port}"

    def context(self, *devices: str, **config: Any) -> HardwareContext:
        return HardwareContext(AgentConfig(**config), LoopOnlyRunner(self.real, devices),
                               reactor, reactor)

    async def sh(self, *argv: str) -> str:
        out, _ = await self.real.execute(*argv)
        return out.decode()

    async def blkid(self, path: str) -> dict[str, str]:
        out, _ = await self.real.execute("blkid", "-p", "-o", "export", path,
                                         check_exit_code=[0, 2])
        return dict(line.split("=", 1) for line in out.decode().splitlines() if "=" in line)

    async def file_image(self, name: str, size: int, *argv: str) -> str:
        """A file of ``size`` bytes prepared by ``argv`` (the path is appended)."""
        path = os.path.join(self.workdir, name)
        with open(path, "wb") as f:
            f.truncate(size)
        await self.sh(*argv, path)
        return path

    def writer(self, source: str) -> Any:
        """An image writer copying file ``source`` (stands in for the pipeline, whose
        ``prepare`` it awaits before writing, as the pipeline does)."""
        async def write(image_info: Any, device: str, prepare: Any = None) -> None:
            if prepare is not None:
                device = await prepare() or device
            self.written.append(device)

            def copy() -> None:
                with open(source, "rb") as f:
                    disks.write_at(device, f.read())
            await deferToThread(copy)
        return write

    async def configdrive_image(self) -> bytes:
        path = await self.file_image("configdrive.img", 2 * MiB, "mkfs.vfat", "-n", "config-2")
        with open(path, "rb") as f:
            return f.read()

    async def parted(self, device: str) -> disks.DiskLayout:
        return await disks.read_layout(self.context(device), device)


class PartitionImageTests(LoopTestCase):
    async def root_image(self) -> tuple[str, str]:
        root_uuid = str(uuidlib.uuid4())
        path = await self.file_image("root.img", 8 * MiB, "mkfs.ext4", "-q", "-F", "-U",
                                     root_uuid, "-L", "cloudimg-rootfs")
        return path, root_uuid

    async def deploy(self, size: int, image_info: dict[str, Any],
                     node: dict[str, Any] | None = None, configdrive: bool = True,
                     **config: Any) -> tuple[LoopDevice, dict[str, Any], str]:
        loop = await self.loop(size)
        root, root_uuid = await self.root_image()
        drive = await self.configdrive_image() if configdrive else None
        info = {"id": "img", "image_type": "partition", "ephemeral_format": "ext4",
                **image_info}
        result = await write_image_to_disk(
            self.context(loop.path, **config), loop.path, info,
            _gzip_b64(drive) if drive else None, node=node or {}, write=self.writer(root))
        return loop, result, root_uuid

    async def check_common(self, loop: LoopDevice, result: dict[str, Any],
                           root_uuid: str) -> dict[str, str]:
        partitions = result["partitions"]
        self.assertEqual(self.written, [partitions["root"]])
        self.assertEqual(result["root uuid"], root_uuid)
        self.assertEqual((await self.blkid(partitions["root"]))["UUID"], root_uuid)
        swap = await self.blkid(partitions["swap"])
        self.assertEqual((swap["TYPE"], swap["LABEL"]), ("swap", "swap1"))
        ephemeral = await self.blkid(partitions["ephemeral"])
        self.assertEqual((ephemeral["TYPE"], ephemeral["LABEL"]), ("ext4", "ephemeral0"))
        drive = await self.blkid(partitions["configdrive"])
        self.assertEqual((drive["TYPE"], drive["LABEL"]), ("vfat", "config-2"))
        return partitions  # type: ignore[no-any-return]

    async def test_bios_msdos(self) -> None:
        loop, result, root_uuid = await self.deploy(
            256 * MiB, {"root_mb": 64, "swap_mb": 16, "ephemeral_mb": 32},
            {"instance_info": {"deploy_boot_mode": "bios"}})
        partitions = await self.check_common(loop, result, root_uuid)
        p = loop.path + "p"
        self.assertEqual(partitions, {"ephemeral": p + "1", "swap": p + "2",
                                      "configdrive": p + "3", "root": p + "4"})
        self.assertEqual(set(result), {"partitions", "root uuid", "efi system partition uuid"})
        self.assertIsNone(result["efi system partition uuid"])
        layout = await self.parted(loop.path)
        self.assertEqual(layout.table, "msdos")
        self.assertEqual([(q.number, q.size // MiB) for q in layout.partitions],
                         [(1, 32), (2, 16), (3, 2), (4, 64)])
        self.assertIn("boot", layout.partitions[3].flags)

    async def test_bios_gpt_with_bios_grub(self) -> None:
        loop, result, root_uuid = await self.deploy(
            256 * MiB, {"root_mb": 0, "swap_mb": 16, "ephemeral_mb": 32},
            {"instance_info": {"deploy_boot_mode": "bios",
                               "capabilities": {"disk_label": "gpt"}}})
        partitions = await self.check_common(loop, result, root_uuid)
        p = loop.path + "p"
        self.assertEqual(partitions, {"BIOS Boot partition": p + "1", "ephemeral": p + "2",
                                      "swap": p + "3", "configdrive": p + "4", "root": p + "5"})
        layout = await self.parted(loop.path)
        self.assertEqual(layout.table, "gpt")
        self.assertIn("bios_grub", layout.partitions[0].flags)
        self.assertEqual(layout.partitions[0].size, MiB)
        # root 0: the rest of the disk, up to the backup GPT
        self.assertGreater(layout.partitions[-1].end, loop.size - 2 * MiB)

    async def test_uefi_with_esp(self) -> None:
        loop, result, root_uuid = await self.deploy(
            1024 * MiB, {"root_mb": 64, "swap_mb": 16, "ephemeral_mb": 32},
            {"properties": {"capabilities": "boot_mode:uefi,disk_label:msdos"}})
        partitions = await self.check_common(loop, result, root_uuid)
        esp = await self.blkid(partitions["efi system partition"])
        self.assertEqual((esp["TYPE"], esp["LABEL"]), ("vfat", "efi-part"))
        self.assertEqual(result["efi system partition uuid"], esp["UUID"])
        layout = await self.parted(loop.path)
        self.assertEqual(layout.table, "gpt")
        self.assertEqual(layout.partitions[0].size, 550 * MiB)
        self.assertTrue({"boot", "esp"} <= layout.partitions[0].flags)
        self.assertEqual(await disks.get_efi_part_on_device(self.context(loop.path),
                                                            loop.path), 1)

    async def test_boot_partition_sizes_from_the_disk_utils_options(self) -> None:
        loop, _, _ = await self.deploy(
            256 * MiB, {"root_mb": 32}, {"properties": {"capabilities": "boot_mode:uefi"}},
            configdrive=False, efi_system_partition_size=40)
        self.assertEqual((await self.parted(loop.path)).partitions[0].size, 40 * MiB)
        loop, _, _ = await self.deploy(
            256 * MiB, {"root_mb": 32},
            {"instance_info": {"deploy_boot_mode": "bios",
                               "capabilities": {"disk_label": "gpt"}}},
            configdrive=False, bios_boot_partition_size=3)
        first = (await self.parted(loop.path)).partitions[0]
        self.assertEqual((first.size, "bios_grub" in first.flags), (3 * MiB, True))

    async def test_partition_nodes_made_without_udev(self) -> None:
        """dev_path holding only the disk's node: partition nodes come from sysfs."""
        loop = await self.loop(256 * MiB)
        dev = os.path.join(self.workdir, "dev")
        os.makedirs(dev)
        node = os.path.join(dev, os.path.basename(loop.path))
        os.mknod(node, 0o600 | 0o060000, os.stat(loop.path).st_rdev)
        root, root_uuid = await self.root_image()
        result = await write_image_to_disk(
            self.context(node, dev_path=dev), node,
            {"id": "img", "image_type": "partition", "root_mb": 32, "swap_mb": 8},
            node={"instance_info": {"deploy_boot_mode": "bios"}}, write=self.writer(root))
        self.assertEqual(result["partitions"], {"swap": node + "p1", "root": node + "p2"})
        self.assertEqual(result["root uuid"], root_uuid)
        self.assertEqual(sorted(os.listdir(dev)), sorted(
            os.path.basename(p) for p in (node, node + "p1", node + "p2")))

    async def test_preserve_ephemeral_keeps_table_and_data(self) -> None:
        loop, first, _ = await self.deploy(
            256 * MiB, {"root_mb": 64, "swap_mb": 16, "ephemeral_mb": 32},
            {"instance_info": {"deploy_boot_mode": "bios"}}, configdrive=False)
        ephemeral = (await self.blkid(first["partitions"]["ephemeral"]))["UUID"]
        root, root_uuid = await self.root_image()
        second = await write_image_to_disk(
            self.context(loop.path), loop.path,
            {"id": "img2", "image_type": "partition", "root_mb": 64, "swap_mb": 16,
             "ephemeral_mb": 32, "preserve_ephemeral": True},
            node={"instance_info": {"deploy_boot_mode": "bios"}}, write=self.writer(root))
        self.assertEqual(second["partitions"], first["partitions"])
        self.assertEqual(second["root uuid"], root_uuid)
        self.assertEqual((await self.blkid(first["partitions"]["ephemeral"]))["UUID"],
                         ephemeral)

    async def test_not_enough_space(self) -> None:
        loop = await self.loop(64 * MiB)
        root, _ = await self.root_image()
        await self.sh("parted", "-s", loop.path, "mklabel", "gpt")
        with self.assertRaises(InstanceDeployFailure) as caught:
            await write_image_to_disk(
                self.context(loop.path), loop.path,
                {"id": "img", "image_type": "partition", "root_mb": 60, "swap_mb": 8},
                node={}, write=self.writer(root))
        self.assertIn("Not enough space", str(caught.exception))
        self.assertEqual(self.written, [])
        self.assertEqual((await self.parted(loop.path)).table, "gpt")   # untouched


class RefusedBeforePartitioningTests(LoopTestCase):
    """Through the real pipeline: a refused partition image never reaches parted."""

    async def test_refused_partition_images_leave_the_disk_alone(self) -> None:
        loop = await self.loop(256 * MiB)
        await self.sh("sgdisk", "-o", "-n", "1:2048:+32M", "-c", "1:precious", loop.path)
        with open(loop.path, "rb") as f:
            before = f.read(64 * MiB)
        root = await self.file_image("root.img", 8 * MiB, "mkfs.ext4", "-q", "-F")
        with open(root, "rb") as f:
            data = f.read()
        qcow2 = root + ".qcow2"
        await self.sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", root, qcow2)
        with open(qcow2, "rb") as f:
            qcow2_digest = hashlib.sha256(f.read()).hexdigest()
        context, base = await self.pipeline_context(loop, permitted_image_formats=("raw",))
        common = {"id": "img", "image_type": "partition", "root_mb": 64}
        for info, words in (
                ({"urls": [f"{base}/root.img"], "checksum": hashlib.md5(data).hexdigest()},
                 ("md5_enabled",)),
                ({"urls": [f"{base}/root.img.qcow2"], "disk_format": "qcow2",
                  "checksum": qcow2_digest}, ("'qcow2'", "permitted_image_formats"))):
            with self.assertRaises(Exception) as caught:
                await write_image_to_disk(context, loop.path, {**common, **info}, None,
                                          node={})
            for word in words:
                self.assertIn(word, str(caught.exception))
            with open(loop.path, "rb") as f:
                self.assertEqual(f.read(64 * MiB), before)
        # accepted: partitioned, then written into the root partition
        result = await write_image_to_disk(
            context, loop.path, {**common, "urls": [f"{base}/root.img"],
                                 "checksum": hashlib.sha256(data).hexdigest()}, None, node={})
        self.assertEqual((await self.blkid(result["partitions"]["root"]))["TYPE"], "ext4")
    test_refused_partition_images_leave_the_disk_alone.skip = (  # type: ignore[attr-defined]
        None if shutil.which("qemu-img") else "qemu-img is not installed")

    async def test_image_for_512_byte_sectors_on_a_4k_disk(self) -> None:
        loop = await self.loop(64 * MiB, sector_size=4096)
        image = os.path.join(self.workdir, "512.img")
        with open(image, "wb") as f:
            f.truncate(32 * MiB)
        await self.sh("sgdisk", "-o", "-n", "1:2048:0", image)   # a file: 512-byte sectors
        with self.assertRaises(InstanceDeployFailure) as caught:
            await write_image_to_disk(self.context(loop.path), loop.path, {"id": "whole"},
                                      write=self.writer(image))
        message = str(caught.exception)
        self.assertIn("different sector size than the device", message)
        self.assertIn("512-byte sectors", message)
        self.assertIn("4096-byte logical sectors", message)


class FourKConfigDriveTests(LoopTestCase):
    """An ISO config drive on a disk with 4096-byte logical sectors is rebuilt as a FAT."""

    def setUp(self) -> None:
        super().setUp()
        try:
            import pycdlib  # noqa: F401
        except ImportError:
            raise SkipTest("pycdlib (a test dependency) is not installed") from None

    def gpt_writer(self) -> Any:
        """A whole-disk "image": a GPT with one partition, made on the disk itself."""
        async def write(image_info: Any, device: str, prepare: Any = None) -> None:
            if prepare is not None:
                await prepare()
            self.written.append(device)
            await self.sh("sgdisk", "-o", "-n", "1:1MiB:+32MiB", device)
        return write

    async def read_partition(self, path: str, size: int) -> bytes:
        def read() -> bytes:
            with open(path, "rb") as f:
                return f.read(size)
        return await deferToThread(read)

    async def check_fat(self, path: str) -> None:
        probed = await self.blkid(path)
        self.assertEqual((probed["TYPE"], probed["LABEL"], probed["BLOCK_SIZE"]),
                         ("vfat", "CONFIG-2", "4096"))
        if shutil.which("fsck.fat"):
            await self.sh("fsck.fat", "-n", path)
        data = await self.read_partition(path, 8 * MiB)
        files = {e.path: e.data for e in configdrive_fs.read_fat(data) if not e.is_dir}
        self.assertEqual(files, META_DATA)

    async def test_whole_disk(self) -> None:
        loop = await self.loop(256 * MiB, sector_size=4096)
        await write_image_to_disk(self.context(loop.path), loop.path, {"id": "whole"},
                                  _gzip_b64(make_iso(META_DATA)), write=self.gpt_writer())
        layout = await self.parted(loop.path)
        self.assertEqual(layout.logical_sector_size, 4096)
        last = layout.partitions[-1]
        self.assertEqual(last.name, "config-2")
        await self.check_fat(last.path)

    async def test_partition_image(self) -> None:
        loop = await self.loop(256 * MiB, sector_size=4096)
        root = await self.file_image("root.img", 8 * MiB, "mkfs.ext4", "-q", "-F", "-b", "4096")
        result = await write_image_to_disk(
            self.context(loop.path), loop.path,
            {"id": "img", "image_type": "partition", "root_mb": 32}, _gzip_b64(
                make_iso(META_DATA)), node={"instance_info": {"deploy_boot_mode": "bios"}},
            write=self.writer(root))
        await self.check_fat(result["partitions"]["configdrive"])

    async def test_512_byte_sectors_keep_the_iso(self) -> None:
        loop = await self.loop(256 * MiB)
        iso = make_iso(META_DATA)
        await write_image_to_disk(self.context(loop.path), loop.path, {"id": "whole"},
                                  _gzip_b64(iso), write=self.gpt_writer())
        last = (await self.parted(loop.path)).partitions[-1]
        self.assertEqual(await self.read_partition(last.path, len(iso)), iso)

    async def test_config_drive_rebuild_option(self) -> None:
        loop = await self.loop(256 * MiB)
        await write_image_to_disk(self.context(loop.path, config_drive_rebuild=True),
                                  loop.path, {"id": "whole"}, _gzip_b64(make_iso(META_DATA)),
                                  write=self.gpt_writer())
        last = (await self.parted(loop.path)).partitions[-1]
        probed = await self.blkid(last.path)
        self.assertEqual((probed["TYPE"], probed["BLOCK_SIZE"]), ("vfat", "512"))
        data = await self.read_partition(last.path, 8 * MiB)
        self.assertEqual({e.path: e.data for e in configdrive_fs.read_fat(data)
                          if not e.is_dir}, META_DATA)


class WholeDiskConfigdriveTests(LoopTestCase):
    async def disk_image(self, label: str, size: int, end: str = "100%") -> str:
        path = os.path.join(self.workdir, f"whole-{label}.img")
        with open(path, "wb") as f:
            f.truncate(size)
        await self.sh("parted", "-s", "-a", "optimal", path, "--", "mklabel", label,
                      "mkpart", "primary", "ext4", "1MiB", end)
        return path

    async def test_gpt_partition_at_the_end(self) -> None:
        loop = await self.loop(512 * MiB)
        image = await self.disk_image("gpt", 128 * MiB)
        drive = await self.configdrive_image()
        result = await write_image_to_disk(self.context(loop.path), loop.path,
                                           {"id": "whole"}, _gzip_b64(drive),
                                           write=self.writer(image))
        self.assertEqual(self.written, [loop.path])
        layout = await self.parted(loop.path)
        self.assertEqual([p.number for p in layout.partitions], [1, 2])
        last = layout.partitions[-1]
        self.assertEqual(last.name, "config-2")
        self.assertTrue(64 * MiB <= last.size < 65 * MiB, last.size)
        self.assertEqual(last.start % MiB, 0)
        # it ends the disk: at the last usable sector, the backup GPT having been moved
        self.assertEqual(last.end, loop.size - 33 * 512 - 1)
        probed = await self.blkid(last.path)
        self.assertEqual((probed["TYPE"], probed["LABEL"]), ("vfat", "config-2"))
        with open(loop.path, "rb") as f:
            f.seek(440)
            signature = int.from_bytes(f.read(4), "little")
        self.assertEqual(result, {"root uuid": "0x%08x" % signature})
        self.assertEqual((await self.sh("sgdisk", "-v", loop.path)).count("No problems"), 1)

        # again: the labelled partition is found and rewritten, not duplicated
        again = await cd.create_config_drive_partition(self.context(loop.path), loop.path,
                                                       drive)
        self.assertEqual(again, last.path)
        self.assertEqual(len((await self.parted(loop.path)).partitions), 2)

    async def test_msdos_primary_partition(self) -> None:
        loop = await self.loop(256 * MiB)
        image = await self.disk_image("msdos", 64 * MiB)
        drive = await self.configdrive_image()
        await write_image_to_disk(self.context(loop.path), loop.path, {"id": "whole"},
                                  _gzip_b64(drive), write=self.writer(image))
        layout = await self.parted(loop.path)
        self.assertEqual(layout.table, "msdos")
        last = layout.partitions[-1]
        self.assertEqual((last.number, last.size, last.end), (2, 64 * MiB, loop.size - 1))
        self.assertEqual((await self.blkid(last.path))["LABEL"], "config-2")

    async def test_not_enough_space(self) -> None:
        loop = await self.loop(128 * MiB)
        image = await self.disk_image("gpt", 128 * MiB)
        drive = await self.configdrive_image()
        with self.assertRaises(InstanceDeployFailure) as caught:
            await write_image_to_disk(self.context(loop.path), loop.path, {"id": "whole"},
                                      _gzip_b64(drive), write=self.writer(image))
        self.assertIn("Not enough space", str(caught.exception))
        self.assertEqual(len((await self.parted(loop.path)).partitions), 1)

    async def test_msdos_table_full(self) -> None:
        loop = await self.loop(256 * MiB)
        await self.sh("parted", "-s", loop.path, "--", "mklabel", "msdos",
                      *sum((["mkpart", "primary", f"{n}MiB", f"{n + 8}MiB"]
                            for n in (1, 9, 17, 25)), []))
        drive = await self.configdrive_image()
        with self.assertRaises(InstanceDeployFailure) as caught:
            await cd.create_config_drive_partition(self.context(loop.path), loop.path, drive)
        self.assertIn("already has 4 primary partitions", str(caught.exception))

    async def test_bad_configdrive_leaves_the_disk_alone(self) -> None:
        loop = await self.loop(128 * MiB)
        await self.sh("parted", "-s", loop.path, "mklabel", "gpt")
        image = await self.disk_image("gpt", 64 * MiB)
        with self.assertRaises(InstanceDeployFailure):
            await write_image_to_disk(self.context(loop.path), loop.path, {"id": "whole"},
                                      "this is not a config drive", write=self.writer(image))
        self.assertEqual(self.written, [])
        self.assertEqual((await self.parted(loop.path)).table, "gpt")

    async def test_through_the_image_pipeline(self) -> None:
        """The real pipeline downloads the image from a local web server."""
        from twisted.web.server import Site
        from twisted.web.static import File

        from ipa_twisted.http import make_http_client, make_pool
        loop = await self.loop(256 * MiB)
        image = await self.disk_image("gpt", 64 * MiB)
        with open(image, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        port: Any = reactor.listenTCP(0, Site(File(self.workdir)),  # type: ignore[arg-type]
                                      interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = make_pool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        shown: list[Any] = []
        config = AgentConfig(image_download_connection_retries=0)
        http = make_http_client(reactor, config, pool=pool)
        context = HardwareContext(config, LoopOnlyRunner(self.real, [loop.path]),
                                  reactor, reactor, http_client=lambda: http,
                                  report_progress=shown.append)
        url = f"http://127.0.0.1:{port.getHost().port}/{os.path.basename(image)}"
        drive = await self.configdrive_image()
        result = await write_image_to_disk(
            context, loop.path, {"id": "whole", "urls": [url], "disk_format": "raw",
                                 "os_hash_algo": "sha256", "os_hash_value": digest},
            _gzip_b64(drive))
        self.assertEqual(len(shown), 1)                   # the progress object shown
        self.assertIn("bytes_written", shown[0].serialize())
        layout = await self.parted(loop.path)
        self.assertEqual([p.name for p in layout.partitions], ["primary", "config-2"])
        self.assertEqual(set(result), {"root uuid"})

    async def test_manager_write_image_step(self) -> None:
        loop = await self.loop(256 * MiB)
        image = await self.disk_image("gpt", 64 * MiB)
        context = self.context(loop.path, include_loop_devices=True)
        manager = GenericHardwareManager(writer=self.writer(image))
        manager.bind(context)
        node = {"uuid": "n1", "properties": {"root_device": {"name": loop.path}}}
        deployed = await manager.write_image(node, [], {"id": "whole-1"}, None)
        self.assertEqual(self.written, [loop.path])
        self.assertEqual((deployed.image_id, deployed.device), ("whole-1", loop.path))
        self.assertEqual(set(deployed.partition_uuids), {"root uuid"})
        self.assertIsNone(to_jsonable(deployed))      # a deploy step's result: null, as ever
