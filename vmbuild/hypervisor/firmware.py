"""Firmware for a VM: SeaBIOS (QEMU's default), OVMF (UEFI) and OVMF with Secure
Boot enforced, from Debian's `ovmf` package.

UEFI keeps its variables in a second flash: the code is shared read-only, each
VM gets its own copy of a vars template (boot entries a guest writes must never
reach another VM). Secure Boot needs OVMF's SMM build, which QEMU only runs on
the q35 machine with SMM on and the flash locked to SMM (`cfi.pflash01
secure=on`); its template is Debian's `OVMF_VARS_4M.ms.fd`, which holds
Microsoft's keys enrolled with Secure Boot on, as EC2's default UEFI store does.

How a recipe's EC2 boot mode maps to firmware (`boot_modes`): legacy-bios
boots SeaBIOS; uefi boots OVMF (with Secure Boot when asked); uefi-preferred
boots OVMF first, then SeaBIOS, as EC2 picks UEFI where the instance type
supports it and legacy BIOS where it does not.

arm64 guests boot UEFI only (as EC2's Graviton instances): AAVMF, Debian's
`qemu-efi-aarch64` build of the same firmware for QEMU's virt machine, with
the same shared-code/own-vars split. Secure Boot is not offered for arm64
(the recipe refuses it): the offline base carries an unsigned GRUB there.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmbuild.errors import VmbuildError
from vmbuild.hypervisor.arch import Arch

Firmware = Literal["bios", "uefi", "uefi-secure"]
BootMode = Literal["legacy-bios", "uefi", "uefi-preferred"]
# How errors name the firmware a VM booted (the recipe's boot_mode and secure_boot).
FIRMWARE_LABEL: dict[Firmware, str] = {
    "bios": "legacy BIOS (SeaBIOS)",
    "uefi": "UEFI (OVMF)",
    "uefi-secure": "UEFI with Secure Boot enforced (OVMF, Microsoft's keys)",
}
OVMF_DIR = Path("/usr/share/OVMF")
AAVMF_DIR = Path("/usr/share/AAVMF")


@dataclass(frozen=True)
class UefiFiles:
    code: Path  # read-only, shared
    vars_template: Path  # copied per VM

    @property
    def secure(self) -> bool:
        return "secboot" in self.code.name


FILES: dict[Firmware, UefiFiles] = {
    "uefi": UefiFiles(OVMF_DIR / "OVMF_CODE_4M.fd", OVMF_DIR / "OVMF_VARS_4M.fd"),
    "uefi-secure": UefiFiles(OVMF_DIR / "OVMF_CODE_4M.secboot.fd", OVMF_DIR / "OVMF_VARS_4M.ms.fd"),
}
# AAVMF's code and vars are both 64 MiB, the size of the virt machine's flash banks.
AAVMF = UefiFiles(AAVMF_DIR / "AAVMF_CODE.fd", AAVMF_DIR / "AAVMF_VARS.fd")
PACKAGE: dict[Arch, str] = {"x86_64": "ovmf", "arm64": "qemu-efi-aarch64"}


def boot_modes(boot_mode: BootMode, secure_boot: bool) -> list[Firmware]:
    """The firmware a recipe's image is tested under, first the one the builder uses."""
    uefi: Firmware = "uefi-secure" if secure_boot else "uefi"
    return {"legacy-bios": ["bios"], "uefi": [uefi], "uefi-preferred": [uefi, "bios"]}[boot_mode]  # type: ignore[return-value]


def builder_firmware(boot_mode: BootMode) -> Firmware:
    # The builder needs no Secure Boot: the test VM proves it. OVMF without
    # SMM runs on the default machine and boots faster under TCG.
    return "bios" if boot_mode == "legacy-bios" else "uefi"


def _files(firmware: Firmware, arch: Arch) -> UefiFiles:
    if arch == "x86_64":
        return FILES[firmware]
    if firmware != "uefi":
        raise VmbuildError(f"{arch} guests boot plain UEFI only, not {firmware}")
    return AAVMF


def uefi_files(firmware: Firmware, arch: Arch = "x86_64") -> UefiFiles:
    """The OVMF (AAVMF for arm64) files for `firmware`; an error naming the package
    when they are missing."""
    files = _files(firmware, arch)
    for path in (files.code, files.vars_template):
        if not path.is_file():
            raise VmbuildError(
                f"{firmware} firmware: {path} is missing", hint=f"apt-get install {PACKAGE[arch]}"
            )
    return files


def vars_copy(firmware: Firmware, dest: Path, arch: Arch = "x86_64") -> Path:
    """This VM's own UEFI variable store, a copy of the template."""
    shutil.copyfile(uefi_files(firmware, arch).vars_template, dest)
    return dest


def qemu_args(firmware: Firmware, vars_file: Path | None, arch: Arch = "x86_64") -> list[str]:
    """The machine and flash drives for `firmware` (SeaBIOS needs nothing)."""
    if firmware == "bios":
        if arch != "x86_64":
            raise VmbuildError(f"{arch} guests have no BIOS: they boot UEFI")
        return []
    if vars_file is None:
        raise VmbuildError(f"{firmware} firmware needs a per-VM vars file")
    files = _files(firmware, arch)
    args = []
    if files.secure:
        args += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return [
        *args,
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={files.code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}",
    ]  # fmt: skip


def machine(firmware: Firmware, arch: Arch = "x86_64") -> str:
    """QEMU's machine type: Secure Boot OVMF needs q35 with SMM; arm64 runs on virt."""
    if arch == "arm64":
        return "virt"
    return "q35,smm=on" if firmware == "uefi-secure" else "pc"
