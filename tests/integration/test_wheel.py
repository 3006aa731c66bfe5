"""The wheel works on its own: built from the repo, installed into a fresh venv without
extras, run from another directory. Built-in components and schemas are package data;
missing extras are clear errors naming the extra."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.cli import REPO, isolated_env

EXAMPLE = REPO / "examples" / "nginx"
BUILTINS = sorted(p.stem for p in (REPO / "vmbuild" / "components").glob("*.yaml"))


def run(
    argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=cwd, env=env)


def test_wheel_in_a_fresh_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    built = run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)]
    )
    assert built.returncode == 0, built.stderr
    [wheel] = dist.glob("vmbuild-*.whl")
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    installed = run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)])
    assert installed.returncode == 0, installed.stderr
    # No extras: neither boto3, libvirt-python nor pytest came with it.
    for module in ("boto3", "libvirt", "pytest", "testinfra"):
        probe = run([str(venv / "bin" / "python"), "-c", f"import {module}"])
        assert probe.returncode == 1, module

    work = tmp_path / "elsewhere"  # not the repository: nothing found by accident
    work.mkdir()
    env = isolated_env(tmp_path)
    env.pop("PYTHONPATH", None)
    vmbuild = str(venv / "bin" / "vmbuild")

    listing = run([vmbuild, "component", "list", "--json"], cwd=work, env=env)
    assert listing.returncode == 0, listing.stderr
    assert [c["name"] for c in json.loads(listing.stdout)] == BUILTINS

    files = [str(EXAMPLE / n) for n in ("recipe.yaml", "pipeline.yaml", "distribution.yaml")]
    valid = run([vmbuild, "validate", *files], cwd=work, env=env)
    assert valid.returncode == 0, valid.stderr
    assert valid.stdout.splitlines() == [
        f"{files[0]}: valid recipe", f"{files[1]}: valid pipeline", f"{files[2]}: valid distribution",
    ]  # fmt: skip

    schemas = run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.resources as r; s = r.files('vmbuild') / 'schemas';"
         "print(sorted(p.name for p in s.iterdir()))"],
        cwd=work, env=env,
    )  # fmt: skip
    assert schemas.stdout.strip() == "['events.schema.json', 'manifest.schema.json']"

    # A build needing the test extra says so before creating anything.
    build = run([vmbuild, "build", files[0]], cwd=work, env=env)
    assert build.returncode == 1
    assert build.stderr.startswith("error: this build cannot run here: ")
    assert (
        "Python module pytest (runs testinfra files in the test stage): pip install 'vmbuild[test]'"
        in build.stderr
    )
    assert "Traceback" not in build.stderr
    assert not (tmp_path / "store").exists()
    # Distribution needs the aws extra.
    dist_run = run(
        [vmbuild, "distribute", "example-nginx", "--config", files[2], "--dry-run"],
        cwd=work,
        env=env,
    )
    assert dist_run.returncode == 1
    assert dist_run.stderr.splitlines()[0] == (
        "error: missing Python module boto3 (distribution to AWS): pip install 'vmbuild[aws]'"
    )
