"""Tool outputs recorded in the project's ramdisk, booted in QEMU, and how to re-record them.

The unit tests of the RAID and erase code (and ``FakeMdMachine``) answer from these. Each
``Recording`` names the command that produced it in the guest (words with ``{md}``,
``{virtio}``, ``{sata}``, ``{nvme}`` standing for the guest's device names) and a ``shape``:
the structure of the output the agent's parsers read (field names, line kinds, table
columns), with the values that vary between machines left out. ``tests/test_qemu_ramdisk.py``
runs the same commands in the guest, once it holds a software RAID-1 over its two virtio
disks, and checks that each fresh output has its recording's shape, and that the parsers
read it as they read the recording (``parsed``): a recording cannot drift from what the
tools print. The fresh outputs are kept in ``.cache/ramdisk-recordings/`` to re-record from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ipa_twisted.blockdev.drives import parse_ata_security, parse_nvme_id_ctrl
from ipa_twisted.blockdev.md import parse_examine_scan, parse_mdadm_detail, parse_mdstat

# -- the recordings (RAID-1 over two virtio disks, an NVMe and a SATA disk) --------------------

MDADM_DETAIL = """\
/dev/md0:
           Version : 1.2
     Creation Time : Sat Nov 21 07:36:00 2026
        Raid Level : raid1
        Array Size : 56256 (54.94 MiB 57.61 MB)
     Used Dev Size : 56256 (54.94 MiB 57.61 MB)
      Raid Devices : 2
     Total Devices : 2
       Persistence : Superblock is persistent

       Update Time : Sat Nov 21 07:36:00 2026
             State : clean 
    Active Devices : 2
   Working Devices : 2
    Failed Devices : 0
     Spare Devices : 0

Consistency Policy : resync

              Name : ipa-ramdisk:root  (local to host ipa-ramdisk)
              UUID : f2071a93:29233306:efd5edf0:0258fb51
            Events : 18

    Number   Major   Minor   RaidDevice State
       0     253        2        0      active sync   /dev/vda2
       1     253       18        1      active sync   /dev/vdb2
"""
MDSTAT = """\
Personalities : [raid0] [raid1] [raid10] [raid6] [raid5] [raid4] [linear] 
md0 : active raid1 vdb2[1] vda2[0]
      56256 blocks super 1.2 [2/2] [UU]
      
unused devices: <none>
"""
EXAMINE_SCAN = ("ARRAY /dev/md/root  metadata=1.2 UUID=f2071a93:29233306:efd5edf0:0258fb51 "
                "name=ipa-ramdisk:root\n")
# hdparm -I of QEMU's emulated SATA disk: no security feature set.
HDPARM_QEMU_SATA = """\

/dev/sda:

