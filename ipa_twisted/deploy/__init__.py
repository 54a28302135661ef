"""Writing an instance onto the install disk: the image (``write``), the partition layout
and config drive of partition images, the bootloader and EFI boot entries, injected files.
Below the hardware managers, above the image byte pipeline and the block devices."""
