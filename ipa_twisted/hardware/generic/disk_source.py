"""What the erase and RAID collaborators ask of the generic manager's disk listing."""

from __future__ import annotations

from typing import Protocol

from ipa_twisted.hardware.inventory import BlockDevice


class DiskSource(Protocol):
    """The machine's disks as the generic manager lists and judges them."""

    async def list_block_devices(self, include_partitions: bool = False
                                 ) -> list[BlockDevice]:
        """The block devices (lsblk, udev), as ``list_block_devices`` gives them."""
        ...

    def is_read_only(self, name: str) -> bool:
        """Whether the kernel flags ``name`` (a kernel name, e.g. ``sda``) read-only."""
        ...

    def is_virtual_media(self, device: BlockDevice) -> bool:
        """Whether ``device`` is the virtual media the agent was booted with."""
        ...
