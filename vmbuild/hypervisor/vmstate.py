"""A running QEMU VM's state (RAM and devices) kept in a file and loaded into a new QEMU.

QEMU's own migration does the work, as `virsh save` and `snapshot-save` do:
the stream leaves through a pipe handed to QEMU over QMP (`getfd`, then
`migrate fd:`), runs through zstd, and lands in a file; it comes back the
same way into a QEMU started with `-incoming defer`. Not `exec:` URIs: those
are a shell command QEMU runs outside vmbuild's process runner (and libvirt
forbids them). Not `snapshot-save`: its state lives inside a writable qcow2,
where a checkpoint's layers are read-only and shared.

zstd at level 1: most of a builder's RAM after a component is page cache and
freed pages, which compress well; level 1 keeps up with the migration on two
cores (measured numbers in the closing note of issue 12), and its frames
carry a checksum, so a damaged file fails the load instead of loading.

A state loads only into the same machine (QEMU build, accelerator, machine
type, CPU model, memory, devices): qemu.state_signature() says which, and a
state whose machine differs is never loaded.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import IO, Any

from vmbuild.errors import VMError
from vmbuild.hypervisor.qmp import QMPClient
from vmbuild.run import reaped, spawn

FD_NAME = "vmbuild-state"
COMPRESS = ["zstd", "-1", "-T0", "-q", "-c"]
DECOMPRESS = ["zstd", "-d", "-q", "-c"]


class StateNotSaved(VMError):
    """The disk layer was cut, but the VM's running state could not be kept."""


class StateNotLoaded(VMError):
    """QEMU could not load a saved state (damaged, cut short, or not its machine's)."""


def save(qmp: QMPClient, dest: Path, *, log: IO[Any], timeout: float) -> None:
    """Write the VM's state to `dest` (the VM should be paused: then the state is
    that instant's, and matches its disk). QEMU leaves the VM paused after it."""
    # The guest's RAM: readable by the owner only, from the first byte.
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        z = spawn(COMPRESS, stdin=subprocess.PIPE, stdout=out, stderr=log)
        try:
            assert z.stdin is not None
            qmp.send_fd(FD_NAME, z.stdin.fileno())
            z.stdin.close()  # QEMU holds the write end now: EOF when it closes it
            qmp.watch_migration()
            qmp.execute("migrate", uri=f"fd:{FD_NAME}")
            status = qmp.wait_migration(timeout)
            rc = _finish(z, timeout)
        except BaseException:
            _kill(z)
            dest.unlink(missing_ok=True)
            raise
    if status != "completed" or rc != 0:
        dest.unlink(missing_ok=True)
        raise VMError(f"saving the VM's state failed (migration {status}, zstd exit {rc})")


def load(qmp: QMPClient, src: Path, *, log: IO[Any], timeout: float) -> None:
    """Load `src` into a QEMU started with `-incoming defer` and let it run on."""
    with src.open("rb") as inp:
        z = spawn(DECOMPRESS, stdin=inp, stdout=subprocess.PIPE, stderr=log)
        try:
            assert z.stdout is not None
            qmp.send_fd(FD_NAME, z.stdout.fileno())
            z.stdout.close()
            qmp.watch_migration()
            qmp.execute("migrate-incoming", uri=f"fd:{FD_NAME}")
            status = qmp.wait_migration(timeout)
            rc = _finish(z, timeout)
        except BaseException:
            _kill(z)
            raise
    if status != "completed" or rc != 0:
        raise StateNotLoaded(
            f"loading the VM's saved state failed (migration {status}, zstd exit {rc})"
        )
    # Saved paused, it comes back paused (the run state travels with it).
    if not (qmp.execute("query-status") or {}).get("running"):
        qmp.execute("cont")


def _finish(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        return -9
    reaped(proc)
    return rc


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    reaped(proc)
