"""Bad input through the real CLI: one clear line naming file and field, exit 1,
and nothing left behind (no store dirs, no temp files, no QEMU). No VM boots."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = dict(os.environ)
    e["VMBUILD_STORE"] = str(tmp_path / "store")
    e["VMBUILD_CACHE_DIR"] = str(tmp_path / "cache")
    return e


def vmbuild(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmbuild", *args], env=env, capture_output=True, text=True,
        timeout=120, cwd=REPO,
    )  # fmt: skip


def assert_clean_failure(
    proc: subprocess.CompletedProcess[str], env: dict[str, str], text: str
) -> None:
    assert proc.returncode == 1, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: "), proc.stderr
    assert text in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not Path(env["VMBUILD_STORE"]).exists()
    cache = Path(env["VMBUILD_CACHE_DIR"])
    leftovers = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert leftovers == []


def recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_malformed_yaml(tmp_path: Path, env: dict[str, str]) -> None:
    proc = vmbuild(env, "build", recipe(tmp_path, "name: x\nversion: [1\n"))
    assert_clean_failure(proc, env, "recipe.yaml: line 3, column 1: invalid YAML")


def test_unknown_field(tmp_path: Path, env: dict[str, str]) -> None:
    proc = vmbuild(
        env, "build", recipe(tmp_path, "name: x\nversion: 1.0.0\nbase: debian-12\nfoo: 1\n")
    )
    assert_clean_failure(proc, env, "recipe.yaml: foo: unknown field")


def test_missing_base_file(tmp_path: Path, env: dict[str, str]) -> None:
    proc = vmbuild(env, "build", recipe(tmp_path, "name: x\nversion: 1.0.0\nbase: ./gone.qcow2\n"))
    assert_clean_failure(proc, env, "recipe.yaml: base: not a built-in base and no such file")


def test_missing_component(tmp_path: Path, env: dict[str, str]) -> None:
    text = "name: x\nversion: 1.0.0\nbase: debian-12\ncomponents:\n  - name: no-such-component\n"
    proc = vmbuild(env, "build", recipe(tmp_path, text))
    assert_clean_failure(proc, env, "recipe.yaml: components[0].name:")


def test_bad_checksum_rejects_and_deletes_the_download(tmp_path: Path, env: dict[str, str]) -> None:
    image = tmp_path / "vendor.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    wrong = hashlib.sha256(b"something else").hexdigest()
    proc = vmbuild(env, "base", "fetch", image.as_uri(), "--sha256", wrong)
    assert_clean_failure(proc, env, "checksum")
    right = hashlib.sha256(image.read_bytes()).hexdigest()
    ok = vmbuild(env, "base", "fetch", image.as_uri(), "--sha256", right, "--json")
    assert ok.returncode == 0, ok.stderr


def test_images_show_unknown_ref(env: dict[str, str]) -> None:
    proc = vmbuild(env, "images", "show", "nothing/1.0.0")
    assert_clean_failure(proc, env, "no image 'nothing/1.0.0'")