ATA device, with non-removable media
\tModel Number:       QEMU HARDDISK                           
\tSerial Number:      IPA-SATA-1          
\tFirmware Revision:  2.5+    
Standards:
\tUsed: ATA/ATAPI-5 published, ANSI INCITS 340-2000 
\tSupported: 7 6 5 4 & some of 6
Configuration:
\tLogical\t\tmax\tcurrent
\tcylinders\t130\t130
\theads\t\t16\t16
\tsectors/track\t63\t63
\t--
\tCHS current addressable sectors:      131040
\tLBA    user addressable sectors:      131072
\tLBA48  user addressable sectors:      131072
\tLogical  Sector size:                   512 bytes
\tPhysical Sector size:                   512 bytes
\tdevice size with M = 1024*1024:          64 MBytes
\tdevice size with M = 1000*1000:          67 MBytes (0 GB)
\tcache/buffer size  = 256 KBytes (type=DualPortCache)
Capabilities:
\tLBA, IORDY(cannot be disabled)
\tQueue depth: 32
\tStandby timer values: spec'd by Vendor
\tR/W multiple sector transfer: Max = 16\tCurrent = 16
\tDMA: sdma0 sdma1 sdma2 mdma0 mdma1 mdma2 udma0 udma1 udma2 udma3 udma4 *udma5 
\t     Cycle time: min=120ns recommended=120ns
\tPIO: pio0 pio1 pio2 pio3 pio4 
\t     Cycle time: no flow control=120ns  IORDY flow control=120ns
Commands/features:
\tEnabled\tSupported:
\t   *\tSMART feature set
\t   *\tWrite cache
\t   *\tNOP cmd
\t   *\t48-bit Address feature set
\t   *\tMandatory FLUSH_CACHE
\t   *\tFLUSH_CACHE_EXT
\t   *\tNative Command Queueing (NCQ)
HW reset results:
\tCBLID- above Vih
\tDevice num = 0
Integrity word not set (found 0x0000, expected 0x87a5)
"""
# hdparm -I of a virtio disk: exit 0, nothing but the name.
HDPARM_VIRTIO = "\n/dev/vda:\n"
# nvme id-ctrl -o json of QEMU's emulated NVMe: the fields the agent reads, and a few more.
NVME_QEMU = json.dumps({"vid": 6966, "sn": "IPA-NVME-1          ",
                        "mn": "QEMU NVMe Ctrl                          ", "oacs": 266,
                        "fna": 0, "sanicap": 0, "nn": 256, "oncs": 349})
# lsblk --fs --noheadings of a RAID member disk.
LSBLK_FS_RAID_MEMBER = """\
vda
\u251c\u2500vda1
\u2514\u2500vda2 linux_raid_member 1.2 ipa-ramdisk:root f2071a93-2923-3306-efd5-edf00258fb51
  \u2514\u2500md0
