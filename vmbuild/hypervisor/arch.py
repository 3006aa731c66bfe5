"""Guest architectures: what differs between an x86_64 and an arm64 guest.

A recipe's `arch` (EC2's names: x86_64, arm64) picks the QEMU binary, machine,
CPU model, serial console, Debian architecture and kernel. Everything else (the
virtio devices on PCI, the user-network SSH forward, the seed) is the same.

An arm64 guest on an x86_64 host (or the reverse) cannot use KVM: it runs under
TCG, which translates every guest instruction, so its timeouts are scaled
beyond the x86 TCG factor by `FOREIGN_TCG_SCALE` (measured below;
applied by accel.for_guest).
"""

from __future__ import annotations

import platform
from typing import Literal

Arch = Literal["x86_64", "arm64"]
ARCHES: tuple[Arch, ...] = ("x86_64", "arm64")

QEMU_BINARY: dict[Arch, str] = {"x86_64": "qemu-system-x86_64", "arm64": "qemu-system-aarch64"}
# What `uname -m` says in the guest; also libvirt's <type arch=...>.
UNAME: dict[Arch, str] = {"x86_64": "x86_64", "arm64": "aarch64"}
DEBIAN_ARCH: dict[Arch, str] = {"x86_64": "amd64", "arm64": "arm64"}
# The kernel's serial console: the PC's 16550 UART, the virt machine's PL011.
SERIAL_CONSOLE: dict[Arch, str] = {"x86_64": "ttyS0", "arm64": "ttyAMA0"}
# TCG CPU models. x86_64: qemu64 measured ~20 % faster than `max`. arm64:
# cortex-a72 (ARMv8.0): `max` adds pointer authentication, whose emulated
# QARMA signing is costly under TCG and which Debian's arm64 kernel uses.
# Measured on the offline base (2 cores, load ~2): the kernel reached /init
# 16.6 s after QEMU started with cortex-a72, 20.2 s with max (kernel clock
# 5.1 s vs 13.0 s).
TCG_CPU: dict[Arch, str] = {"x86_64": "qemu64", "arm64": "cortex-a72"}
# How many times slower than x86_64-on-x86_64 TCG an arm64 guest is taken to
# boot on an x86_64 host; applied on top of the TCG scale (a 45 s KVM boot
# budget becomes 900 s). Measured (load ~3.5): the arm64 test VM's first SSH
# command 68 s after launch, cloud-init done at 89 s; x86_64 guests under
# TCG reach SSH in 45-55 s on this class of machine: ~1.4x, and 2 leaves room
# for load (boots vary 35-105 s with it).
FOREIGN_TCG_SCALE = 2.0


def host_arch() -> Arch | None:
    """The host's architecture in EC2's names, or None when vmbuild has no guest for it."""
    machine = platform.machine()
    return {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(
        machine.lower()
    )  # type: ignore[return-value]
