"""Partition tables and superblocks, parsed in Python from bytes written to small files."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

from vmbuild.diskfs.lint import check_partition_table, lint_disk
from vmbuild.diskfs.rootfs import (
    GPT_BIOS_BOOT,
    GPT_ESP,
    detect_filesystem,
    read_partition_table,
)

MIB = 1024 * 1024


def mbr(entries: list[tuple[int, int, int, bool]], boot_code: bytes = b"\xeb\x63") -> bytes:
    sector = bytearray(512)
    sector[: len(boot_code)] = boot_code
    for i, (ptype, lba, sectors, active) in enumerate(entries):
        entry = struct.pack(
            "<B3sB3sII", 0x80 if active else 0, b"\0" * 3, ptype, b"\0" * 3, lba, sectors
        )
        sector[446 + 16 * i : 462 + 16 * i] = entry
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def gpt_disk(path: Path, parts: list[tuple[str, int, int, str]], size: int = 64 * MIB) -> None:
    with path.open("wb") as fh:
        fh.truncate(size)
        fh.write(mbr([(0xEE, 1, size // 512 - 1, False)], boot_code=b""))
        header = bytearray(92)
        header[:8] = b"EFI PART"
        struct.pack_into("<QII", header, 72, 2, 128, 128)
        fh.seek(512)
        fh.write(bytes(header))
        fh.seek(1024)
        for ptype, first, last, name in parts:
            entry = uuid.UUID(ptype).bytes_le + uuid.uuid4().bytes_le
            entry += struct.pack("<QQQ", first, last, 0) + name.encode("utf-16-le").ljust(72, b"\0")
            fh.write(entry)


def test_mbr_is_parsed(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as fh:
        fh.truncate(8 * MIB)
        fh.write(mbr([(0x83, 2048, 8192, True), (0x82, 10240, 2048, False)]))
    table = read_partition_table(disk)
    assert table is not None and table.kind == "mbr"
    first, second = table.partitions
    assert (first.number, first.start, first.size, first.type, first.bootable) == (
        1,
        MIB,
        4 * MIB,
        "0x83",
        True,
    )
    assert first.is_linux and not second.is_linux
    assert check_partition_table(table, "legacy-bios") == []
    uefi = check_partition_table(table, "uefi")
    assert [f.message for f in uefi] == [
        "boot mode uefi needs a GPT disk with an EFI system partition"
    ]


def test_mbr_without_boot_code_cannot_boot_bios(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(mbr([(0x83, 2048, 8192, True)], boot_code=b""))
    table = read_partition_table(disk)
    assert table is not None
    (finding,) = check_partition_table(table, "legacy-bios")
    assert finding.severity == "error" and "no boot code" in finding.message


def test_gpt_is_parsed_behind_the_protective_mbr(tmp_path: Path) -> None:
    disk = tmp_path / "gpt.raw"
    linux = "0fc63daf-8483-4772-8e79-3d69d8477de4"
    gpt_disk(disk, [(GPT_ESP, 2048, 4095, "EFI"), (linux, 4096, 100000, "root")])
    table = read_partition_table(disk)
    assert table is not None and table.kind == "gpt"
    esp, root = table.partitions
    assert esp.type == GPT_ESP and esp.name == "EFI" and esp.start == MIB
    assert root.is_linux and root.size == (100000 - 4096 + 1) * 512
    assert check_partition_table(table, "uefi") == []
    # No BIOS boot partition and no boot code: one error, the BIOS path is absent.
    assert [(f.severity, f.message) for f in check_partition_table(table, "legacy-bios")] == [
        (
            "error",
            "UEFI-only disk: no BIOS boot partition and no boot code in the protective MBR, "
            "so the legacy-BIOS boot path is absent",
        )
    ]
    gpt_disk(disk, [(GPT_BIOS_BOOT, 34, 2047, "bios"), (linux, 4096, 100000, "root")])
    table = read_partition_table(disk)
    assert table is not None
    assert not any(
        "BIOS boot partition" in f.message for f in check_partition_table(table, "legacy-bios")
    )


def test_no_partition_table_is_an_error(tmp_path: Path) -> None:
    disk = tmp_path / "blank.raw"
    with disk.open("wb") as fh:
        fh.truncate(MIB)
    assert read_partition_table(disk) is None
    report = lint_disk(disk)
    assert not report.ok
    assert report.errors[0].message == "no MBR or GPT partition table"


def test_superblocks_are_recognised(tmp_path: Path) -> None:
    disk = tmp_path / "fs.raw"
    fs_uuid = uuid.uuid4()
    sb = bytearray(1024)
    struct.pack_into("<H", sb, 0x38, 0xEF53)
    struct.pack_into("<III", sb, 0x5C, 0x4, 0x2C2, 0x400)  # journal; extents,64bit,flex_bg
    sb[0x68:0x78] = fs_uuid.bytes
    sb[0x78:0x7C] = b"root"
    with disk.open("wb") as fh:
        fh.truncate(4 * MIB)
        fh.seek(MIB + 1024)
        fh.write(bytes(sb))
        fh.seek(2 * MIB)
        fh.write(b"XFSB" + bytes(28) + fs_uuid.bytes)
    ext = detect_filesystem(disk, MIB)
    assert (ext.kind, ext.uuid, ext.label) == ("ext4", str(fs_uuid), "root")
    assert {"extents", "64bit", "metadata_csum"} <= ext.features
    assert detect_filesystem(disk, 2 * MIB).kind == "xfs"
    assert detect_filesystem(disk, 3 * MIB).kind == "unknown"


def test_a_disk_without_any_root_file_system(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    with disk.open("wb") as fh:
        fh.truncate(8 * MIB)
        fh.write(mbr([(0x83, 2048, 8192, True)]))
    report = lint_disk(disk)
    assert [f.message for f in report.errors] == [
        "no root file system found (partitions: 1:unknown)"
    ]
