"""Run the real `vmbuild` CLI as a subprocess, as a user would, in an isolated environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def isolated_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The caller's environment with the store, cache and history under `tmp_path`."""
    env = dict(os.environ)
    env.pop("VMBUILD_STORE", None)
    env["VMBUILD_STORE"] = str(tmp_path / "store")
    env["VMBUILD_CACHE_DIR"] = str(tmp_path / "cache")
    env["VMBUILD_COMPONENT_LIBRARY"] = str(tmp_path / "component-library")
    env["COLUMNS"] = "80"  # what a narrow terminal would say; piped output must ignore it
    env.update(extra)
    return env


def vmbuild(
    env: dict[str, str], *args: str, cwd: Path = REPO, stdin: str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "vmbuild", *args], env=env, capture_output=True, text=True,
        timeout=timeout, cwd=cwd, input=stdin if stdin is not None else "",
    )  # fmt: skip


BUILD_A = "20261101T000000Z-aaaaaa"
BUILD_B = "20261102T000000Z-bbbbbb"
SHA = "ab" * 32


def stored_build(store: Path, name: str, version: str, build: str, **fields: Any) -> Path:
    """A committed build dir with a small but complete manifest (no disks needed)."""
    d = store / name / version / build
    d.mkdir(parents=True)
    manifest = {
        "name": name, "version": version, "build": build, "created": "2026-11-01T00:00:00Z",
        "base": {"id": "debian-12", "source": "debian-12"},
        "tests": {"status": "passed"}, "packages": [],
        "components": [{"name": "update-linux", "sha256": SHA, "parameters": {}}],
        "outputs": [{"format": "qcow2", "file": f"{name}.qcow2", "sha256": SHA, "size": 1}],
        **fields,
    }  # fmt: skip
    (d / "manifest.json").write_text(json.dumps(manifest))
    (d / f"{name}.qcow2").write_bytes(b"x")
    return d
