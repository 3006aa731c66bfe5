"""Check a stored build against its signed provenance: signature, then every subject.

The first difference stops the check and names the file: a disk whose sha256 changed, a
manifest edited after signing, an SBOM swapped, a provenance file whose signature fails.
Digests already computed by the caller (a bundle import hashes while it unpacks) are reused
instead of reading multi-GiB disks twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securesystemslib.dsse import Envelope
from securesystemslib.signer import Key

from vmbuild.digest import sha256_file
from vmbuild.errors import VmbuildError
from vmbuild.publish.artifact import manifest_digest
from vmbuild.supply import PROVENANCE, provenance, signing
from vmbuild.supply.signing import VerificationFailed


@dataclass
class VerifyReport:
    build_dir: Path
    signed: bool
    keyids: list[str] = field(default_factory=list)
    subjects: dict[str, str] = field(default_factory=dict)
    provenance_sha256: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.build_dir),
            "ok": True,
            "signed": self.signed,
            "keyids": self.keyids,
            "provenance_sha256": self.provenance_sha256,
            "subjects": self.subjects,
        }


def read_envelope(path: Path) -> tuple[Envelope, bytes]:
    """The DSSE envelope in `path` and the file's raw bytes."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise VerificationFailed(
            f"{path}: no provenance (the artifact was never signed)",
            hint="sign it with `vmbuild sign REF`, or pass --allow-unsigned",
        ) from None
    try:
        envelope = Envelope.from_dict(json.loads(raw))
    except (ValueError, KeyError, TypeError) as exc:
        raise VerificationFailed(f"{path}: not a DSSE envelope ({exc})") from None
    return envelope, raw


def verify_build(
    build_dir: Path,
    keys: list[Key] | None,
    *,
    allow_unsigned: bool = False,
    known_digests: Mapping[str, str] | None = None,
    on_file: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Raise VerificationFailed (naming the file) unless `build_dir` matches its provenance.

    `keys` None means: the trusted keys from `signing.trusted_keys()`, looked up only when the
    envelope is signed. With `allow_unsigned`, an unsigned envelope (or none at all) passes
    on digests alone: the manifest's sha256 of each disk, or the unsigned subjects.
    """
    from vmbuild.stages.store import read_manifest

    manifest = read_manifest(build_dir)
    env_path = build_dir / PROVENANCE
    if not env_path.exists() and allow_unsigned:
        _check_manifest_outputs(build_dir, manifest, known_digests, on_file)
        return VerifyReport(build_dir, signed=False)
    envelope, raw = read_envelope(env_path)
    if envelope.signatures or not allow_unsigned:
        signing.verify(envelope, keys if keys is not None else signing.trusted_keys(), env_path)
    try:
        stmt = provenance.parse_statement(envelope.payload)
    except (ValueError, KeyError, TypeError) as exc:
        raise VerificationFailed(f"{env_path}: not an in-toto SLSA statement ({exc})") from None
    expected = provenance.subject_digests(stmt)
    for out in manifest.get("outputs", []):
        # A directory output (an OCI layout) is covered file by file: a file added to it
        # after signing is named too.
        for name in provenance.output_files(build_dir, str(out.get("file"))):
            if name not in expected:
                raise VerificationFailed(
                    f"{build_dir / name}: not covered by the signed provenance"
                )
    for name, want in expected.items():
        if on_file is not None:
            on_file(name)
        if name == provenance.MANIFEST_SUBJECT:
            got = manifest_digest(manifest)
            target = build_dir / "manifest.json"
        elif name.startswith(provenance.OCI_IMAGE_PREFIX):
            got, target = _image_digest(build_dir, manifest)
        else:
            target = build_dir / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise VerificationFailed(f"{env_path}: subject {name!r} is outside the artifact")
            if not target.is_file():
                raise VerificationFailed(f"{target}: missing (listed in the signed provenance)")
            got = (known_digests or {}).get(name) or sha256_file(target)
        if got != want:
            raise VerificationFailed(
                f"{target}: differs from the signed provenance (sha256 {got[:16]}…, "
                f"signed {want[:16]}…)",
                hint="the file was modified after the build; restore it or rebuild",
            )
    return VerifyReport(
        build_dir,
        signed=bool(envelope.signatures),
        keyids=sorted(envelope.signatures),
        subjects=expected,
        provenance_sha256=hashlib.sha256(raw).hexdigest(),
    )


def _image_digest(build_dir: Path, manifest: Mapping[str, Any]) -> tuple[str, Path]:
    """The manifest digest the stored layout's index names for the image's first tag (the
    layout's files were checked before this, so a changed blob was named already)."""
    from vmbuild.oci.layout import describe

    oci = manifest.get("oci") or {}
    layout = build_dir / "oci"
    try:
        digest = describe(layout, str((oci.get("tags") or [""])[0])).digest
    except VmbuildError as exc:
        raise VerificationFailed(str(exc)) from None
    return digest.removeprefix("sha256:"), layout / "index.json"


def _check_manifest_outputs(
    build_dir: Path,
    manifest: Mapping[str, Any],
    known: Mapping[str, str] | None,
    on_file: Callable[[str], None] | None,
) -> None:
    for out in manifest.get("outputs", []):
        name = str(out.get("file"))
        if on_file is not None:
            on_file(name)
        path = build_dir / name
        if path.is_dir() and out.get("format") == "oci":
            _check_layout(build_dir, manifest, path, str(out.get("sha256", "")))
            continue
        if not path.is_file():
            raise VerificationFailed(f"{path}: disk file missing from the artifact")
        got = (known or {}).get(name) or sha256_file(path)
        if out.get("sha256") and got != out["sha256"]:
            raise VerificationFailed(f"{path}: sha256 differs from the manifest")


def _check_layout(build_dir: Path, manifest: Mapping[str, Any], layout: Path, want: str) -> None:
    """An unsigned OCI layout: every blob matches its digest, the image's is the manifest's."""
    from vmbuild.oci.layout import check_blobs

    try:
        check_blobs(layout)
    except VmbuildError as exc:
        raise VerificationFailed(str(exc)) from None
    got, where = _image_digest(build_dir, manifest)
    if want and got != want:
        raise VerificationFailed(f"{where}: names image sha256:{got[:16]}…, not the manifest's")


def provenance_digest(build_dir: Path) -> str | None:
    """sha256 of the provenance file, if the artifact has one (the AMI tag's value)."""
    path = build_dir / PROVENANCE
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()
