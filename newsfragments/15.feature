New `erase_pstore` clean step: removes the kernel's pstore crash records (mounting pstore for the step when it is not mounted).
New `clean_uefi_nvram` clean and deploy step (`match_patterns`): removes the UEFI boot entries whose device path or label matches, never the one the machine booted from.
The Mellanox manager offers `update_nvidia_nic_firmware_image` and `update_nvidia_nic_firmware_settings` (clean, deploy and service) on machines with NVIDIA/Mellanox NICs, with mstflint and mstconfig.
