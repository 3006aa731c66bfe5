"""The UEFI variable store an AMI carries (RegisterImage's UefiData): the very
Secure Boot store the test VM booted under (Debian's OVMF_VARS_4M.ms.fd:
Microsoft's PK, KEK and db, and the dbx), converted from OVMF's edk2 flash
format to EC2's base64 `uefi-data` format by AWS's own `uefivars` library.

With it the AMI enforces Secure Boot with those keys on EC2, as it was proved
to boot under them here; without it EC2 gives the instance its default store.
The conversion is the library's documented one (its CLI does the same: read
one store class, write it as another); its errors are turned into one
VmbuildError naming the file.
"""

from __future__ import annotations

from pathlib import Path

from vmbuild.errors import VmbuildError
from vmbuild.hypervisor import firmware

# EC2 limits uefi-data to 64 KiB of base64 text.
MAX_UEFI_DATA = 64 * 1024
SECURE_BOOT_VARS = ("PK", "KEK", "db", "dbx")


def secure_boot_uefi_data(vars_file: Path | None = None) -> str:
    """EC2 uefi-data (base64) for the Secure Boot store the test VM used."""
    from pyuefivars.aws import AWSUEFIVarStore
    from pyuefivars.edk2 import EDK2UEFIVarStore

    path = vars_file or firmware.uefi_files("uefi-secure").vars_template
    try:
        store = EDK2UEFIVarStore(path.read_bytes())
        names = {v.name for v in store.vars}
        store.__class__ = AWSUEFIVarStore  # the library's conversion: same vars, new format
        blob = bytes(store).decode("ascii")
    except (Exception, SystemExit) as exc:  # the library reports bad input by sys.exit()
        raise VmbuildError(f"{path}: cannot convert the UEFI variable store: {exc}") from None
    if missing := [n for n in SECURE_BOOT_VARS if n not in names]:
        raise VmbuildError(
            f"{path}: no Secure Boot keys ({', '.join(missing)} missing)",
            hint="use an OVMF vars file with keys enrolled (Debian: OVMF_VARS_4M.ms.fd)",
        )
    if len(blob) > MAX_UEFI_DATA:
        raise VmbuildError(f"{path}: uefi-data is {len(blob)} bytes, over EC2's 64 KiB")
    return blob


def variable_names(blob: str) -> list[str]:
    """The variables an EC2 uefi-data blob holds (for checks and `distribute --dry-run`)."""
    from pyuefivars.aws import AWSUEFIVarStore

    return [v.name for v in AWSUEFIVarStore(blob.encode("ascii")).vars]
