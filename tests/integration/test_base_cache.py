"""`vmbuild base rm|prune` on a real cache filled by `vmbuild base fetch` (file:// URLs,
real qcow2 files); only the cache's own base directories are ever removed."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from tests.support.cli import isolated_env, vmbuild


def fetch(env: dict[str, str], image: Path, size: str) -> dict[str, str]:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), size], check=True)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    proc = vmbuild(env, "base", "fetch", image.as_uri(), "--sha256", digest, "--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, str] = json.loads(proc.stdout)
    return data


def listed(env: dict[str, str]) -> list[str]:
    return [b["id"] for b in json.loads(vmbuild(env, "base", "list", "--json").stdout)]


def test_prune_keeps_the_newest_per_url_and_rm_removes_by_id(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    old = fetch(env, tmp_path / "vendor.qcow2", "64M")
    new = fetch(env, tmp_path / "vendor.qcow2", "128M")  # the same URL, a newer image
    other = fetch(env, tmp_path / "other.qcow2", "96M")
    assert sorted(listed(env)) == sorted({old["id"], new["id"], other["id"]})

    dry = vmbuild(env, "base", "prune", "--dry-run")
    assert (dry.returncode, dry.stdout) == (0, f"would remove {old['id']}  ({old['source']})\n")
    assert len(listed(env)) == 3
    pruned = vmbuild(env, "base", "prune", "--json")
    assert [b["id"] for b in json.loads(pruned.stdout)] == [old["id"]]
    assert not Path(old["path"]).exists()
    assert sorted(listed(env)) == sorted([new["id"], other["id"]])
    again = vmbuild(env, "base", "prune")
    assert again.stdout == "nothing to prune\n"

    rm = vmbuild(env, "base", "rm", other["id"])
    assert (rm.returncode, rm.stdout) == (0, f"removed {other['id']}\n")
    assert listed(env) == [new["id"]]


def test_rm_refuses_what_is_not_a_cached_base(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    fetch(env, tmp_path / "vendor.qcow2", "64M")
    victim = tmp_path / "cache" / "keep-me"
    victim.mkdir()
    for bad, message in (
        ("../keep-me", "error: '../keep-me' is not a base id"),
        ("/etc", "error: '/etc' is not a base id"),
        ("nope", f"error: no cached base 'nope' in {tmp_path / 'cache' / 'bases'}"),
    ):
        proc = vmbuild(env, "base", "rm", bad)
        assert proc.returncode == 1
        assert proc.stderr.splitlines()[0] == message
    assert victim.is_dir() and Path("/etc/passwd").is_file()
    assert len(listed(env)) == 1
