"""The hybrid layout's partition table and ESP, written by the real tools (sfdisk,
mkfs.fat, mtools) into a sparse file exactly as the base build does, then read
back by the lint: the signed shim at the removable-media path, GRUB's config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vmbuild.debian import bootstrap as b
from vmbuild.diskfs.lint import check_esp, check_partition_table, esp_listing
from vmbuild.diskfs.rootfs import GPT_ESP, read_partition_table
from vmbuild.hypervisor import accel
from vmbuild.run import run

UUID = "0b8ca0c5-5c3a-4b59-9fd4-3c6c0d2f8e11"


def _disk(disk: Path, script: str, size: int = b.DISK_SIZE) -> Path:
    """A sparse file of `size` partitioned by sfdisk `script`, as the base build does."""
    with disk.open("wb") as f:
        f.truncate(size)
    run(b.sfdisk_argv(disk), input=script.encode())
    return disk


def _write_esp(disk: Path) -> Path:
    """The ESP formatted and filled (signed shim, GRUB, its config) by the real tools."""
    run(b.mkfs_esp_argv(disk, UUID))
    cfg = disk.with_name("grub-efi.cfg")
    cfg.write_text(b.grub_efi_config(UUID))
    for argv in b.mtools_argvs(disk, b.esp_files(cfg)):
        run(argv, env={"MTOOLS_SKIP_CHECK": "1"})
    return disk


def _build(tmp_path: Path, base: Path, boot_mode: str) -> subprocess.CompletedProcess[str]:
    """`vmbuild build` of a recipe on `base` with `boot_mode`, in its own store and state."""
    (tmp_path / "recipe.yaml").write_text(
        f"name: wrong-mode\nversion: 1.0.0\nbase: ./{base.name}\nboot_mode: {boot_mode}\n"
    )
    env = {**os.environ, "VMBUILD_STORE": str(tmp_path / "store"),
           "VMBUILD_STATE_DIR": str(tmp_path / "state"), "VMBUILD_ACCEL": "tcg"}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "vmbuild", "build", str(tmp_path / "recipe.yaml")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_hybrid_disk_has_a_bootable_esp(tmp_path: Path) -> None:
    disk = _write_esp(_disk(tmp_path / "disk.raw", b.sfdisk_gpt_script(UUID)))

    table = read_partition_table(disk)
    assert table is not None and table.kind == "gpt"
    assert [(p.number, p.start, p.type) for p in table.partitions][:2] == [
        (1, b.BIOS_BOOT_START, b.GPT_BIOS_BOOT.lower()),
        (2, b.ESP_START, GPT_ESP),
    ]
    assert table.partitions[2].start == b.HYBRID_ROOT_START
    assert table.partitions[2].start + table.partitions[2].size <= b.DISK_SIZE - b.GPT_TAIL
    paths = esp_listing(disk, table)
    assert paths is not None
    assert {"efi/boot/bootx64.efi", "efi/boot/grubx64.efi", "efi/debian/grub.cfg"} <= set(paths)
    assert check_esp(paths, "x86_64") == []
    # uefi-preferred also wants the BIOS path: there is a BIOS boot partition, and
    # (here, with no GRUB written) no boot code in the MBR, which the lint names.
    assert [f.message for f in check_partition_table(table, "uefi")] == []
    assert [f.message for f in check_partition_table(table, "uefi-preferred")] == [
        "the MBR has no boot code: BIOS boot would stop at once"
    ]
    back = tmp_path / "BOOTX64.EFI"
    run(["mcopy", "-i", b.esp_image(disk), "::/EFI/BOOT/BOOTX64.EFI", str(back)],
        env={"MTOOLS_SKIP_CHECK": "1"})  # fmt: skip
    assert back.read_bytes() == b.SHIM_SIGNED.read_bytes()


def test_a_base_that_cannot_boot_uefi_is_refused_before_any_vm(tmp_path: Path) -> None:
    """An MBR-only base with boot_mode uefi: one error naming the base and why, before
    any VM boots (OVMF would otherwise sit in its boot menu until the boot timeout)."""
    disk = _disk(
        tmp_path / "bios-only.raw", "label: dos\n\nstart=2048, type=83, bootable\n", 64 << 20
    )
    proc = _build(tmp_path, disk, "uefi")
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == [
        f"error: base {disk}: cannot boot as boot_mode uefi: "
        "boot mode uefi needs a GPT disk with an EFI system partition"
    ], proc.stderr
    assert "Traceback" not in proc.stderr
    store = tmp_path / "store"
    assert not store.exists() or [p for p in store.rglob("*") if p.is_file()] == []
    assert not list(tmp_path.glob("store/**/.staging-*"))


def test_uefi_only_disk_has_no_bios_path_and_is_refused_as_legacy_bios(tmp_path: Path) -> None:
    """The `uefi` layout (boot_mode: uefi) written by the real tools: the same ESP,
    no BIOS boot partition, no boot code. The lint says the legacy-BIOS path is
    absent, and a legacy-bios build of it stops before any VM, naming the base."""
    size = 256 * b.MiB  # small: the build hashes it
    script = b.sfdisk_gpt_script(UUID, size, layout="uefi")
    disk = _write_esp(_disk(tmp_path / "uefi-only.raw", script, size))

    table = read_partition_table(disk)
    assert table is not None and table.kind == "gpt"
    assert [(p.number, p.start, p.type) for p in table.partitions] == [
        (1, b.ESP_START, GPT_ESP),
        (2, b.HYBRID_ROOT_START, b.GPT_ROOT_X86_64.lower()),
    ]
    assert not any(table.boot_code)
    paths = esp_listing(disk, table)
    assert paths is not None and check_esp(paths, "x86_64") == []
    absent = (
        "UEFI-only disk: no BIOS boot partition and no boot code in the protective MBR, "
        "so the legacy-BIOS boot path is absent"
    )
    assert check_partition_table(table, "uefi") == []
    for mode in ("legacy-bios", "uefi-preferred"):
        assert [(f.severity, f.message) for f in check_partition_table(table, mode)] == [
            ("error", absent)
        ]

    proc = _build(tmp_path, disk, "legacy-bios")
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == [f"error: base {disk}: cannot boot as boot_mode legacy-bios: {absent}"]
    assert "set boot_mode: uefi" in proc.stderr
    assert not list(tmp_path.glob("state/**/*console*.log"))  # no VM ever started


def test_the_kvm_probe_boots_a_uefi_only_base_under_ovmf(tmp_path: Path) -> None:
    """SeaBIOS cannot start a UEFI-only disk: probed that way, KVM would be blamed
    (and the verdict cached) for the image's boot mode."""
    uefi = _disk(tmp_path / "uefi.raw", b.sfdisk_gpt_script(UUID, layout="uefi"))
    hybrid = _disk(tmp_path / "hybrid.raw", b.sfdisk_gpt_script(UUID))
    mbr = _disk(tmp_path / "mbr.raw", b.sfdisk_script(UUID))
    # sfdisk writes no boot code; SeaBIOS needs some in the MBR (GRUB's boot.img
    # in a real base). Without it even the hybrid disk boots UEFI only.
    assert accel.uefi_only(hybrid, "raw", tmp_path)
    for disk in (hybrid, mbr):
        with disk.open("r+b") as f:
            f.write(b"\xeb\x63\x90")  # a jump, as boot.img starts
    assert [accel.uefi_only(d, "raw", tmp_path) for d in (uefi, hybrid, mbr)] == [
        True, False, False,
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hybrid.raw", "mbr.raw", "uefi.raw"]
