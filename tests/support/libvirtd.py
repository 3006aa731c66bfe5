"""A real libvirtd for the libvirt backend's tests, started by hand.

PID 1 is not systemd here (and the full libvirt-daemon-system package would
upgrade systemd), so the tests do what the units would: create the
`libvirt-qemu` user the QEMU driver insists on, start virtlogd and libvirtd
in the foreground as our own children, wait for the socket, and stop exactly
those processes at the end. A libvirtd that is already running is reused and
left alone.
"""

from __future__ import annotations

import contextlib
import grp
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SYSTEM_URI = "qemu:///system"
SOCKET = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
QEMU_USER = "libvirt-qemu"
PACKAGES = ("libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients")


@dataclass
class Libvirtd:
    uri: str
    log_dir: Path
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def reused(self) -> bool:
        return not self.started


def _answers(uri: str) -> bool:
    """Does a libvirtd answer on `uri`? (A stale socket file does not count.)"""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    conn.close()
    return True


def ensure_installed() -> None:
    """Install the daemon packages if missing (what `make setup` does)."""
    if shutil.which("libvirtd") and shutil.which("virtlogd"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # --no-install-recommends: the recommends pull in libvirt-daemon-system,
    # which upgrades systemd.
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def ensure_qemu_user() -> None:
    """The QEMU driver refuses to load without its configured user and group."""

    def exists(db: str, name: str) -> bool:
        return subprocess.run(["getent", db, name], capture_output=True).returncode == 0

    if not exists("group", QEMU_USER):
        subprocess.run(["groupadd", "--system", QEMU_USER], check=True)
    if not exists("passwd", QEMU_USER):
        subprocess.run(
            ["useradd", "--system", "--gid", QEMU_USER, "--no-create-home",
             "--home-dir", "/var/lib/libvirt", "--shell", "/usr/sbin/nologin", QEMU_USER],
            check=True,
        )  # fmt: skip


@contextlib.contextmanager
def kvm_group_access(device: Path = Path("/dev/kvm")) -> Iterator[None]:
    """Give /dev/kvm the owner udev gives it on Debian (root:kvm 0660, with
    libvirt-qemu in kvm), for as long as the tests run.

    Without udev the node stays root-only. libvirtd then probes QEMU's
    capabilities with KVM enabled but finds /dev/kvm unusable by its QEMU user
    on every later look, so it re-probes (about 2 s a time) over and over:
    measured 70-80 s per domain start instead of 1-2.5 s. KVM itself stays
    unused here (the domains are TCG); only the cache stops thrashing.
    """
    if not device.exists():
        yield
        return
    if subprocess.run(["getent", "group", "kvm"], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "--system", "kvm"], check=True)
    subprocess.run(["usermod", "--append", "--groups", "kvm", QEMU_USER], check=True)
    st = device.stat()
    kvm_gid = grp.getgrnam("kvm").gr_gid
    changed = st.st_gid != kvm_gid or (st.st_mode & 0o060) != 0o060
    if changed:
        os.chown(device, st.st_uid, kvm_gid)
        os.chmod(device, (st.st_mode & 0o7777) | 0o060)
    try:
        yield
    finally:
        if changed:
            os.chown(device, st.st_uid, st.st_gid)
            os.chmod(device, st.st_mode & 0o7777)


def _spawn(argv: list[str], log_file: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "LIBVIRT_LOG_OUTPUTS": f"3:file:{log_file}"}
    # Foreground (no -d): the child is the daemon, so its pid is ours to stop.
    # A new session keeps a Ctrl-C meant for pytest from killing libvirtd
    # before the test's cleanup has destroyed its domains.
    with log_file.with_suffix(".out").open("wb") as out:
        return subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen[bytes], log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{_tail(log_file)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout:.0f}s:\n{_tail(log_file)}")
        time.sleep(0.1)


def _tail(log_file: Path, lines: int = 30) -> str:
    texts = []
    for f in (log_file, log_file.with_suffix(".out")):
        with contextlib.suppress(OSError):
            texts += f.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(texts)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def running_libvirtd(log_dir: Path, timeout: float = 30) -> Iterator[Libvirtd]:
    """Yield a system libvirtd: reuse one that answers, else start (and later stop) our own."""
    if os.geteuid() != 0:
        raise RuntimeError("the libvirt VM tests start a system libvirtd and need root")
    log_dir.mkdir(parents=True, exist_ok=True)
    daemon = Libvirtd(SYSTEM_URI, log_dir)
    ensure_installed()
    ensure_qemu_user()
    with kvm_group_access():
        if SOCKET.exists() and _answers(SYSTEM_URI):
            yield daemon
        else:
            with _own_daemons(daemon, timeout):
                yield daemon


@contextlib.contextmanager
def _own_daemons(daemon: Libvirtd, timeout: float) -> Iterator[None]:
    log_dir = daemon.log_dir
    try:
        if not (VIRTLOGD_SOCKET.exists() and _is_listening(VIRTLOGD_SOCKET)):
            VIRTLOGD_SOCKET.unlink(missing_ok=True)
            log = log_dir / "virtlogd.log"
            proc = _spawn(["virtlogd"], log)
            daemon.started.append(proc)
            _wait_for(VIRTLOGD_SOCKET, proc, log, timeout)
        # A socket left by a daemon that was SIGKILLed would make the wait
        # below succeed at once.
        SOCKET.unlink(missing_ok=True)
        log = log_dir / "libvirtd.log"
        proc = _spawn(["libvirtd"], log)
        daemon.started.append(proc)
        _wait_for(SOCKET, proc, log, timeout)
        deadline = time.monotonic() + timeout
        while not _answers(SYSTEM_URI):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"libvirtd does not answer on {SYSTEM_URI}:\n{_tail(log)}")
            time.sleep(0.2)
        yield
    finally:
        # libvirtd first: it still talks to virtlogd while it shuts down.
        for proc in reversed(daemon.started):
            _stop(proc)


def _is_listening(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True
