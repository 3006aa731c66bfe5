"""`images run`'s plan and SSH command, without booting: what it boots and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.cli import BUILD_A, stored_build
from vmbuild.cli.images_run import USER, plan, ssh_argv
from vmbuild.errors import VmbuildError


def test_the_stored_qcow2_is_what_boots(tmp_path: Path) -> None:
    store = tmp_path / "store"
    build = stored_build(store, "web", "1.0.0", BUILD_A)
    chosen = plan(store, "web")
    assert (chosen.ref, chosen.build_dir, chosen.disk, chosen.format) == (
        f"web/1.0.0/{BUILD_A}", build, build / "web.qcow2", "qcow2",
    )  # fmt: skip


def test_a_raw_output_boots_when_there_is_no_qcow2(tmp_path: Path) -> None:
    store = tmp_path / "store"
    outputs = [{"format": "vmdk", "file": "disk.vmdk"}, {"format": "raw", "file": "disk.raw"}]
    build = stored_build(store, "web", "1.0.0", BUILD_A, outputs=outputs)
    (build / "disk.raw").write_bytes(b"\0" * 512)
    chosen = plan(store, "web/1.0.0")
    assert (chosen.disk, chosen.format) == (build / "disk.raw", "raw")


def test_refusals_name_the_image(tmp_path: Path) -> None:
    store = tmp_path / "store"
    stored_build(store, "vm", "1.0.0", BUILD_A, outputs=[{"format": "vmdk", "file": "d.vmdk"}])
    with pytest.raises(VmbuildError) as no_disk:
        plan(store, "vm")
    assert (
        str(no_disk.value) == f"vm/1.0.0/{BUILD_A} has no qcow2 or raw disk to boot (outputs: vmdk)"
    )
    gone = stored_build(store, "gone", "1.0.0", BUILD_A)
    (gone / "gone.qcow2").unlink()
    with pytest.raises(VmbuildError) as missing:
        plan(store, "gone")
    assert (
        str(missing.value)
        == f"gone/1.0.0/{BUILD_A}: its qcow2 disk {gone / 'gone.qcow2'} is missing"
    )
    elsewhere = tmp_path / "elsewhere" / "web" / "1.0.0" / BUILD_A
    elsewhere.mkdir(parents=True)
    (elsewhere / "manifest.json").write_text(json.dumps({"name": "web"}))
    with pytest.raises(VmbuildError, match="is outside the store"):
        plan(store, str(elsewhere))


def test_ssh_uses_only_the_fresh_key_and_the_pinned_host_key() -> None:
    argv = ssh_argv(Path("/w/id"), 2222, Path("/w/known_hosts"), USER)
    assert argv == [
        "ssh", "-i", "/w/id", "-p", "2222", "-o", "IdentitiesOnly=yes",
        "-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=/w/known_hosts",
        "vmbuild-try@127.0.0.1",
    ]  # fmt: skip
