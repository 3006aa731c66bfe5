"""The build's attest stage: SBOMs + signed provenance in the staging dir, before commit.

A build with no key configured creates the local key on first use (as ssh-keygen would be
run once), so every stored artifact is signed and `distribute` can refuse tampered ones.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmbuild.supply import signing
from vmbuild.supply.attest import Attestation, attest

log = logging.getLogger("vmbuild.supply")


def attest_stage(
    build_dir: Path, manifest: Mapping[str, Any], vm_settings: Mapping[str, Any] | None = None
) -> Attestation:
    """Write sbom.spdx.json, sbom.cdx.json and the signed provenance.intoto.jsonl."""
    signer, label = signing.default_signer()
    if signer is None:
        where = signing.generate_local_key()
        log.warning(
            "created a signing key for provenance: %s (public: %s)", where.private, where.public
        )
        signer, label = signing.default_signer()
    return attest(build_dir, manifest, signer=signer, signed_by=label, vm_settings=vm_settings)
