"""The hybrid (BIOS + UEFI) GPT layout of the offline Debian base, as data."""

from __future__ import annotations

from pathlib import Path

from vmbuild.debian import bootstrap as b

UUID = "0b8ca0c5-5c3a-4b59-9fd4-3c6c0d2f8e11"
MiB = 1 << 20


def test_gpt_script_puts_root_last_and_clear_of_the_backup_header() -> None:
    script = b.sfdisk_gpt_script(UUID)
    lines = script.splitlines()
    assert lines[0] == "label: gpt"
    assert lines[1] == f"label-id: {b._derived_uuid(UUID, 'disk')}".upper().replace(
        "LABEL-ID", "label-id"
    )
    parts = [ln for ln in lines if ln.startswith("start=")]
    assert parts == [
        f"start=2048, size=2048, type={b.GPT_BIOS_BOOT}, name=bios",
        f"start=4096, size={126 * 2048}, type={b.GPT_ESP}, name=esp",
        f"start={128 * 2048}, size={(2048 - 128 - 1) * 2048}, type={b.GPT_ROOT_X86_64}, name=root",
    ]
    # Same inputs, same table: the disk GUID comes from the root's UUID.
    assert b.sfdisk_gpt_script(UUID) == script
    assert b.sfdisk_gpt_script("1" * 8 + UUID[8:]) != script


def test_root_filesystem_fills_its_partition() -> None:
    argv = b.mke2fs_argv(Path("/w/d.raw"), Path("/w/r"), UUID, layout="hybrid")
    assert argv[argv.index("-E") + 1] == f"offset={128 * MiB}"
    assert int(argv[-1]) * 4096 == (2048 - 128 - 1) * MiB
    bios = b.mke2fs_argv(Path("/w/d.raw"), Path("/w/r"), UUID)
    assert bios[bios.index("-E") + 1] == f"offset={MiB}"


def test_esp_is_fat32_at_its_offset() -> None:
    assert b.mkfs_esp_argv(Path("/w/d.raw"), UUID) == [
        "mkfs.fat", "-F", "32", "-s", "1", "-h", "4096", "-n", "EFI",
        "-i", b.esp_volume_id(UUID), "--offset=4096",
        "/w/d.raw", str(126 * 1024),
    ]  # fmt: skip
    assert len(b.esp_volume_id(UUID)) == 8


def test_esp_files_and_mtools_order() -> None:
    cfg = Path("/w/grub-efi.cfg")
    argvs = b.mtools_argvs(Path("/w/d.raw"), b.esp_files(cfg))
    image = f"/w/d.raw@@{2 * MiB}"
    assert argvs[:3] == [
        ["mmd", "-i", image, "::/EFI"],
        ["mmd", "-i", image, "::/EFI/BOOT"],
        ["mmd", "-i", image, "::/EFI/debian"],
    ]
    assert ["mcopy", "-i", image, str(b.SHIM_SIGNED), "::/EFI/BOOT/BOOTX64.EFI"] in argvs
    assert ["mcopy", "-i", image, str(b.GRUB_EFI_SIGNED), "::/EFI/BOOT/grubx64.efi"] in argvs
    assert ["mcopy", "-i", image, str(cfg), "::/EFI/debian/grub.cfg"] in argvs
    assert all(a[0] == "mcopy" for a in argvs[3:])


def test_efi_grub_config_hands_over_to_the_root() -> None:
    assert b.grub_efi_config(UUID) == (
        f"search --no-floppy --fs-uuid --set=root {UUID}\n"
        "set prefix=($root)/boot/grub\nconfigfile $prefix/grub.cfg\n"
    )


def test_boot_and_core_img_patches() -> None:
    boot = bytes(512)
    patched = b.patch_boot_img(boot, 2048)
    assert len(patched) == 512
    assert int.from_bytes(patched[0x5C:0x64], "little") == 2048
    assert patched[:0x5C] == boot[:0x5C] and patched[0x64:] == boot[0x64:]
    core = bytes(range(256)) * 8  # 4 sectors
    pcore = b.patch_core_img(core, 2048)
    assert int.from_bytes(pcore[500:508], "little") == 2049
    assert pcore[:500] == core[:500] and pcore[508:] == core[508:]


def test_grub_mkimage_reads_gpt_for_hybrid() -> None:
    argv = b.grub_mkimage_argv(Path("/m"), Path("/c"), Path("/e"), "hybrid")
    assert "part_gpt" in argv and "part_msdos" not in argv
    assert "part_msdos" in b.grub_mkimage_argv(Path("/m"), Path("/c"), Path("/e"))


def test_esp_lint() -> None:
    from vmbuild.diskfs.lint import check_esp

    good = ["efi", "efi/boot", "efi/boot/bootx64.efi", "efi/boot/grubx64.efi",
            "efi/debian", "efi/debian/grub.cfg"]  # fmt: skip
    assert check_esp(good, "x86_64") == []
    no_fat = check_esp(None, "x86_64")
    assert [(f.severity, f.message) for f in no_fat] == [
        ("error", "no readable FAT file system on an EFI system partition")
    ]
    missing = check_esp(["efi", "efi/debian", "efi/debian/grubx64.efi"], "x86_64")
    assert [(f.severity, f.check) for f in missing] == [
        ("error", "boot-loader"),
        ("warning", "grub"),
    ]
    assert "EFI/BOOT/BOOTX64.EFI" in missing[0].message
    assert "EFI/BOOT/BOOTAA64.EFI" in check_esp(good, "arm64")[0].message


def test_the_root_partition_type_is_one_the_readers_know() -> None:
    from vmbuild.diskfs.rootfs import GPT_LINUX

    # The Discoverable Partitions Specification's "Root Partition (x86-64)".
    assert b.GPT_ROOT_X86_64.lower() == "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
    assert b.GPT_ROOT_X86_64.lower() in GPT_LINUX
