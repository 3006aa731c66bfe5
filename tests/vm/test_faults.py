"""Faults injected into real guests: each ends in the exact, named outcome, at
once, with nothing left behind.

Cases that leave the guest usable (full disk, step timeout, a frozen guest)
share the session's booted VM; each destructive case (panic, poweroff, QEMU
killed) gets its own scratch VM, resumed from the booted builder kept in the
session (as `component run` does). The time from fault to clean failure is
printed and, when VMBUILD_FAULT_TIMES names a file, appended to it as JSON
lines (the closing note quotes them).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.vm.conftest import REPO, VMBUILD, qemu_pids, vmbuild
from vmbuild.errors import GuestStopped, TransferError
from vmbuild.hypervisor.guest import Guest
from vmbuild.remote import ssh as ssh_mod
from vmbuild.scratch import scratch_guest

pytestmark = pytest.mark.vm


def record(case: str, seconds: float) -> None:
    line = {"case": case, "fault_to_failure_s": round(seconds, 1), "load": os.getloadavg()[0]}
    print(f"fault timing: {json.dumps(line)}")
    target = os.environ.get("VMBUILD_FAULT_TIMES")
    if target:
        with open(target, "a") as f:
            f.write(json.dumps(line) + "\n")


def qemu_pid(guest: Guest) -> int:
    pid = getattr(guest.machine, "pid", None)
    assert isinstance(pid, int)
    return pid


class Trigger:
    """Fires `action` once the guest prints `marker`: the fault happens while the
    step is provably running, without sleeping on a guess."""

    def __init__(self, marker: str, action: Callable[[], None]) -> None:
        self.marker, self.action = marker, action
        self.fired_at: float | None = None

    def __call__(self, stream: str, line: str) -> None:
        if self.fired_at is None and line.strip() == self.marker:
            self.fired_at = time.monotonic()
            self.action()


# -- the shared VM -----------------------------------------------------------


@pytest.fixture
def full_disk(guest_vm: Guest) -> Iterator[None]:
    """The guest's root filesystem filled to the last block (root's reserve included)."""
    fill = guest_vm.ssh.run(
        "fallocate -l $(( $(df -k --output=avail / | tail -1) * 1024 )) /var/fill.bin;"
        " dd if=/dev/zero of=/var/fill2.bin bs=64k 2>/dev/null; df -k --output=avail / | tail -1",
        timeout=300,
    )
    assert fill.stdout.split()[-1] == "0"
    yield
    guest_vm.ssh.run("rm -f /var/fill.bin /var/fill2.bin", timeout=60)


def test_full_guest_disk_fails_the_step_and_names_it(guest_vm: Guest, full_disk: None) -> None:
    result = guest_vm.ssh.run("echo data > /var/lib/new-file", timeout=60)
    assert result.exit_code == 1
    assert "No space left on device" in result.stderr
    # Step scripts live on tmpfs, so the step ran (and failed on its own) rather
    # than being silently replaced by an empty upload.
    started = time.monotonic()
    with pytest.raises(TransferError) as info:
        guest_vm.ssh.put(b"x" * 100_000, "/opt/after-full/file.bin")
    record("full disk: put()", time.monotonic() - started)
    assert str(info.value).startswith("cannot write /opt/after-full/file.bin in the guest: ")
    assert "the guest's disk is full (/: 0 KiB free)" in str(info.value)


def test_full_guest_tmpfs_fails_the_upload_at_once(guest_vm: Guest) -> None:
    guest_vm.ssh.run(
        "fallocate -l $(( $(df -k --output=avail /dev/shm | tail -1) * 1024 )) /dev/shm/fill",
        timeout=60,
    )
    try:
        started = time.monotonic()
        with pytest.raises(TransferError) as info:
            # Larger than the pages the fill script itself frees when it is removed.
            guest_vm.ssh.run("echo must-not-run\n" + "#" * (256 << 10), timeout=60)
        record("full tmpfs: script upload", time.monotonic() - started)
        message = str(info.value)
        assert message.startswith("cannot upload /dev/shm/vmbuild-")
        # What is free by the time the probe runs: the failed upload's own
        # pages are released when its partial file is removed.
        free = re.search(
            r"the guest's memory \(tmpfs\) is full \(/dev/shm: (\d+) KiB free\)", message
        )
        assert free is not None, message
        assert int(free.group(1)) < 64, message
    finally:
        guest_vm.ssh.run("rm -f /dev/shm/fill", timeout=60)
    assert guest_vm.ssh.run("echo ok", timeout=60).stdout == "ok\n"


def test_a_step_that_ignores_sigterm_is_still_a_timeout(guest_vm: Guest) -> None:
    # timeout(1) -k escalates to SIGKILL: exit 137, which is still a timeout.
    result = guest_vm.ssh.run("trap '' TERM; sleep 300", timeout=3)
    assert result.exit_code == 137
    assert result.timed_out
    assert result.duration < 3 + 10 + 15


def test_a_frozen_guest_hits_the_host_deadline(guest_vm: Guest) -> None:
    pid = qemu_pid(guest_vm)
    trigger = Trigger("frozen", lambda: os.kill(pid, signal.SIGSTOP))
    try:
        result = guest_vm.ssh.run("echo frozen; sleep 300", timeout=2, on_output=trigger)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert trigger.fired_at is not None
    waited = time.monotonic() - trigger.fired_at
    record("frozen guest: host deadline", waited)
    assert result.timed_out and result.exit_code == -1
    assert waited < 2 + ssh_mod.KILL_GRACE + ssh_mod.HOST_GRACE + 5
    assert guest_vm.ssh.run("echo back", timeout=120).stdout == "back\n"


# -- one VM per destructive case ---------------------------------------------


DESTRUCTIVE = {
    "kernel panic": ("echo c > /proc/sysrq-trigger", None, "guest kernel panic"),
    "guest poweroff": ("systemctl poweroff", None, "guest powered off"),
    "QEMU SIGKILL": ("true", signal.SIGKILL, "QEMU exited with signal 9"),
}


@pytest.mark.parametrize("case", list(DESTRUCTIVE))
def test_a_dying_guest_ends_the_step_at_once(case: str, guest_vm: Guest) -> None:
    # guest_vm: once it is up, a booted builder is kept in this session.
    command, host_signal, cause = DESTRUCTIVE[case]
    said: list[str] = []
    with (
        pytest.raises(GuestStopped) as info,
        scratch_guest("debian-12", base_dir=REPO, keep_boot=True, on_status=said.append) as guest,
    ):
        assert "checkpoints: the booted builder is back, no boot" in said
        work = guest.spec.workdir
        pid = qemu_pid(guest)

        def fault() -> None:
            if host_signal is not None:
                os.kill(pid, host_signal)

        trigger = Trigger("fault", fault)
        script = f"echo fault; {command}; sleep 600"
        try:
            guest.ssh.run(script, timeout=300, on_output=trigger)
        finally:
            failed_at = time.monotonic()
    assert trigger.fired_at is not None
    record(case, failed_at - trigger.fired_at)
    assert info.value.cause == cause
    # A powering-off guest closes its SSH sessions before QEMU exits: the
    # SSH layer waits at most LOST_GRACE for the watchdog to name the cause.
    assert failed_at - trigger.fired_at < ssh_mod.LOST_GRACE + 5
    if case == "kernel panic":
        assert "Kernel panic - not syncing" in info.value.console_tail
    # Nothing left: the VM is reaped, its work dir (overlay, seed, keys) gone.
    assert not qemu_pids(work)
    assert not work.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# -- the CLI killed mid-build -------------------------------------------------

FAULT_COMPONENT = """\
name: fault-point
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: Wait
        action: ExecuteBash
        inputs:
          commands: ["echo fault-here", "sleep 600"]
