"""Small but real bootable-looking disks for the distribution tests, made without root.

A fake Debian 12 tree (fstab by UUID, GRUB config, a kernel with nvme/ena in modules.dep,
cloud-init with the Ec2 datasource, sshd and systemd-networkd enabled, a 64-bit init) is put
into an ext4 file system written straight into a partitioned sparse raw file (sfdisk, then
`mke2fs -d -E offset=`), like vmbuild's offline base builder does. Plus artifacts around it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
KERNEL = "6.1.0-28-cloud-amd64"
ROOT_UUID = "5e1f7c2a-9b1d-4c33-8f0e-2a6d1b7c9e01"
BUILD = "20261122T180000Z-1a2b3c"


def _elf64(machine: int = 0x3E) -> bytes:
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header += struct.pack("<HHI", 2, machine, 1) + bytes(64 - 24)
    return header + os.urandom(4096)


def guest_tree(root: Path, *, data_mib: int = 3) -> None:
    """Write the fake guest file system into `root`."""

    def put(path: str, content: str | bytes, mode: int = 0o644) -> None:
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
        target.chmod(mode)

    def link(path: str, dest: str) -> None:
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(dest)

    for usr_dir in ("bin", "sbin", "lib"):
        (root / "usr" / usr_dir).mkdir(parents=True, exist_ok=True)
        link(f"/{usr_dir}", f"usr/{usr_dir}")
    put(
        "/etc/fstab",
        f"# <file system> <mount point> <type> <options> <dump> <pass>\n"
        f"UUID={ROOT_UUID} / ext4 rw,discard,errors=remount-ro 0 1\n",
    )
    put(f"/boot/vmlinuz-{KERNEL}", os.urandom(64 * 1024))
    put(f"/boot/initrd.img-{KERNEL}", os.urandom(64 * 1024))
    put(
        "/boot/grub/grub.cfg",
        f"""set default=0
set timeout=1
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
menuentry 'Debian GNU/Linux' {{
    search --no-floppy --fs-uuid --set=root {ROOT_UUID}
    linux /boot/vmlinuz-{KERNEL} root=UUID={ROOT_UUID} ro console=tty0 console=ttyS0,115200n8
    initrd /boot/initrd.img-{KERNEL}
}}
""",
    )
    mods = f"/usr/lib/modules/{KERNEL}"
    put(
        f"{mods}/modules.dep",
        "kernel/drivers/nvme/host/nvme.ko: kernel/drivers/nvme/host/"
        "nvme-core.ko\nkernel/drivers/nvme/host/nvme-core.ko:\n"
        "kernel/drivers/net/ethernet/amazon/ena/ena.ko:\n"
        "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko\n",
    )
    put(f"{mods}/modules.builtin", "kernel/fs/ext4/ext4.ko\n")
    put(f"{mods}/kernel/drivers/nvme/host/nvme.ko", os.urandom(4096))
    put("/usr/lib/systemd/systemd", _elf64(), 0o755)
    link("/usr/sbin/init", "../lib/systemd/systemd")
    put("/usr/bin/cloud-init", "#!/usr/bin/python3\n", 0o755)
    put("/etc/cloud/cloud.cfg", "users: [default]\ncloud_init_modules: [seed_random]\n")
    put("/etc/cloud/cloud.cfg.d/90-vmbuild.cfg", "datasource_list: [NoCloud, Ec2, None]\n")
    for unit in (
        "cloud-init.service",
        "cloud-init-local.service",
        "ssh.service",
        "systemd-networkd.service",
    ):
        put(f"/usr/lib/systemd/system/{unit}", "[Unit]\n")
    link(
        "/etc/systemd/system/cloud-init.target.wants/cloud-init.service",
        "/lib/systemd/system/cloud-init.service",
    )
    link(
        "/etc/systemd/system/multi-user.target.wants/ssh.service", "/lib/systemd/system/ssh.service"
    )
    link(
        "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
        "/lib/systemd/system/systemd-networkd.service",
    )
    put("/usr/sbin/sshd", _elf64(), 0o755)
    put("/usr/lib/systemd/systemd-networkd", _elf64(), 0o755)
    put("/etc/systemd/network/10-dhcp.network", "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n")
    # Incompressible content, so the disk has real data blocks to upload.
    put("/var/lib/payload.bin", os.urandom(data_mib * MIB))


def make_disk(
    directory: Path,
    *,
    size_mib: int = 64,
    data_mib: int = 3,
    edit: Callable[[Path], None] | None = None,
    boot_code: bool = True,
) -> Path:
    """A partitioned raw disk with the guest tree in an ext4 root at 1 MiB; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    tree = directory / "tree"
    guest_tree(tree, data_mib=data_mib)
    if edit is not None:
        edit(tree)
    raw = directory / "disk.raw"
    with raw.open("wb") as fh:
        fh.truncate(size_mib * MIB)
    part_mib = size_mib - 9  # leave room after the partition for the zero-region test
    subprocess.run(
        ["sfdisk", "-q", str(raw)],
        input=f"label: dos\nstart=2048, size={part_mib * 2048}, type=83, bootable\n",
        text=True,
        check=True,
    )
    subprocess.run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-d",
            str(tree),
            "-U",
            ROOT_UUID,
            "-L",
            "root",
            "-E",
            f"offset={MIB}",
            str(raw),
            f"{part_mib * 1024}k",
        ],
        check=True,
        capture_output=True,
    )
    if boot_code:
        with raw.open("r+b") as fh:  # a stand-in for GRUB's boot.img (first 440 bytes)
            fh.write(b"\xebc\x90" + b"GRUB boot code stand-in".ljust(437, b"\x01"))
    return raw


