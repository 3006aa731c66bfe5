"""Artifacts for the supply-chain tests that need no process: stand-in disk files (random
bytes; verification hashes bytes, it never parses a disk) with a real manifest, SBOMs and
provenance signed exactly as a build signs them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from vmbuild.supply import signing
from vmbuild.supply.attest import attest

BUILD = "20261130T120000Z-abc123"
PACKAGES = [
    {"name": "openssl", "version": "3.0.11-1~deb12u2", "arch": "amd64",
     "source": "openssl", "source_version": "3.0.11-1~deb12u2"},
    {"name": "libssl3", "version": "3.0.11-1~deb12u2", "arch": "amd64",
     "source": "openssl", "source_version": "3.0.11-1~deb12u2"},
    {"name": "nginx", "version": "1.22.1-9", "arch": "amd64",
     "source": "nginx", "source_version": "1.22.1-9"},
    {"name": "libc6", "version": "2.36-9+deb12u9", "arch": "amd64",
     "source": "glibc", "source_version": "2.36-9+deb12u9"},
]  # fmt: skip


def manifest_for(name: str, version: str, build: str, outputs: list[dict[str, Any]],
                 packages: list[dict[str, str]]) -> dict[str, Any]:  # fmt: skip
    return {
        "schema": 1,
        "name": name,
        "version": version,
        "description": "",
        "build": build,
        "created": "2026-11-30T12:00:00Z",
        "recipe": {"path": "/src/recipe.yaml", "sha256": "ab" * 32},
        "base": {
            "id": "debian-12",
            "sha256": "cd" * 32,
            "source": "mmdebstrap bookworm",
            "format": "qcow2",
        },
        "components": [
            {
                "name": "nginx-app",
                "path": "/src/nginx-app.yaml",
                "sha256": "ef" * 32,
                "parameters": {"Content": "<h1>hi</h1>", "Port": "80"},
                "status": "success",
            }
        ],
        "outputs": outputs,
        "packages": packages,
        "tests": {"status": "passed"},
        "timings": {"total": 321.5},
        "accelerator": {"kind": "tcg", "reason": "test"},
        "backend": "qemu",
        "vmbuild_version": "0.1.0",
    }


def fake_artifact(
    store: Path,
    *,
    name: str = "example-nginx",
    version: str = "1.0.0",
    build: str = BUILD,
    disk_bytes: int = 256 * 1024,
    sign: bool = True,
    packages: list[dict[str, str]] | None = None,
) -> Path:
    """A build dir with one stand-in qcow2 output, SBOMs and (signed) provenance."""
    build_dir = store / name / version / build
    build_dir.mkdir(parents=True)
    disk = build_dir / "disk.qcow2"
    disk.write_bytes(os.urandom(disk_bytes))
    outputs = [{"format": "qcow2", "file": disk.name,
                "sha256": hashlib.sha256(disk.read_bytes()).hexdigest(),
                "size": disk_bytes, "virtual_size": 4 << 30}]  # fmt: skip
    manifest = manifest_for(
        name, version, build, outputs, PACKAGES if packages is None else packages
    )
    (build_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    signer = signing.local_signer() if sign else None
    if sign:
        assert signer is not None, "generate a local key first"
    attest(build_dir, manifest, signer=signer, signed_by="local" if sign else "unsigned")
    return build_dir


def flip_byte(path: Path, offset: int = 1000) -> None:
    """Change one byte of a file in place."""
    with path.open("r+b") as fh:
        fh.seek(offset)
        old = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([old[0] ^ 0xFF]))
