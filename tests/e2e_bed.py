"""The end-to-end bed: a real, unmodified Ironic 39 (``tests/ironic/harness.py``) drives our
ramdisk (``ramdisk/build.sh``) in a libvirt VM (TCG) through a Redfish BMC (sushy-tools,
``tests/libvirt_bmc.py``), and the steps of a node's life through Ironic's REST API, as an
operator would. Used by ``tests/test_e2e_vm.py`` (which asserts) and ``.ci/demo`` (which
shows).

Ironic uses the ``redfish`` hardware type with ``redfish-virtual-media`` boot: it builds the
boot ISO from our kernel and initramfs, publishes it on an HTTP server of this bed on
127.0.0.1 and has sushy insert it. The guest reaches Ironic and the image server, both on
127.0.0.1, at QEMU's user-network alias of the host (``libvirt_bmc.GUEST_HOST``); Ironic
reaches the agent on a forwarded port of 127.0.0.1. Ironic's conductor checks the image URL (a
HEAD request) before deploying: it uses the image server as its HTTP proxy, which serves the
guest's address of itself as its own.

The VM: two 1 GiB virtio disks (serials ``RAID_SERIALS``), a 1 GiB NVMe disk, the NIC Ironic
knows (``MAC``, on the user network) and a second NIC (``SECOND_MAC``) that inspection adds as a
port; boot mode BIOS (faster under TCG). The image deployed is ``tests/bootable_image.py``'s.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid as uuidlib
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import File

from tests import bootable_image, libvirt_bmc, qemu
from tests.ironic.harness import RealIronic, skip_reason
from tests.processes import ROOT, free_port, sleep

MAC = "52:54:00:e2:e1:40"
SECOND_MAC = "52:54:00:e2:e1:41"
RAID_SERIALS = ("e2e-virtio-0", "e2e-virtio-1")
NVME_SERIAL = "e2e-nvme-0"
RAID_DEVICE = "/dev/md0"
RESCUE_PASSWORD = "e2e-rescue-password"
FAILED = ("inspect failed", "clean failed", "deploy failed", "rescue failed",
          "unrescue failed", "error")
WROTE_IMAGE = re.compile(r"Wrote image \S+ \((\w+), (\d+) bytes\) to (\S+) in ([\d.]+) s")
"""The agent's log line (on the serial console) once an image is written and verified."""


def unavailable() -> str | None:
    """Why the bed cannot run here (None: it can)."""
    return (skip_reason() or qemu.unavailable() or libvirt_bmc.unavailable()
            or bootable_image.unavailable())


class Transitions:
    """Each provision and power state of a node with the time it was first seen; ``say``
    is called with each new one as a line."""

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self.started = time.monotonic()
        self.seen: list[tuple[float, str, str]] = []
        self._last: tuple[str, str] | None = None
        self._say = say

    def record(self, node: dict[str, Any]) -> None:
        now = (node["provision_state"], node["power_state"])
        if now != self._last:
            self._last = now
            self.seen.append((time.monotonic() - self.started, *now))
            if self._say is not None:
                self._say(self._line(len(self.seen) - 1))

    def _line(self, index: int) -> str:
        at, provision, power = self.seen[index]
        previous = self.seen[index - 1][0] if index else 0.0
        return f"  {at:7.1f}s (+{at - previous:6.1f}s)  {provision:<16} {power}"

    def report(self) -> str:
        return "\n".join(self._line(index) for index in range(len(self.seen)))


class TimedFile(File):
    """A file served with the time each GET took to finish."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.downloads: list[float] = []

    def render_GET(self, request: Any) -> Any:
        started = time.monotonic()
        request.notifyFinish().addCallback(
            lambda _: self.downloads.append(time.monotonic() - started))
        return super().render_GET(request)


class ImageSite(Site):
    """The image server. Also Ironic's HTTP proxy: a request for an absolute URL (the
    guest's address of this server) is served as if addressed to this server."""

    def getResourceFor(self, request: Any) -> Any:
        target = urlsplit(request.path)
        if target.scheme:
            path = target.path or b"/"
            request.postpath = [unquote_to_bytes(part) for part in path[1:].split(b"/")]
        return super().getResourceFor(request)


