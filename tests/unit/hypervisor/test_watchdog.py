"""The host-side watchdog: console faults and VM exits become named causes."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmbuild.errors import GuestStopped
from vmbuild.hypervisor.watchdog import ConsoleScanner, Watchdog, exit_cause

PANIC = b"[   12.3] sysrq: Trigger a crash\n[   12.4] Kernel panic - not syncing: sysrq triggered crash\n"


class FakeMachine:
    name = "vmbuild-x-builder"

    def __init__(self, console: Path) -> None:
        self.console = console
        self.status: int | None = None

    def exit_status(self) -> int | None:
        return self.status

    def console_tail(self, lines: int = 40) -> str:
        return self.console.read_text()[-200:]


@pytest.mark.parametrize(
    ("status", "cause"),
    [(0, "guest powered off"), (-9, "QEMU exited with signal 9"), (1, "QEMU exited with status 1")],
)
def test_exit_causes(status: int, cause: str) -> None:
    assert exit_cause(status) == cause


@pytest.mark.parametrize(
    ("text", "cause"),
    [
        (PANIC, "guest kernel panic"),
        (b"[ 3.1] Oops: 0002 [#1] PREEMPT SMP NOPTI\n", "guest kernel oops"),
        (b"You are in emergency mode. After logging in, type...\n", "guest in emergency mode"),
    ],
)
def test_console_faults_are_named(tmp_path: Path, text: bytes, cause: str) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"Debian GNU/Linux 12 vmbuild ttyS0\n")
    dog = Watchdog(FakeMachine(console), console)
    dog.check()  # a healthy console: nothing
    with console.open("ab") as f:
        f.write(text)
    with pytest.raises(GuestStopped) as info:
        dog.check()
    assert info.value.cause == cause
    assert str(info.value).startswith(f"vmbuild-x-builder: {cause}\n--- serial console")


def test_a_fault_split_across_two_reads_is_found(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"boot\nKernel pan")
    scanner = ConsoleScanner(console)
    assert scanner.scan() is None
    with console.open("ab") as f:
        f.write(b"ic - not syncing: Fatal exception\n")
    assert scanner.scan() == "guest kernel panic"


def test_an_old_fault_is_not_news_but_a_stopped_vm_is(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(PANIC)  # printed before the watchdog started (an earlier life)
    machine = FakeMachine(console)
    dog = Watchdog(machine, console)
    dog.check()
    machine.status = -9
    with pytest.raises(GuestStopped) as info:
        dog.check()
    assert info.value.cause == "QEMU exited with signal 9"


def test_from_start_reads_the_whole_console(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(b"x" * 5000 + PANIC)
    with pytest.raises(GuestStopped, match="guest kernel panic"):
        Watchdog(FakeMachine(console), console, from_start=True).check()


def test_a_missing_console_is_quiet(tmp_path: Path) -> None:
    Watchdog(FakeMachine(tmp_path / "none.log"), tmp_path / "none.log").check()


# OVMF's Secure Boot refusal as Debian's OVMF_CODE_4M.secboot.fd printed it (an
# unsigned GRUB as EFI/BOOT/BOOTX64.EFI), screen control codes included.
REFUSAL = (
    b'\x1b[2J\x1b[01;01HBdsDxe: loading Boot0001 "UEFI Misc Device" from PciRoot(0x0)/Pci(0x3,0x0)'
    b'\r\nBdsDxe: failed to load Boot0001 "UEFI Misc Device" from PciRoot(0x0)/Pci(0x3,0x0): '
    b"Access Denied\r\n\r\n"
)


def test_a_secure_boot_refusal_quotes_the_firmware(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_bytes(REFUSAL)
    with pytest.raises(GuestStopped) as info:
        Watchdog(FakeMachine(console), console, from_start=True).check()
    assert info.value.cause == (
        "the UEFI firmware refused to start the disk's boot loader: BdsDxe: failed to load "
        'Boot0001 "UEFI Misc Device" from PciRoot(0x0)/Pci(0x3,0x0): Access Denied'
    )


def test_a_boot_entry_the_firmware_merely_could_not_find_is_not_a_refusal(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    # What OVMF says for an empty virtio disk: it goes on to the next entry, not fatal.
    console.write_bytes(REFUSAL.replace(b"Access Denied", b"Not Found"))
    Watchdog(FakeMachine(console), console, from_start=True).check()
