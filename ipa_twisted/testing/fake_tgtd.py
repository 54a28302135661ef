"""FakeTgtd: the tgt daemon as ``tgtadm`` sees it, for the iSCSI extension's tests.

``tgtadm ... --op show`` fails (exit 107, as when nothing listens on tgtd's socket) until
``start`` ran (``tgtd``), and for ``ready_after`` more shows; then it prints ``targets``.
``TARGETS`` is that listing in tgtadm's format, recorded from a real tgtd (tgt 1.0.85)
exporting a device (the second target made from the first); ``show_shape`` is its
structure without the values, which the real iSCSI test (``tests/test_iscsi_ext.py``, a
real tgtd in the disk sandbox) compares with what the real tgtadm prints, so the recording
cannot drift.
"""

from __future__ import annotations

import re
from typing import Any

from ipa_twisted.testing.fake_process import Exit

SHOW = ("tgtadm", "--lld", "iscsi", "--mode", "target", "--op", "show")
"""The argv of the listing."""

_TARGET_1 = """Target 1: iqn.2008-10.org.openstack:node-1
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            SCSI ID: IET     00010000
            SCSI SN: beaf10
            Size: 0 MB, Block size: 1
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: null
            Backing store path: None
            Backing store flags: 
        LUN: 1
            Type: disk
            SCSI ID: IET     00010001
            SCSI SN: beaf11
            Size: 8 MB, Block size: 512
            Online: Yes
            Removable media: No
            Prevent removal: No
            Readonly: No
            SWP: No
            Thin-provisioning: No
            Backing store type: rdwr
            Backing store path: /dev/sda
            Backing store flags: 
    Account information:
    ACL information:
        ALL
"""
TARGETS = _TARGET_1 + (_TARGET_1.replace("1: iqn.2008-10.org.openstack:node-1",
                                         "2: iqn.2008-10.org.openstack:other")
                       .replace("/dev/sda", "/dev/sdb").replace("IET     0001", "IET     0002")
                       .replace("beaf1", "beaf2"))
"""Two targets: node-1 exporting /dev/sda, other exporting /dev/sdb."""


def show_shape(text: str) -> Any:
    """Each line's indent and label (``Backing store path``), values left out."""
    shape = []
    for line in text.splitlines():
        if line.strip():
            label = re.sub(r"\d+", "#", line.strip().split(":")[0])
            shape.append((len(line) - len(line.lstrip()), label))
    return shape


class FakeTgtd:
    """tgtd behind ``tgtadm`` (see the module doc)."""

    def __init__(self, running: bool = False, ready_after: int = 0,
                 targets: str = "") -> None:
        self.running, self.ready_after, self.targets = running, ready_after, targets

    def start(self, argv: tuple[str, ...]) -> bytes:
        """``tgtd``: the daemon starts."""
        self.running = True
        return b""

    def show(self, argv: tuple[str, ...]) -> bytes | Exit:
        """``tgtadm ... --op show``: the targets, once the daemon answers."""
        if not self.running:
            return Exit(107, b"", b"tgtadm: failed to send request hdr to tgt daemon")
        if self.ready_after:
            self.ready_after -= 1
            return Exit(107)
        return self.targets.encode()
