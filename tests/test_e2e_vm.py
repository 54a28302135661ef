"""End to end: a real, unmodified Ironic 39 drives our ramdisk (``ramdisk/build.sh``) in a
libvirt VM (TCG) through a Redfish BMC (sushy-tools, libvirt driver), as an operator would
(``tests/e2e_bed.py`` describes the bed: forwards, image server, the VM's disks and NICs).

One node's life in one test, with Ironic's fast track (the ramdisk booted for inspection
serves cleaning and deploy): enrolment; inspection by the ``agent`` inspect interface
(inventory stored, disks by serial, a port created for the second NIC); manual cleaning
building a software RAID 1 over the two virtio disks (``target_raid_config``,
``physical_disks`` by serial); automated cleaning (metadata erase); deploy of a bootable
whole-disk image (``tests/bootable_image.py``) onto the RAID device (root device hint) with a
config drive, the VM powered off through the agent and booted from its disks, the deployed
system's marker and the config drive's uuid seen on the serial console; rescue and unrescue
(the deployed system boots again).

The longest VM test (about 8-9 minutes under TCG on 2 idle cores, 15-18 under load;
``IPA_SKIP_E2E_VM=1`` leaves it out):
run it alone with ``PYTHONPATH=. .venv/bin/python -m twisted.trial tests.test_e2e_vm``.
Needs root, the
ramdisk build's tools, ``.venv-ironic`` and ``.venv-sushy`` (``bash .ci/setup`` makes them).
Each Ironic state transition is printed with its time, and the image's throughput into the
VM.
"""

from __future__ import annotations

import os

from twisted.trial import unittest

from tests import bootable_image, e2e_bed


def _unavailable() -> str | None:
    if os.environ.get("IPA_SKIP_E2E_VM") == "1":
        return "IPA_SKIP_E2E_VM=1: the end-to-end VM test is left out"
    return e2e_bed.unavailable()


class EndToEndTests(unittest.TestCase):
    """Ironic → sushy-tools → libvirt → our ramdisk, one VM through the node's life."""

    timeout = 3600

    def setUp(self) -> None:
        reason = _unavailable()
        if reason:
            raise unittest.SkipTest(reason)

    async def test_life_of_a_node(self) -> None:
        bed = e2e_bed.Bed(self.mktemp())
        self.addCleanup(bed.stop)
        await bed.start()
        try:
            await self._life(bed)
        finally:
            print(f"\n{bed.report()}")

    async def _life(self, bed: e2e_bed.Bed) -> None:
        # (1) Enrolment: verifying reads the power state from the BMC.
        node = await bed.enrol()
        self.assertEqual(node["power_state"], "power off")
        self.assertEqual(node["boot_interface"], "redfish-virtual-media")

        # (2) Inspection by the agent: the ramdisk boots from virtual media and posts its
        # inventory to Ironic's continue_inspection, which finds the node by its port's MAC.
        node, inventory, ports = await bed.inspect()
        serials = {disk.get("serial") for disk in inventory["disks"]}
        self.assertLessEqual({*e2e_bed.RAID_SERIALS, e2e_bed.NVME_SERIAL}, serials)
        self.assertLessEqual({e2e_bed.MAC, e2e_bed.SECOND_MAC},
                             {i["mac_address"] for i in inventory["interfaces"]})
        self.assertEqual(node["properties"].get("cpu_arch"), "x86_64")
        self.assertEqual(ports, sorted([e2e_bed.MAC, e2e_bed.SECOND_MAC]),
                         "inspection created the second NIC's port")

        # (3) Manual cleaning: software RAID 1 over the two virtio disks, by serial; then
        # automated cleaning (the metadata erase) to available.
        node = await bed.build_raid()
        [volume] = node["raid_config"]["logical_disks"]
        self.assertEqual((volume["raid_level"], volume["controller"]), ("1", "software"))
        await bed.provide()
        assert bed.ironic is not None
        self.assertTrue(any("erase_devices_metadata" in line
                            for line in bed.ironic.log_lines("INFO", "DEBUG")),
                        "the metadata erase ran during automated cleaning")

        # (4) Deploy onto the RAID device with a config drive: Ironic installs GRUB onto the
        # holders (software RAID), powers the VM off through the agent and boots it from
        # its disk, where the deployed system prints its marker and the config drive's uuid.
        instance_uuid = await bed.deploy()

        # (5) Rescue (the ramdisk again, the password set), then unrescue: the deployed
        # system boots again.
        await bed.rescue()
        await bed.console("Rescue password written")
        await bed.unrescue()
        await bed.console(f"{bootable_image.CONFIGDRIVE_MARKER}{instance_uuid}", times=2)
