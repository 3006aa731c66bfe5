"""The in-toto Statement with a SLSA Provenance v1 predicate for a stored build.

Subjects: every disk output and both SBOMs by the sha256 of their bytes, and the manifest by
the digest of its canonical JSON (minus the keys written after the build, see
publish.artifact.MUTABLE_KEYS). A container image adds every file of its OCI layout
(oci-layout, index.json, each blob), its docker-archive, and the image itself: its
repository with the OCI manifest digest, as container provenance names images. The predicate
records what went in: recipe, base, component documents and parameters, the package list,
builder/test VM settings and the times.
The message types come from in-toto-attestation (protobuf), so field names and JSON
encoding are the specification's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
from in_toto_attestation.v1.statement import Statement

from vmbuild import __version__
from vmbuild.digest import sha256_file
from vmbuild.publish.artifact import manifest_digest
from vmbuild.supply import CYCLONEDX, SPDX

SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:vmbuild:buildtype:recipe:v1"
BUILDER_ID = "urn:vmbuild:builder:local"
MANIFEST_SUBJECT = "manifest.json"
# The manifest subject's digest is not of the file's bytes (keys are added after signing),
# so its name says how it was computed.
MANIFEST_DIGEST_NOTE = "sha256 of canonical JSON without distribution, scan, provenance"
# A container image's subject is not a file: its digest is the OCI manifest's.
OCI_IMAGE_PREFIX = "oci-image:"
OCI_DIGEST_NOTE = "OCI image manifest digest"


def packages_digest(packages: object) -> str:
    """sha256 of the package list as canonical JSON: the package index state of the image."""
    blob = json.dumps(packages or [], sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def image_subject(manifest: Mapping[str, Any]) -> tuple[str, str] | None:
    """A container image's own subject: its repository (the recipe's target, else the
    recipe's name) and the OCI manifest digest, the digest registries and `@sha256:`
    references name. None for a VM image."""
    oci = manifest.get("oci") if manifest.get("kind") == "container" else None
    if not isinstance(oci, Mapping) or not str(oci.get("digest", "")).startswith("sha256:"):
        return None
    target = oci.get("target")
    if not isinstance(target, Mapping):
        where = str(manifest.get("name", ""))
    elif target.get("registry"):
        where = f"{target['registry']}/{target['repository']}"
    else:  # ECR: one repository name, a registry per region
        where = str(target["repository"])
    return f"{OCI_IMAGE_PREFIX}{where}", str(oci["digest"]).removeprefix("sha256:")


def output_files(build_dir: Path, name: str) -> list[str]:
    """The file names (relative to `build_dir`) of one output: itself, or every file of a
    directory output (an OCI layout: oci-layout, index.json and each blob)."""
    path = build_dir / name
    if not path.is_dir():
        return [name]
    return sorted(str(f.relative_to(build_dir)) for f in path.rglob("*") if f.is_file())


def subjects(
    build_dir: Path,
    manifest: Mapping[str, Any],
    hashed: Mapping[str, tuple[str, int]] | None = None,
) -> dict[str, str]:
    """name -> sha256 of every file the provenance covers, hashed now (streamed).

    `hashed` (name -> (sha256, size)) holds digests the caller took itself as it
    wrote those files into its private staging dir: a build's disks, hashed by
    the convert stage. Hashing them again cost 5.4 s of a 140 s build (four
    formats, a 4 GiB sparse raw read in full) on its critical path. One whose
    size changed since is hashed anew. `vmbuild sign` passes none: a stored
    build's files are read as they are now.
    """
    known = hashed or {}
    found: dict[str, str] = {}
    for out in manifest.get("outputs", []):
        for name in output_files(build_dir, str(out["file"])):
            path = build_dir / name
            digest, size = known.get(name, ("", -1))
            found[name] = digest if digest and path.stat().st_size == size else sha256_file(path)
    for sbom in (SPDX, CYCLONEDX):
        if (build_dir / sbom).is_file():
            found[sbom] = sha256_file(build_dir / sbom)
    found[MANIFEST_SUBJECT] = manifest_digest(dict(manifest))
    # Last: verification checks it after every file, so a changed blob is named as a file.
    image = image_subject(manifest)
    if image is not None:
        found[image[0]] = image[1]
    return found


def _rd(name: str, sha256: str, **kw: Any) -> Any:
    return ResourceDescriptor(name=name, digest={"sha256": sha256}, **kw).pb


def _timestamps(manifest: Mapping[str, Any]) -> tuple[datetime, datetime]:
    created = str(manifest.get("created") or "")
    try:
        started = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        started = datetime.now(UTC)
    total = (manifest.get("timings") or {}).get("total")
    finished = started + timedelta(seconds=float(total)) if total else datetime.now(UTC)
    return started, finished


def statement(
    manifest: Mapping[str, Any],
    digests: Mapping[str, str],
    *,
    vm_settings: Mapping[str, Any] | None = None,
) -> bytes:
    """The Statement as JSON bytes (the DSSE payload)."""
    prov = provenance_pb2.Provenance()
    definition = prov.build_definition
    definition.build_type = BUILD_TYPE
    recipe = manifest.get("recipe") or {}
    components = manifest.get("components") or []
    definition.external_parameters.update(
        {
            "recipe": {"path": str(recipe.get("path", "")), "sha256": recipe.get("sha256", "")},
            "name": manifest.get("name", ""),
            "version": manifest.get("version", ""),
            "components": [
                {
                    "name": c.get("name", ""),
                    "sha256": c.get("sha256", ""),
                    "parameters": {k: str(v) for k, v in (c.get("parameters") or {}).items()},
                }
                for c in components
            ],
        }
    )
    definition.internal_parameters.update(
        {
            "build": manifest.get("build", ""),
            "accelerator": manifest.get("accelerator") or {},
            "backend": manifest.get("backend") or "",
            "vm": dict(vm_settings or {}),
            "tests": (manifest.get("tests") or {}).get("status", "unknown"),
        }
    )
    base = manifest.get("base") or {}
    deps = [
        _rd(
            f"base:{base.get('id', '')}",
            str(base.get("sha256", "")),
            uri=str(base.get("source", "")),
        )
    ]
    if recipe.get("sha256"):
        deps.append(_rd(f"recipe:{Path(str(recipe.get('path', ''))).name}", recipe["sha256"]))
    deps += [_rd(f"component:{c.get('name')}", str(c.get("sha256", ""))) for c in components]
    packages = manifest.get("packages") or []
    deps.append(
        _rd(
            "packages",
            packages_digest(packages),
            annotations={"count": len(packages), "format": "dpkg name/version/arch, sorted"},
        )
    )
    definition.resolved_dependencies.extend(deps)
    run = prov.run_details
    run.builder.id = BUILDER_ID
    run.builder.version["vmbuild"] = str(manifest.get("vmbuild_version") or __version__)
    run.metadata.invocation_id = str(manifest.get("build", ""))
    started, finished = _timestamps(manifest)
    run.metadata.started_on.FromDatetime(started.astimezone(UTC).replace(tzinfo=None))
    run.metadata.finished_on.FromDatetime(finished.astimezone(UTC).replace(tzinfo=None))

    subject = [
        _rd(
            name,
            sha,
            annotations={"vmbuild.digest": MANIFEST_DIGEST_NOTE}
            if name == MANIFEST_SUBJECT
            else {"vmbuild.digest": OCI_DIGEST_NOTE}
            if name.startswith(OCI_IMAGE_PREFIX)
            else None,
        )
        for name, sha in digests.items()
    ]
    stmt = Statement(subject, SLSA_PROVENANCE_V1, json_format.MessageToDict(prov))
    stmt.validate()
    text: str = json_format.MessageToJson(stmt.pb, indent=None, sort_keys=True)
    return text.encode()


def parse_statement(payload: bytes) -> dict[str, Any]:
    """The Statement from a DSSE payload, checked against the in-toto message types."""
    data: dict[str, Any] = json.loads(payload)
    pb = Statement([], "", {}).pb
    json_format.ParseDict(data, pb)
    Statement.copy_from_pb(pb).validate()
    if data.get("predicateType") != SLSA_PROVENANCE_V1:
        raise ValueError(f"predicateType is {data.get('predicateType')!r}")
    return data


def subject_digests(stmt: Mapping[str, Any]) -> dict[str, str]:
    return {str(s["name"]): str(s["digest"]["sha256"]) for s in stmt.get("subject", [])}
