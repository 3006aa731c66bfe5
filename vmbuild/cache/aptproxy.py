"""The host package cache: apt-cacher-ng run by vmbuild as the invoking user.

Guests on QEMU user networking reach the host's loopback through the gateway
address 10.0.2.2, so a proxy bound to 127.0.0.1 serves them without being
exposed to anything else. One instance per cache dir is shared by every build
of the user (and by the whole test suite): a shared flock on `users.lock`
marks each build using it, and the last one out stops it. Its config, cache
and logs live under `<cache dir>/apt-cacher-ng/`, so packages survive between
builds and between test runs.

The setting (`--apt-proxy` / `$VMBUILD_APT_PROXY`): `auto` (default) starts or
joins the shared instance, `off` goes direct, an `http://127.0.0.1:PORT` URL
names a running instance the user manages.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from vmbuild import paths
from vmbuild.errors import VmbuildError
from vmbuild.run import spawn, which, write_atomic

log = logging.getLogger("vmbuild.aptproxy")

ENV = "VMBUILD_APT_PROXY"
# QEMU user networking (slirp) maps its gateway address to the host's loopback.
GUEST_GATEWAY = "10.0.2.2"
# The one file the guest gets; generalize removes it and verify proves it gone.
# apt settings for the build only (the proxy, no translations); generalize
# deletes the file and the offline verify fails an image that still has it.
GUEST_CONF = "/etc/apt/apt.conf.d/00vmbuild-build"
BINARY = "apt-cacher-ng"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
LOOPBACK = {"127.0.0.1", "localhost"}
PORT_RANGE = (20000, 32767)


class AptProxyError(VmbuildError):
    pass


@dataclass(frozen=True)
class AptProxy:
    port: int
    owned: bool  # True: vmbuild's own shared instance (its log is readable)
    state_dir: Path | None = None

    @property
    def host_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def guest_url(self) -> str:
        return f"http://{GUEST_GATEWAY}:{self.port}"

    @property
    def transfer_log(self) -> Path | None:
        """apt-cacher-ng's transfer log: `I` lines are bytes fetched from outside."""
        return None if self.state_dir is None else self.state_dir / "log" / "apt-cacher.log"


# An offline rebuild's mirror as the guest reaches it: a QEMU guest forward (the
# only way out of a `restrict=on` user network) to vmbuild.supply.mirror on the host.
OFFLINE_ADDRESS = "10.0.2.100"


def guest_apt_conf(proxy_url: str | None, *, builder: bool, offline: bool = False) -> str | None:
    """The apt configuration a guest gets, or None when it needs none.

    `proxy_url`: the host package cache (HTTPS sources stay direct: not
    cacheable). `builder`: a builder or scratch VM, whose `apt-get update` skips
    the Translation-* indexes. Nothing in a build reads them (apt-cache's long
    descriptions at most), the lists are deleted when the image is generalized,
    and they are the larger part of a cold update: 6.1 of 15.8 MB for bookworm,
    plus their parse under TCG. The test VM is the image as it is: not touched.

    `offline`: the proxy is the bundle's mirror behind a guest forward, which carries
    every guest connection over one host connection, one after another: apt must not
    open two at once (one queue for all hosts) nor pipeline requests; pdiffs and
    translations, which the bundle does not carry, are not asked for."""
    lines = []
    if proxy_url is not None:
        lines.append(f'Acquire::http::Proxy "{proxy_url}";')
    if offline:
        lines += [
            'Acquire::Queue-Mode "access";',
            'Acquire::http::Pipeline-Depth "0";',
            'Acquire::PDiffs "false";',
        ]
    if builder or offline:
        lines.append('Acquire::Languages "none";')
    if not lines:
        return None
    header = "// Written by vmbuild for the build only; removed when the image is generalized."
    return "\n".join([header, *lines, ""])


def parse_setting(value: str | None) -> str | int | None:
    """`auto` -> "auto", `off` -> None, a loopback URL -> its port. Errors name the setting."""
    text = (value or os.environ.get(ENV) or "auto").strip()
    if text in ("auto", ""):
        return "auto"
    if text in ("off", "none", "direct"):
        return None
    parts = urlsplit(text)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK or parts.port is None:
        raise AptProxyError(
            f"apt proxy {text!r}: expected auto, off or http://127.0.0.1:PORT",
            hint="guests reach the host's loopback only (through the user-network gateway)",
        )
    return parts.port


def config_text(state: Path, port: int) -> str:
    """acng.conf for vmbuild's own instance (pure: unit-tested)."""
    return "\n".join(
        [
            f"CacheDir: {state / 'cache'}",
            f"LogDir: {state / 'log'}",
            "SupportDir: /usr/lib/apt-cacher-ng",
            f"Port: {port}",
            "BindAddress: 127.0.0.1",
            f"PidFile: {state / 'run' / 'pid'}",
            f"SocketPath: {state / 'run' / 'socket'}",
            "ForeGround: 1",
            "ReportPage: acng-report.html",
            "ExThreshold: 4",
            # A --mirror may be served on any port (a local mirror on :8080).
            "AllowUserPorts: 0",
            # Debian's own acng.conf remaps mirror names into shared namespaces
            # with files we do not own; without it a URL is cached by host/path.
            "",
        ]
    )


def argv(state: Path) -> list[str]:
    return [BINARY, "-c", str(state / "conf")]


