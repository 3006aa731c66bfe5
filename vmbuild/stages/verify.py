"""Prove the image is generalized by reading the converted disk offline.

The generalize stage ran a script; this stage does not trust it. The final
qcow2 is converted to a scratch raw file and its root filesystem read with the
offline ext reader (diskfs): machine-id, host keys, the builder's user and key.
"""

from __future__ import annotations

from pathlib import Path

from vmbuild.diskfs.rootfs import root_view
from vmbuild.errors import VmbuildError
from vmbuild.run import qemu_img
from vmbuild.stages import generalize


def check_generalized(final: Path, work: Path, builder_user: str, builder_pubkey: str) -> None:
    """Raise naming every leftover found in `final` (a qcow2); `work` holds the scratch raw."""
    raw = work / "verify.raw"
    try:
        qemu_img("convert", "-f", "qcow2", "-O", "raw", final, raw)
        findings = generalize.verify(root_view(raw), builder_user, builder_pubkey)
    finally:
        raw.unlink(missing_ok=True)
    if findings:
        details = "; ".join(f"{f.path}: {f.problem}" for f in findings)
        raise VmbuildError(f"the image is not generalized: {details}")