class ProxiedIronic(RealIronic):
    """Ironic whose outgoing HTTP to anything but this machine goes through ``proxy``, and
    which hands the ramdisk its URL as the guest sees it."""

    proxy = ""

    def config(self) -> dict[str, dict[str, object]]:
        sections = super().config()
        sections["service_catalog"]["endpoint_override"] = (
            f"http://{libvirt_bmc.GUEST_HOST}:{self.port}")
        return sections

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env.update(http_proxy=self.proxy, no_proxy="127.0.0.1,localhost")
        return env


class Bed:
    """Ironic, the BMC, the VM and the servers in ``directory``; ``say`` shows progress."""

    def __init__(self, directory: str, say: Callable[[str], None] | None = None,
                 vm_name: str | None = None, fast_track: bool = True) -> None:
        """``fast_track``: Ironic's ``[deploy]fast_track``: the ramdisk booted for inspection
        stays up (powered on, heartbeating) through cleaning and deploy, as metal3 runs it;
        without it each of those boots the ramdisk again (a minute or more under TCG)."""
        self.fast_track = fast_track
        self.directory = os.path.abspath(directory)
        self.say = say or (lambda line: None)
        self.transitions = Transitions(say)
        self.figures: dict[str, str] = {}
        self.vm_name = vm_name or f"ipa-e2e-{os.getpid()}"
        self.uuid = ""
        self.ironic: ProxiedIronic | None = None
        self.bmc: libvirt_bmc.LibvirtBMC | None = None
        self.image_path = ""
        self._image_sha256 = ""
        self._image: TimedFile | None = None
        self._image_url = ""
        self._stops: list[Callable[[], Any]] = []

    # -- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Build (or reuse) the ramdisk and the image, start the servers, the BMC and VM
        (powered off) and Ironic."""
        os.makedirs(self.directory, exist_ok=True)
        # QEMU runs as libvirt's user: the disks' directories must be traversable by it.
        path = self.directory
        while path != "/":
            os.chmod(path, os.stat(path).st_mode | 0o711)
            path = os.path.dirname(path)
        started = time.monotonic()
        self.ramdisk = await qemu.build_ramdisk()
        self.figures["ramdisk build"] = (f"{self.ramdisk.seconds:.0f} s "
                                         f"({'rebuilt' if self.ramdisk.rebuilt else 'cached'})")
        self.image_path = await bootable_image.build_bootable_image()
        self._image_sha256 = await deferToThread(_sha256, self.image_path)
        self.say(f"ramdisk and image ready ({time.monotonic() - started:.0f} s)")

        # The HTTP server Ironic publishes the boot ISO on ([deploy]http_url, http_root).
        http_root = os.path.join(self.directory, "httpboot")
        os.makedirs(http_root, exist_ok=True)
        http: Any = reactor.listenTCP(0, Site(File(http_root)),  # type: ignore[arg-type]
                                      interface="127.0.0.1")
        self._stops.append(http.stopListening)
        http_url = f"http://127.0.0.1:{http.getHost().port}"
        self._image = TimedFile(self.image_path)
        images = Resource()
        images.putChild(b"disk.img", self._image)
        image_server: Any = reactor.listenTCP(0, ImageSite(images),  # type: ignore[arg-type]
                                              interface="127.0.0.1")
        self._stops.append(image_server.stopListening)
        self._image_url = (f"http://{libvirt_bmc.GUEST_HOST}:{image_server.getHost().port}"
                           "/disk.img")

        agent_port = free_port()
        self.ironic = ProxiedIronic(
            os.path.join(self.directory, "ironic"), hardware_type="redfish",
            require_tls=False, callback_timeout=900, fast_track=self.fast_track,
            # fast_track_timeout: Ironic's default; the harness's 30 s is shorter than the
            # conductor holds the node's lock after inspection, during which heartbeats are
            # refused (HTTP 409), so the next stage found the agent stale and rebooted it.
            options={"deploy": {"http_root": http_root, "http_url": http_url,
                                "default_boot_mode": "bios", "fast_track_timeout": 300,
                                "erase_devices_metadata_priority": 99},
                     "conductor": {"file_url_allowed_paths": qemu.RAMDISK_OUTPUT,
                                   "automated_clean": True,
                                   "force_power_state_during_sync": False},
                     "agent": {"post_deploy_get_power_state_retries": 60,
                               "post_deploy_get_power_state_retry_interval": 2},
                     "redfish": {"kernel_append_params":
                                 f"console=ttyS0 ipa-advertise-host=127.0.0.1 "
                                 f"ipa-advertise-port={agent_port} "
                                 f"ipa-enable-bios-bootloader-install=1"}})
        self.ironic.proxy = f"http://127.0.0.1:{image_server.getHost().port}"
        vm = os.path.join(self.directory, "vm")
        self.bmc = libvirt_bmc.LibvirtBMC(
            vm, self.vm_name,
            [libvirt_bmc.VMDisk(os.path.join(vm, f"virtio{n}.img"), "virtio", serial, 1 << 30)
             for n, serial in enumerate(RAID_SERIALS)]
            + [libvirt_bmc.VMDisk(os.path.join(vm, "nvme.img"), "nvme", NVME_SERIAL,
                                  1 << 30)],
            MAC, second_mac=SECOND_MAC, agent_port=agent_port)
        self._stops.append(self.bmc.stop)
        await self.bmc.start()
        self.say(f"Redfish BMC (sushy-tools) at {self.bmc.redfish_address}, VM {self.vm_name}")
        self._stops.append(self.ironic.stop)
        await self.ironic.start()
        self.say(f"Ironic at {self.ironic.api_url} (log {self.ironic.log_path})")

    async def stop(self) -> None:
        """Stop what ``start`` started, last first."""
        while self._stops:
            result = self._stops.pop()()
            if hasattr(result, "__await__") or hasattr(result, "addCallback"):
                await result

    # -- waiting ----------------------------------------------------------------------------
    async def node(self) -> dict[str, Any]:
        assert self.ironic is not None
        node = await self.ironic.node(self.uuid)
        self.transitions.record(node)
        return node

    async def reach(self, state: str, what: str, timeout: float = 1200) -> dict[str, Any]:
        """The node once it rests in ``state`` (no target); AssertionError with the states,
        Ironic's errors and the console if it fails or takes longer than ``timeout``."""
        assert self.ironic is not None and self.bmc is not None
        started = time.monotonic()
        deadline = reactor.seconds() + timeout
        while True:
            node = await self.node()
            if node["provision_state"] == state and node["target_provision_state"] is None:
                self.figures[what] = f"{time.monotonic() - started:.0f} s"
                return node
            failed = node["provision_state"] in FAILED
            if failed or reactor.seconds() > deadline:
                raise AssertionError(
                    f"{what}: {'failed' if failed else f'not within {timeout}s'}; "
                    f"state {node['provision_state']!r}, power {node['power_state']!r}, "
                    f"last_error {node['last_error']!r}\nstates:\n"
                    f"{self.transitions.report()}{self.ironic.log_excerpt()}\n"
                    f"--- console:\n{self.bmc.console()[-4000:]}")
            await sleep(1)

    async def console(self, text: str, times: int = 1, timeout: float = 600) -> None:
        """Wait until ``text`` was printed ``times`` times on the VM's serial console."""
        assert self.bmc is not None
        deadline = reactor.seconds() + timeout
        while self.bmc.console().count(text) < times:
            if reactor.seconds() > deadline:
                raise AssertionError(f"{text!r} not seen {times} time(s) on the console "
                                     f"within {timeout}s:\n{self.bmc.console()[-4000:]}")
            await sleep(2)

    # -- a node's life ----------------------------------------------------------------------
    async def enrol(self) -> dict[str, Any]:
        """A redfish node with a port for ``MAC``, verified (its power read from the BMC)."""
        assert self.ironic is not None and self.bmc is not None
        kernel, initrd = "file://" + self.ramdisk.kernel, "file://" + self.ramdisk.initrd
        self.uuid = await self.ironic.enroll_node(
            [MAC], state="manageable", power=None, name="e2e-node",
            driver_info={"redfish_address": self.bmc.redfish_address,
                         "redfish_system_id": self.bmc.system_id,
                         "redfish_username": "admin", "redfish_password": "password",
                         "deploy_kernel": kernel, "deploy_ramdisk": initrd,
                         "rescue_kernel": kernel, "rescue_ramdisk": initrd},
            properties={"capabilities": "boot_mode:bios"},
            raid_interface="agent", rescue_interface="agent")
        return await self.node()

    async def inspect(self) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """Inspection by the agent: the node, its stored inventory and its ports' MACs."""
        assert self.ironic is not None
        await self.ironic.set_provision_state(self.uuid, "inspect")
        node = await self.reach("manageable", "inspection")
        _, data = await self.ironic.request("GET", f"/v1/nodes/{self.uuid}/inventory",
                                            expect=[200])
        _, ports = await self.ironic.request("GET", f"/v1/ports?node={self.uuid}",
                                             expect=[200])
        return node, data["inventory"], sorted(p["address"] for p in ports["ports"])

    async def build_raid(self) -> dict[str, Any]:
        """Manual cleaning: software RAID 1 over the virtio disks, named by serial."""
        assert self.ironic is not None
        raid = {"logical_disks": [{
            "size_gb": "MAX", "raid_level": "1", "controller": "software",
            "is_root_volume": True,
            "physical_disks": [{"serial": serial} for serial in RAID_SERIALS]}]}
        await self.ironic.request("PUT", f"/v1/nodes/{self.uuid}/states/raid", raid,
                                  expect=[204])
        await self.ironic.set_provision_state(self.uuid, "clean", clean_steps=[
            {"interface": "raid", "step": "delete_configuration"},
            {"interface": "raid", "step": "create_configuration"}])
        return await self.reach("manageable", "manual cleaning (RAID 1)")

    async def provide(self) -> dict[str, Any]:
        """Automated cleaning (the metadata erase), then available."""
        assert self.ironic is not None
        await self.ironic.set_provision_state(self.uuid, "provide")
        return await self.reach("available", "automated cleaning")

    async def deploy(self) -> str:
        """Deploy the bootable image onto the RAID device with a config drive; wait until
        active and the deployed system has printed the config drive's uuid. That uuid."""
        assert self.ironic is not None and self._image is not None
        instance_uuid = str(uuidlib.uuid4())
        await self.ironic.request("PATCH", f"/v1/nodes/{self.uuid}", [
            {"op": "add", "path": "/properties/root_device",
             "value": {"name": RAID_DEVICE}}], expect=[200])
        await self.ironic.deploy(self.uuid, {
            "image_source": self._image_url, "image_disk_format": "raw",
            "image_os_hash_algo": "sha256", "image_os_hash_value": self._image_sha256,
            "image_rootfs_uuid": bootable_image.ROOTFS_UUID},
            configdrive={"meta_data": {"uuid": instance_uuid}})
        await self.reach("active", "deploy")
        self._image_figures()
        started = time.monotonic()
        await self.console(bootable_image.MARKER)
        await self.console(f"{bootable_image.CONFIGDRIVE_MARKER}{instance_uuid}")
        self.figures["active to the deployed system's config drive line"] = (
            f"{time.monotonic() - started:.0f} s")
        return instance_uuid

    def _image_figures(self) -> None:
        assert self.bmc is not None and self._image is not None
        mib = os.path.getsize(self.image_path) / (1 << 20)
        if self._image.downloads:
            seconds = max(self._image.downloads)
            self.figures["image download into the VM (server side)"] = (
                f"{mib:.0f} MiB in {seconds:.1f} s = {mib / seconds:.1f} MiB/s")
        wrote = WROTE_IMAGE.findall(self.bmc.console())
        if wrote:
            _, size, device, seconds = wrote[-1]
            self.figures["agent's image write (its log)"] = (
                f"{int(size) / (1 << 20):.0f} MiB to {device} in {float(seconds):.1f} s = "
                f"{int(size) / (1 << 20) / float(seconds):.1f} MiB/s")

    async def rescue(self) -> dict[str, Any]:
        assert self.ironic is not None
        await self.ironic.set_provision_state(self.uuid, "rescue",
                                              rescue_password=RESCUE_PASSWORD)
        return await self.reach("rescue", "rescue")

    async def unrescue(self) -> dict[str, Any]:
        assert self.ironic is not None
        await self.ironic.set_provision_state(self.uuid, "unrescue")
        return await self.reach("active", "unrescue")

    def report(self) -> str:
        """The state transitions and the figures, as lines."""
        lines = [f"Ironic state transitions of node {self.uuid}:", self.transitions.report()]
        lines += [f"  {name}: {figure}" for name, figure in self.figures.items()]
        return "\n".join(lines)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -- the demo (.ci/demo) ------------------------------------------------------------------------
