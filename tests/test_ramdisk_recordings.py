"""The shapes that keep the recorded tool outputs honest: values may vary, structure not.

tests/test_qemu_ramdisk.py compares each recording's shape with a fresh output's; here each
shape is shown to ignore what differs between machines and runs and to catch what a parser
would trip on.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from ipa_twisted.testing.ramdisk_recordings import RECORDINGS, Recording

BY_NAME = {recording.name: recording for recording in RECORDINGS}

# (recording, a change of values only, a change of structure)
CASES = [
    ("mdadm-detail", [("Events : 18", "Events : 97"), ("/dev/vda2", "/dev/vdc2"),
                      ("f2071a93", "0badc0de")],
     ("Raid Level", "RAID Level")),
    ("mdstat", [("56256", "1047552"), ("vdb2[1]", "vdc2[1]")], ("[UU]", "")),
    ("mdadm-examine-scan", [("f2071a93", "0badc0de")], ("UUID=", "uuid=")),
    ("hdparm-sata", [("IPA-SATA-1", "S3Z1NB0K1234"), ("0x87a5", "0x1234")],
     ("Commands/features:", "Security:\n\tsupported\nCommands/features:")),
    ("hdparm-virtio", [("/dev/vda", "/dev/vdb")], ("/dev/vda:", "/dev/vda:\nATA device")),
    ("nvme-id-ctrl", [('"oacs": 266', '"oacs": 23')], ('"oacs": 266', '"oacs": "266"')),
    ("lsblk-fs-raid-member", [("f2071a93", "0badc0de")],
     ("\u2514\u2500vda2 linux_raid_member", "\u2514\u2500vda2 ext4")),
]


def changed(recording: Recording, old: str, new: str) -> str:
    if old not in recording.output:
        raise AssertionError(f"{recording.name}: {old!r} is not in the recording")
    return recording.output.replace(old, new)


class ShapeTests(SynchronousTestCase):
    def test_every_recording_is_covered(self) -> None:
        self.assertEqual({name for name, _, _ in CASES}, set(BY_NAME))

    def test_values_do_not_change_the_shape(self) -> None:
        for name, value_changes, _ in CASES:
            recording = BY_NAME[name]
            for old, new in value_changes:
                output = changed(recording, old, new)
                self.assertEqual(recording.shape(output), recording.shape(recording.output),
                                 (name, old, new))
                self.assertEqual(recording.parsed(output), recording.parsed(recording.output),
                                 (name, old, new))

    def test_structure_changes_the_shape(self) -> None:
        for name, _, (old, new) in CASES:
            recording = BY_NAME[name]
            self.assertNotEqual(recording.shape(changed(recording, old, new)),
                                recording.shape(recording.output), (name, old, new))

    def test_nvme_shape_reads_only_the_recorded_fields(self) -> None:
        recording = BY_NAME["nvme-id-ctrl"]
        fuller = dict(json.loads(recording.output), ver=66304, psds=[{"max_power": 25}])
        self.assertEqual(recording.shape(json.dumps(fuller)),
                         recording.shape(recording.output))

    def test_the_parsers_read_the_recordings(self) -> None:
        parsed = {recording.name: recording.parsed(recording.output)
                  for recording in RECORDINGS}
        self.assertEqual(parsed["mdadm-detail"][:3], ("raid1", "clean", "root"))
        self.assertEqual(parsed["mdstat"], [("<md>", True, "raid1",
                                             ["<virtio>2", "<virtio>2"])])
        self.assertIsNone(parsed["hdparm-sata"])             # QEMU's disk: no Security
        self.assertEqual(parsed["nvme-id-ctrl"].format_mode, 1)
        self.assertIs(parsed["lsblk-fs-raid-member"], True)
