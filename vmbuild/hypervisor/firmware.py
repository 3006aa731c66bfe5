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
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmbuild.errors import VmbuildError

Firmware = Literal["bios", "uefi", "uefi-secure"]
BootMode = Literal["legacy-bios", "uefi", "uefi-preferred"]
OVMF_DIR = Path("/usr/share/OVMF")


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


def boot_modes(boot_mode: BootMode, secure_boot: bool) -> list[Firmware]:
    """The firmware a recipe's image is tested under, first the one the builder uses."""
    uefi: Firmware = "uefi-secure" if secure_boot else "uefi"
    return {"legacy-bios": ["bios"], "uefi": [uefi], "uefi-preferred": [uefi, "bios"]}[boot_mode]  # type: ignore[return-value]


def builder_firmware(boot_mode: BootMode) -> Firmware:
    # The builder needs no Secure Boot: the test VM proves it. OVMF without
    # SMM runs on the default machine and boots faster under TCG.
    return "bios" if boot_mode == "legacy-bios" else "uefi"


def uefi_files(firmware: Firmware) -> UefiFiles:
    """The OVMF files for `firmware`; an error naming the package when they are missing."""
    files = FILES[firmware]
    for path in (files.code, files.vars_template):
        if not path.is_file():
            raise VmbuildError(
                f"{firmware} firmware: {path} is missing", hint="apt-get install ovmf"
            )
    return files


def vars_copy(firmware: Firmware, dest: Path) -> Path:
    """This VM's own UEFI variable store, a copy of the template."""
    shutil.copyfile(uefi_files(firmware).vars_template, dest)
    return dest


def qemu_args(firmware: Firmware, vars_file: Path | None) -> list[str]:
    """The machine and flash drives for `firmware` (SeaBIOS needs nothing)."""
    if firmware == "bios":
        return []
    if vars_file is None:
        raise VmbuildError(f"{firmware} firmware needs a per-VM vars file")
    files = FILES[firmware]
    args = []
    if files.secure:
        args += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    return [
        *args,
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={files.code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_file}",
    ]  # fmt: skip


def machine(firmware: Firmware) -> str:
    """QEMU's machine type: Secure Boot OVMF needs q35 with SMM."""
    return "q35,smm=on" if firmware == "uefi-secure" else "pc"