AGENT_PROGRESS = re.compile(r"\[ipa_twisted\.[\w.]+#info\] ((Image |Wrote image|Writing image"
                            r"|Adding a |Fetching the config drive|Install device|Running "
                            r"erase|Creating|Erased|Installing)[^\n]*)")
"""The agent's log lines (on the serial console) the demo shows as its progress."""


async def demo(directory: str, env_file: str) -> None:
    """Bring the bed up in ``directory``, take a node through inspection, RAID, cleaning
    and deploy while printing each state change and the agent's image progress, write the
    ``baremetal`` CLI's environment to ``env_file``, print ``DEMO READY`` and run until
    SIGTERM (which stops everything)."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import LoopingCall

    def say(line: str) -> None:
        print(line, flush=True)

    bed = Bed(directory, say=say, vm_name="ipa-demo")
    stopped: Deferred[None] = Deferred()
    reactor.addSystemEventTrigger("before", "shutdown",
                                  lambda: Deferred.fromCoroutine(bed.stop()))
    seen = [0]

    def agent_progress() -> None:
        if bed.bmc is None:
            return
        console = bed.bmc.console()
        for match in AGENT_PROGRESS.finditer(console, seen[0]):
            say(f"      agent: {match.group(1).strip()}")
        seen[0] = len(console)
    follow = LoopingCall(agent_progress)
    follow.start(2.0)
    try:
        await bed.start()
        assert bed.ironic is not None and bed.bmc is not None
        with open(env_file, "w") as f:
            f.write(f"export OS_AUTH_TYPE=none\nexport OS_ENDPOINT={bed.ironic.api_url}\n"
                    f"export OS_BAREMETAL_API_VERSION=1.81\n"
                    f"export PATH={os.path.join(ROOT, '.venv-ironic', 'bin')}:$PATH\n")
        say("enrolling the node (driver redfish, boot redfish-virtual-media)")
        await bed.enrol()
        say("inspecting (the agent inspect interface)")
        _, inventory, ports = await bed.inspect()
        say(f"  inventory: {len(inventory['disks'])} disks "
            f"({', '.join(d['name'] + '=' + str(d.get('serial')) for d in inventory['disks'])})"
            f", ports {', '.join(ports)}")
        say("manual cleaning: software RAID 1 over the two virtio disks")
        await bed.build_raid()
        say("providing: automated cleaning (metadata erase)")
        await bed.provide()
        say("deploying the bootable image onto the RAID device, with a config drive")
        instance_uuid = await bed.deploy()
        say(f"  the deployed system booted from the RAID and read its config drive "
            f"(uuid {instance_uuid})")
        say(bed.report())
        say("DEMO READY")
        await stopped
    except Exception as e:
        say(f"DEMO FAILED: {e}")
        raise
    finally:
        if follow.running:
            follow.stop()


def main(argv: list[str]) -> None:
    """``python -m tests.e2e_bed DIRECTORY ENV_FILE``: the demo (see ``demo``)."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react
    react(lambda _reactor: Deferred.fromCoroutine(demo(argv[1], argv[2])))


if __name__ == "__main__":
    import sys
    main(sys.argv)
