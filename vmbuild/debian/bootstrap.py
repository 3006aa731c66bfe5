"""The offline Debian base, as pure functions: every argv and file the build
writes (partition table, filesystem, GRUB), unit-tested without running them.
The steps that run them are in `base_image.build_debian`.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from vmbuild.debian.sources import DebianMirrors, apt_source_lines

MiB = 1024 * 1024
DISK_SIZE = 2048 * MiB
PARTITION_OFFSET = MiB  # sector 2048; GRUB's core.img lives in the gap before it
FS_BLOCK_SIZE = 4096
GRUB_MODULES = (
    "biosdisk", "part_msdos", "ext2", "search_fs_uuid", "search", "configfile",
    "normal", "linux", "serial", "terminal", "terminfo", "echo", "test",
)  # fmt: skip
CONSOLE_ARGS = "console=tty0 console=ttyS0,115200n8"


# --- Debian build: argv and file contents (pure) ---------------------------------


def mmdebstrap_argv(
    codename: str, rootfs: Path, mirrors: DebianMirrors, packages: Sequence[str],
    *, hook: Path, debs_in: Path, debs_out: Path,
) -> list[str]:  # fmt: skip
    """mmdebstrap into a directory, seeding apt's cache from `debs_in`.

    essential/unlink is skipped so the essential .debs are still there for
    sync-out; mmdebstrap's cleanup still empties the image's own apt cache.
    """
    q = shlex.quote
    return [
        "mmdebstrap", "--mode=root", "--variant=minbase", "--format=directory",
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


def sfdisk_argv(disk: Path) -> list[str]:
    return ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(disk)]


def mke2fs_argv(disk: Path, rootfs: Path, root_uuid: str, disk_size: int = DISK_SIZE) -> list[str]:
    """ext4 filled from `rootfs`, written at the partition's offset inside the file.

    metadata_csum_seed is off: bookworm's GRUB 2.06 cannot read it.
    """
    blocks = (disk_size - PARTITION_OFFSET) // FS_BLOCK_SIZE
    return [
        "mke2fs", "-q", "-F", "-t", "ext4", "-b", str(FS_BLOCK_SIZE),
        "-O", "^metadata_csum_seed", "-L", "root", "-U", root_uuid,
        "-E", f"offset={PARTITION_OFFSET}", "-d", str(rootfs), str(disk), str(blocks),
    ]  # fmt: skip


def grub_early_config(root_uuid: str) -> str:
    # Without grub-install nothing records the boot partition: find it by UUID.
    return f"search.fs_uuid {root_uuid} root\nset prefix=($root)/boot/grub\n"


def grub_mkimage_argv(module_dir: Path, core: Path, early_config: Path) -> list[str]:
    return [
        "grub-mkimage", "-O", "i386-pc", "-d", str(module_dir), "-o", str(core),
        "-c", str(early_config), "-p", "/boot/grub", *GRUB_MODULES,
    ]  # fmt: skip


def dd_argv(
    src: Path, disk: Path, *, bs: int, count: int | None = None, seek: int = 0
) -> list[str]:
    argv = ["dd", f"if={src}", f"of={disk}", f"bs={bs}"]
    argv += [f"count={count}"] if count is not None else []
    argv += [f"seek={seek}"] if seek else []
    return [*argv, "conv=notrunc", "status=none"]


def grub_config(root_uuid: str, title: str) -> str:
    """grub.cfg by hand (grub-mkconfig writes no entries for a file-backed root).

    /vmlinuz and /initrd.img are symlinks the kernel package keeps current, so
    a kernel upgrade in a builder VM still boots without update-grub.
    """
    return (
        "serial --unit=0 --speed=115200 --word=8 --parity=no --stop=1\n"
        "terminal_input serial console\nterminal_output serial console\n"
        "set default=0\nset timeout=0\n"
        f"menuentry '{title}' {{\n"
        f"\tsearch --no-floppy --fs-uuid --set=root {root_uuid}\n"
        f"\tlinux /vmlinuz root=UUID={root_uuid} ro {CONSOLE_ARGS}\n"
        "\tinitrd /initrd.img\n}\n"
    )
