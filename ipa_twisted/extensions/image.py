"""``image.install_bootloader``: make the deployed instance bootable.

The work is in ``ipa_twisted.deploy.bootloader`` (see its docstring for the steps). This
command picks the install device and the agent's own boot mode from the hardware managers,
stops an iSCSI target exposing the disk (``iscsi.start_iscsi_target``) first, and applies
``ignore_bootloader_failure`` (the command's, else the ``ignore_bootloader_failure`` option
when the configuration has one, else False). A partition image's BIOS boot loader needs the
``enable_bios_bootloader_install`` option (Ironic's lookup may set it; CVE-2026-43003):
without it the command fails before any disk is looked at (``bios_install_permitted``).
A whole-disk image on a machine where no EFI boot entry can be made has nothing to install
(``nothing_to_install``): the command ends without asking for the install device, so its
first answer already says it has finished, as Ironic's first poll of it expects. Otherwise
the answer waits for the end, up to ``ANSWER_WITHIN`` seconds, for the same reason.
"""

from __future__ import annotations

from typing import Any

from ipa_twisted import errors
from ipa_twisted.commands import async_command
from ipa_twisted.extensions.base import Extension

BOOT_MODES = ("bios", "uefi")
ANSWER_WITHIN = 20.0
"""How long (s) the answer to ``install_bootloader`` waits for its end: Ironic polls it right
after the answer and, finding it still running, looks again only after
``[agent]command_wait_interval`` (6 s by default)."""


def _validate(extension: Extension, root_uuid: Any = None, efi_system_part_uuid: Any = None,
              prep_boot_part_uuid: Any = None, target_boot_mode: Any = "bios",
              ignore_bootloader_failure: Any = None) -> None:
    if target_boot_mode is not None and target_boot_mode not in BOOT_MODES:
        raise errors.InvalidCommandParamsError(
            f"target_boot_mode must be one of {', '.join(BOOT_MODES)}, not "
            f"{target_boot_mode!r}")
    for name, value in (("root_uuid", root_uuid),
                        ("efi_system_part_uuid", efi_system_part_uuid),
                        ("prep_boot_part_uuid", prep_boot_part_uuid)):
        if value is not None and not value.strip():
            raise errors.InvalidCommandParamsError(f"{name} must not be empty")


class ImageExtension(Extension):
    """Installs the boot loader of a freshly written image."""

    name = "image"

    @async_command("install_bootloader", validator=_validate, answer_within=ANSWER_WITHIN)
    async def install_bootloader(self, root_uuid: str | None,
                                 efi_system_part_uuid: str | None = None,
                                 prep_boot_part_uuid: str | None = None,
                                 target_boot_mode: str | None = "bios",
                                 ignore_bootloader_failure: bool | None = None) -> None:
        """Install GRUB2 (or register the image's EFI loaders) for the instance.

        ``root_uuid``: the root partition's UUID (None or ``0x00000000`` for whole-disk
        images); ``efi_system_part_uuid``: the ESP, for UEFI; ``prep_boot_part_uuid``: the
        PReP partition (PowerPC); ``target_boot_mode``: ``bios`` or ``uefi``.
        CommandExecutionError if the boot loader cannot be installed, DeviceNotFound if a
        partition cannot be found.
        """
        from ipa_twisted.deploy import bootloader   # loaded when first used (idle memory)
        ignore = ignore_bootloader_failure
        if ignore is None:
            ignore = bool(getattr(self.agent.config, "ignore_bootloader_failure", False))
        if not bootloader.bios_install_permitted(self.agent.config, root_uuid,
                                                 efi_system_part_uuid, target_boot_mode,
                                                 ignore):
            return
        managers = await self.agent.get_managers()
        boot = await managers.dispatch_to_managers("get_boot_info")
        current_boot_mode = str(getattr(boot, "current_boot_mode", "bios"))
        context = self.agent.hardware_context()
        iscsi = self.agent.extensions.get("iscsi")
        if (getattr(iscsi, "exported_device", None) is None
                and bootloader.nothing_to_install(context, root_uuid, target_boot_mode,
                                                  current_boot_mode)):
            return
        device = await managers.dispatch_to_managers("get_os_install_device")
        cleanup = getattr(iscsi, "clean_up_started_target", None)
        if cleanup is not None:
            await cleanup(device)
        await bootloader.install_bootloader(
            context, str(device), root_uuid,
            efi_system_part_uuid=efi_system_part_uuid,
            prep_boot_part_uuid=prep_boot_part_uuid, target_boot_mode=target_boot_mode,
            current_boot_mode=current_boot_mode, ignore_failure=ignore)
