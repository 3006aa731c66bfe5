"""The arm64 offline Debian base, as data: packages, cache key and id, the
mmdebstrap argv, the GPT layout without a BIOS boot partition, GRUB arm64-efi
and the foreign-architecture preflight. No processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmbuild.debian import bootstrap as b
from vmbuild.debian.sources import DebianMirrors
from vmbuild.errors import VmbuildError
from vmbuild.stages import base_image as bi

UUID = "0b8ca0c5-5c3a-4b59-9fd4-3c6c0d2f8e11"
MIRRORS = DebianMirrors("http://m/debian", "http://m/debian-security")


def test_arm64_packages_swap_kernel_and_grub() -> None:
    amd = bi.packages_for("hybrid")
    arm = bi.packages_for("uefi", "arm64")
    assert "linux-image-cloud-arm64" in arm and "grub-efi-arm64-bin" in arm
    assert "linux-image-cloud-amd64" not in arm and "grub-pc-bin" not in arm
    # Everything else (cloud-init, sshd, mokutil for UEFI) is the same list.
    assert sorted(set(amd) - {"linux-image-cloud-amd64", "grub-pc-bin"}) == sorted(
        set(arm) - {"linux-image-cloud-arm64", "grub-efi-arm64-bin"}
    )
    assert bi.packages_for("bios") == bi.DEBIAN_PACKAGES


def test_arch_is_in_the_cache_key_and_the_id() -> None:
    x86 = bi.base_cache_key("debian-12", "http://m/debian", ["a"])
    arm = bi.base_cache_key("debian-12", "http://m/debian", ["a"], layout="uefi", arch="arm64")
    assert arm != x86
    assert arm != bi.base_cache_key("debian-12", "http://m/debian", ["a"], layout="uefi")
    # x86_64 keys are what they were before arch existed: cached bases stay valid.
    assert x86 == bi.base_cache_key("debian-12", "http://m/debian", ["a"], arch="x86_64")
    arm_id = bi.base_id_for("debian-12", MIRRORS, "uefi", "arm64")
    assert (
        arm_id.startswith("debian-12-arm64-uefi-")
        and len(arm_id) == len("debian-12-arm64-uefi-") + 16
    )
    assert bi.base_id_for("debian-12", MIRRORS, "bios").count("-") == 2  # debian-12-<key>
    assert bi.layout_for("uefi", "arm64") == "uefi"
    assert bi.layout_for("uefi") == "uefi" and bi.layout_for("legacy-bios") == "bios"
    assert bi.layout_for("uefi-preferred") == "hybrid"


def test_arm64_base_needs_the_uefi_layout() -> None:
    with pytest.raises(VmbuildError, match="an arm64 base boots UEFI only"):
        bi.build_debian(layout="hybrid", arch="arm64", mirror="http://m/debian")


def test_deb_caches_are_per_architecture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bi, "cache_dir", lambda: tmp_path)
    assert bi.debs_dir("x86_64") == tmp_path / "debs"
    assert bi.debs_dir("arm64") == tmp_path / "debs-arm64"


def test_mmdebstrap_argv_names_the_foreign_arch() -> None:
    argv = b.mmdebstrap_argv(
        "bookworm", Path("/w/rootfs"), MIRRORS, ["linux-image-cloud-arm64"],
        hook=Path("/d/hook.sh"), debs_in=Path("/c/debs-arm64"), debs_out=Path("/w/debs"),
        arch="arm64",
    )  # fmt: skip
    assert argv[:6] == [
        "mmdebstrap", "--mode=root", "--variant=minbase", "--format=directory",
        "--arch=arm64", "--include=linux-image-cloud-arm64",
    ]  # fmt: skip
    assert "--setup-hook=sync-in /c/debs-arm64 /var/cache/apt/archives/" in argv


def test_uefi_gpt_has_esp_and_arm64_root_only() -> None:
    parts = [
        ln for ln in b.sfdisk_gpt_script(UUID, layout="uefi", arch="arm64").splitlines()
        if ln.startswith("start=")
    ]  # fmt: skip
    assert parts == [
        f"start=4096, size={126 * 2048}, type={b.GPT_ESP}, name=esp",
        f"start={128 * 2048}, size={(2048 - 128 - 1) * 2048}, "
        "type=B921B045-1DF0-41C3-AF44-4C6F280D3FAE, name=root",
    ]
    assert b.root_size("uefi") == b.root_size("hybrid")
    argv = b.mke2fs_argv(Path("/w/d.raw"), Path("/w/r"), UUID, layout="uefi")
    assert argv[argv.index("-E") + 1] == f"offset={128 << 20}"


def test_grub_arm64_efi_image_and_config() -> None:
    assert b.grub_arm64_mkimage_argv(
        Path("/w/rootfs/usr/lib/grub/arm64-efi"), Path("/w/BOOTAA64.EFI"), Path("/w/early.cfg")
    ) == [
        "grub-mkimage", "-O", "arm64-efi", "-d", "/w/rootfs/usr/lib/grub/arm64-efi",
        "-o", "/w/BOOTAA64.EFI", "-c", "/w/early.cfg", "-p", "/boot/grub",
        "part_gpt", "fat", "ext2", "search_fs_uuid", "search", "configfile", "normal",
        "linux", "gzio", "echo", "test",
    ]  # fmt: skip
    cfg = b.grub_config(UUID, "Debian GNU/Linux 12 (bookworm)", "arm64")
    assert f"\tlinux /vmlinuz root=UUID={UUID} ro console=ttyAMA0,115200n8\n" in cfg
    assert "serial" not in cfg  # UEFI's console is the serial port already
    assert b.mtools_argvs(
        Path("/w/d.raw"), [(Path("/w/BOOTAA64.EFI"), "::/EFI/BOOT/BOOTAA64.EFI")]
    ) == [
        ["mmd", "-i", f"/w/d.raw@@{2 << 20}", "::/EFI"],
        ["mmd", "-i", f"/w/d.raw@@{2 << 20}", "::/EFI/BOOT"],
        ["mcopy", "-i", f"/w/d.raw@@{2 << 20}", "/w/BOOTAA64.EFI", "::/EFI/BOOT/BOOTAA64.EFI"],
    ]


def test_foreign_arch_needs_a_binfmt_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bi, "host_arch", lambda: "x86_64")
    assert bi.foreign_arch_problem("x86_64", tmp_path) is None
    assert bi.foreign_arch_problem("arm64", tmp_path) == (
        f"no binfmt_misc handler {tmp_path}/qemu-aarch64 for arm64 binaries"
    )
    (tmp_path / "qemu-aarch64").write_text("disabled\ninterpreter /usr/libexec/qemu-binfmt/x\n")
    assert bi.foreign_arch_problem("arm64", tmp_path) == (
        f"the binfmt_misc handler {tmp_path}/qemu-aarch64 is disabled"
    )
    (tmp_path / "qemu-aarch64").write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/x\n")
    assert bi.foreign_arch_problem("arm64", tmp_path) is None


def test_x86_64_uefi_only_base() -> None:
    """boot_mode uefi on x86_64: the uefi layout (no BIOS boot partition), with the
    hybrid's signed ESP, its own key and id; no i386-pc GRUB modules in the image."""
    pkgs = bi.packages_for("uefi")
    assert "grub-pc-bin" not in pkgs and "mokutil" in pkgs
    assert set(bi.packages_for("hybrid")) - set(pkgs) == {"grub-pc-bin"}
    assert bi.signed_esp("uefi") and bi.signed_esp("hybrid")
    assert not bi.signed_esp("uefi", "arm64") and not bi.signed_esp("bios")
    uefi_id = bi.base_id_for("debian-12", MIRRORS, "uefi")
    assert uefi_id.startswith("debian-12-uefi-") and len(uefi_id) == len("debian-12-uefi-") + 16
    ids = {bi.base_id_for("debian-12", MIRRORS, layout) for layout in ("bios", "hybrid", "uefi")}
    assert len(ids | {bi.base_id_for("debian-12", MIRRORS, "uefi", "arm64")}) == 4
    table = b.sfdisk_gpt_script(UUID, layout="uefi")
    assert b.GPT_BIOS_BOOT not in table and b.GPT_ESP in table and b.GPT_ROOT_X86_64 in table
