"""`vmbuild images show|rm` touch the store and only the store, and ask before deleting.

Driven through the real CLI (subprocess), on stores made of real directories and manifests.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.cli import BUILD_A, BUILD_B, isolated_env, stored_build, vmbuild


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_rm_refuses_a_build_dir_outside_the_store(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    stored_build(tmp_path / "store", "img", "1.0.0", BUILD_A)
    outside = stored_build(tmp_path / "elsewhere", "img", "1.0.0", BUILD_B)
    before = tree(tmp_path / "elsewhere")
    for ref in (str(outside), f"../{outside.relative_to(tmp_path)}", str(outside.parent)):
        proc = vmbuild(env, "images", "rm", ref, "--yes", cwd=tmp_path / "store")
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith(f"error: {ref!r} is outside the store "), proc.stderr
        assert "Traceback" not in proc.stderr
    assert tree(tmp_path / "elsewhere") == before
    assert (tmp_path / "store" / "img" / "1.0.0" / BUILD_A / "manifest.json").is_file()


def test_a_local_directory_does_not_shadow_a_stored_image(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    stored = stored_build(tmp_path / "store", "example-nginx", "1.0.0", BUILD_A)
    # ./example-nginx in the working directory, holding a manifest of its own.
    local = tmp_path / "example-nginx"
    local.mkdir()
    (local / "manifest.json").write_text(json.dumps({"name": "local"}))
    show = vmbuild(env, "images", "show", "example-nginx", "--json", cwd=tmp_path)
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout)["path"] == str(stored)
    rm = vmbuild(env, "images", "rm", "example-nginx", "--yes", cwd=tmp_path)
    assert rm.returncode == 0, rm.stderr
    assert rm.stdout == f"removed example-nginx/1.0.0/{BUILD_A}\n"
    assert not stored.exists()
    assert json.loads((local / "manifest.json").read_text()) == {"name": "local"}


def test_rm_asks_first_and_keeps_the_build_without_a_yes(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    build = stored_build(tmp_path / "store", "img", "1.0.0", BUILD_A)
    for answer in ("", "n\n", "nope\n"):
        proc = vmbuild(env, "images", "rm", "img", stdin=answer)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith(f"remove img/1.0.0/{BUILD_A} ({build})? [y/N] "), proc.stderr
        assert f"error: img/1.0.0/{BUILD_A} not removed" in proc.stderr
        assert (build / "manifest.json").is_file()
    proc = vmbuild(env, "images", "rm", "img", stdin="y\n")
    assert proc.returncode == 0, proc.stderr
    assert not build.exists()
    # The emptied version and name dirs go; the store itself stays.
    assert (tmp_path / "store").is_dir()
    assert list((tmp_path / "store").iterdir()) == []


def test_rm_by_path_inside_the_store_and_keeps_siblings(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    a = stored_build(tmp_path / "store", "img", "1.0.0", BUILD_A)
    b = stored_build(tmp_path / "store", "img", "1.0.0", BUILD_B)
    proc = vmbuild(env, "images", "rm", str(a), "--yes", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"removed": str(a), "ref": f"img/1.0.0/{BUILD_A}"}
    assert not a.exists()
    assert (b / "manifest.json").is_file()


def test_show_of_a_non_vmbuild_directory_is_a_clear_error(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    store = tmp_path / "store"
    # Inside the store, shaped like a build, but its manifest is not vmbuild's.
    foreign = store / "img" / "1.0.0" / BUILD_A
    foreign.mkdir(parents=True)
    (foreign / "manifest.json").write_text(json.dumps({"schemaVersion": 2, "layers": []}))
    proc = vmbuild(env, "images", "show", str(foreign))
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == (
        f"error: {foreign / 'manifest.json'}: not a vmbuild manifest for img/1.0.0/{BUILD_A}"
    )
    assert "Traceback" not in proc.stderr and "KeyError" not in proc.stderr
    # A directory of the store that is not a build.
    proc = vmbuild(env, "images", "show", str(store / "img"))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: '{store / 'img'}' is not a build in the store ")
    # Not JSON at all.
    (foreign / "manifest.json").write_text("\x00\x01 not json")
    proc = vmbuild(env, "images", "show", "img")
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {foreign / 'manifest.json'}: invalid JSON"), proc.stderr


def test_show_prints_whole_digests_and_paths_when_piped(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    name = "an-image-with-a-rather-long-name-that-would-not-fit-in-eighty-columns"
    build = stored_build(tmp_path / "store", name, "1.0.0", BUILD_A)
    show = vmbuild(env, "images", "show", name)
    assert show.returncode == 0, show.stderr
    assert f"path:     {build}\n" in show.stdout
    assert f"output    qcow2  {name}.qcow2 sha256:{'ab' * 32}\n" in show.stdout
    listing = vmbuild(env, "images", "list")
    assert listing.returncode == 0, listing.stderr
    rows = [[c for c in line.split() if c != "│"] for line in listing.stdout.splitlines()]
    assert [
        f"{name}/1.0.0/{BUILD_A}",
        "vm",
        "2026-11-01T00:00:00Z",
        "passed",
        "qcow2",
        "0",
        "MiB",
    ] in rows