"""

# -- shapes: the structure a parser reads, values left out -------------------------------------


def _device_names(text: str) -> str:
    """Kernel device names replaced by what they are (``vda2`` → ``<virtio>2``).

    Device paths are cut to ``/dev/`` (a fake tree's ``/tmp/x/dev/vda`` is ``/dev/<virtio>``).
    """
    text = re.sub(r"(?<!\S)/\S*/dev/", "/dev/", text)
    for pattern, kind in ((r"nvme\d+n\d+(p?)", "<nvme>"), (r"\bmd\d+", "<md>"),
                          (r"\bvd[a-z]+", "<virtio>"), (r"\bsd[a-z]+", "<sata>")):
        text = re.sub(pattern, kind, text)
    return text


def mdadm_detail_shape(text: str) -> Any:
    """The ``Key : value`` keys in order, the member table's header and its rows' columns."""
    lines = text.splitlines()
    head, _, table = text.partition("    Number")
    keys = [line.partition(" : ")[0].strip() for line in head.splitlines()[1:]
            if " : " in line]
    rows = [_device_names(" ".join(line.split()[4:])) for line in table.splitlines()[1:]
            if line.strip()]
    return {"first": _device_names(lines[0]) if lines else None, "keys": keys,
            "table": ("Number" + table.splitlines()[0]).split() if table else None,
            "rows": rows}


def mdstat_shape(text: str) -> Any:
    """Each line's kind: personalities, an array line (state, level, members), blocks, end."""
    shape: list[Any] = []
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "Personalities":
            shape.append("personalities")
        elif re.match(r"^md\d+$", words[0]) and words[1:2] == [":"]:
            shape.append(("array", words[2], words[3],
                          [re.sub(r"\d+\[", "[", _device_names(w)) for w in words[4:]]))
        elif "blocks" in words:
            shape.append(("blocks", " ".join(re.sub(r"\d+", "#", w) for w in words)))
        else:
            shape.append(" ".join(words[:2]))
    return shape


def examine_scan_shape(text: str) -> Any:
    """Each ARRAY line: its device's form and its keys."""
    return [(re.sub(r"[^/]+$", "<name>", words[1]),
             [word.split("=", 1)[0] for word in words[2:]])
            for words in (line.split() for line in text.splitlines()) if words]


def hdparm_shape(text: str) -> Any:
    """The section headings and labelled fields of ``hdparm -I`` (Security among them)."""
    shape = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith("\t"):
            shape.append(re.sub(r"0x[0-9a-f]+", "0x#", _device_names(line.strip())))
        elif re.match(r"^\t[A-Z][\w ]*:", line):
            shape.append("\t" + line.split(":")[0].strip())
    return shape


NVME_FIELDS = ("vid", "sn", "mn", "oacs", "fna", "sanicap", "nn", "oncs")


def nvme_id_ctrl_shape(text: str) -> Any:
    """The types of the recorded fields (the output has hundreds more)."""
    document = json.loads(text)
    return {key: type(document.get(key)).__name__ for key in NVME_FIELDS}


def lsblk_fs_shape(text: str) -> Any:
    """The tree (device kinds by depth) and each line's file system type."""
    shape = []
    for line in text.splitlines():
        words = line.split()
        if words:
            indent = len(line) - len(line.lstrip(" \u2502\u251c\u2514\u2500"))
            shape.append((indent, _device_names(words[0].lstrip("\u251c\u2514\u2500")),
                           words[1] if len(words) > 1 else None))
    return shape


# -- what the parsers make of them, in the terms that hold on any machine ---------------------

def _parsed_detail(text: str) -> Any:
    detail = parse_mdadm_detail("/dev/md0", text)
    return (detail.level, (detail.state or "").split(",")[0], detail.volume_name,
            [_device_names(c) for c in detail.components],
            re.sub(r"[0-9a-f]", "x", detail.uuid or ""))


def _parsed_mdstat(text: str) -> Any:
    return sorted((_device_names(a.name), a.active, a.level,
                   sorted(_device_names(m) for m in a.members)) for a in parse_mdstat(text))


def _parsed_examine_scan(text: str) -> Any:
    return {device: (keys.get("metadata"), keys.get("name", "").rpartition(":")[2])
            for device, keys in parse_examine_scan(text).items()}


def _parsed_ata(text: str) -> Any:
    return parse_ata_security(text)


def _parsed_nvme(text: str) -> Any:
    return parse_nvme_id_ctrl(text)


def _parsed_raid_member(text: str) -> Any:
    return "linux_raid_member" in text


@dataclass(frozen=True)
class Recording:
    """One recorded output, the guest command that prints it, its shape and its reading."""

    name: str
    command: tuple[str, ...]
    output: str
    shape: Callable[[str], Any]
    parsed: Callable[[str], Any]


RECORDINGS = (
    Recording("mdadm-detail", ("mdadm", "--detail", "/dev/{md}"), MDADM_DETAIL,
              mdadm_detail_shape, _parsed_detail),
    Recording("mdstat", ("cat", "/proc/mdstat"), MDSTAT, mdstat_shape, _parsed_mdstat),
    Recording("mdadm-examine-scan", ("mdadm", "--examine", "--scan"), EXAMINE_SCAN,
              examine_scan_shape, _parsed_examine_scan),
    Recording("hdparm-sata", ("hdparm", "-I", "/dev/{sata}"), HDPARM_QEMU_SATA, hdparm_shape,
              _parsed_ata),
    Recording("hdparm-virtio", ("hdparm", "-I", "/dev/{virtio}"), HDPARM_VIRTIO, hdparm_shape,
              _parsed_ata),
    Recording("nvme-id-ctrl", ("nvme", "id-ctrl", "/dev/{nvme}", "-o", "json"), NVME_QEMU,
              nvme_id_ctrl_shape, _parsed_nvme),
    Recording("lsblk-fs-raid-member", ("lsblk", "--fs", "--noheadings", "/dev/{virtio}"),
              LSBLK_FS_RAID_MEMBER, lsblk_fs_shape, _parsed_raid_member),
)
"""Every recording, in the order the QEMU test re-records them."""
