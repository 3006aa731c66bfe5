"""The offline Debian base, as pure functions: every argv and file the build
writes (partition table, filesystem, GRUB), unit-tested without running them.
The steps that run them are in `base_image.build_debian`.

Three disk layouts:
- `bios`: an MBR, one ext4 partition, GRUB i386-pc in the gap before it.
- `hybrid`: GPT with a BIOS boot partition, an EFI system partition and the
  root, as Debian's own cloud images: one disk boots under legacy BIOS
  (GRUB i386-pc in the BIOS boot partition) and under UEFI, Secure Boot
  included (Debian's Microsoft-signed shim as the removable-media path
  EFI/BOOT/BOOTX64.EFI, then Debian's signed GRUB, then the signed kernel).
- `uefi`: GPT with an EFI system partition and the root, no BIOS boot
  partition and no i386-pc boot code: a disk only UEFI boots (EC2's
  `boot_mode: uefi`, and arm64, which has no BIOS). On x86_64 the ESP is the
  hybrid layout's (signed shim, GRUB, MokManager); on arm64 it holds GRUB
  arm64-efi, built here with `grub-mkimage` from the image's own
  grub-efi-arm64-bin modules, as EFI/BOOT/BOOTAA64.EFI.

Everything is written into a plain file at known offsets (sfdisk, mke2fs -E
offset, mkfs.fat --offset, mtools' `image@@offset`, dd): no loop devices,
which the hosts vmbuild targets (containers, CI runners) often lack. GRUB's
own installer needs a block device, so its two steps for a GPT disk are done
here: boot.img learns where core.img starts, core.img where its rest is.
"""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from vmbuild.debian.sources import DebianMirrors, apt_source_lines
from vmbuild.hypervisor.arch import DEBIAN_ARCH, SERIAL_CONSOLE, Arch

MiB = 1024 * 1024
DISK_SIZE = 2048 * MiB
PARTITION_OFFSET = MiB  # sector 2048; GRUB's core.img lives in the gap before it
FS_BLOCK_SIZE = 4096
GRUB_MODULES = (
    "biosdisk", "part_msdos", "ext2", "search_fs_uuid", "search", "configfile",
    "normal", "linux", "serial", "terminal", "terminfo", "echo", "test",
)  # fmt: skip
CONSOLE_ARGS = "console=tty0 console=ttyS0,115200n8"
# arm64-efi GRUB: the ESP is FAT, the root ext4 on GPT; gzio for a gzip'd
# kernel; no serial/terminal modules: UEFI's console already is the serial port.
GRUB_ARM64_MODULES = (
    "part_gpt", "fat", "ext2", "search_fs_uuid", "search", "configfile", "normal",
    "linux", "gzio", "echo", "test",
)  # fmt: skip
ESP_LOADER = {"x86_64": "BOOTX64.EFI", "arm64": "BOOTAA64.EFI"}

Layout = Literal["bios", "hybrid", "uefi"]
SECTOR = 512
# hybrid: 1 MiB BIOS boot, 126 MiB ESP (FAT32 needs >= ~33 MiB; room for
# shim/GRUB updates), the root to 1 MiB before the end (the backup GPT).
BIOS_BOOT_START = MiB
ESP_START, ESP_SIZE = 2 * MiB, 126 * MiB
HYBRID_ROOT_START = ESP_START + ESP_SIZE
GPT_TAIL = MiB
GPT_BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
GPT_ESP = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
GPT_ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
GPT_ROOT_ARM64 = "B921B045-1DF0-41C3-AF44-4C6F280D3FAE"  # Discoverable Partitions Spec
GPT_ROOT: dict[Arch, str] = {"x86_64": GPT_ROOT_X86_64, "arm64": GPT_ROOT_ARM64}
# GRUB's i386-pc boot.img: the 64-bit LBA of core.img's first sector
# (GRUB_BOOT_MACHINE_KERNEL_SECTOR); core.img's first sector (diskboot.img)
# ends with a blocklist whose first entry's 64-bit start LBA is 12 bytes
# before the sector's end (GRUB_BOOT_MACHINE_LIST_SIZE). grub-mkimage
# writes both for core.img at sector 1, which is where the bios layout puts it.
BOOT_IMG_KERNEL_SECTOR = 0x5C
DISKBOOT_BLOCKLIST_START = SECTOR - 12
# Debian's signed EFI binaries, as installed on the build host by
# shim-signed and grub-efi-amd64-signed (scripts/install-host-deps).
SHIM_SIGNED = Path("/usr/lib/shim/shimx64.efi.signed")
MOKMANAGER_SIGNED = Path("/usr/lib/shim/mmx64.efi.signed")
GRUB_EFI_SIGNED = Path("/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed")
SIGNED_EFI_BINARIES = (SHIM_SIGNED, GRUB_EFI_SIGNED, MOKMANAGER_SIGNED)


