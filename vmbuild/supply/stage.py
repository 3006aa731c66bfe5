"""The build's attest stage: SBOMs, the CVE scan (when the recipe asks) and signed
provenance, written in the staging dir before the atomic commit.

A build with no key configured creates the local key on first use (as ssh-keygen would be
run once), so every stored artifact is signed and `distribute` can refuse tampered ones.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmbuild.supply import sbom, signing
from vmbuild.supply.attest import Attestation, attest

log = logging.getLogger("vmbuild.supply")


def attest_stage(
    build_dir: Path,
    manifest: dict[str, Any],
    vm_settings: Mapping[str, Any] | None = None,
    *,
    scan_settings: Any = None,  # config.recipe.ScanSettings | None
    recipe_dir: Path | None = None,
    hashed: Mapping[str, tuple[str, int]] | None = None,
) -> Attestation:
    """Write both SBOMs, scan them if asked (results into `manifest["scan"]`, ScanFailed
    above the threshold), then the signed provenance.intoto.jsonl."""
    sbom.write_sboms(build_dir, manifest)
    if scan_settings is not None:
        from vmbuild.supply.scan import raise_if_failed, scan_build

        data = Path(scan_settings.data) if scan_settings.data else None
        if data is not None and not data.is_absolute() and recipe_dir is not None:
            data = recipe_dir / data
        result = scan_build(build_dir, manifest, data=data, fail_on=scan_settings.fail_on)
        manifest["scan"] = result.to_json()
        raise_if_failed(result)
    signer, label = signing.default_signer()
    if signer is None:
        where = signing.generate_local_key()
        log.warning("created a signing key for provenance: %s (public: %s)", where.private,
                    where.public)  # fmt: skip
        signer, label = signing.default_signer()
    return attest(
        build_dir, manifest, signer=signer, signed_by=label, vm_settings=vm_settings,
        write_sboms=False, hashed=hashed,
    )  # fmt: skip
