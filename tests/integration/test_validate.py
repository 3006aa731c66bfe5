"""`vmbuild validate`: every kind of file checked by content, through the real CLI, creating
nothing (no store, no cache entry)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.cli import REPO, isolated_env, vmbuild

EXAMPLE = REPO / "examples" / "nginx"


def created_nothing(tmp_path: Path) -> bool:
    return not (tmp_path / "store").exists() and not (tmp_path / "cache").exists()


def test_the_example_files_are_valid_and_their_kind_detected(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    files = [
        str(EXAMPLE / "recipe.yaml"), str(EXAMPLE / "pipeline.yaml"),
        str(EXAMPLE / "distribution.yaml"), str(REPO / "vmbuild" / "components" / "nginx-app.yaml"),
    ]  # fmt: skip
    proc = vmbuild(env, "validate", *files)
    assert proc.returncode == 0, proc.stderr
    kinds = ["recipe", "pipeline", "distribution", "component"]
    assert proc.stdout.splitlines() == [
        f"{f}: valid {k}" for f, k in zip(files, kinds, strict=True)
    ]
    proc = vmbuild(env, "validate", "--json", *files)
    assert json.loads(proc.stdout) == [
        {"file": f, "kind": k, "valid": True, "problems": []}
        for f, k in zip(files, kinds, strict=True)
    ]
    assert created_nothing(tmp_path)


def test_problems_name_the_file_and_the_field(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: web\nversion: 1.0.0\nbase: debian-12\ncomponents:\n"
        "  - name: nginx-app\n    parameters: {Port: {a: 1}}\n"
    )
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("recipe: r.yaml\nschedule: {cron: '0 3 * * 1', timezone: Mars/Base}\n")
    dist = tmp_path / "d.yaml"
    dist.write_text("regions:\n  - region: us-east-1\n    encrypted: maybe\n")
    component = tmp_path / "c.yaml"
    component.write_text("name: c\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps: []\n")
    other = tmp_path / "notes.yaml"
    other.write_text("hello: world\n")
    proc = vmbuild(env, "validate", *map(str, (recipe, pipeline, dist, component, other)))
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines[0] == (
        f"error: {recipe}: components[0].parameters: parameter values must be strings "
        "(or lists of strings)"
    )
    assert lines[1] == (
        f"error: {pipeline}: schedule.timezone: unknown time zone 'Mars/Base' "
        "(use an IANA name such as Europe/Paris)"
    )
    assert lines[2].startswith(f"error: {dist}: regions[0].encrypted:"), lines[2]
    assert lines[3] == f"error: {component}: build.steps: expected a non-empty list of steps"
    assert lines[4] == (
        f"error: {other}: not a vmbuild file: expected a recipe (base:), a container recipe "
        "(parentImage:), a pipeline (recipe:), "
        "a distribution file (regions:) or a component (phases:)"
    )
    assert lines[-1] == "5 of 5 file(s) invalid"
    assert created_nothing(tmp_path)


def test_unreadable_files(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    binary = tmp_path / "disk.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    proc = vmbuild(env, "validate", str(tmp_path / "missing.yaml"), str(binary))
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[0] == f"error: {tmp_path / 'missing.yaml'}: file not found"
    assert lines[1].startswith(f"error: {binary}: cannot read"), lines[1]
    assert "Traceback" not in proc.stderr