def _answers(port: int, timeout: float = 1.0) -> bool:
    """True when apt-cacher-ng serves its report page on the port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET /acng-report.html HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            return s.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False


def _is_ours(pid: int, state: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        bool(cmdline)
        and cmdline[0].endswith(BINARY.encode())
        and (str(state / "conf").encode() in cmdline)
    )


def _read_instance(state: Path) -> tuple[int, int] | None:
    try:
        data = json.loads((state / "instance.json").read_text())
        return int(data["pid"]), int(data["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _free_port() -> int:
    """A free port apt-cacher-ng can take: 3.7.4 reads `Port` as a signed 16-bit
    number and fails ("Error resolving address for binding") above 32767, where
    the kernel's ephemeral ports are; so pick one below."""
    for _ in range(200):
        port = secrets.randbelow(PORT_RANGE[1] - PORT_RANGE[0]) + PORT_RANGE[0]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AptProxyError(f"no free port in {PORT_RANGE[0]}-{PORT_RANGE[1]} on 127.0.0.1")


def _start(state: Path) -> tuple[subprocess.Popen[bytes], int]:
    if which(BINARY) is None:
        raise AptProxyError(f"{BINARY} is not installed", hint="run scripts/install-host-deps")
    for sub in ("conf", "cache", "log", "run"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    port = _free_port()
    write_atomic(state / "conf" / "acng.conf", config_text(state, port))
    with (state / "log" / "daemon.out").open("ab") as out:
        # Shared by every build of the user: it must outlive the one that started it.
        proc = spawn(argv(state), stdout=out, shared_daemon=True)
    deadline = time.monotonic() + START_TIMEOUT
    while not _answers(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            _terminate(proc.pid, proc)
            tail = (state / "log" / "daemon.out").read_text(errors="replace")[-500:]
            raise AptProxyError(f"{BINARY} did not start on 127.0.0.1:{port}: {tail.strip()}")
        time.sleep(0.05)
    write_atomic(state / "instance.json", json.dumps({"pid": proc.pid, "port": port}))
    return proc, port


def _terminate(pid: int, proc: subprocess.Popen[bytes] | None) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if proc is not None:
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return
    deadline = time.monotonic() + STOP_TIMEOUT
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def shared_instance(state: Path | None = None) -> Iterator[AptProxy]:
    """Join (or start) the user's shared apt-cacher-ng; stop it if we are the last user."""
    state = state or paths.cache_dir() / "apt-cacher-ng"
    state.mkdir(parents=True, exist_ok=True)
    proc: subprocess.Popen[bytes] | None = None
    users: IO[str] = (state / "users.lock").open("a")
    try:
        with _locked(state / "start.lock"):
            fcntl.flock(users, fcntl.LOCK_SH)
            found = _read_instance(state)
            if found and _is_ours(found[0], state) and _answers(found[1]):
                pid, port = found
                log.info("joining the running package cache on 127.0.0.1:%d", port)
            else:
                proc, port = _start(state)
                pid = proc.pid
                log.info("started the package cache on 127.0.0.1:%d (pid %d)", port, pid)
        yield AptProxy(port=port, owned=True, state_dir=state)
    finally:
        with _locked(state / "start.lock"):
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except BlockingIOError:
                last = False  # another build still uses it
            if last:
                found = _read_instance(state)
                if found and _is_ours(found[0], state):
                    _terminate(found[0], proc if proc and proc.pid == found[0] else None)
                (state / "instance.json").unlink(missing_ok=True)
            users.close()


@contextlib.contextmanager
def host_package_cache(
    setting: str | None, on_status: Callable[[str], None] | None = None
) -> Iterator[AptProxy | None]:
    """The proxy a build's guests use, or None (direct) when off or unavailable."""
    status = on_status or (lambda _m: None)
    chosen = parse_setting(setting)
    if chosen is None:
        yield None
        return
    if isinstance(chosen, int):
        if not _answers(chosen):
            status(f"package cache 127.0.0.1:{chosen} does not answer; guests fetch directly")
            yield None
            return
        status(f"package cache: 127.0.0.1:{chosen} (shared)")
        yield AptProxy(port=chosen, owned=False)
        return
    with contextlib.ExitStack() as stack:
        try:
            proxy = stack.enter_context(shared_instance())
        except (VmbuildError, OSError) as exc:
            status(f"package cache unavailable ({exc}); guests fetch directly")
            yield None
            return
        status(f"package cache: apt-cacher-ng on 127.0.0.1:{proxy.port}")
        yield proxy


def fetched_from_outside(transfer_log: Path, since: int = 0) -> list[tuple[int, str]]:
    """(bytes, path) of each file apt-cacher-ng fetched from outside (its `I` lines)
    after byte offset `since`; the path is "" where the line names none."""
    found = []
    try:
        with transfer_log.open("rb") as f:
            f.seek(since)
            for line in f:
                fields = line.decode(errors="replace").rstrip("\n").split("|")
                if len(fields) >= 3 and fields[1] == "I" and fields[2].isdigit():
                    found.append((int(fields[2]), fields[4] if len(fields) >= 5 else ""))
    except FileNotFoundError:
        return []
    return found


def fetched_bytes(transfer_log: Path, since: int = 0) -> int:
    """Bytes apt-cacher-ng fetched from outside after byte offset `since`."""
    return sum(size for size, _path in fetched_from_outside(transfer_log, since))
