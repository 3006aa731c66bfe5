"""Checkpoints end to end: a build saves the builder as booted and a layer and the
running VM per component; an identical rebuild boots no VM; editing the last
component resumes the builder as it was after the first (no boot), and where its
state cannot be loaded (another QEMU), boots from the first one's disk layer;
editing the first resumes the builder as it was booted."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.schemas import event_lines
from tests.vm.conftest import vmbuild
from vmbuild.diskfs.rootfs import read_file, root_view
from vmbuild.stages import base_image

pytestmark = pytest.mark.vm

COMPONENT = """\
name: {name}
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: Write
        action: ExecuteBash
        inputs:
          commands: ["echo '{text}' > /etc/{name}.txt"]
"""


CLOCK = """\
      - name: Clock
        action: ExecuteBash
        inputs:
          commands: ["date +%s > /etc/clock.txt"]
"""


def write_recipe(d: Path, second_text: str, first_text: str = "one") -> Path:
    (d / "first.yaml").write_text(COMPONENT.format(name="first", text=first_text))
    # The second one also notes the guest's clock when it ran.
    (d / "second.yaml").write_text(COMPONENT.format(name="second", text=second_text) + CLOCK)
    recipe = d / "recipe.yaml"
    recipe.write_text(
        "name: ckpt\nversion: 1.0.0\nbase: debian-12\noutputs: [qcow2, vmdk]\n"
        "components:\n  - name: ./first.yaml\n  - name: ./second.yaml\n"
    )
    return recipe


def build(recipe: Path, env: dict[str, str]) -> tuple[dict[str, Any], Path, str]:
    proc = vmbuild("build", str(recipe), "--skip-tests", "--json", env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = event_lines(proc.stdout)[-1]
    assert result["type"] == "result"
    build_dir = Path(result["path"])
    return result["manifest"], build_dir, (build_dir / "logs" / "build.log").read_text()


def etc_file(disk: Path, tmp: Path, name: str) -> bytes | None:
    raw = tmp / "image.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    try:
        return read_file(root_view(raw), f"/etc/{name}.txt")
    finally:
        raw.unlink()


def test_rebuilds_resume_from_the_longest_matching_prefix(
    debian_base: base_image.BaseImage, cli_env: dict[str, str], tmp_path: Path,
    no_leftover_qemu: None,
) -> None:  # fmt: skip
    cli_env["VMBUILD_CHECKPOINT_DIR"] = str(tmp_path / "checkpoints")
    recipe = write_recipe(tmp_path, "two")

    first, first_dir, _ = build(recipe, cli_env)
    assert first["checkpoints"] == {
        "resumed": [], "generalized": False, "tests": False, "outputs": False, "restore": None,
        "boot": False, "saved": ["booted builder", "1/2 first", "2/2 second", "generalized disk"],
    }  # fmt: skip
    assert etc_file(first_dir / "disk.qcow2", tmp_path, "second") == b"two\n"
    # Each component's checkpoint holds the running VM; its keys are the owner's alone.
    metas = [p for p in (tmp_path / "checkpoints").glob("*/meta.json")
             if json.loads(p.read_text())["stage"] == "component"]  # fmt: skip
    assert len(metas) == 2
    for meta in metas:
        assert (meta.parent / "vmstate.zst").read_bytes()[:4] == b"\x28\xb5\x2f\xfd"
        assert (meta.parent / "ssh-keys.json").stat().st_mode & 0o777 == 0o600
        assert "PRIVATE KEY" not in meta.read_text()

    # Identical inputs: no builder VM at all, the same image content.
    again, again_dir, log = build(recipe, cli_env)
    assert again["checkpoints"]["generalized"] is True
    assert again["checkpoints"]["resumed"] == ["1/2 first", "2/2 second"]
    assert "booting the builder VM" not in log
    assert [c["name"] for c in again["components"]] == ["first", "second"]
    assert again["packages"] == first["packages"]
    cmp = subprocess.run(
        ["qemu-img", "compare", str(first_dir / "disk.qcow2"), str(again_dir / "disk.qcow2")]
    )
    assert cmp.returncode == 0
    # ... and the vmdk of that very qcow2, byte for byte (its random ids included).
    assert again["checkpoints"]["outputs"] is True
    assert [o for o in again["outputs"] if o["format"] == "vmdk"] == [
        o for o in first["outputs"] if o["format"] == "vmdk"
    ]

    # The last component edited: the builder comes back running as it was
    # after the first one, and its clock is set to now (not to the save's time).
    write_recipe(tmp_path, "changed")
    started = time.time()
    edited, edited_dir, log = build(recipe, cli_env)
    assert edited["checkpoints"]["resumed"] == ["1/2 first"]
    assert edited["checkpoints"]["restore"] == "ram"
    assert edited["checkpoints"]["saved"] == ["2/2 second", "generalized disk"]
    assert "checkpoints: 1/2 first: the running VM is back, no boot" in log
    assert "booting the builder VM" not in log
    assert etc_file(edited_dir / "disk.qcow2", tmp_path, "first") == b"one\n"
    assert etc_file(edited_dir / "disk.qcow2", tmp_path, "second") == b"changed\n"
    clock = int(etc_file(edited_dir / "disk.qcow2", tmp_path, "clock") or b"0")
    assert started - 1 <= clock <= time.time()

    # Saved by another QEMU (its signature differs): not loaded; the builder
    # boots from the first one's disk layer. The state is kept: it is not
    # damaged, and the QEMU that saved it (sharing this cache) can still load it.
    [first_cp] = [p for p in (tmp_path / "checkpoints").glob("*/meta.json")
                  if json.loads(p.read_text())["label"] == "1/2 first"]  # fmt: skip
    meta = json.loads(first_cp.read_text())
    meta["data"]["vm"]["signature"] = "0" * 64
    first_cp.write_text(json.dumps(meta))
    write_recipe(tmp_path, "again")
    other, other_dir, log = build(recipe, cli_env)
    assert other["checkpoints"]["restore"] == "disk"
    assert "checkpoints: 1/2 first: booting from its disk layer (not resumable here: it was " \
        "saved by another QEMU or machine" in log  # fmt: skip
    assert (first_cp.parent / "vmstate.zst").exists()
    assert (first_cp.parent / "ssh-keys.json").exists()
    assert etc_file(other_dir / "disk.qcow2", tmp_path, "second") == b"again\n"

    # The first component edited: nothing matches but the booted builder, which
    # comes back running; both components run on it.
    write_recipe(tmp_path, "two", first_text="uno")
    fresh, fresh_dir, log = build(recipe, cli_env)
    assert (fresh["checkpoints"]["resumed"], fresh["checkpoints"]["boot"]) == ([], True)
    assert fresh["checkpoints"]["restore"] == "ram"
    assert fresh["checkpoints"]["saved"] == ["1/2 first", "2/2 second", "generalized disk"]
    assert "checkpoints: booted builder: the running VM is back, no boot" in log
    assert "booting the builder VM" not in log
    assert etc_file(fresh_dir / "disk.qcow2", tmp_path, "first") == b"uno\n"
    assert etc_file(fresh_dir / "disk.qcow2", tmp_path, "second") == b"two\n"

    listed = vmbuild("cache", "list", "--json", env=cli_env)
    rows = json.loads(listed.stdout)
    labels = sorted(row["label"] for row in rows)
    # Every component's running state is listed, the one another QEMU saved included.
    assert sorted((r["label"], r["running_vm"]) for r in rows if r["stage"] == "component") == [
        ("1/2 first", True), ("1/2 first", True),
        ("2/2 second", True), ("2/2 second", True), ("2/2 second", True), ("2/2 second", True),
    ]  # fmt: skip
    assert [(r["label"], r["running_vm"]) for r in rows if r["stage"] == "boot"] == [
        ("booted builder", True)
    ]
    assert edited["checkpoints"]["outputs"] is False and other["checkpoints"]["outputs"] is False
    assert labels == ["1/2 first", "1/2 first",
                      "2/2 second", "2/2 second", "2/2 second", "2/2 second", "booted builder",
                      "generalized disk", "generalized disk", "generalized disk", "generalized disk",
                      "outputs vmdk", "outputs vmdk", "outputs vmdk", "outputs vmdk"]  # fmt: skip
