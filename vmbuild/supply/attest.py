"""Attest a build dir: both SBOMs, then the provenance over disks, SBOMs and manifest, signed.

Called by the build's attest stage (inside the staging dir, before the atomic commit) and by
`vmbuild sign REF` for stores built before signing existed or to re-sign with another key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer

from vmbuild.run import write_atomic
from vmbuild.supply import PROVENANCE, provenance, sbom, signing


@dataclass(frozen=True)
class Attestation:
    path: Path  # the DSSE envelope file
    digest: str  # sha256 of that file: what AMIs are tagged with
    signed_by: str  # "local:<path>", "awskms:<arn>" or "unsigned"
    keyids: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "sha256": self.digest,
            "signed_by": self.signed_by,
            "keyids": list(self.keyids),
        }


def attest(
    build_dir: Path,
    manifest: Mapping[str, Any],
    *,
    signer: Signer | None,
    signed_by: str,
    vm_settings: Mapping[str, Any] | None = None,
    write_sboms: bool = True,
    hashed: Mapping[str, tuple[str, int]] | None = None,
) -> Attestation:
    """Write sbom.spdx.json, sbom.cdx.json and provenance.intoto.jsonl into `build_dir`
    (`hashed`: digests the caller took as it wrote those files; see provenance.subjects)."""
    if write_sboms:
        sbom.write_sboms(build_dir, manifest)
    digests = provenance.subjects(build_dir, manifest, hashed)
    payload = provenance.statement(manifest, digests, vm_settings=vm_settings)
    envelope = signing.sign(payload, signer)
    text = json.dumps(envelope.to_dict(), sort_keys=True) + "\n"
    target = build_dir / PROVENANCE
    write_atomic(target, text)
    return Attestation(
        target,
        hashlib.sha256(text.encode()).hexdigest(),
        signed_by if envelope.signatures else "unsigned",
        tuple(envelope.signatures),
    )