def write_zero_region(raw: Path, offset_mib: int, length_mib: int) -> None:
    """Allocated, non-sparse zeros (the reader must skip them without being told)."""
    with raw.open("r+b") as fh:
        fh.seek(offset_mib * MIB)
        fh.write(bytes(length_mib * MIB))
        fh.flush()
        os.fsync(fh.fileno())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def make_artifact(
    store: Path,
    raw: Path,
    *,
    formats: tuple[str, ...] = ("qcow2",),
    name: str = "example-nginx",
    version: str = "1.0.0",
    build: str = BUILD,
    tests_status: str = "passed",
    sign: bool = True,
    packages: list[dict[str, str]] | None = None,
    manifest_extra: dict[str, Any] | None = None,
) -> Path:
    """A stored build dir (images/<name>/<version>/<build>/) holding `raw` in `formats`,
    with SBOMs and provenance signed by the local key (`$VMBUILD_CONFIG_DIR`) unless `sign`
    is false."""
    build_dir = store / name / version / build
    build_dir.mkdir(parents=True)
    outputs: list[dict[str, Any]] = []
    qemu = {"qcow2": "qcow2", "raw": "raw", "vmdk": "vmdk", "vhd": "vpc"}
    for fmt in formats:
        target = build_dir / f"disk.{fmt}"
        if fmt == "raw":
            subprocess.run(["cp", "--sparse=always", str(raw), str(target)], check=True)
        else:
            opts = {
                "vmdk": ["-o", "subformat=streamOptimized"],
                "vhd": ["-o", "subformat=dynamic,force_size=on"],
            }.get(fmt, [])
            subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", qemu[fmt], *opts, str(raw), str(target)],
                check=True,
            )
        outputs.append(
            {
                "format": fmt,
                "file": target.name,
                "sha256": sha256(target),
                "size": target.stat().st_size,
                "virtual_size": raw.stat().st_size,
            }
        )
    manifest = {
        "schema": 1,
        "name": name,
        "version": version,
        "build": build,
        "created": "2026-11-22T18:00:00Z",
        "recipe": {"path": "recipe.yaml", "sha256": "ab" * 32},
        "base": {"id": "debian-12", "sha256": "cd" * 32, "source": "test"},
        "components": [],
        "outputs": outputs,
        "packages": packages
        if packages is not None
        else [{"name": "nginx", "version": "1.22.1-9", "arch": "amd64"}],
        "tests": {"status": tests_status},
        "timings": {},
        "vmbuild_version": "0.1.0",
        **(manifest_extra or {}),
    }
    (build_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if sign:
        sign_artifact(build_dir)
    return build_dir


def sign_artifact(build_dir: Path) -> None:
    """(Re)write the SBOMs and the provenance signed with the local key, as a build does."""
    from vmbuild.supply import signing
    from vmbuild.supply.attest import attest

    signer = signing.local_signer()
    assert signer is not None, "no local signing key: set VMBUILD_CONFIG_DIR and generate one"
    manifest = json.loads((build_dir / "manifest.json").read_text())
    attest(build_dir, manifest, signer=signer, signed_by="local")


def new_uuid() -> str:
    return str(uuid.uuid4())


def qcow2_header(virtual_size: int = 1 << 30, tail: bytes = b"") -> bytes:
    """The first bytes of a standalone qcow2 v3 image (what base validation reads)."""
    return (
        b"QFI\xfb"
        + (3).to_bytes(4, "big")  # version
        + bytes(8)  # no backing file
        + bytes(4)
        + (16).to_bytes(4, "big")  # cluster bits
        + virtual_size.to_bytes(8, "big")
        + bytes(72)
        + tail
    )


EBS_BLOCK = 512 * 1024


def _debugfs(raw: Path, request: str, offset: int = MIB, write: bool = False) -> str:
    argv = ["debugfs", *(["-w"] if write else []), "-R", request, f"{raw}?offset={offset}"]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def _stats(raw: Path, offset: int = MIB) -> dict[str, int]:
    wanted = ("Block count", "Block size", "First block")
    out = {}
    for line in _debugfs(raw, "stats", offset).splitlines():
        name, _, value = line.partition(":")
        if name in wanted:
            out[name] = int(value.split()[0])
    return out


def used_blocks(raw: Path, offset: int = MIB) -> set[int]:
    """Independent oracle: the 512 KiB blocks holding any ext block marked in use, asked
    block by block with debugfs `testb` (not through dumpe2fs, which vmbuild parses). The
    blocks before "First block" (the boot sector area of a 1 KiB-block file system) count as
    in use."""
    stats = _stats(raw, offset)
    first, size = stats["First block"], stats["Block size"]
    used = {offset // EBS_BLOCK}
    out = _debugfs(raw, f"testb {first} {stats['Block count'] - first}", offset)
    for line in out.splitlines():
        if line.endswith("marked in use"):
            used.add((offset + int(line.split()[1]) * size) // EBS_BLOCK)
    return used


def file_blocks(raw: Path, path: str, offset: int = MIB) -> list[int]:
    """Disk byte offsets of the ext blocks of file `path` (debugfs `blocks`), one per block."""
    size = _stats(raw, offset)["Block size"]
    return [offset + int(b) * size for b in _debugfs(raw, f"blocks {path}").split()]


def zero_file_in_place(raw: Path, path: str) -> list[int]:
    """Overwrite the data blocks of `path` with zeros, as `dd if=/dev/zero of=FILE conv=notrunc`
    in the guest would: the blocks stay allocated in the file system. Returns their offsets.

    (mke2fs -d itself stores an all-zero file as a hole, so the file is created with other
    content first.)"""
    offsets = file_blocks(raw, path)
    size = _stats(raw)["Block size"]
    with raw.open("r+b") as fh:
        for at in offsets:
            fh.seek(at)
            fh.write(bytes(size))
    return offsets


def write_guest_file(raw: Path, path: str, content: bytes, workdir: Path) -> None:
    """Add (or replace) a file in the ext4 root of `raw`, like a component would."""
    src = workdir / "guest-file.bin"
    src.write_bytes(content)
    _debugfs(raw, f"rm {path}", write=True)
    _debugfs(raw, f"write {src} {path}", write=True)
