"""Prove the image is generalized by reading the converted disk offline.

The generalize stage ran a script; this stage does not trust it. The final
qcow2 is converted to a scratch raw file and its root filesystem read with the
offline ext reader (diskfs): machine-id, host keys, the builder's user and key.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from vmbuild import secrets as secrets_mod
from vmbuild.config.recipe import Recipe
from vmbuild.diskfs.rootfs import root_view
from vmbuild.diskfs.scrub import (
    MIN_NEEDLE,
    MIN_TOKEN,
    TEXT_DIRS,
    Needle,
    key_needles,
    scan_for_secrets,
    scan_text_files,
)
from vmbuild.errors import VmbuildError
from vmbuild.hypervisor.guest import Guest
from vmbuild.run import qemu_img
from vmbuild.stages import generalize

log = logging.getLogger("vmbuild.verify")


def check_generalized(
    final: Path,
    work: Path,
    builder_user: str,
    builder_pubkey: str,
    secrets: Sequence[Needle] = (),
) -> None:
    """Raise naming every leftover found in `final` (a qcow2); `work` holds the scratch raw.

    `secrets` (the builder's keys, secret parameter values) are searched for on
    the whole disk, free blocks included: a deleted copy is still a copy. Values
    too short for that are searched for as whole words in the root file system's
    text files (diskfs.scrub.MIN_TOKEN says why).
    """
    raw = work / "verify.raw"
    try:
        qemu_img("convert", "-f", "qcow2", "-O", "raw", final, raw)
        root = root_view(raw)
        findings = generalize.verify(root, builder_user, builder_pubkey)
        hits = [f"{h.label} at byte {h.offset}" for h in scan_for_secrets(raw, secrets)]
        hits += [f"{h.label} in {h.path}" for h in scan_text_files(root, secrets, work)]
    finally:
        raw.unlink(missing_ok=True)
    if findings:
        details = "; ".join(f"{f.path}: {f.problem}" for f in findings)
        raise VmbuildError(f"the image is not generalized: {details}")
    if hits:
        raise VmbuildError(
            f"the image still holds secrets: {'; '.join(hits)}",
            hint="nothing was stored; a component may have written the value into a file "
            "that stays in the image (a parameter that is not a secret can be listed in "
            "public_parameters)",
        )


def builder_needles(builder: Guest) -> list[Needle]:
    """What of the builder VM must not be anywhere on the output disk.

    The builder VM's SSH host *public* key is deliberately not searched for.
    It is public by design: sshd hands it to every client, vmbuild keeps it in
    its known_hosts pin, and a copy of it in a log or in a known_hosts file in
    the image lets nobody impersonate or log into anything. A search for it
    could only fail builds over harmless text. What does matter is the host
    *private* key (anyone holding it can impersonate every VM booted from this
    image), and both halves of the client key: the public half in an
    authorized_keys file would keep a door open for whoever held the private one.
    """
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
            size = len(value.encode())
            if size < MIN_TOKEN:
                log.warning(
                    "%s is %d bytes long: it is masked, but too short to be told apart from "
                    "other text, so the image cannot be checked for it", label, size,
                )  # fmt: skip
            elif size < MIN_NEEDLE:
                log.warning(
                    "%s is shorter than %d bytes: the image is checked for it only as a whole "
                    "word in the text files under %s", label, MIN_NEEDLE, ", ".join(TEXT_DIRS),
                )  # fmt: skip
    return needles
