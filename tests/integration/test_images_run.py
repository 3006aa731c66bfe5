"""`vmbuild images run` through the real CLI, up to the point where it would boot:
everything it refuses, it refuses before creating anything (no VM is booted here;
the boot itself is hypervisor.guest.booted_guest, exercised by the VM suite)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.support.cli import BUILD_A, isolated_env, stored_build, vmbuild


def nothing_created(tmp_path: Path) -> bool:
    return not (tmp_path / "cache").exists()


def test_a_directory_outside_the_store_is_refused(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    elsewhere = tmp_path / "elsewhere" / "web" / "1.0.0" / BUILD_A
    elsewhere.mkdir(parents=True)
    (elsewhere / "manifest.json").write_text(json.dumps({"name": "web"}))
    (elsewhere / "web.qcow2").write_bytes(b"x")
    proc = vmbuild(env, "images", "run", str(elsewhere))
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == (
        f"error: {str(elsewhere)!r} is outside the store {(tmp_path / 'store').resolve()}"
    )
    assert nothing_created(tmp_path)


def test_an_image_without_a_bootable_disk_is_refused(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    stored_build(tmp_path / "store", "vm", "1.0.0", BUILD_A,
                 outputs=[{"format": "vhd", "file": "disk.vhd"}])  # fmt: skip
    proc = vmbuild(env, "images", "run", "vm", "--ssh")
    assert (proc.returncode, proc.stderr) == (1, (
        f"error: vm/1.0.0/{BUILD_A} has no qcow2 or raw disk to boot (outputs: vhd)\n"
        "hint: add qcow2 to the recipe's outputs and build it again\n"
    ))  # fmt: skip
    assert nothing_created(tmp_path)


def test_ssh_without_an_ssh_client_is_refused_before_booting(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    env = isolated_env(tmp_path, PATH=str(empty))
    stored_build(tmp_path / "store", "web", "1.0.0", BUILD_A)
    proc = vmbuild(env, "images", "run", "web", "--ssh")
    assert (proc.returncode, proc.stderr) == (1, (
        "error: --ssh needs the ssh client\nhint: apt-get install openssh-client\n"
    ))  # fmt: skip
    assert nothing_created(tmp_path)
    assert os.path.isabs(sys.executable)  # the CLI ran without PATH


def test_help_says_the_stored_disk_is_never_written(tmp_path: Path) -> None:
    proc = vmbuild(isolated_env(tmp_path), "images", "run", "--help")
    assert proc.returncode == 0
    assert "the stored disk is never written" in " ".join(proc.stdout.split())
    for flag in ("--ssh", "--accelerator", "--memory", "--cpus", "--store"):
        assert flag in proc.stdout


def test_the_ssh_session_gets_vmbuilds_own_stdin_and_its_status_is_returned(
    tmp_path: Path,
) -> None:
    from vmbuild.run import interactive

    # run() gives commands /dev/null; an SSH session needs the user's terminal.
    seen = tmp_path / "stdin"
    script = f'readlink /proc/self/fd/0 > "{seen}"; exit 3'
    assert interactive(["sh", "-c", script]) == 3
    assert seen.read_text().strip() == os.readlink("/proc/self/fd/0")
    assert interactive(["true"]) == 0
