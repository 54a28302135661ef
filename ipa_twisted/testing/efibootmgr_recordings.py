"""Outputs of ``efibootmgr -v`` (UEFI NVRAM boot entries), for ``clean_uefi_nvram``.

- ``OVMF_EFIBOOTMGR_V`` was captured: the project's ramdisk booted in QEMU with OVMF
  (Debian's ovmf, a fresh VARS file, the kernel given directly, hence no ``BootCurrent``),
  Debian bookworm's efibootmgr 17, after
  ``efibootmgr -c -d /dev/vda -p 1 -L ipa-grub -l \\EFI\\ipa\\grubx64.efi`` on a disk whose
  partition 1 is an EFI system partition. ``tests/test_qemu_uefi_nvram.py`` reads the fresh
  output the same way (its copy goes to ``.cache/ramdisk-recordings/efibootmgr-v.txt``).
- ``SERVER_EFIBOOTMGR_V`` was written, not captured: efibootmgr 17's format (``BootCurrent``,
  ``Timeout``, ``BootOrder``, then ``BootXXXX* <label><TAB><device path>``, an entry's
  optional data printed after its path) with the firmware entries OVMF makes when it boots
  from a disk, and entries operating systems add (shim, GRUB, systemd-boot, ironic's own
  ``ironic1``, from which the machine booted).
"""

from __future__ import annotations

OVMF_EFIBOOTMGR_V = (
    "Timeout: 0 seconds\n"
    "BootOrder: 0001,0000\n"
    "Boot0000* UiApp\tFvVol(7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1)/"
    "FvFile(462caa21-7614-4503-836e-8ab6f4662331)\n"
    "Boot0001* ipa-grub\tHD(1,GPT,062ffc50-7faa-4598-9b05-6f39e3449ca2,0x800,0x10000)/"
    "File(\\EFI\\ipa\\grubx64.efi)\n")

SERVER_EFIBOOTMGR_V = (
    "BootCurrent: 0004\n"
    "Timeout: 1 seconds\n"
    "BootOrder: 0004,0003,0000,0001,0002,0005,0006\n"
    "Boot0000* UiApp\tFvVol(7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1)/"
    "FvFile(462caa21-7614-4503-836e-8ab6f4662331)\n"
    "Boot0001* UEFI PXEv4 (MAC:525400123456)\tPciRoot(0x0)/Pci(0x2,0x0)/"
    "MAC(525400123456,1)/IPv4(0.0.0.00.0.0.0,0,0)N.....YM....R,Y.\n"
    "Boot0002* EFI Internal Shell\tFvVol(7cb8bdc9-f8eb-4f34-aaea-3ee4af6516a1)/"
    "FvFile(7c04a583-9e3e-4f1c-ad65-e05268d0b4d1)\n"
    "Boot0003* ubuntu\tHD(1,GPT,4a1c2b3d-5e6f-4a8b-9c0d-1e2f3a4b5c6d,0x800,0x100000)/"
    "File(\\EFI\\ubuntu\\shimx64.efi)\n"
    "Boot0004* ironic1\tHD(1,GPT,0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a,0x800,0x100000)/"
    "File(\\EFI\\BOOT\\BOOTX64.EFI)\n"
    "Boot0005* Linux Boot Manager\tHD(1,GPT,4a1c2b3d-5e6f-4a8b-9c0d-1e2f3a4b5c6d,0x800,"
    "0x100000)/File(\\EFI\\systemd\\systemd-bootx64.efi)\n"
    "Boot000A  debian\tHD(2,GPT,11111111-2222-4333-8444-555555555555,0x100800,0x100000)/"
    "File(\\EFI\\debian\\grubx64.efi)..BO\n")
"""Boot000A is inactive (no ``*``): efibootmgr still lists it, and it is cleaned alike."""
