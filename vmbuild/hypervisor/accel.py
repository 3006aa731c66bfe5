"""Choose the accelerator: KVM only when a guest kernel is *proved* to run, else TCG.

On some hosts (nested virtualization in CI) /dev/kvm opens and answers
KVM_GET_API_VERSION, and even the firmware runs, yet a Linux guest hangs
forever once its kernel starts. So the probe boots a real kernel from a base
image under KVM, time-boxed, and requires it to reach userspace. The verdict
is cached per host boot and QEMU version: the probe costs seconds, not minutes.

KVM runs guests of the host's own architecture only, so the probe boots the
host's: qemu-system-x86_64 (`pc`, SeaBIOS) on an x86_64 host,
qemu-system-aarch64 (`virt`, AAVMF: arm64 has no BIOS) on an arm64 host, and
the image it boots must be of that architecture.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from vmbuild import paths
from vmbuild.diskfs.lint import check_partition_table
from vmbuild.diskfs.rootfs import GPT_ESP, image_partition_table
from vmbuild.errors import VmbuildError
from vmbuild.hypervisor import arch as arch_mod
from vmbuild.hypervisor import firmware
from vmbuild.hypervisor.arch import Arch
from vmbuild.run import run, spawn

log = logging.getLogger("vmbuild.accel")

AccelKind = Literal["kvm", "tcg"]
AccelMode = Literal["auto", "kvm", "tcg"]

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
# Markers the guest kernel prints once it has left early boot; seeing one under
# KVM proves the vCPU really executes guest code.
USERSPACE_MARKERS = ("Run /init as init process", "Run /sbin/init", "systemd[1]:")
PROBE_SECONDS = 25.0
PROBE_VERSION = 2  # 2: the host's architecture is part of the probe
# KVM on arm64: the host's interrupt controller (a GICv3-only host, as Graviton's,
# cannot emulate the virt machine's default GICv2 in the kernel).
KVM_ARM64_MACHINE = "virt,gic-version=host"

# Timeouts are written for KVM and multiplied by `scale`: measured TCG boots
# are ~10x slower than KVM ones on this class of machine.
TCG_SCALE = 10.0


@dataclass(frozen=True)
class Accel:
    kind: AccelKind
    reason: str
    scale: float

    def qemu_args(self, cpus: int, machine: str = "pc", tcg_cpu: str = "qemu64") -> list[str]:
        """The fastest measured flags for each accelerator (`tcg_cpu`: the guest
        architecture's TCG CPU model, hypervisor/arch.py)."""
        if self.kind == "kvm":
            machine = KVM_ARM64_MACHINE if machine == "virt" else machine
            return ["-machine", machine, "-accel", "kvm", "-cpu", "host", "-smp", str(cpus)]
        # Measured: multi-threaded TCG with qemu64 beats `-cpu max` by ~20 %
        # and single-threaded TCG by ~30 %.
        return [
            "-machine", machine, "-accel", "tcg,thread=multi", "-cpu", tcg_cpu,
            "-smp", str(cpus),
        ]  # fmt: skip

    def timeout(self, kvm_seconds: float) -> float:
        return kvm_seconds * self.scale

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def tcg(reason: str) -> Accel:
    return Accel("tcg", reason, TCG_SCALE)


def kvm_device_usable(device: str = "/dev/kvm") -> tuple[bool, str]:
    """Can we open the device and does it speak the stable KVM API?"""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"{device}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return False, f"{device}: KVM_GET_API_VERSION failed: {exc.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return False, f"{device}: unexpected KVM API version {version}"
    return True, f"{device} opens (API {version})"


def _qemu_version(binary: str) -> str:
    out = run([binary, "--version"], timeout=30).stdout
    return out.splitlines()[0] if out else "unknown"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _cache_file() -> Path:
    return paths.cache_dir() / "accel-probe.json"


def probe_argv(
    image: Path, image_format: str, console: Path, host: Arch, uefi_vars: Path | None = None
) -> list[str]:
    """QEMU for the probe: the `host` architecture's binary and machine under KVM
    (`uefi_vars`: the per-probe copy of the UEFI vars, for arm64 and for an x86_64
    image that boots UEFI only; SeaBIOS otherwise)."""
    if host == "x86_64":
        # A UEFI-only base has no legacy-BIOS path: SeaBIOS would sit there and
        # the probe would blame KVM (and cache that) for the image's boot mode.
        machine, boot = "pc", firmware.qemu_args("uefi", uefi_vars) if uefi_vars else []
    else:
        machine, boot = KVM_ARM64_MACHINE, firmware.qemu_args("uefi", uefi_vars, host)
    return [
        arch_mod.QEMU_BINARY[host], "-machine", machine, "-accel", "kvm", "-cpu", "host",
        "-m", "512", "-smp", "1", "-nodefaults", "-display", "none", "-no-reboot",
        "-snapshot", *boot,
        "-drive", f"file={image},format={image_format},if=virtio",
        "-serial", f"file:{console}",
    ]  # fmt: skip


def probe_kvm_boot(
    image: Path, image_format: str, workdir: Path, host: Arch = "x86_64"
) -> tuple[bool, str]:
    """Boot `image` (of the `host`'s architecture) under KVM (no writes: -snapshot)
    and wait for the kernel to reach userspace."""
    console = workdir / "kvm-probe-console.log"
    output = workdir / "kvm-probe-qemu.log"
    uefi_vars = None
    if host != "x86_64" or uefi_only(image, image_format, workdir):
        uefi_vars = firmware.vars_copy("uefi", workdir / "kvm-probe-vars.fd", host)
    argv = probe_argv(image, image_format, console, host, uefi_vars)
    with output.open("wb") as out:
        proc = spawn(argv, stdout=out)
    start = time.monotonic()
    try:
        while time.monotonic() - start < PROBE_SECONDS:
            if proc.poll() is not None:
                said = " ".join(output.read_text(errors="replace").split())
                last = f": {said[-200:]}" if said else ""
                return False, f"QEMU exited with {proc.returncode} under KVM{last}"
            text = console.read_text(errors="replace") if console.exists() else ""
            if any(m in text for m in USERSPACE_MARKERS):
                took = time.monotonic() - start
                return True, f"a guest kernel reached userspace under KVM in {took:.1f}s"
            time.sleep(0.25)
        text = console.read_text(errors="replace") if console.exists() else ""
        stage = "the kernel started but hung" if "Linux version" in text else "no kernel output"
        return False, f"KVM guest did not reach userspace in {PROBE_SECONDS:.0f}s ({stage})"
    finally:
        proc.kill()
        proc.wait()
        for path in (console, output, uefi_vars):
            if path is not None:
                path.unlink(missing_ok=True)


def uefi_only(image: Path, image_format: str, workdir: Path) -> bool:
    """Whether `image` can boot under UEFI only (a GPT disk with an ESP and no
    legacy-BIOS path), read from its first MiB."""
    table = image_partition_table(image, image_format, workdir)
    if table is None or not any(p.type == GPT_ESP for p in table.partitions):
        return False
    return any(f.severity == "error" for f in check_partition_table(table, "legacy-bios"))


def choose(
    mode: AccelMode, probe_image: tuple[Path, str] | None, workdir: Path,
    host: Arch | None = None,
) -> Accel:  # fmt: skip
    """Resolve `--accel auto|kvm|tcg` to an accelerator, explaining why.

    `probe_image` must be of the `host`'s architecture (default: this machine's),
    which is the one KVM can run."""
    host = host or arch_mod.host_arch()
    if mode == "tcg":
        return tcg("TCG requested")
    usable, why = kvm_device_usable()
    if not usable:
        if mode == "kvm":
            raise VmbuildError(f"KVM requested but unusable: {why}", hint="use --accel tcg")
        return tcg(f"KVM unusable ({why}); using TCG")
    if probe_image is None:
        if mode == "kvm":
            return Accel("kvm", f"KVM requested ({why}; guest boot not verified)", 1.0)
        return tcg(f"{why}, but no base image to prove a guest boots; using TCG")
    if host is None:
        why += ", but vmbuild has no guest of this host's architecture"
        if mode == "kvm":
            raise VmbuildError(f"KVM requested but unusable: {why}", hint="use --accel tcg")
        return tcg(f"{why}; using TCG")
    key = {"boot_id": _boot_id(), "qemu": _qemu_version(arch_mod.QEMU_BINARY[host]),
           "probe": PROBE_VERSION, "host": host}  # fmt: skip
    cached = _read_cache(key)
    if cached is None:
        ok, detail = probe_kvm_boot(probe_image[0], probe_image[1], workdir, host)
        _write_cache(key, ok, detail)
    else:
        ok, detail = cached
        detail += " (cached probe)"
    if ok:
        return Accel("kvm", detail, 1.0)
    if mode == "kvm":
        raise VmbuildError(f"KVM requested but broken: {detail}", hint="use --accel tcg")
    return tcg(f"{detail}; using TCG")


def _read_cache(key: dict[str, object]) -> tuple[bool, str] | None:
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return None
    if data.get("key") != key:
        return None
    return bool(data["ok"]), str(data["detail"])


def _write_cache(key: dict[str, object], ok: bool, detail: str) -> None:
    from vmbuild.run import write_atomic

    path = _cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"key": key, "ok": ok, "detail": detail}))


def for_guest(accel: Accel, arch: Arch, host: Arch | None = None) -> Accel:
    """`accel` (chosen by probing the host) as it applies to an `arch` guest.

    A foreign guest cannot use KVM; it runs under TCG, slower than a native
    TCG guest by FOREIGN_TCG_SCALE, and its timeouts say so.
    """
    host = host if host is not None else arch_mod.host_arch()
    if arch == host:
        return accel
    reason = f"{arch_mod.UNAME[arch]} guest on a {host or platform.machine()} host: TCG"
    return dataclasses.replace(
        accel, kind="tcg", reason=reason, scale=TCG_SCALE * arch_mod.FOREIGN_TCG_SCALE
    )


def guest_accel(arch: Arch, choose_native: Callable[[], Accel], host: Arch | None = None) -> Accel:
    """The accelerator for an `arch` guest: the host's probed choice for a native
    guest; TCG for a foreign one, without the KVM probe (which boots the host's
    architecture and could only waste its time-box)."""
    host = host if host is not None else arch_mod.host_arch()
    if arch == host:
        return choose_native()
    return for_guest(tcg("foreign architecture"), arch, host)
