"""End to end: a real, unmodified Ironic 39 drives our ramdisk (``ramdisk/build.sh``) in a
libvirt VM (TCG) through a Redfish BMC (sushy-tools, libvirt driver), as an operator would.

Ironic uses the ``redfish`` hardware type with ``redfish-virtual-media`` boot: it builds the
boot ISO from our kernel and initramfs, publishes it on a test HTTP server on 127.0.0.1 and has
sushy insert it. The guest reaches Ironic only through a QEMU user-network forward
(``10.0.2.100:6385``), Ironic reaches the agent on a forwarded port of 127.0.0.1.

Long (a VM under emulation): run alone with
``PYTHONPATH=. .venv/bin/python -m twisted.trial tests.test_e2e_vm``. Needs root, the
ramdisk build's tools, ``.venv-ironic`` and ``.venv-sushy`` (``bash .ci/setup`` makes them).
Each Ironic state transition is recorded with its time and printed at the end.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web.server import Site
from twisted.web.static import File

from tests import libvirt_bmc, qemu
from tests.ironic.harness import RealIronic, skip_reason
from tests.processes import sleep

GUEST_IRONIC = "10.0.2.100:6385"
MAC = "52:54:00:e2:e1:40"


def _unavailable() -> str | None:
    if os.environ.get("IPA_E2E_VM") != "1":
        # Work in progress: enrolment through Redfish passes; inspection reaches
        # "inspect wait" with the VM booting our ramdisk from virtual media, not yet further.
        return ("set IPA_E2E_VM=1 to run the end-to-end VM test (work in progress: passes "
                "enrolment through Redfish, inspection not yet)")
    return (skip_reason() or qemu.unavailable() or libvirt_bmc.unavailable())


class Transitions:
    """Each provision and power state of a node with the time it was first seen."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seen: list[tuple[float, str, str]] = []
        self._last: tuple[str, str] | None = None

    def record(self, node: dict[str, Any]) -> None:
        now = (node["provision_state"], node["power_state"])
        if now != self._last:
            self._last = now
            self.seen.append((time.monotonic() - self.started, *now))

    def report(self) -> str:
        lines, previous = [], 0.0
        for at, provision, power in self.seen:
            lines.append(f"  {at:7.1f}s (+{at - previous:6.1f}s)  {provision:<16} {power}")
            previous = at
        return "\n".join(lines)