def root_offset(layout: Layout) -> int:
    return PARTITION_OFFSET if layout == "bios" else HYBRID_ROOT_START


def root_size(layout: Layout, disk_size: int = DISK_SIZE) -> int:
    return disk_size - root_offset(layout) - (0 if layout == "bios" else GPT_TAIL)


# --- Debian build: argv and file contents (pure) ---------------------------------


def mmdebstrap_argv(
    codename: str, rootfs: Path, mirrors: DebianMirrors, packages: Sequence[str],
    *, hook: Path, debs_in: Path, debs_out: Path, arch: Arch = "x86_64",
) -> list[str]:  # fmt: skip
    """mmdebstrap into a directory, seeding apt's cache from `debs_in`.

    essential/unlink is skipped so the essential .debs are still there for
    sync-out; mmdebstrap's cleanup still empties the image's own apt cache.
    A foreign `arch` runs the image's maintainer scripts under qemu-user
    (binfmt_misc: scripts/install-host-deps registers it).
    """
    q = shlex.quote
    return [
        "mmdebstrap", "--mode=root", "--variant=minbase", "--format=directory",
        f"--arch={DEBIAN_ARCH[arch]}",
        f"--include={','.join(packages)}", "--skip=essential/unlink",
        '--setup-hook=mkdir -p "$1"/var/cache/apt/archives',
        f"--setup-hook=sync-in {q(str(debs_in))} /var/cache/apt/archives/",
        f'--essential-hook=sh {q(str(hook))} essential "$1"',
        f'--customize-hook=sh {q(str(hook))} customize "$1"',
        f"--customize-hook=sync-out /var/cache/apt/archives {q(str(debs_out))}",
        codename, str(rootfs), *apt_source_lines(mirrors, codename),
    ]  # fmt: skip


def sfdisk_script(root_uuid: str) -> str:
    """One bootable Linux partition from 1 MiB to the end; disk id from the fs UUID."""
    return (
        f"label: dos\nlabel-id: 0x{root_uuid.replace('-', '')[:8]}\nunit: sectors\n\n"
        f"start={PARTITION_OFFSET // 512}, type=83, bootable\n"
    )


def sfdisk_gpt_script(
    root_uuid: str, disk_size: int = DISK_SIZE, layout: Layout = "hybrid", arch: Arch = "x86_64"
) -> str:
    """BIOS boot (hybrid only), ESP and root (last, so cloud-init's growpart can
    grow it), typed as `arch`'s root. The `uefi` layout keeps the hybrid offsets:
    the first MiB after the GPT stays empty.

    The disk GUID is derived from the root filesystem's UUID, as the MBR
    label id is, so two builds of one key differ only where their inputs do.
    """
    disk_guid = str(_derived_uuid(root_uuid, "disk")).upper()
    s = SECTOR
    bios = (
        f"start={BIOS_BOOT_START // s}, size={MiB // s}, type={GPT_BIOS_BOOT}, name=bios\n"
        if layout == "hybrid"
        else ""
    )
    return (
        f"label: gpt\nlabel-id: {disk_guid}\nunit: sectors\nfirst-lba: 34\n\n{bios}"
        f"start={ESP_START // s}, size={ESP_SIZE // s}, type={GPT_ESP}, name=esp\n"
        f"start={HYBRID_ROOT_START // s}, size={root_size(layout, disk_size) // s}, "
        f"type={GPT_ROOT[arch]}, name=root\n"
    )