"""


def start_build(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    (tmp_path / "fault.yaml").write_text(FAULT_COMPONENT)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: fault\nversion: 1.0.0\nbase: debian-12\ncomponents:\n  - name: ./fault.yaml\n"
    )
    return subprocess.Popen(
        [*VMBUILD, "build", str(recipe), "--skip-tests", "--apt-proxy", "off"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_for_marker(proc: subprocess.Popen[str], marker: str = "fault-here") -> None:
    assert proc.stderr is not None
    for line in proc.stderr:  # guest output is streamed as it comes: an event, not a guess
        if line.rstrip().endswith(marker):
            return
    raise AssertionError(f"the build ended (exit {proc.wait()}) before printing {marker}")


def leftovers(tmp_path: Path) -> list[Path]:
    store = tmp_path / "store"
    return list(store.rglob(".staging-*")) if store.exists() else []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_vmbuild_killed_in_a_step_leaves_nothing(
    tmp_path: Path, cli_env: dict[str, str], sig: signal.Signals
) -> None:
    env = {**cli_env, "VMBUILD_STATE_DIR": str(tmp_path / "state")}
    proc = start_build(tmp_path, env)
    wait_for_marker(proc)
    assert qemu_pids(tmp_path)  # the builder VM is running
    killed_at = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(120)
    # SIGKILL: the kernel kills QEMU with vmbuild (PR_SET_PDEATHSIG). SIGTERM:
    # vmbuild unwinds itself (exit 130).
    deadline = time.monotonic() + 30
    while qemu_pids(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not qemu_pids(tmp_path)
    record(f"vmbuild {sig.name} in a step: QEMU gone", time.monotonic() - killed_at)
    if sig == signal.SIGTERM:
        assert code == 130
        assert not leftovers(tmp_path)
        return
    assert code == -signal.SIGKILL
    assert leftovers(tmp_path)  # nobody cleaned up yet: the next command does
    started = time.monotonic()
    listing = vmbuild("images", "list", env=env, timeout=120)
    record("vmbuild SIGKILL: next command cleans up", time.monotonic() - started)
    assert listing.returncode == 0, listing.stderr
    assert "an earlier vmbuild run (" in listing.stderr
    assert not leftovers(tmp_path)
    (failed,) = (tmp_path / "state" / "failed-runs").iterdir()
    data = json.loads(failed.read_text())
    assert data["status"] == "failed"
    assert "fault-here" in data["log_tail"]
