"""The base image stage: the disk every builder VM starts from.

Three sources, one result (`BaseImage`):
- `debian-12`, built offline from the host's Debian mirror: mmdebstrap into a
  directory; an MBR and an ext4 filesystem written straight into a sparse file
  (`sfdisk`, `mke2fs -d -E offset=`); GRUB put in place with `dd`; qcow2. No loop
  partitions, device-mapper or NBD: they do not work on the hosts vmbuild targets.
- an http(s)/file URL, downloaded once and verified against a checksum;
- a local qcow2 or raw file, used in place.

Built and fetched bases live in `cache_dir()/bases/<id>/` (disk + meta.json).
vmbuild never writes a base: VMs run on qcow2 overlays.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from vmbuild.config.recipe import UrlBase
from vmbuild.debian.bootstrap import (
    BIOS_BOOT_START,
    DISK_SIZE,
    ESP_LOADER,
    PARTITION_OFFSET,
    SECTOR,
    SIGNED_EFI_BINARIES,
    Layout,
    MiB,
    dd_argv,
    esp_files,
    grub_arm64_mkimage_argv,
    grub_config,
    grub_early_config,
    grub_efi_config,
    grub_mkimage_argv,
    mke2fs_argv,
    mkfs_esp_argv,
    mmdebstrap_argv,
    mtools_argvs,
    patch_boot_img,
    patch_core_img,
    sfdisk_argv,
    sfdisk_gpt_script,
    sfdisk_script,
)
from vmbuild.debian.sources import (
    DebianMirrors,
    mirrors_for,
)
from vmbuild.digest import sha256_file
from vmbuild.errors import ConfigError, VmbuildError
from vmbuild.hypervisor.arch import DEBIAN_ARCH, UNAME, Arch, host_arch
from vmbuild.paths import cache_dir
from vmbuild.progress import Reporter, reporter_or_null
from vmbuild.run import qemu_img, run, which, write_atomic
from vmbuild.stages.key import StageKey, stage_key

log = logging.getLogger("vmbuild.stages.base_image")

# Part of the cache key: bump when the build changes what ends up on the disk
# in a way the key's other inputs (release, mirrors, packages, hook) miss.
BUILD_METHOD_VERSION = 1
RELEASES = {"debian-12": "bookworm"}

# mmdebstrap installs no Recommends, so what cloud-init and a builder need at
# runtime is listed: udev for /dev/disk/by-uuid, dbus for hostnamectl, resolved
# as there is no ifupdown/resolvconf, growpart + resize2fs so cloud-init grows
# the root filesystem into a bigger overlay.
DEBIAN_PACKAGES = (
    "linux-image-cloud-amd64", "grub-pc-bin", "systemd-sysv", "systemd-resolved", "udev",
    "dbus", "iproute2", "cloud-init", "cloud-guest-utils", "e2fsprogs", "openssh-server",
    "sudo", "netbase", "ca-certificates", "qemu-guest-agent",
)  # fmt: skip

# What an arm64 base has instead: its cloud kernel and GRUB's arm64-efi modules
# (BOOTAA64.EFI is made from them on the host: bootstrap.grub_arm64_mkimage_argv).
ARCH_PACKAGES: dict[Arch, dict[str, str]] = {
    "x86_64": {},
    "arm64": {
        "linux-image-cloud-amd64": "linux-image-cloud-arm64",
        "grub-pc-bin": "grub-efi-arm64-bin",
    },
}

# The GPT (UEFI) layouts' extra: mokutil, so a test can ask the firmware
# whether Secure Boot is on (`mokutil --sb-state`).
UEFI_PACKAGES = ("mokutil",)

REQUIRED_TOOLS = {  # tool -> Debian package, for the hint
    "mmdebstrap": "mmdebstrap", "sfdisk": "fdisk", "mke2fs": "e2fsprogs",
    "grub-mkimage": "grub-common", "dd": "coreutils", "qemu-img": "qemu-utils",
}  # fmt: skip
HYBRID_TOOLS = {"mkfs.fat": "dosfstools", "mmd": "mtools", "mcopy": "mtools"}
_HOOK = resources.files("vmbuild") / "data" / "debian-customize.sh"
_COMPRESSED_MAGIC = {b"\xfd7zXZ\x00": "xz", b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}


@dataclass(frozen=True)
class BaseImage:
    """A disk VMs boot from (through an overlay); `path` is never written."""

    id: str
    path: Path
    format: str  # "qcow2" | "raw"
    sha256: str
    source: str
    virtual_size: int


# --- the cache -----------------------------------------------------------------


def packages_for(layout: Layout, arch: Arch = "x86_64") -> tuple[str, ...]:
    swap = ARCH_PACKAGES[arch]
    packages = tuple(swap.get(p, p) for p in DEBIAN_PACKAGES)
    if layout == "uefi":
        # A UEFI-only disk has no i386-pc boot code, so no modules to make it from.
        packages = tuple(p for p in packages if p != "grub-pc-bin")
    return packages + (UEFI_PACKAGES if layout != "bios" else ())


def signed_esp(layout: Layout, arch: Arch = "x86_64") -> bool:
    """Whether the layout's ESP holds Debian's signed shim and GRUB (x86_64 UEFI
    layouts); arm64's holds a GRUB made from the image's own modules."""
    return layout != "bios" and arch == "x86_64"


def base_cache_key(
    release: str, mirror: str, packages: Sequence[str], *, security_mirror: str | None = None,
    layout: Layout = "bios", arch: Arch = "x86_64",
) -> str:  # fmt: skip
    """sha256 hex naming a built base: same inputs, same key, same cached disk.

    Covers the build method version, disk size and the customize hook's bytes,
    so changing how a base is made never reuses a stale one. The layout and
    the architecture are in the key only when they are not the original `bios`
    and x86_64, so those keys (and the bases cached under them) stay what they were.
    """
    material: dict[str, Any] = {
        "method": BUILD_METHOD_VERSION,
        "release": release,
        "mirror": mirror.rstrip("/"),
        "security": security_mirror.rstrip("/") if security_mirror else None,
        "packages": sorted(set(packages)),
        "disk_size": DISK_SIZE,
        "hook": hashlib.sha256(_HOOK.read_bytes()).hexdigest(),
    }
    if arch != "x86_64":
        material["arch"] = arch
    if layout != "bios":
        material["layout"] = layout
    if signed_esp(layout, arch):
        # The signed EFI binaries come from the host: their bytes are inputs.
        material["efi"] = {
            str(b): hashlib.sha256(b.read_bytes()).hexdigest() if b.is_file() else None
            for b in SIGNED_EFI_BINARIES
        }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def _bases_dir() -> Path:
    return cache_dir() / "bases"


def _from_meta(d: Path, meta: dict[str, Any]) -> BaseImage:
    disk, size = d / meta["disk"], int(meta["virtual_size"])
    return BaseImage(d.name, disk, meta["format"], meta["sha256"], meta["source"], size)


def _read_meta(directory: Path) -> dict[str, Any] | None:
    if not (directory / "meta.json").is_file():
        return None
    try:
        meta: dict[str, Any] = json.loads((directory / "meta.json").read_text())
        if (directory / meta["disk"]).is_file():
            return meta
        log.warning("ignoring cached base %s: %s is missing", directory, meta["disk"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring cached base %s: bad meta.json: %s", directory, exc)
    return None


def _cached() -> Iterator[tuple[BaseImage, dict[str, Any]]]:
    bases = _bases_dir()
    for directory in sorted(bases.iterdir()) if bases.is_dir() else ():
        if not directory.name.startswith(".") and (meta := _read_meta(directory)) is not None:
            yield _from_meta(directory, meta), meta


def probe_disk(arch: Arch | None = None) -> tuple[Path, str] | None:
    """A cached base of `arch` (default: the host's, the one KVM runs) for the
    accelerator probe to boot (doctor, workers), if any. A fetched base's
    architecture is not recorded: taken as x86_64, as vmbuild's were before arm64."""
    arch = arch or host_arch()
    try:
        bases = [b for b, meta in _cached() if meta.get("arch", "x86_64") == arch]
    except VmbuildError:
        return None
    return (bases[0].path, bases[0].format) if bases else None


def list_bases() -> list[BaseImage]:
    """The bases in the cache (built and fetched), sorted by id."""
    return [base for base, _ in _cached()]


def _write_meta(directory: Path, meta: dict[str, Any]) -> None:
    write_atomic(directory / "meta.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")


def mounts_under(mountinfo: str, path: Path) -> list[str]:
    """Mount points at or below `path` in /proc/self/mountinfo text, deepest first."""
    prefix = str(path).rstrip("/") + "/"
    points = []
    for fields in (line.split() for line in mountinfo.splitlines()):
        if len(fields) > 4:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if (point + "/").startswith(prefix):
                points.append(point)
    return sorted(points, key=lambda p: (-p.count("/"), p))


def _remove_tree(path: Path) -> None:
    """rmtree that never descends into a mount.

    mmdebstrap mounts /proc, /sys, /dev/pts into the rootfs; if it dies before
    unmounting, deleting through those would delete host files. A tree still
    mounted after `umount` is left in place, loudly.
    """
    if not path.exists():
        return
    _kill_processes_using(path)
    for point in mounts_under(Path("/proc/self/mountinfo").read_text(), path):
        run(["umount", "--lazy", point], check=False)
    if left := mounts_under(Path("/proc/self/mountinfo").read_text(), path):
        log.error("not deleting %s: still mounted: %s", path, ", ".join(left))
        return
    shutil.rmtree(path, ignore_errors=True)


def _processes_using(path: Path) -> list[int]:
    """PIDs chrooted into `path` (dpkg, maintainer scripts) or naming it (apt, mmdebstrap)."""
    prefix = str(path).rstrip("/") + "/"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            root = os.readlink(proc / "root")
            argv = (proc / "cmdline").read_bytes().decode("utf-8", "replace").split("\0")
        except OSError:
            continue  # gone, a zombie, or not ours to see
        if (root + "/").startswith(prefix) or any(prefix in arg + "/" for arg in argv):
            found.append(int(proc.name))
    return found


def _kill_processes_using(path: Path) -> None:
    """Kill what is left of an interrupted mmdebstrap under `path`.

    `run()` stops only the direct child; apt, dpkg and maintainer scripts in
    the chroot would keep writing into the tree while it is deleted.
    """
    deadline = time.monotonic() + 10
    while (pids := _processes_using(path)) and time.monotonic() < deadline:
        for pid in pids:
            log.info("killing leftover process %d in %s", pid, path)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


@contextlib.contextmanager
def _staging_dir(kind: str) -> Iterator[Path]:
    """A temp dir inside the bases dir (results move in with one rename); always removed."""
    bases = _bases_dir()
    bases.mkdir(parents=True, exist_ok=True)
    # A SIGKILLed run cannot clean up after itself: the next one does.
    for stale in bases.glob(".tmp-*"):
        pid = re.match(r"\.tmp-(\d+)-", stale.name)
        if pid and not Path(f"/proc/{pid.group(1)}").exists():
            _remove_tree(stale)
    path = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-{kind}-", dir=bases))
    try:
        yield path
    finally:
        _remove_tree(path)


def _install(staged: Path, final: Path, *, replace: bool) -> Path:
    """Move a finished base dir into place by rename (atomic: same filesystem)."""
    if final.exists():
        if not replace:
            return final  # someone else finished first: same key, same content
        final.rename(staged.parent / "replaced")  # deleted with the staging dir
    staged.rename(final)
    return final


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    _bases_dir().mkdir(parents=True, exist_ok=True)
    with (_bases_dir() / f".{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _probe(path: Path) -> tuple[str, int]:
    """(format, virtual size) from `qemu-img info`; only qcow2 and raw are bases."""
    info = json.loads(qemu_img("info", "-U", "--output=json", path))
    fmt = str(info.get("format"))
    if fmt not in ("qcow2", "raw"):
        raise VmbuildError(
            f"{path}: unsupported base image format {fmt!r} (vmbuild needs qcow2 or raw)",
            hint=f"convert it: qemu-img convert -O qcow2 {shlex.quote(str(path))} base.qcow2",
        )
    if "backing-filename" in info:
        raise VmbuildError(f"{path}: a base image cannot have a backing file")
    if fmt == "raw":  # qemu-img calls anything it does not recognise raw
        with path.open("rb") as f:
            head = f.read(8)
        for magic, name in _COMPRESSED_MAGIC.items():
            if head.startswith(magic):
                raise VmbuildError(f"{path}: {name}-compressed, not a disk image")
    return fmt, int(info["virtual-size"])


# --- Debian build: the steps -------------------------------------------------------


def base_id_for(release: str, mirrors: DebianMirrors, layout: Layout, arch: Arch = "x86_64") -> str:
    key = base_cache_key(
        release, mirrors.mirror, packages_for(layout, arch), security_mirror=mirrors.security,
        layout=layout, arch=arch,
    )  # fmt: skip
    arch_part = "" if arch == "x86_64" else f"{arch}-"
    layout_part = "" if layout == "bios" else f"{layout}-"
    return f"{release}-{arch_part}{layout_part}{key[:16]}"


def build_debian(
    release: str = "debian-12",
    *,
    mirror: str | None = None,
    rebuild: bool = False,
    on_progress: Reporter | None = None,
    layout: Layout = "bios",
    arch: Arch = "x86_64",
) -> BaseImage:
    """Build (or reuse from the cache) a Debian cloud base image, offline.

    `mirror` defaults to the host's apt configuration. The result is cached as
    `cache_dir()/bases/<release>[-<layout>]-<key>/`; `rebuild` forces a new build.
    Needs root and mmdebstrap, sfdisk, mke2fs, grub-mkimage, qemu-img (and for
    the GPT layouts mkfs.fat, mtools and, on x86_64, Debian's signed shim and GRUB).
    """
    if release not in RELEASES:
        raise VmbuildError(f"unknown release {release!r}", hint=f"supported: {', '.join(RELEASES)}")
    codename = RELEASES[release]
    mirrors = mirrors_for(mirror, codename)
    if arch != "x86_64" and layout != "uefi":
        raise VmbuildError(f"an {arch} base boots UEFI only (layout uefi), not {layout}")
    base_id = base_id_for(release, mirrors, layout, arch)
    final = _bases_dir() / base_id
    progress = reporter_or_null(on_progress).status
    # One build at a time: a second build of the same key waits, then reuses;
    # builds also share (and swap) the .deb cache.
    with _lock("debian-build"):
        if not rebuild and (meta := _read_meta(final)) is not None:
            log.info("using cached base %s", final)
            return _from_meta(final, meta)
        _preflight(layout, arch)
        with _staging_dir(base_id) as work:
            meta = _build_into(work, release, codename, mirrors, progress, layout, arch)
            _write_meta(work / "out", {"id": base_id, **meta})
            _install(work / "out", final, replace=True)
            _refresh_deb_cache(work / "debs", arch)
    progress(f"base {base_id} ready in {sum(meta['timings'].values()):.0f}s")
    return _from_meta(final, meta)


def debs_dir(arch: Arch) -> Path:
    """The .deb cache a build seeds apt from: one per architecture, so building
    an arm64 base does not evict the amd64 packages (x86_64 keeps its old place)."""
    return cache_dir() / ("debs" if arch == "x86_64" else f"debs-{DEBIAN_ARCH[arch]}")


BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")


def foreign_arch_problem(arch: Arch, binfmt_dir: Path = BINFMT_DIR) -> str | None:
    """Why this host cannot run `arch`'s maintainer scripts (None: it can, or it is native)."""
    if arch == host_arch():
        return None
    entry = binfmt_dir / f"qemu-{UNAME[arch]}"
    try:
        enabled = entry.read_text().splitlines()[0].strip() == "enabled"
    except (OSError, IndexError):
        return f"no binfmt_misc handler {entry} for {arch} binaries"
    return None if enabled else f"the binfmt_misc handler {entry} is disabled"


def _preflight(layout: Layout, arch: Arch = "x86_64") -> None:
    if os.geteuid() != 0:
        raise VmbuildError(
            "building a Debian base needs root (mmdebstrap root mode, root-owned files)",
            hint="run as root, or use a cloud image: vmbuild base fetch URL --sha256 HEX",
        )
    tools = REQUIRED_TOOLS | (HYBRID_TOOLS if layout != "bios" else {})
    if arch != host_arch():
        tools |= {"arch-test": "arch-test"}  # mmdebstrap's check of a foreign arch
    if missing := [tool for tool in tools if which(tool) is None]:
        raise VmbuildError(
            f"missing tools to build a Debian base: {', '.join(missing)}",
            hint=f"apt-get install {' '.join(sorted({tools[t] for t in missing}))}",
        )
    absent = [b for b in SIGNED_EFI_BINARIES if not b.is_file()]
    if signed_esp(layout, arch) and absent:
        raise VmbuildError(
            f"missing signed EFI binaries for a UEFI base: {', '.join(map(str, absent))}",
            hint="apt-get install shim-signed grub-efi-amd64-signed",
        )
    if (problem := foreign_arch_problem(arch)) is not None:
        raise VmbuildError(
            f"cannot build an {arch} base on this host: {problem} (mmdebstrap runs the "
            "image's maintainer scripts under qemu-user)",
            hint="run scripts/install-host-deps (mounts binfmt_misc, registers qemu-user)",
        )


def _build_into(
    work: Path, release: str, codename: str, mirrors: DebianMirrors,
    progress: Callable[[str], None], layout: Layout, arch: Arch = "x86_64",
) -> dict[str, Any]:  # fmt: skip
    """Every build step, inside `work`; leaves `work/out/disk.qcow2`. Returns meta."""
    timings: dict[str, float] = {}

    @contextlib.contextmanager
    def step(name: str, message: str) -> Iterator[None]:
        progress(message)
        start = time.monotonic()
        yield
        timings[name] = round(time.monotonic() - start, 1)
        log.info("%s took %.1fs", name, timings[name])

    # Taken before apt reads the mirror: packages newer than this may be missing.
    created = _now()
    root_uuid = str(uuid.uuid4())
    packages = packages_for(layout, arch)
    rootfs, disk, out, debs = work / "rootfs", work / "disk.raw", work / "out", debs_dir(arch)
    for d in (debs, work / "debs", out):
        d.mkdir(parents=True, exist_ok=True)
    with resources.as_file(_HOOK) as hook:
        argv = mmdebstrap_argv(
            codename, rootfs, mirrors, packages,
            hook=hook, debs_in=debs, debs_out=work / "debs", arch=arch,
        )  # fmt: skip
        with step(
            "mmdebstrap", f"mmdebstrap {codename} ({DEBIAN_ARCH[arch]}) from {mirrors.mirror}"
        ):
            # INITRD=No: the hook builds the initramfs once, at the end.
            run(argv, env={"VMBUILD_ROOT_UUID": root_uuid, "INITRD": "No"}, timeout=1800)
    if not ((rootfs / "vmlinuz").exists() and (rootfs / "initrd.img").exists()):
        raise VmbuildError(f"mmdebstrap left no /vmlinuz and /initrd.img in {rootfs}")
    title = f"Debian GNU/Linux {release.removeprefix('debian-')} ({codename})"
    (rootfs / "boot" / "grub").mkdir(parents=True, exist_ok=True)
    (rootfs / "boot" / "grub" / "grub.cfg").write_text(grub_config(root_uuid, title, arch))

    with step("filesystem", f"writing the partition table ({layout}) and ext4 filesystem"):
        with disk.open("wb") as f:
            f.truncate(DISK_SIZE)  # sparse: only what mke2fs writes takes space
        table = (
            sfdisk_script(root_uuid)
            if layout == "bios"
            else sfdisk_gpt_script(root_uuid, layout=layout, arch=arch)
        )
        run(sfdisk_argv(disk), input=table.encode())
        run(mke2fs_argv(disk, rootfs, root_uuid, layout=layout))
    if signed_esp(layout, arch):
        with step("esp", "writing the EFI system partition (signed shim and GRUB)"):
            _write_esp(work, disk, root_uuid)
    elif layout == "uefi":
        with step(
            "esp", f"writing the EFI system partition (GRUB arm64-efi as {ESP_LOADER[arch]})"
        ):
            _write_arm64_esp(work, disk, rootfs / "usr/lib/grub/arm64-efi", root_uuid)
    if layout != "uefi":
        with step("grub", "installing GRUB (i386-pc) without grub-install"):
            _install_grub(work, disk, rootfs / "usr/lib/grub/i386-pc", root_uuid, layout)
    with step("convert", "converting to qcow2 (zstd)"):
        # Deleting the ~0.5 GB rootfs takes seconds: overlap it with qemu-img.
        cleaner = threading.Thread(target=_remove_tree, args=(rootfs,), daemon=True)
        cleaner.start()
        qcow2 = out / "disk.qcow2"
        try:
            # zstd: ~3 s more than uncompressed, a third of the size, boots as fast.
            qemu_img("convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zstd",
                     disk, qcow2)  # fmt: skip
            fmt, virtual_size = _probe(qcow2)
            digest = sha256_file(qcow2)
        finally:
            cleaner.join()
    return {
        "kind": "debian", "disk": qcow2.name, "format": fmt, "sha256": digest,
        "virtual_size": virtual_size, "source": f"{release} (mirror {mirrors.mirror})",
        "release": release, "mirror": mirrors.mirror, "security_mirror": mirrors.security,
        "packages": list(packages), "method": BUILD_METHOD_VERSION, "layout": layout,
        "arch": arch,
        "root_uuid": root_uuid, "created": created, "timings": timings,
    }  # fmt: skip


def _write_esp(work: Path, disk: Path, root_uuid: str) -> None:
    cfg = work / "grub-efi.cfg"
    cfg.write_text(grub_efi_config(root_uuid))
    run(mkfs_esp_argv(disk, root_uuid))
    for argv in mtools_argvs(disk, esp_files(cfg)):
        # mtools refuses to run without a config unless told the image is fine as is.
        run(argv, env={"MTOOLS_SKIP_CHECK": "1"})


def _write_arm64_esp(work: Path, disk: Path, module_dir: Path, root_uuid: str) -> None:
    early, loader = work / "grub-early.cfg", work / ESP_LOADER["arm64"]
    early.write_text(grub_early_config(root_uuid))
    run(grub_arm64_mkimage_argv(module_dir, loader, early))
    run(mkfs_esp_argv(disk, root_uuid))
    for argv in mtools_argvs(disk, [(loader, f"::/EFI/BOOT/{ESP_LOADER['arm64']}")]):
        run(argv, env={"MTOOLS_SKIP_CHECK": "1"})


def _install_grub(work: Path, disk: Path, module_dir: Path, root_uuid: str, layout: Layout) -> None:
    early, core = work / "grub-early.cfg", work / "core.img"
    early.write_text(grub_early_config(root_uuid))
    run(grub_mkimage_argv(module_dir, core, early, layout))
    room = PARTITION_OFFSET - SECTOR if layout == "bios" else MiB
    if core.stat().st_size > room:
        raise VmbuildError(f"GRUB core.img is {core.stat().st_size} bytes: too big for its place")
    boot = module_dir / "boot.img"
    if layout == "hybrid":
        # core.img goes into the BIOS boot partition: tell boot.img and
        # core.img's own blocklist where, as grub-install would.
        lba = BIOS_BOOT_START // SECTOR
        patched = work / "boot.img"
        patched.write_bytes(patch_boot_img(boot.read_bytes(), lba))
        core.write_bytes(patch_core_img(core.read_bytes(), lba))
        boot = patched
    # 440 bytes of boot code only: the disk id and partition table stay.
    run(dd_argv(boot, disk, bs=440, count=1))
    run(dd_argv(core, disk, bs=SECTOR, seek=1 if layout == "bios" else BIOS_BOOT_START // SECTOR))


def _refresh_deb_cache(fresh: Path, arch: Arch = "x86_64") -> None:
    """Swap in this build's .debs, so the cache holds what the last build used.

    Only a speed-up: a failure here is logged, never fails the build.
    """
    current = debs_dir(arch)
    try:
        if any(fresh.glob("*.deb")):
            if current.exists():
                current.rename(fresh.with_name("debs-old"))  # deleted with the staging dir
            fresh.rename(current)
    except OSError as exc:
        log.warning("could not refresh the .deb cache %s: %s", current, exc)


def _now() -> str:
    # Microseconds: prune keeps the newest base per origin by this stamp, and two
    # fetches of one URL within a second tied at seconds (the test saw it). An
    # older seconds-only stamp still sorts first (`+` < `.`).
    return datetime.now(UTC).isoformat(timespec="microseconds")


# --- fetched and local bases -------------------------------------------------------


def parse_checksum_file(text: str, filename: str) -> tuple[str, str]:
    """(algorithm, hex) for `filename` in a sha256sum/SHA512SUMS or BSD-style file."""
    for line in text.splitlines():
        if bsd := re.fullmatch(r"(SHA256|SHA512) \((.+)\) = ([0-9a-fA-F]+)", line.strip()):
            algo, name, digest = bsd.group(1).lower(), bsd.group(2), bsd.group(3)
        elif gnu := re.fullmatch(r"([0-9a-fA-F]{64}|[0-9a-fA-F]{128}) [ *](.+)", line.strip()):
            digest, name = gnu.group(1), gnu.group(2)
            algo = "sha256" if len(digest) == 64 else "sha512"
        else:
            continue
        if name.removeprefix("./") == filename:
            return algo, digest.lower()
    raise VmbuildError(f"no checksum for {filename!r} in the checksum file")


def _expected_checksum(
    url: str, sha256: str | None, sha512: str | None, checksum_url: str | None
) -> tuple[str, str]:
    for algo, value, length in (("sha256", sha256, 64), ("sha512", sha512, 128)):
        if value is not None:
            if not re.fullmatch(f"[0-9a-fA-F]{{{length}}}", value):
                raise VmbuildError(f"--{algo} must be {length} hex digits, got {value!r}")
            return algo, value.lower()
    if checksum_url is None:
        raise VmbuildError(
            f"refusing to fetch {url} without a checksum",
            hint="pass --sha256 HEX, --sha512 HEX or --checksum-url URL (e.g. SHA512SUMS)",
        )
    with _open_url(checksum_url) as response:
        text = response.read(4 * MiB).decode("utf-8", "replace")
    name = urllib.parse.unquote(urllib.parse.urlparse(url).path.rstrip("/").rsplit("/", 1)[-1])
    return parse_checksum_file(text, name)


def _open_url(url: str) -> Any:
    scheme = urllib.parse.urlparse(url).scheme
    if scheme not in ("http", "https", "file"):
        raise VmbuildError(f"unsupported URL scheme {scheme!r}: {url}")
    try:
        return urllib.request.urlopen(url, timeout=60)
    except (urllib.error.URLError, OSError) as exc:
        raise VmbuildError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from exc


def _download(url: str, dest: Path, algos: set[str], reporter: Reporter) -> dict[str, str]:
    """Stream `url` to `dest`, hashing as it goes; hex digests by algorithm."""
    hashes = {algo: hashlib.new(algo) for algo in algos}
    done = 0
    with _open_url(url) as response, dest.open("wb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        try:
            while chunk := response.read(MiB):
                out.write(chunk)
                for h in hashes.values():
                    h.update(chunk)
                done += len(chunk)
                reporter.bytes(done, total)
        except OSError as exc:
            raise VmbuildError(f"download of {url} failed after {done} bytes: {exc}") from exc
    if total is not None and done != total:
        raise VmbuildError(f"download of {url} truncated: {done} of {total} bytes")
    return {algo: h.hexdigest() for algo, h in hashes.items()}


def fetch_base(
    url: str,
    *,
    sha256: str | None = None,
    sha512: str | None = None,
    checksum_url: str | None = None,
    on_progress: Reporter | None = None,
) -> BaseImage:
    """Download a base image into the cache, verified against a checksum.

    Already cached with this URL and checksum: returned without downloading.
    On a mismatch nothing is kept and the error names expected and actual
    digests. Bytes are reported through `on_progress.bytes(done, total)`.
    """
    algo, expected = _expected_checksum(url, sha256, sha512, checksum_url)
    for base, meta in _cached():
        if url in meta.get("urls", ()) and meta.get(algo) == expected:
            return base
    with _staging_dir("url") as work:
        download = work / "download"
        digests = _download(url, download, {"sha256", algo}, reporter_or_null(on_progress))
        if digests[algo] != expected:
            download.unlink()
            raise VmbuildError(
                f"checksum mismatch for {url}: expected {algo} {expected}, got {digests[algo]}",
                hint="the file changed upstream or the checksum is wrong; nothing was kept",
            )
        fmt, virtual_size = _probe(download)
        final = _bases_dir() / f"url-{digests['sha256'][:16]}"
        with _lock("fetch"):
            meta = _read_meta(final) or {
                "kind": "url", "disk": f"disk.{fmt}", "format": fmt, "source": url,
                "virtual_size": virtual_size, "urls": [], "created": _now(),
            }  # fmt: skip
            if not final.exists():
                (work / "out").mkdir()
                download.rename(work / "out" / meta["disk"])
                _install(work / "out", final, replace=False)
            # Same bytes under another URL: one copy, both URLs resolve to it.
            meta.update(digests, urls=sorted({*meta["urls"], url}))
            _write_meta(final, meta)
    return _from_meta(final, meta)


def local_base(path: Path) -> BaseImage:
    """A qcow2 or raw file used in place: probed and hashed, never copied or written."""
    if not path.is_file():
        hint = "give a qcow2 or raw file, a fetched URL, or debian-12"
        raise ConfigError(str(path), None, "base image not found", hint=hint)
    fmt, virtual_size = _probe(path)
    digest = sha256_file(path)
    return BaseImage(f"file-{digest[:16]}", path.resolve(), fmt, digest, str(path), virtual_size)


def resolve_base(
    spec: str,
    *,
    recipe_dir: Path,
    mirror: str | None = None,
    rebuild: bool = False,
    on_progress: Reporter | None = None,
) -> BaseImage:
    """Turn a recipe's `base` into a `BaseImage`.

    `debian-12` is built offline (or reused from the cache); a URL must be in
    the cache already (fetching needs a checksum: `vmbuild base fetch`);
    anything else is a local file, relative to `recipe_dir`.
    """
    if spec in RELEASES:
        return build_debian(spec, mirror=mirror, rebuild=rebuild, on_progress=on_progress)
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", spec):
        found = [(m.get("created", ""), b) for b, m in _cached() if spec in m.get("urls", ())]
        if not found:
            hint = f"run `vmbuild base fetch {spec} --sha256 HEX` first"
            raise VmbuildError(f"base {spec} is not in the cache", hint=hint)
        return max(found, key=lambda pair: pair[0])[1]
    path = Path(spec).expanduser()
    path = path if path.is_absolute() else recipe_dir / path
    if not path.exists() and re.fullmatch(r"[a-z]+-\d+", spec):
        raise VmbuildError(f"unknown base {spec!r}", hint=f"supported: {', '.join(RELEASES)}")
    return local_base(path)


def layout_for(boot_mode: str, arch: Arch = "x86_64") -> Layout:
    """The offline Debian base's layout for an EC2 boot mode: legacy-bios keeps
    the MBR disk; uefi-preferred gets the hybrid GPT that boots both ways; uefi
    (and every arm64 image) gets GPT with an ESP and no BIOS boot partition, so
    the image cannot boot the way its AMI will not."""
    if arch != "x86_64" or boot_mode == "uefi":
        return "uefi"
    return "bios" if boot_mode == "legacy-bios" else "hybrid"


def for_recipe(
    spec: str | UrlBase, local_path: Path | None, *, mirror: str | None,
    reporter: Reporter | None, layout: Layout = "bios", arch: Arch = "x86_64",
) -> BaseImage:  # fmt: skip
    """The base a recipe names: its local file, a verified URL download, or an offline
    Debian build (cached by its inputs)."""
    if local_path is not None:
        return local_base(local_path)
    if isinstance(spec, str):
        return build_debian(spec, mirror=mirror, on_progress=reporter, layout=layout, arch=arch)
    return fetch_base(
        spec.url, sha256=spec.sha256, sha512=spec.sha512, checksum_url=spec.checksum_url,
        on_progress=reporter,
    )  # fmt: skip


def check_boot_mode(base: BaseImage, boot_mode: str, workdir: Path) -> None:
    """Refuse a base that cannot boot the recipe's way before any VM tries to (a
    UEFI boot of a disk without an ESP would sit in the firmware until the boot
    timeout). Reads the first MiB (MBR, GPT header and entries) only."""
    from vmbuild.diskfs.lint import check_partition_table
    from vmbuild.diskfs.rootfs import image_partition_table

    table = image_partition_table(base.path, base.format, workdir)
    if table is None:
        return  # a partitionless disk: the boot itself will say
    if errors := [f for f in check_partition_table(table, boot_mode) if f.severity == "error"]:
        raise VmbuildError(
            f"base {base.source}: cannot boot as boot_mode {boot_mode}: {errors[0].message}",
            hint=errors[0].hint or "choose the boot_mode the base image was made for",
        )


def key(base: BaseImage, disk_size: int | None) -> StageKey:
    """The builder's starting disk: the base's bytes, grown to the recipe's size."""
    return stage_key("base", sha256=base.sha256, format=base.format, disk_size=disk_size)


def cached_for_recipe(
    spec: str | UrlBase,
    local_path: Path | None,
    *,
    mirror: str | None,
    layout: Layout = "bios",
    arch: Arch = "x86_64",
) -> BaseImage | None:
    """The base `for_recipe` would use, if it needs no build or download; else None.

    Reads the cache (and hashes a local file) only: `vmbuild inspect` uses it to say
    what a build would reuse without building, fetching or writing anything.
    """
    if local_path is not None:
        return local_base(local_path) if local_path.is_file() else None
    if isinstance(spec, str):
        if spec not in RELEASES:
            return None
        mirrors = mirrors_for(mirror, RELEASES[spec])
        final = _bases_dir() / base_id_for(spec, mirrors, layout, arch)
        meta = _read_meta(final)
        return _from_meta(final, meta) if meta is not None else None
    found = [(m.get("created", ""), b) for b, m in _cached() if spec.url in m.get("urls", ())]
    if spec.sha256:
        found = [(c, b) for c, b in found if b.sha256 == spec.sha256.lower()]
    return max(found, key=lambda pair: pair[0])[1] if found else None


def remove_base(base_id: str) -> BaseImage:
    """Delete one cached base by id (`vmbuild base list`). Only a directory directly in
    the cache's bases folder is ever removed. VMs running on it are unaffected: each
    pins its base with a hard link (hypervisor/guest.py)."""
    bases = _bases_dir().resolve()
    target = (bases / base_id).resolve()
    if target.parent != bases or base_id.startswith("."):
        raise VmbuildError(f"{base_id!r} is not a base id", hint="`vmbuild base list` shows them")
    with _lock("debian-build"):  # not while a build installs or reuses it
        meta = _read_meta(target)
        if meta is None:
            raise VmbuildError(
                f"no cached base {base_id!r} in {bases}", hint="`vmbuild base list` shows them"
            )
        base = _from_meta(target, meta)
        tomb = bases / f".rm-{base_id}"
        os.replace(target, tomb)  # atomic: a build never sees half a base
        shutil.rmtree(tomb)
    return base


def prunable_bases(keep: int = 1) -> list[BaseImage]:
    """Bases no origin keeps: each origin (a Debian release, a downloaded URL) keeps its
    `keep` newest; a base several URLs share stays while any of them keeps it. That
    drops older builds of a release whose inputs changed and older downloads of a URL."""
    groups: dict[str, list[tuple[str, BaseImage]]] = {}
    for base, meta in _cached():
        # A release's builds for another layout or architecture are other origins.
        release = (
            f"{meta['release']}/{meta.get('layout', 'bios')}/{meta.get('arch', 'x86_64')}"
            if meta.get("release")
            else None
        )
        origins = [release] if release else list(meta.get("urls") or ())
        for origin in origins or [base.source]:
            groups.setdefault(origin, []).append((str(meta.get("created", "")), base))
    kept, seen = set(), {}
    for members in groups.values():
        members.sort(key=lambda pair: pair[0], reverse=True)
        kept |= {base.id for _, base in members[:keep]}
        seen.update({base.id: base for _, base in members})
    return sorted((b for i, b in seen.items() if i not in kept), key=lambda b: b.id)
