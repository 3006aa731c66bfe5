"""SIGTERM while the convert stage's `qemu-img convert` runs: vmbuild stops with
exit 130 and leaves no qemu-img, no half-written disk, no staging dir and no
registry entry. Real qemu-img on a real qcow2, the CLI's own SIGTERM handler,
the build's staging dir; no VM.

qemu-img runs in its own session (vmbuild/run.py spawns every command so), so
neither a terminal's Ctrl-C nor a SIGTERM to vmbuild reaches it: only
vmbuild's own cleanup can stop it. To make "SIGTERM arrives while it runs"
certain rather than a race with a fast disk, the test freezes qemu-img
(SIGSTOP) once its progress shows data moving and waits until it is stopped,
then SIGTERMs vmbuild, waits until vmbuild's SIGTERM is pending on qemu-img,
and lets it run again."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from vmbuild.runs import proc_start_time

REPO = Path(__file__).resolve().parents[2]

CONVERTING = textwrap.dedent(
    """
    import signal
    import sys
    from pathlib import Path
    from vmbuild.cli import _interrupt
    from vmbuild.stages import convert, store

    class Printer:  # the parts of a Reporter the convert stage calls
        def status(self, text):
            print("status", text, flush=True)
        def bytes(self, done, total):
            print("bytes", done, total, flush=True)
        def output(self, line):
            pass

    signal.signal(signal.SIGTERM, _interrupt)  # as `vmbuild build` does
    overlay, root = Path(sys.argv[1]), Path(sys.argv[2])
    try:
        with store.staging(root, "img", "1.0.0", "conv") as stage:
            work = stage.path / "work"
            work.mkdir()
            convert.flatten_final(overlay, ["qcow2", "vmdk"], stage.path, work,
                                  keep_source=True, reporter=Printer())
            print("finished", flush=True)
    except KeyboardInterrupt:
        sys.exit(130)
    """
)


def wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


def state(pid: int) -> str:
    """The process state letter (R, S, T stopped, Z...) from /proc/PID/stat."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def pending(pid: int) -> int:
    """The signals pending on `pid` (thread or process), as a bit mask."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    return int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)


def test_sigterm_during_qemu_img_convert_leaves_nothing(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    with raw.open("wb") as f:  # data qemu-img has to copy, not holes it skips
        for _ in range(256):
            f.write(os.urandom(1 << 20))
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, overlay], check=True)
    raw.unlink()
    env = dict(os.environ, VMBUILD_STATE_DIR=str(tmp_path / "state"))
    store = tmp_path / "store"
    vmbuild = subprocess.Popen(
        [sys.executable, "-c", CONVERTING, str(overlay), str(store)],
        env=env, cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    found: list[tuple[int, int]] = []  # qemu-img's pid and start time
    try:
        assert vmbuild.stdout is not None
        staging = store / "img" / "1.0.0" / ".staging-conv"
        assert vmbuild.stdout.readline() == "status flattening the disk\n"
        # qemu-img draws its 0% frame before it creates the target: wait for data moving.
        while (line := vmbuild.stdout.readline().split())[:1] != ["bytes"] or line[1] == "0":
            assert line, "the conversion ended before copying anything"
        # run() tracks every command it starts in the run's registry entry (on a
        # loaded machine the first convert may be over already: then the next one).
        (entry,) = (tmp_path / "state" / "runs").iterdir()

        def converting() -> bool:
            children = json.loads((entry / "run.json").read_text())["children"]
            for child in children:
                cmdline = Path(f"/proc/{child['pid']}/cmdline")
                if cmdline.exists() and cmdline.read_bytes().split(b"\0")[1:2] == [b"convert"]:
                    found.append((child["pid"], child["start"]))
                    return True
            return False

        wait_for(converting)
        qemu_img = found[0][0]
        os.kill(qemu_img, signal.SIGSTOP)
        # SIGSTOP takes effect when qemu-img next runs; a SIGTERM arriving before
        # that would be taken first (lower number): wait until it is stopped.
        wait_for(lambda: state(qemu_img) == "T")
        argv = Path(f"/proc/{qemu_img}/cmdline").read_bytes().split(b"\0")
        assert argv[:2] == [b"qemu-img", b"convert"] and str(staging).encode() in argv[-2]
        assert list((staging / "work").glob("scrubbed.raw"))  # a half-written disk, in staging

        vmbuild.send_signal(signal.SIGTERM)
        # vmbuild's cleanup SIGTERMs qemu-img's process group: pending while it is stopped.
        wait_for(lambda: pending(qemu_img) & (1 << (signal.SIGTERM - 1)))
        os.kill(qemu_img, signal.SIGCONT)
        started = time.monotonic()
        assert vmbuild.wait(30) == 130
        print(f"vmbuild exited {time.monotonic() - started:.2f}s after qemu-img resumed")
        rest = vmbuild.stdout.read().splitlines()
        # Progress frames qemu-img drew before it was stopped may follow; never the end.
        assert "finished" not in rest and all(
            line.startswith(("bytes ", "status ")) for line in rest
        )

        assert proc_start_time(qemu_img) is None  # dead and reaped
        assert not staging.exists()  # the half-written raw and qcow2 went with it
        assert not store.exists() or list(store.iterdir()) == []
        assert list((tmp_path / "state" / "runs").iterdir()) == []  # nothing for a reaper
        assert overlay.exists()  # the input (a checkpoint's disk) is untouched
    finally:
        # A failed assertion must not leave the vmbuild process waiting on a
        # stopped qemu-img: kill it (PR_SET_PDEATHSIG then kills qemu-img,
        # stopped or not) and qemu-img itself if it is still the same process.
        if vmbuild.poll() is None:
            vmbuild.kill()
            vmbuild.wait(30)
        for pid, start in found:
            if proc_start_time(pid) == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