class EndToEndTests(unittest.TestCase):
    """Ironic → sushy-tools → libvirt → our ramdisk, one VM through the node's life."""

    timeout = 1800

    def setUp(self) -> None:
        reason = _unavailable()
        if reason:
            raise unittest.SkipTest(reason)

    async def _await_node(self, ironic: RealIronic, uuid: str, done: Any, what: str,
                    timeout: float, transitions: Transitions,
                    bmc: libvirt_bmc.LibvirtBMC | None = None) -> dict[str, Any]:
        deadline = reactor.seconds() + timeout
        while True:
            node = await ironic.node(uuid)
            transitions.record(node)
            if done(node):
                return node
            failed = node["provision_state"] in ("inspect failed", "clean failed",
                                                 "deploy failed", "rescue failed",
                                                 "unrescue failed", "error")
            if failed or reactor.seconds() > deadline:
                console = bmc.console()[-3000:] if bmc else ""
                raise AssertionError(
                    f"{what}: {'failed' if failed else f'not within {timeout}s'}; "
                    f"state {node['provision_state']!r}, power {node['power_state']!r}, "
                    f"last_error {node['last_error']!r}\nstates:\n{transitions.report()}"
                    f"{ironic.log_excerpt()}\n--- console:\n{console}")
            await sleep(1)

    async def test_life_of_a_node(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        # QEMU runs as libvirt's user: the disks' directories must be traversable by it.
        path = directory
        while path != os.getcwd() and path != "/":
            os.chmod(path, os.stat(path).st_mode | 0o711)
            path = os.path.dirname(path)
        ramdisk = await qemu.build_ramdisk()
        transitions = Transitions()

        # The HTTP server Ironic publishes the boot ISO on ([deploy]http_url, http_root).
        http_root = os.path.join(directory, "httpboot")
        os.makedirs(http_root)
        http = reactor.listenTCP(0, Site(File(http_root)), interface="127.0.0.1")
        self.addCleanup(http.stopListening)
        http_url = f"http://127.0.0.1:{http.getHost().port}"

        ironic = RealIronic(
            os.path.join(directory, "ironic"), hardware_type="redfish", require_tls=False,
            callback_timeout=600,
            options={"deploy": {"http_root": http_root, "http_url": http_url,
                                "default_boot_mode": "bios"},
                     "conductor": {"file_url_allowed_paths": qemu.RAMDISK_OUTPUT},
                     "service_catalog": {"endpoint_override": f"http://{GUEST_IRONIC}"}})
        bmc = libvirt_bmc.LibvirtBMC(
            os.path.join(directory, "vm"), f"ipa-e2e-{os.getpid()}",
            [libvirt_bmc.VMDisk(os.path.join(directory, f"virtio{n}.img"), "virtio",
                                f"e2e-virtio-{n}", 1 << 30) for n in range(2)]
            + [libvirt_bmc.VMDisk(os.path.join(directory, "nvme.img"), "nvme",
                                  "e2e-nvme-0", 1 << 30)],
            MAC, guest_forwards={GUEST_IRONIC: ironic.port})
        ironic._options["redfish"] = {
            "kernel_append_params": f"console=ttyS0 ipa-advertise-host=127.0.0.1 "
                                    f"ipa-advertise-port={bmc.agent_port}"}
        self.addCleanup(bmc.stop)
        await bmc.start()
        await ironic.start()
        self.addCleanup(ironic.stop)

        # (1) Enrol a redfish node: verifying syncs its power state from the BMC.
        uuid = await ironic.enroll_node(
            [MAC], state="manageable", power=None, name="e2e-node",
            driver_info={"redfish_address": bmc.redfish_address,
                         "redfish_system_id": bmc.system_id,
                         "redfish_username": "admin", "redfish_password": "password",
                         "deploy_kernel": "file://" + ramdisk.kernel,
                         "deploy_ramdisk": "file://" + ramdisk.initrd},
            properties={"capabilities": "boot_mode:bios"})
        node = await ironic.node(uuid)
        transitions.record(node)
        self.assertEqual(node["power_state"], "power off")
        self.assertEqual(node["boot_interface"], "redfish-virtual-media")

        try:
            await self._stages(ironic, bmc, uuid, transitions)
        finally:
            print(f"\nIronic state transitions of {uuid} (ramdisk build "
                  f"{ramdisk.seconds:.0f}s):\n{transitions.report()}")

    async def _stages(self, ironic: RealIronic, bmc: libvirt_bmc.LibvirtBMC, uuid: str,
                      transitions: Transitions) -> None:
        # (2) Inspection by the agent: boot the ramdisk from virtual media.
        await ironic.set_provision_state(uuid, "inspect")
        await self._await_node(ironic, uuid, lambda n: n["provision_state"] == "manageable",
                         "inspection", 900, transitions, bmc)
        code, data = await ironic.request("GET", f"/v1/nodes/{uuid}/inventory",
                                          expect=[200])
        inventory = data["inventory"]
        serials = {disk.get("serial") for disk in inventory["disks"]}
        self.assertLessEqual({"e2e-virtio-0", "e2e-virtio-1", "e2e-nvme-0"}, serials)
        macs = {i["mac_address"] for i in inventory["interfaces"]}
        self.assertIn(MAC, macs)
        code, ports = await ironic.request("GET", f"/v1/ports?node={uuid}", expect=[200])
        self.assertEqual([p["address"] for p in ports["ports"]], [MAC])
