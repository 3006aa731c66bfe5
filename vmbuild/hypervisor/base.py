"""The VM description every backend boots, and the Protocol a booted VM satisfies."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from vmbuild.hypervisor.accel import Accel


@dataclass(frozen=True)
class VMSpec:
    name: str  # e.g. vmbuild-<run>-builder: also the libvirt domain name
    disk: Path  # a qcow2 overlay: the base is never written
    seed: Path  # NoCloud ISO (label cidata)
    memory_mib: int
    cpus: int
    accel: Accel
    ssh_port: int  # host side of the forward, bound on 127.0.0.1 only
    console_log: Path  # serial console, kept in the run log
    workdir: Path  # sockets and pid files

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
