"""`vmbuild doctor` and the build's own preflight agree on what the host lacks, and say
what each missing piece is for and what provides it. Real PATHs, real tools, no VM."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.support.cli import isolated_env, vmbuild

USER_PATH = "/usr/local/bin:/usr/bin:/bin"  # a non-root PATH: no sbin directories


def test_doctor_ready_on_this_host(tmp_path: Path) -> None:
    proc = vmbuild(isolated_env(tmp_path), "doctor", "--accel", "tcg", "--json")
    assert proc.returncode == 0, proc.stdout
    report = json.loads(proc.stdout)
    assert report["ready"] is True
    by_name = {c["name"]: c for c in report["checks"]}
    for tool in ("qemu-system-x86_64", "qemu-img", "debugfs", "grub-mkimage", "sfdisk"):
        assert by_name[tool]["ok"] is True, by_name[tool]
    assert by_name["accelerator"] == {
        "name": "accelerator", "ok": True, "required": True, "detail": "tcg: TCG requested",
        "needed_for": "every build",
    }  # fmt: skip
    human = vmbuild(isolated_env(tmp_path), "doctor", "--accel", "tcg")
    assert human.returncode == 0
    assert human.stdout.splitlines()[-1] == "ready: vmbuild can build images on this host"
    assert "✓ qemu-img             /usr/bin/qemu-img (qemu-img version " in human.stdout


def test_doctor_names_what_is_missing_and_fails(tmp_path: Path) -> None:
    env = isolated_env(tmp_path, PATH=USER_PATH)
    env["PATH"] = "/nonexistent"
    proc = vmbuild(env, "doctor", "--accel", "tcg")
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[-1] == (
        "not ready: 3 required check(s) failed (qemu-system-x86_64, qemu-img, debugfs)"
    )
    assert (
        "✗ qemu-img             qemu-img (overlays, output conversion): apt-get install qemu-utils"
        in lines
    )
    assert (
        "✗ debugfs              debugfs (verifies the generalized image offline) is not on PATH "
        "but /usr/sbin/debugfs exists: add /usr/sbin to PATH"
    ) in lines
    assert any(
        line.startswith("✗ mmdebstrap ") and "[for debian-12 base builds]" in line for line in lines
    )


def test_build_checks_its_tools_before_creating_anything(tmp_path: Path) -> None:
    disk = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: web\nversion: 1.0.0\nbase: base.qcow2\n")
    env = isolated_env(tmp_path, PATH=USER_PATH)
    proc = vmbuild(env, "build", str(recipe), "--skip-tests")
    assert proc.returncode == 1
    assert proc.stderr == (
        "error: this build cannot run here: debugfs (verifies the generalized image offline) is "
        "not on PATH but /usr/sbin/debugfs exists: add /usr/sbin to PATH\n"
        "hint: `vmbuild doctor` checks everything; nothing was created\n"
    )
    assert not (tmp_path / "store").exists()
    assert not (tmp_path / "cache").exists()


def test_arm64_build_needs_qemu_system_aarch64(tmp_path: Path) -> None:
    disk = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: web\nversion: 1.0.0\nbase: base.qcow2\narch: arm64\n")
    # Every tool an x86_64 build needs, but no qemu-system-aarch64.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("qemu-system-x86_64", "qemu-img", "debugfs"):
        found = subprocess.run(
            ["sh", "-c", f"PATH=$PATH:/usr/sbin:/sbin command -v {tool}"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        (bin_dir / tool).symlink_to(found)
    env = isolated_env(tmp_path, PATH=f"{bin_dir}:/bin")
    env["PATH"] = f"{bin_dir}"
    proc = vmbuild(env, "build", str(recipe), "--skip-tests")
    assert proc.returncode == 1
    assert proc.stderr == (
        "error: this build cannot run here: qemu-system-aarch64 (runs arm64 builder and test "
        "VMs): apt-get install qemu-system-arm\n"
        "hint: `vmbuild doctor` checks everything; nothing was created\n"
    )
    assert not (tmp_path / "store").exists()
