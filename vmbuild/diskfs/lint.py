"""Bootability lint: what makes AWS reject an image or an instance fail to boot, found offline.

Errors stop an upload before any byte is sent; warnings are printed. The checks read the
disk (partition table, superblock) and the root file system through a `FilesystemView`, so
they run as an ordinary user on a raw image, and in unit tests on a fake tree.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from vmbuild.diskfs.lint_report import Finding, LintReport, Severity
from vmbuild.diskfs.lint_services import check_cloud_init, check_network, check_sshd
from vmbuild.diskfs.rootfs import (
    GPT_BIOS_BOOT,
    GPT_ESP,
    DebugfsView,
    FilesystemView,
    FsInfo,
    PartitionTable,
    detect_filesystem,
    exists,
    read_file,
    read_partition_table,
    resolve,
)
from vmbuild.run import run

__all__ = ["Finding", "LintReport", "check_root", "lint_disk"]

SUPPORTED_ROOT_FS = {"ext2", "ext3", "ext4", "xfs", "btrfs"}
ELF_MACHINE = {"x86_64": 0x3E, "arm64": 0xB7}
# Device names differ between the build VM (vda/sda), Xen (xvda) and Nitro (nvme0n1).
UNSTABLE_DEVICE = re.compile(r"^/dev/(sd|hd|vd|xvd)[a-z]+\d*$|^/dev/nvme\d+n\d+(p\d+)?$")


def lint_disk(
    raw: Path,
    *,
    boot_mode: str = "legacy-bios",
    architecture: str = "x86_64",
    ena_support: bool = True,
) -> LintReport:
    """Inspect a raw disk image offline."""
    report = LintReport()
    add = report.findings.append
    table = read_partition_table(raw)
    if table is None:
        add(
            Finding(
                "error",
                "partition-table",
                "no MBR or GPT partition table",
                "AWS boots whole disks: partition it (msdos or gpt) with a root partition",
            )
        )
        return report
    report.partition_table = table.kind
    report.findings.extend(check_partition_table(table, boot_mode))
    if boot_mode in UEFI_MODES:
        report.findings.extend(check_esp(esp_listing(raw, table), architecture))
    root = None
    for part in table.partitions:
        info = detect_filesystem(raw, part.start)
        if info.kind in {"ext2", "ext3", "ext4"}:
            view = DebugfsView(raw, part.start)
            if exists(view, "/etc") and (exists(view, "/usr") or exists(view, "/sbin/init")):
                root = (part, info, view)
                break
        elif info.kind in SUPPORTED_ROOT_FS and root is None and part.is_linux:
            report.root_partition, report.root_fs = part.number, info.kind
            add(
                Finding(
                    "warning",
                    "root-filesystem",
                    f"{info.kind} on partition {part.number} cannot be inspected offline; "
                    "file-level checks skipped",
                )
            )
            return report
    if root is None:
        kinds = (
            ", ".join(
                f"{p.number}:{detect_filesystem(raw, p.start).kind}" for p in table.partitions
            )
            or "none"
        )
        add(
            Finding(
                "error",
                "root-filesystem",
                f"no root file system found (partitions: {kinds})",
                "AWS supports ext2/3/4, XFS and Btrfs root file systems",
            )
        )
        return report
    part, info, view = root
    report.root_partition, report.root_fs = part.number, info.kind
    report.findings.extend(
        check_root(
            view, info, boot_mode=boot_mode, architecture=architecture, ena_support=ena_support
        )
    )
    return report


UEFI_MODES = ("uefi", "uefi-preferred")
# The removable-media path UEFI firmware boots when it has no boot entry, as
# on a new EC2 instance (its variable store holds none unless --uefi-data does).
REMOVABLE_PATH = {"x86_64": "efi/boot/bootx64.efi", "arm64": "efi/boot/bootaa64.efi"}


def esp_listing(raw: Path, table: PartitionTable) -> list[str] | None:
    """Every path on the first EFI system partition, lowercased (FAT ignores case);
    None when there is no ESP or it holds no FAT file system mtools can read."""
    esp = next((p for p in table.partitions if p.type == GPT_ESP), None)
    if esp is None:
        return None
    result = run(
        ["mdir", "-b", "-/", "-i", f"{raw}@@{esp.start}", "::/"],
        env={"MTOOLS_SKIP_CHECK": "1"}, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        return None
    return [
        ln.strip().removeprefix("::/").lower() for ln in result.stdout.splitlines() if ln.strip()
    ]


def check_esp(paths: list[str] | None, architecture: str) -> list[Finding]:
    """The ESP holds the removable-media boot loader and, for GRUB, a config."""
    if paths is None:
        return [
            Finding(
                "error", "boot-loader", "no readable FAT file system on an EFI system partition",
                "format the ESP as FAT32 and install the boot loader into it",
            )
        ]  # fmt: skip
    out: list[Finding] = []
    loader = REMOVABLE_PATH.get(architecture, REMOVABLE_PATH["x86_64"])
    if loader not in paths:
        out.append(
            Finding(
                "error",
                "boot-loader",
                f"the EFI system partition has no {loader.upper()}: UEFI boots that path "
                "when it has no boot entry, as a new instance",
                "install the boot loader as the removable-media path (grub-install --removable)",
            )
        )
    grub = [p for p in paths if re.fullmatch(r"efi/[^/]+/grub[a-z0-9]*\.efi", p)]
    if grub and not any(re.fullmatch(r"efi/[^/]+/grub\.cfg", p) for p in paths):
        out.append(
            Finding(
                "warning",
                "grub",
                "GRUB is on the EFI system partition but no EFI/*/grub.cfg is: unless its "
                "built-in config finds one it stops at a grub> prompt",
            )
        )
    return out


def check_partition_table(table: PartitionTable, boot_mode: str) -> list[Finding]:
    """Partition table and boot loader stage 1, from the first sectors."""
    out: list[Finding] = []
    if not table.partitions:
        out.append(Finding("error", "partition-table", "the partition table has no partitions"))
        return out
    if table.kind == "mbr" and table.disk_size > 2 * 1024**4:
        out.append(
            Finding(
                "warning",
                "partition-table",
                "MBR addresses only the first 2 TiB of this disk",
                "use GPT",
            )
        )
    if boot_mode in UEFI_MODES:
        if table.kind != "gpt" or not any(p.type == GPT_ESP for p in table.partitions):
            out.append(
                Finding(
                    "error",
                    "boot-loader",
                    f"boot mode {boot_mode} needs a GPT disk with an EFI system partition",
                    "set boot_mode: legacy-bios, or build a UEFI image",
                )
            )
        if boot_mode == "uefi":
            return out
    bios_boot = any(p.type == GPT_BIOS_BOOT for p in table.partitions)
    if table.kind == "gpt" and not bios_boot and not any(table.boot_code):
        out.append(
            Finding(
                "error",
                "boot-loader",
                "UEFI-only disk: no BIOS boot partition and no boot code in the protective "
                "MBR, so the legacy-BIOS boot path is absent",
                "set boot_mode: uefi (a uefi-preferred image needs a hybrid disk)",
            )
        )
        return out
    if not any(table.boot_code):
        out.append(
            Finding(
                "error",
                "boot-loader",
                "the MBR has no boot code: BIOS boot would stop at once",
                "install GRUB's boot.img/core.img (or set boot_mode: uefi)",
            )
        )
    if table.kind == "gpt" and not bios_boot:
        out.append(
            Finding(
                "warning",
                "boot-loader",
                "GPT disk without a BIOS boot partition: GRUB has nowhere to embed "
                "its core image for legacy-bios boot",
            )
        )
    return out


def check_root(
    fs: FilesystemView,
    info: FsInfo,
    *,
    boot_mode: str = "legacy-bios",
    architecture: str = "x86_64",
    ena_support: bool = True,
) -> list[Finding]:
    """Every file-level check on the root file system."""
    out: list[Finding] = []
    out += check_fstab(fs, info)
    out += check_kernel(fs, ena_support=ena_support)
    out += check_architecture(fs, architecture)
    out += check_grub(fs, info, boot_mode)
    out += check_cloud_init(fs)
    out += check_sshd(fs)
    out += check_network(fs)
    return out


def _text(fs: FilesystemView, path: str) -> str | None:
    data = read_file(fs, path)
    return None if data is None else data.decode("utf-8", "replace")


def _root_spec_problem(spec: str, info: FsInfo) -> tuple[Severity, str] | None:
    key, _, value = spec.partition("=")
    if key == "UUID" and value:
        if info.uuid and value.lower() != info.uuid.lower():
            return "error", f"UUID={value} but the root file system's UUID is {info.uuid}"
        return None
    if key == "LABEL" and value:
        if value != info.label:
            return "error", f"LABEL={value} but the root file system's label is {info.label!r}"
        return None
    if key in ("PARTUUID", "PARTLABEL") or spec.startswith("/dev/disk/by-"):
        return None
    if UNSTABLE_DEVICE.match(spec):
        return "error", (
            f"{spec} is a device name; on EC2 the disk is /dev/xvda or /dev/nvme0n1 "
            "depending on the instance type"
        )
    return "warning", f"unrecognised root device {spec!r}"


def check_fstab(fs: FilesystemView, info: FsInfo) -> list[Finding]:
    """fstab mounts by UUID or LABEL, and the root entry names this file system."""
    text = _text(fs, "/etc/fstab")
    if text is None:
        return [
            Finding(
                "warning",
                "fstab",
                "/etc/fstab is missing; root stays read-only "
                "unless the kernel command line says otherwise",
            )
        ]
    out: list[Finding] = []
    root_seen = False
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        spec, mountpoint = fields[0], fields[1]
        options = fields[3].split(",") if len(fields) > 3 else []
        if mountpoint == "/":
            root_seen = True
            problem = _root_spec_problem(spec, info)
            if problem:
                out.append(
                    Finding(
                        problem[0], "fstab", f"root entry: {problem[1]}", "mount by UUID= or LABEL="
                    )
                )
        elif UNSTABLE_DEVICE.match(spec) and "nofail" not in options:
            out.append(
                Finding(
                    "warning",
                    "fstab",
                    f"{mountpoint} is mounted by device name {spec} without nofail: "
                    "boot stops in emergency mode when the name differs on EC2",
                    "mount by UUID= or add nofail",
                )
            )
    if not root_seen:
        out.append(Finding("warning", "fstab", "no entry for / in /etc/fstab"))
    return out


def _kernels(fs: FilesystemView) -> list[str]:
    entries = fs.listdir("/boot") or {}
    versions = [n.removeprefix("vmlinuz-") for n in entries if n.startswith("vmlinuz-")]
    return sorted(
        versions, key=lambda v: [int(x) if x.isdigit() else 0 for x in re.split(r"[.-]", v)]
    )


def _has_module(fs: FilesystemView, version: str, relpath: str) -> bool:
    base = f"/lib/modules/{version}"
    builtin = _text(fs, f"{base}/modules.builtin") or ""
    if relpath in builtin:
        return True
    dep = _text(fs, f"{base}/modules.dep")
    if dep is not None:
        return any(
            line.split(":", 1)[0].startswith(f"kernel/{relpath}") for line in dep.splitlines()
        )
    directory, _, name = f"{base}/kernel/{relpath}".rpartition("/")
    entries = fs.listdir(resolve(fs, directory) or directory) or {}
    return any(e.startswith(name) for e in entries)


def check_kernel(fs: FilesystemView, *, ena_support: bool = True) -> list[Finding]:
    """A kernel with an initramfs and the nvme and ena drivers (EBS and network on Nitro)."""
    versions = _kernels(fs)
    if not versions:
        return [
            Finding(
                "error",
                "kernel",
                "no kernel (/boot/vmlinuz-*)",
                "install a kernel package, e.g. linux-image-cloud-amd64",
            )
        ]
    out: list[Finding] = []
    version = versions[-1]
    if not exists(fs, f"/boot/initrd.img-{version}") and not exists(
        fs, f"/boot/initramfs-{version}.img"
    ):
        out.append(Finding("warning", "kernel", f"no initramfs for {version}"))
    if not exists(fs, f"/lib/modules/{version}"):
        out.append(
            Finding(
                "error",
                "kernel",
                f"/lib/modules/{version} is missing: "
                "the kernel has no drivers to find its root disk",
            )
        )
        return out
    if not _has_module(fs, version, "drivers/nvme/host/nvme.ko"):
        out.append(
            Finding(
                "error",
                "drivers",
                f"kernel {version} has no nvme driver: Nitro "
                "instances attach EBS volumes as NVMe and the root disk is not found",
            )
        )
    if not _has_module(fs, version, "drivers/net/ethernet/amazon/ena/ena.ko"):
        severity: Severity = "error" if ena_support else "warning"
        out.append(
            Finding(
                severity,
                "drivers",
                f"kernel {version} has no ena driver: "
                "instances with ENA networking have no network",
                None
                if ena_support
                else "set image.ena_support: false only for instance types without ENA",
            )
        )
    conf = _text(fs, "/etc/initramfs-tools/initramfs.conf") or ""
    if re.search(r"^\s*MODULES\s*=\s*dep\b", conf, re.M):
        out.append(
            Finding(
                "warning",
                "drivers",
                "initramfs MODULES=dep includes only the build "
                "VM's disk drivers (virtio); nvme may be missing at boot",
                "use MODULES=most",
            )
        )
    return out


def check_architecture(fs: FilesystemView, architecture: str) -> list[Finding]:
    """64-bit userspace of the configured architecture (from init's ELF header)."""
    for path in ("/sbin/init", "/lib/systemd/systemd", "/usr/bin/sh", "/bin/sh"):
        data = read_file(fs, path)
        if data is None:
            continue
        if data[:4] != b"\x7fELF":
            continue  # a script: look at the next candidate
        if data[4] != 2:
            return [
                Finding(
                    "error",
                    "architecture",
                    f"{path} is a 32-bit binary: AWS runs 64-bit images only",
                )
            ]
        machine = struct.unpack_from("<H", data, 18)[0]
        if machine != ELF_MACHINE.get(architecture):
            return [
                Finding(
                    "error",
                    "architecture",
                    f"{path} is not an {architecture} binary (ELF machine 0x{machine:x})",
                    "set image.architecture to the image's architecture",
                )
            ]
        return []
    return [Finding("warning", "architecture", "no init binary found to check the architecture")]


def check_grub(fs: FilesystemView, info: FsInfo, boot_mode: str) -> list[Finding]:
    """GRUB's configuration: a linux entry, its kernel present, a stable root=, a serial console."""
    path = next((p for p in ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg") if exists(fs, p)), None)
    if path is None:
        severity: Severity = "error" if boot_mode == "legacy-bios" else "warning"
        return [
            Finding(
                severity,
                "grub",
                "no /boot/grub/grub.cfg: GRUB has nothing to boot",
                "generate grub.cfg (update-grub or a hand-written one)",
            )
        ]
    text = _text(fs, path) or ""
    entries = re.findall(r"^\s*linux(?:efi|16)?\s+(\S+)(.*)$", text, re.M)
    if not entries:
        return [Finding("error", "grub", f"{path} has no linux entry")]
    out: list[Finding] = []
    kernel, args = entries[0]
    if not exists(fs, kernel) and not exists(fs, f"/boot{kernel}"):
        out.append(
            Finding("error", "grub", f"the first entry boots {kernel}, which does not exist")
        )
    params = args.split()
    root = next((p.removeprefix("root=") for p in params if p.startswith("root=")), None)
    if root is None:
        out.append(Finding("warning", "grub", "no root= on the kernel command line"))
    else:
        problem = _root_spec_problem(root, info)
        if problem:
            out.append(Finding(problem[0], "grub", f"root={root}: {problem[1]}"))
    if "cloud-init=disabled" in params:
        out.append(Finding("error", "cloud-init", "the kernel command line disables cloud-init"))
    if not any(p.startswith("console=ttyS0") for p in params):
        out.append(
            Finding(
                "warning",
                "console",
                "no console=ttyS0: EC2's serial console and get-console-output will stay empty",
                "add console=ttyS0,115200n8",
            )
        )
    return out
