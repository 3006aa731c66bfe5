"""Prove the image is generalized by reading the converted disk offline.

The generalize stage ran a script; this stage does not trust it. The final
qcow2 is converted to a scratch raw file and its root filesystem read with the
offline ext reader (diskfs): machine-id, host keys, the builder's user and key.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vmbuild import secrets as secrets_mod
from vmbuild.config.recipe import Recipe
from vmbuild.diskfs.rootfs import root_view
from vmbuild.diskfs.scrub import Needle, key_needles, scan_for_secrets
from vmbuild.errors import VmbuildError
from vmbuild.hypervisor.guest import Guest
from vmbuild.run import qemu_img
from vmbuild.stages import generalize


def check_generalized(
    final: Path,
    work: Path,
    builder_user: str,
    builder_pubkey: str,
    secrets: Sequence[Needle] = (),
) -> None:
    """Raise naming every leftover found in `final` (a qcow2); `work` holds the scratch raw.

    `secrets` (the builder's keys, secret parameter values) are searched for on
    the whole disk, free blocks included: a deleted copy is still a copy.
    """
    raw = work / "verify.raw"
    try:
        qemu_img("convert", "-f", "qcow2", "-O", "raw", final, raw)
        findings = generalize.verify(root_view(raw), builder_user, builder_pubkey)
        hits = scan_for_secrets(raw, secrets)
    finally:
        raw.unlink(missing_ok=True)
    if findings:
        details = "; ".join(f"{f.path}: {f.problem}" for f in findings)
        raise VmbuildError(f"the image is not generalized: {details}")
    if hits:
        details = "; ".join(f"{h.label} at byte {h.offset}" for h in hits)
        raise VmbuildError(
            f"the image still holds secrets: {details}",
            hint="nothing was stored; a component may have written the value into a file "
            "that stays in the image",
        )


def builder_needles(builder: Guest) -> list[Needle]:
    """What of the builder VM must not be anywhere on the output disk."""
    return [
        *key_needles("the builder's client private key", builder.client_key.private_openssh),
        *key_needles("the builder's client public key", builder.client_key.public_openssh),
        *key_needles("the builder VM's SSH host private key", builder.host_key.private_openssh),
    ]


def register_secrets(recipe: Recipe) -> list[Needle]:
    """Mask every secret parameter value from now on; the needles the offline
    scan looks for (labelled by field: a value is never printed)."""
    needles = []
    for i, ref in enumerate(recipe.components):
        for name in sorted(ref.secret_names()):
            value = ref.parameters[name]
            secrets_mod.register(value)
            label = f"secret parameter components[{i}].parameters.{name}"
            needles.append(Needle(label, value.encode()))
    return needles