def _derived_uuid(root_uuid: str, what: str) -> uuid.UUID:
    return uuid.uuid5(uuid.UUID(root_uuid), what)


def esp_volume_id(root_uuid: str) -> str:
    """The ESP's FAT volume id (8 hex digits), derived from the root's UUID."""
    return _derived_uuid(root_uuid, "esp").hex[:8]


def mkfs_esp_argv(disk: Path, root_uuid: str) -> list[str]:
    """FAT32 written into the ESP's place in the disk file (size in KiB blocks).

    One-sector clusters: FAT32 needs at least 65525 clusters, which 126 MiB of
    the default 4 KiB clusters is not (mtools then finds no directory slots).
    `-h`: the partition's start, as a FAT inside a partition records it.
    """
    start = str(ESP_START // SECTOR)
    return [
        "mkfs.fat", "-F", "32", "-s", "1", "-h", start, "-n", "EFI",
        "-i", esp_volume_id(root_uuid), f"--offset={start}", str(disk), str(ESP_SIZE // 1024),
    ]  # fmt: skip


def esp_image(disk: Path) -> str:
    """The ESP as mtools names it: a file at a byte offset."""
    return f"{disk}@@{ESP_START}"


def esp_files(grub_efi_cfg: Path) -> list[tuple[Path, str]]:
    """(host file, ESP path): shim at the removable-media path EFI/BOOT/BOOTX64.EFI
    finds grubx64.efi beside it (no fbx64.efi: no boot entries to create); the
    signed GRUB reads grub.cfg from its prefix EFI/debian, else beside itself."""
    return [
        (SHIM_SIGNED, "::/EFI/BOOT/BOOTX64.EFI"),
        (GRUB_EFI_SIGNED, "::/EFI/BOOT/grubx64.efi"),
        (MOKMANAGER_SIGNED, "::/EFI/BOOT/mmx64.efi"),
        (grub_efi_cfg, "::/EFI/BOOT/grub.cfg"),
        (grub_efi_cfg, "::/EFI/debian/grub.cfg"),
    ]


def grub_arm64_mkimage_argv(module_dir: Path, image: Path, early_config: Path) -> list[str]:
    """GRUB arm64-efi as one EFI binary (the removable-media BOOTAA64.EFI), from the
    image's own modules: the embedded config finds the root by UUID, as the
    i386-pc core.img does, then reads the root's /boot/grub/grub.cfg."""
    return [
        "grub-mkimage", "-O", "arm64-efi", "-d", str(module_dir), "-o", str(image),
        "-c", str(early_config), "-p", "/boot/grub", *GRUB_ARM64_MODULES,
    ]  # fmt: skip


def mtools_argvs(disk: Path, files: Sequence[tuple[Path, str]]) -> list[list[str]]:
    """mmd for each directory, then mcopy for each file, into the ESP."""
    image = esp_image(disk)
    dirs = sorted({dest.rsplit("/", 1)[0] for _, dest in files} - {"::"})
    parents = sorted({d for dest in dirs for d in _parents(dest)}, key=len)
    argvs = [["mmd", "-i", image, d] for d in parents]
    argvs += [["mcopy", "-i", image, str(src), dest] for src, dest in files]
    return argvs


def _parents(path: str) -> list[str]:
    parts = path.removeprefix("::/").split("/")
    return ["::/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def grub_efi_config(root_uuid: str) -> str:
    """The ESP's grub.cfg: hand over to the root filesystem's /boot/grub/grub.cfg,
    the one config both firmware paths share (a kernel upgrade needs no ESP write)."""
    return (
        f"search --no-floppy --fs-uuid --set=root {root_uuid}\n"
        "set prefix=($root)/boot/grub\nconfigfile $prefix/grub.cfg\n"
    )


def patch_boot_img(boot_img: bytes, core_lba: int) -> bytes:
    """boot.img told that core.img starts at `core_lba` (what grub-install does)."""
    return _put_u64(boot_img, BOOT_IMG_KERNEL_SECTOR, core_lba)


def patch_core_img(core_img: bytes, core_lba: int) -> bytes:
    """core.img's first blocklist entry pointed at its own second sector."""
    return _put_u64(core_img, DISKBOOT_BLOCKLIST_START, core_lba + 1)


def _put_u64(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + value.to_bytes(8, "little") + data[offset + 8 :]


def sfdisk_argv(disk: Path) -> list[str]:
    return ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(disk)]


def mke2fs_argv(
    disk: Path, rootfs: Path, root_uuid: str, disk_size: int = DISK_SIZE,
    layout: Layout = "bios",
) -> list[str]:  # fmt: skip
    """ext4 filled from `rootfs`, written at the partition's offset inside the file.

    metadata_csum_seed is off: bookworm's GRUB 2.06 cannot read it.
    """
    blocks = root_size(layout, disk_size) // FS_BLOCK_SIZE
    return [
        "mke2fs", "-q", "-F", "-t", "ext4", "-b", str(FS_BLOCK_SIZE),
        "-O", "^metadata_csum_seed", "-L", "root", "-U", root_uuid,
        "-E", f"offset={root_offset(layout)}", "-d", str(rootfs), str(disk), str(blocks),
    ]  # fmt: skip


def grub_early_config(root_uuid: str) -> str:
    # Without grub-install nothing records the boot partition: find it by UUID.
    return f"search.fs_uuid {root_uuid} root\nset prefix=($root)/boot/grub\n"


def grub_mkimage_argv(
    module_dir: Path, core: Path, early_config: Path, layout: Layout = "bios"
) -> list[str]:
    table = "part_msdos" if layout == "bios" else "part_gpt"
    modules = [table if m == "part_msdos" else m for m in GRUB_MODULES]
    return [
        "grub-mkimage", "-O", "i386-pc", "-d", str(module_dir), "-o", str(core),
        "-c", str(early_config), "-p", "/boot/grub", *modules,
    ]  # fmt: skip


def dd_argv(
    src: Path, disk: Path, *, bs: int, count: int | None = None, seek: int = 0
) -> list[str]:
    argv = ["dd", f"if={src}", f"of={disk}", f"bs={bs}"]
    argv += [f"count={count}"] if count is not None else []
    argv += [f"seek={seek}"] if seek else []
    return [*argv, "conv=notrunc", "status=none"]


def kernel_console_args(arch: Arch) -> str:
    if arch == "x86_64":
        return CONSOLE_ARGS
    return f"console={SERIAL_CONSOLE[arch]},115200n8"


def grub_config(root_uuid: str, title: str, arch: Arch = "x86_64") -> str:
    """grub.cfg by hand (grub-mkconfig writes no entries for a file-backed root).

    /vmlinuz and /initrd.img are symlinks the kernel package keeps current, so
    a kernel upgrade in a builder VM still boots without update-grub. On arm64
    GRUB's console is UEFI's, which the firmware already puts on the serial port.
    """
    serial = (
        "serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1\n"
        "terminal_input serial console\nterminal_output serial console\n"
        if arch == "x86_64"
        else ""
    )
    return (
        f"{serial}set default=0\nset timeout=0\n"
        f"menuentry '{title}' {{\n"
        f"\tsearch --no-floppy --fs-uuid --set=root {root_uuid}\n"
        f"\tlinux /vmlinuz root=UUID={root_uuid} ro {kernel_console_args(arch)}\n"
        "\tinitrd /initrd.img\n}\n"
    )
