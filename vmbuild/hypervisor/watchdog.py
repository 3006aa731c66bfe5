"""Host-side watch over a running guest: its serial console and its process.

A guest that panics keeps its TCP connections open (QEMU's user network
answers for it), so nothing on the SSH side ever notices: only the console
says so. A guest that powers itself off or a QEMU killed by a signal ends the
process. `Watchdog.check()` is called by the SSH layer about once a second
while it waits for a guest command, and raises `GuestStopped` with the cause
and the console tail the moment either happens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from vmbuild.errors import GuestStopped

# Lines a Linux guest prints when it can no longer run our commands.
CONSOLE_FAULTS: tuple[tuple[re.Pattern[bytes], str], ...] = (
    (re.compile(rb"Kernel panic - not syncing"), "guest kernel panic"),
    (re.compile(rb"\bOops: ", re.ASCII), "guest kernel oops"),
    (re.compile(rb"\bBUG: (?:unable to handle|kernel NULL pointer)"), "guest kernel oops"),
    (re.compile(rb"You are in emergency mode|Entering emergency mode"), "guest in emergency mode"),
)
# OVMF's boot manager when LoadImage() fails with EFI_SECURITY_VIOLATION: Secure
# Boot found the boot loader unsigned, or signed by a key not in db (measured on
# Debian's OVMF_CODE_4M.secboot.fd: 4 s after QEMU started, under TCG). It then
# tries the next boot option (iPXE) and never boots the disk: waiting for SSH
# would only run into the boot timeout. The firmware's own line is quoted.
FIRMWARE_REFUSAL = re.compile(rb"BdsDxe: failed to load Boot[0-9A-Fa-f]{4}[^\r\n]*: Access Denied")
FIRMWARE_REFUSED = "the UEFI firmware refused to start the disk's boot loader"
# A match may straddle two reads: keep this much of the previous chunk.
OVERLAP = 256
MAX_READ = 1 << 20


class Watched(Protocol):
    """What the watchdog needs from a machine (both backends provide it)."""

    @property
    def name(self) -> str: ...

    def exit_status(self) -> int | None:
        """None while the VM runs; else the hypervisor process's exit status
        (negative: killed by that signal, as subprocess reports it)."""
        ...

    def console_tail(self, lines: int = 40) -> str: ...


def exit_cause(status: int) -> str:
    """How a VM's end reads to a user: a clean QEMU exit is the guest's poweroff."""
    if status == 0:
        return "guest powered off"
    if status < 0:
        return f"QEMU exited with signal {-status}"
    return f"QEMU exited with status {status}"


@dataclass
class ConsoleScanner:
    """Reads only what the console log gained since the last call."""

    path: Path
    offset: int = 0
    carry: bytes = field(default=b"", repr=False)

    def scan(self) -> str | None:
        """The first fault seen in the new console text, or None."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read(MAX_READ)
        except FileNotFoundError:
            return None
        if not chunk:
            return None
        self.offset += len(chunk)
        text = self.carry + chunk
        self.carry = text[-OVERLAP:]
        for pattern, cause in CONSOLE_FAULTS:
            if pattern.search(text):
                return cause
        if refusal := FIRMWARE_REFUSAL.search(text):
            return f"{FIRMWARE_REFUSED}: {refusal.group(0).decode('utf-8', 'replace')}"
        return None


class Watchdog:
    """`check()` raises GuestStopped when the VM died or its console shows a fatal fault."""

    def __init__(self, machine: Watched, console: Path, *, from_start: bool = False) -> None:
        self.machine = machine
        self.scanner = ConsoleScanner(console)
        if not from_start:
            # A fault printed in an earlier life of the guest (before a
            # reboot, or a crash dump we already reported) is not news.
            try:
                self.scanner.offset = console.stat().st_size
            except FileNotFoundError:
                self.scanner.offset = 0

    def check(self) -> None:
        status = self.machine.exit_status()
        if status is not None:
            raise GuestStopped(
                self.machine.name, exit_cause(status), console_tail=self.machine.console_tail()
            )
        cause = self.scanner.scan()
        if cause is not None:
            raise GuestStopped(self.machine.name, cause, console_tail=self.machine.console_tail())
