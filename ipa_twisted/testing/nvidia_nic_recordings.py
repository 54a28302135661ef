"""Outputs of lspci, mstflint and mstconfig on a machine with NVIDIA (Mellanox) NICs.

Origin: no such NIC is on the machines these tests run on, so these were not captured from
a live card. They are written from the tools' documented output formats and the reference
agent's own unit-test fixtures (ironic-python-agent 13.0.0,
``ironic_python_agent/tests/unit/hardware_managers/nvidia/test_nvidia_fw_update.py``):

- ``lspci -Dn -d 15b3:``: ``<domain:bus:slot.func> <class>: <vendor>:<device>`` per line
  (lspci(8), ``-n``/``-D``; `` (rev NN)`` when the revision is not 0), the reference's four
  functions (ConnectX-6 ``101b`` Ethernet and InfiniBand, ConnectX-5 ``1017``) plus a
  BlueField PCI bridge (class ``0604``) that is not a NIC;
- ``mstflint -d <pci> -qq query`` and ``mstflint -i <file> query``: the reference's
  fixtures (``FW Version``, ``FW Version(Running)`` after a burn not yet activated,
  ``PSID``);
- ``mstconfig -d <pci> q`` (``Configurations:`` then ``NAME  value`` lines, values like
  ``False(0)``, ``ETH(2)`` or ``Array[0..7]``) and ``mstconfig -d <pci> i`` (the parameters
  the tool knows, ``NAME=<values>  description``): the reference's fixtures, with
  ``LINK_TYPE_P1`` added from mstconfig's documented listing.

A fake runner (``FakeRunner``) answers the steps' commands with them.
"""

from __future__ import annotations

LSPCI = """\
0000:06:00.0 0200: 15b3:101b
0000:06:00.1 0207: 15b3:101b
0000:03:00.0 0207: 15b3:1017
0000:03:00.1 0207: 15b3:1017
0000:07:00.0 0604: 15b3:1976 (rev 01)
"""
"""``lspci -Dn -d 15b3:``: two cards of two functions each, and a bridge."""

CX6_PSID = "MT_0000000228"
CX5_PSID = "MT_0000000652"

MSTFLINT_QUERY_CX6 = """\
Image type:            FS4
FW Version:            20.35.1012
FW Release Date:       28.10.2022
Product Version:       20.35.1012
Rom Info:              type=UEFI version=14.28.15 cpu=AMD64,AARCH64
                       type=PXE version=3.6.804 cpu=AMD64
Description:           UID                GuidsNumber
Base GUID:             043f720300f04c46        8
Base MAC:              043f72f04c46            8
Image VSD:             N/A
Device VSD:            N/A
PSID:                  MT_0000000228
Security Attributes:   N/A
"""
"""``mstflint -d 0000:06:00.x -qq query``: the ConnectX-6, running what is burnt."""

MSTFLINT_QUERY_CX6_PENDING = """\
Image type:            FS4
FW Version:            20.35.1012
FW Version(Running):   20.34.1002
FW Release Date:       28.10.2022
Product Version:       20.35.1012
Rom Info:              type=UEFI version=14.28.15 cpu=AMD64,AARCH64
                       type=PXE version=3.6.804 cpu=AMD64
Description:           UID                GuidsNumber
Base GUID:             043f720300f04c46        8
Base MAC:              043f72f04c46            8
Image VSD:             N/A
Device VSD:            N/A
PSID:                  MT_0000000228
Security Attributes:   N/A
"""
"""The same card after a burn that awaits a firmware reset."""

MSTFLINT_QUERY_CX5 = """\
Image type:            FS4
FW Version:            16.35.1012
PSID:                  MT_0000000652
"""
"""``mstflint -d 0000:03:00.x -qq query``: the ConnectX-5 (the reference's short form)."""

MSTFLINT_IMAGE_QUERY_CX6 = """\
Image type:            FS4
FW Version:            20.36.1012
FW Release Date:       28.10.2022
Product Version:       rel-20_35_1012
Rom Info:              type=UEFI version=14.29.15 cpu=AMD64,AARCH64
                       type=PXE version=3.6.904 cpu=AMD64
Description:           UID                GuidsNumber
Base GUID:             N/A                     4
Base MAC:              N/A                     4
Image VSD:             N/A
Device VSD:            N/A
PSID:                  MT_0000000228
Security Attributes:   N/A
Security Ver:          0
"""
"""``mstflint -i fw.bin query``: a ConnectX-6 image of version 20.36.1012."""

MSTCONFIG_QUERY = """
Device #1:
----------

Device type:    ConnectX6
Name:           MCX654106A-HCA_Ax
Device:         0000:06:00.0

Configurations:                              Next Boot
         NUM_OF_VFS                          0
         SRIOV_EN                            False(0)
         PF_TOTAL_SF                         0
         LINK_TYPE_P1                        ETH(2)
         ESWITCH_HAIRPIN_TOT_BUFFER_SIZE     Array[0..7]
"""
"""``mstconfig -d <pci> q``."""

MSTCONFIG_INFO = """List of configurations the device 0000:06:00.0 may support:
    GLOBAL PCI CONF:
        SRIOV_EN=<False|True> Enable Single-Root I/O Virtualization (SR-IOV)
        NUM_OF_VFS=<NUM>      Number of Virtual Functions (VFs) to expose
    PF PCI CONF:

        PF_TOTAL_SF=<NUM>     The total number of Sub Function partitions
                              (SFs) that can be supported, for this PF.
                              alid only when PER_PF_NUM_SF is set to TRUE
    PORT CONF:
        LINK_TYPE_P1=<IB|ETH|VPI>  Network link type
    INTERNAL HAIRPIN CONF:
        ESWITCH_HAIRPIN_TOT_BUFFER_SIZE=<NUM>   Log(base 2) of the buffer size
                                                (in bytes) allocated
                                                internally for hairpin for a
                                                given IEEE802.1p priority i.
                                                0 means no buffer for this
                                                priority and traffic with this
                                                priority will be dropped.

"""
"""``mstconfig -d <pci> i``."""

TOOL_VERSIONS: dict[tuple[str, ...], str] = {
    ("mstflint", "-v"): "mstflint, mstflint 4.24.0, Git SHA Hash: N/A\n",
    ("mstconfig", "-v"): "mstconfig, mstflint 4.24.0, Git SHA Hash: N/A\n",
    ("mstfwreset", "-v"): "mstfwreset, mstflint 4.24.0, Git SHA Hash: N/A\n",
    ("lspci", "--version"): "lspci version 3.9.0\n",
}
"""The tools' ``-v``/``--version`` lines (the steps only need them to succeed)."""
