"""The VM description every backend boots, and the Protocol a booted VM satisfies."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from vmbuild.hypervisor.accel import Accel
from vmbuild.hypervisor.arch import Arch
from vmbuild.hypervisor.firmware import Firmware


@dataclass(frozen=True)
class Ec2Boot:
    """What makes a VM look like an EC2 instance to its guest (the `ec2` boot mode):
    SMBIOS as a Nitro instance has it (cloud-init's ds-identify and Ec2 datasource
    call it AWS when the system UUID and serial both start with "ec2" and are
    equal), a NIC with the MAC the metadata names, and the metadata service
    forwarded from 169.254.169.254:80 (vmbuild.hypervisor.imds)."""

    imds_port: int  # the metadata service on the host's 127.0.0.1
    mac: str
    uuid: str  # ec2xxxxx-...: SMBIOS system UUID and serial number
    instance_id: str  # SMBIOS chassis asset tag, as on Nitro
    instance_type: str  # SMBIOS product name


@dataclass(frozen=True)
class VMSpec:
    name: str  # e.g. vmbuild-<run>-builder: also the libvirt domain name
    disk: Path  # a qcow2 overlay: the base is never written
    seed: Path | None  # NoCloud ISO (label cidata); None in the ec2 boot mode
    memory_mib: int
    cpus: int
    accel: Accel
    ssh_port: int  # host side of the forward, bound on 127.0.0.1 only
    console_log: Path  # serial console, kept in the run log
    workdir: Path  # sockets and pid files
    ec2: Ec2Boot | None = None  # boot as on EC2: IMDS, EC2's SMBIOS, no seed
    firmware: Firmware = "bios"
    uefi_vars: Path | None = None  # this VM's own UEFI variable store (UEFI only)
    arch: Arch = "x86_64"  # the guest's; `accel` already says how it runs on this host
    # An offline rebuild: the guest reaches nothing but this port on the host's
    # 127.0.0.1 (the bundle's mirror), forwarded from aptproxy.OFFLINE_ADDRESS:80.
    offline_mirror_port: int | None = None
    # A running VM's saved state (hypervisor/vmstate.py) to load instead of
    # booting: the guest resumes where it was saved. The direct QEMU backend only.
    restore_from: Path | None = None

    def user_netdev(self, netdev_id: str) -> str:
        """QEMU's user network: SSH forwarded from 127.0.0.1 only; in the ec2 mode on
        169.254.0.0/16 with the metadata address forwarded to the host service
        (libslirp forwards only addresses inside the user network)."""
        from vmbuild.cache.aptproxy import OFFLINE_ADDRESS
        from vmbuild.hypervisor import imds

        net = f"user,id={netdev_id},hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22"
        if self.offline_mirror_port is not None:
            # restrict=on: no packet leaves for the host or the internet except
            # through the forwards (SSH in, the mirror out).
            net += (
                f",restrict=on,guestfwd=tcp:{OFFLINE_ADDRESS}:80-"
                f"tcp:127.0.0.1:{self.offline_mirror_port}"
            )
        if self.ec2 is None:
            return net
        return (
            f"{net},net={imds.NETWORK},host={imds.GATEWAY},dns={imds.DNS},"
            f"dhcpstart={imds.GUEST_IP},ipv6=off,"
            f"guestfwd=tcp:{imds.ADDRESS}:80-tcp:127.0.0.1:{self.ec2.imds_port}"
        )

    def nic_options(self) -> str:
        """The NIC's MAC in the ec2 mode (the metadata's network config matches on it)."""
        return f",mac={self.ec2.mac}" if self.ec2 is not None else ""

    @property
    def qemu_log(self) -> Path:
        """QEMU's own stdout and stderr (its warnings and errors), next to the console
        log: a file, never an unread pipe that could fill up and stall QEMU."""
        return self.console_log.parent / f"{self.name}-qemu.log"


class Machine(Protocol):
    spec: VMSpec
    shutdown_timeout: float  # what leaving the `with` block gives an orderly poweroff

    def launch(self) -> None: ...

    def is_running(self) -> bool: ...

    @property
    def name(self) -> str: ...

    def exit_status(self) -> int | None:
        """None while the VM runs; else how it ended (0 poweroff, -N signal N)."""
        ...

    def console_tail(self, lines: int = 40) -> str: ...

    def wait(self, timeout: float) -> bool:
        """Wait for the VM to stop by itself (guest poweroff); True if it did."""
        ...

    def shutdown(self, timeout: float) -> None:
        """Stop the VM: ACPI powerdown, wait, then kill. Always reaps; idempotent."""
        ...

    def kill(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class MachineContext:
    """`with Machine(spec) as vm:` for every backend: launch on entry; on exit an
    orderly shutdown, or an immediate kill when the block raised (a hung guest
    may never honour an ACPI powerdown, and its state no longer matters)."""

    shutdown_timeout = 60.0

    def launch(self) -> None:
        raise NotImplementedError

    def shutdown(self, timeout: float) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.launch()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.kill()
        else:
            self.shutdown(timeout=self.shutdown_timeout)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the VM's SSH forward never listens elsewhere)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    # Serial consoles are full of carriage returns and escape codes.
    text = data.replace("\r", "")
    return "\n".join(text.splitlines()[-lines:])
