"""One paramiko wrapper for every guest connection.

The guest's host key is one vmbuild generated and injected, so it is pinned:
there is no trust-on-first-use, and a mismatch is an error, not a prompt.
Commands run as root through one `sudo -n` per command: the script arrives on
the channel's stdin (one exec instead of an SFTP upload and a second sudo to
delete it: ~0.9 s less per AWSTOE step under TCG), is staged on tmpfs, and
runs with stdin from /dev/null, wrapped in coreutils `timeout`, which kills
the whole process group in the guest.

Nothing is sent without being checked. paramiko's pipelined SFTP writes drop
the server's errors (on a full guest disk the file lands empty and no
exception is raised), so uploads are written acknowledged, their size is
compared, and the script's sha256 is checked by the very command that runs it.
Scripts and `put()` payloads are staged on the guest's tmpfs (/dev/shm): a
full disk cannot truncate them, and rendered parameters (secrets included)
never reach the disk that becomes the image.

The host never trusts the guest to end a command: every command has a host
deadline (the guest timeout plus grace), and a watchdog (`alive`) is polled
about once a second, raising as soon as the VM exits or its console shows a
panic, however quiet the connection.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import math
import select
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from shlex import quote
from typing import Self

import paramiko

from vmbuild.errors import SSHError, SSHTimeout, TransferError
from vmbuild.remote.base import OutputCallback, RemoteResult

log = logging.getLogger("vmbuild.ssh")
logging.getLogger("paramiko").setLevel(logging.WARNING)
# The transport thread logs every failed handshake with a traceback at ERROR,
# and then raises it to connect(), which retries (sshd starting or stopping
# around a boot) or names it in its own error: the log would only repeat it.
logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)

# coreutils timeout(1): 124 when the command ended on SIGTERM, 137 (128+9)
# when `-k` had to SIGKILL it after KILL_GRACE.
TIMEOUT_EXITS = (124, 137)
KILL_GRACE = 10  # seconds between SIGTERM and SIGKILL in the guest
# The host gives up on a command this long after the guest's own timeout(1)
# should have ended it (a hung guest kernel never reports back).
HOST_GRACE = 30.0
# Internal commands (install, cat, df) are bounded too.
INTERNAL_TIMEOUT = 120.0
# How long a dropped connection may take to become a named cause (a guest
# powering off closes sshd's connections seconds before QEMU exits).
LOST_GRACE = 60.0
STAGE_DIR = "/dev/shm"
MISMATCH_EXIT = 250
# Readiness polling: a refused or banner-less attempt costs little, and each
# second between polls is a second added to every boot.
POLL_INTERVAL = 0.5
FREEZE_LIMIT = 300  # seconds a guest stays frozen at most, whatever the host does
# Root last (it holds the other mount points); thawed by the EXIT trap, also
# when `read` ends on EOF (the host went away) or on its time limit.
FREEZE_COMMAND = (
    "sudo -n bash -c '"
    "mnts=$(findmnt -rn -o TARGET -t ext2,ext3,ext4,xfs | sort -r); "
    'thaw() { for m in $(echo "$mnts" | sort); do fsfreeze -u "$m" 2>/dev/null; done; }; '
    "trap thaw EXIT; sync; "
    'for m in $mnts; do fsfreeze -f "$m" || exit 1; done; '
    f"echo FROZEN; read -r -t {FREEZE_LIMIT} _ || true'"
)
# QEMU's user network never closes the host side of a connection whose guest
# rebooted: a keepalive makes the new guest answer with a reset, so a read on
# the old connection ends instead of blocking forever.
KEEPALIVE = 5
READ_TIMEOUT = 60.0


# Bytes a second: a guest command that reads its stdin slower than this has stopped
# (even TCG's slowest `cat` takes megabytes a second).
STDIN_FLOOR = 1e5
STDIN_CHUNK = 1 << 20


class StdinStalled(TransferError):
    """The guest command stopped reading what the host sends to its stdin."""


def _send_within(chan: paramiko.Channel, data: bytes, budget: float) -> None:
    """Send all of `data` within `budget` seconds in all, not per blocked send
    (a channel timeout alone would allow that much for every chunk)."""
    deadline = time.monotonic() + budget
    sent = 0
    while sent < len(data):
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            chan.settimeout(remaining)
            if chan.closed:
                raise OSError("the channel closed while its input was being sent")
            sent += chan.send(data[sent : sent + STDIN_CHUNK])
        except TimeoutError:
            raise StdinStalled(
                f"the guest stopped reading after {sent} of {len(data)} bytes "
                f"({budget:.0f}s allowed, at least {STDIN_FLOOR / 1e3:.0f} kB/s)"
            ) from None
    chan.settimeout(None)


@dataclass(frozen=True)
class _Exec:
    rc: int  # -1 when no exit status arrived
    out: str
    err: str
    lost: bool = False  # the connection dropped mid-command
    deadline_hit: bool = False  # the host deadline passed first


def ssh_banner(host: str, port: int, timeout: float = 5.0) -> bool:
    """True once sshd answers. QEMU's user network accepts TCP before the guest
    is up, so an accepted connection proves nothing: wait for `SSH-`."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


@dataclass(frozen=True)
class GuestCommand:
    line: str  # the command line (nothing secret: sudo logs it in the guest)
    stdin: bytes  # the script, environment included
    path: str  # where it is staged in the guest
    marker: str  # printed on stderr when what landed differs from what was sent


def run_command(script: str, *, timeout: float | None, env: dict[str, str] | None) -> GuestCommand:
    """The one guest command that runs `script` as root (pure: unit-tested).

    The script is written from stdin to tmpfs, checked against its sha256 (a
    full tmpfs or a short write is an error, not an empty script), run with
    stdin from /dev/null and removed. The environment goes inside the script,
    not on the command line: sudo logs its command line to the guest's journal.
    """
    prelude = "".join(f"export {k}={quote(v)}\n" for k, v in (env or {}).items())
    data = (prelude + script).encode()
    digest = hashlib.sha256(data).hexdigest()
    path = f"{STAGE_DIR}/vmbuild-{uuid.uuid4().hex[:12]}.sh"
    marker = f"vmbuild-upload-mismatch-{uuid.uuid4().hex[:8]}"
    # Rounded up: `timeout 0` would mean no limit at all.
    wrapper = f"timeout -k {KILL_GRACE} {math.ceil(timeout)} " if timeout else ""
    # The private umask covers only the staged script (a subshell): the step
    # itself runs with the guest's own umask, or every directory a component
    # creates would be 0700 (nginx answering 403 for its own site root).
    line = (
        f"(umask 077; cat > {path}) && echo '{digest}  {path}' | sha256sum -c --status 2>/dev/null"
        f" || {{ echo {marker} >&2; rm -f {path}; exit {MISMATCH_EXIT}; }}; "
        f"sudo -n {wrapper}bash {path} </dev/null; rc=$?; rm -f {path}; exit $rc"
    )
    return GuestCommand(line, data, path, marker)


def load_public_key(public_openssh: str) -> paramiko.PKey:
    kind, blob = public_openssh.split()[:2]
    return paramiko.PKey.from_type_string(kind, base64.b64decode(blob))


class SSHSession:
    """A connected guest; implements `vmbuild.remote.base.Remote`."""

    def __init__(
        self,
        client: paramiko.SSHClient,
        *,
        host: str,
        port: int,
        user: str,
        key_path: Path,
        host_key: str | None,
        boot_timeout: float,
        alive: Callable[[], None] | None,
    ) -> None:
        self._client = client
        self.host, self.port, self.user = host, port, user
        self.key_path = key_path
        self.host_key = host_key
        self.boot_timeout = boot_timeout
        self._alive = alive

    @property
    def url(self) -> str:
        """The testinfra host URL for this session."""
        return f"paramiko://{self.user}@{self.host}:{self.port}"

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        user: str,
        key_path: Path,
        host_key: str | None = None,
        timeout: float = 30.0,
        alive: Callable[[], None] | None = None,
    ) -> SSHSession:
        """Wait (up to `timeout`) for sshd, then log in with the key.

        `host_key` (an OpenSSH public key line) pins the server; None accepts any
        key and is only for `--host` targets the user vouches for. `alive` is
        called between attempts and raises if the VM died, so a crashed guest
        fails at once with its console instead of after the whole timeout.
        """
        deadline = time.monotonic() + timeout
        pkey = paramiko.Ed25519Key.from_private_key_file(str(key_path))
        last_error = "no SSH banner"
        while True:
            if alive is not None:
                alive()
            if ssh_banner(host, port):
                client = paramiko.SSHClient()
                if host_key is None:
                    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
                else:
                    client.set_missing_host_key_policy(paramiko.RejectPolicy())
                    name = host if port == 22 else f"[{host}]:{port}"
                    pinned = load_public_key(host_key)
                    client.get_host_keys().add(name, pinned.get_name(), pinned)
                try:
                    client.connect(
                        host, port=port, username=user, pkey=pkey, timeout=10,
                        banner_timeout=30, auth_timeout=30,
                        look_for_keys=False, allow_agent=False,
                    )  # fmt: skip
                    transport = client.get_transport()
                    if transport is not None:
                        transport.set_keepalive(KEEPALIVE)
                    return cls(
                        client, host=host, port=port, user=user, key_path=key_path,
                        host_key=host_key, boot_timeout=timeout, alive=alive,
                    )  # fmt: skip
                except paramiko.BadHostKeyException as exc:
                    client.close()
                    raise SSHError(
                        f"{host}:{port} presented an unexpected SSH host key "
                        f"({exc.key.get_name()}); refusing to connect",
                        hint="another VM may be using this port, or the seed was not applied",
                    ) from None
                except (paramiko.SSHException, OSError, EOFError) as exc:
                    # Before cloud-init installs the key, login fails: retry.
                    client.close()
                    last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise SSHTimeout(
                    f"no SSH login to {user}@{host}:{port} within {timeout:.0f}s ({last_error})"
                )
            time.sleep(POLL_INTERVAL)

    # -- Remote ------------------------------------------------------------
    def run(
        self,
        script: str,
        *,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        env: dict[str, str] | None = None,
    ) -> RemoteResult:
        command = run_command(script, timeout=timeout, env=env)
        host_limit = timeout + KILL_GRACE + HOST_GRACE if timeout else None
        start = time.monotonic()
        res = self._exec(command.line, on_output=on_output, timeout=host_limit, stdin=command.stdin)
        duration = time.monotonic() - start
        if res.rc == MISMATCH_EXIT and command.marker in res.err:
            raise self._transfer_error(command.path, "what landed differs from what was sent")
        if res.lost:
            self._name_lost_connection("running a command")
        timed_out = res.deadline_hit or (
            bool(timeout) and res.rc in TIMEOUT_EXITS and duration >= (timeout or 0) - 1
        )
        return RemoteResult(res.rc, res.out, res.err, duration, timed_out)

    def put(self, data: bytes, path: str, *, mode: int = 0o644) -> None:
        tmp = f"{STAGE_DIR}/vmbuild-put-{uuid.uuid4().hex[:12]}"
        self._upload(tmp, data, 0o600)
        res = self._exec(
            f"sudo -n install -D -m {mode:o} {quote(tmp)} {quote(path)}; rc=$?; rm -f {quote(tmp)};"
            " exit $rc",
            timeout=INTERNAL_TIMEOUT + len(data) / 1e6,
        )
        self._check_write(res, path)

    def put_streamed(self, data: bytes, path: str, *, mode: int = 0o600) -> None:
        """Write a large file through one command's stdin, checked by its sha256 in the
        guest. `put`'s SFTP waits for every 32 KiB write's acknowledgement: under TCG a
        60 MiB container parent layer took 100 s that way (13.5 s to unpack)."""
        digest = hashlib.sha256(data).hexdigest()
        q = quote(path)
        script = (
            f'umask 077; mkdir -p -- "$(dirname -- {q})" && cat > {q} && chmod {mode:o} {q}'
            f" && echo '{digest}  '{q} | sha256sum -c --quiet --strict"
        )
        try:
            res = self._exec(
                f"sudo -n sh -c {quote(script)}", stdin=data,
                timeout=INTERNAL_TIMEOUT + len(data) / STDIN_FLOOR,
            )  # fmt: skip
        except StdinStalled as exc:
            raise TransferError(f"cannot write {path} in the guest: {exc}") from None
        self._check_write(res, path)

    def _check_write(self, res: _Exec, path: str) -> None:
        """Raise for a write to `path` that did not complete, naming a full disk."""
        if res.lost or res.deadline_hit:
            self._name_lost_connection(f"writing {path}")
        if res.rc != 0:
            detail = (res.err or res.out).strip()
            if "No space left" in detail:
                detail += f" ({self._space_report() or 'the guest disk is full'})"
            raise TransferError(f"cannot write {path} in the guest: {detail}")

    def get(self, path: str, *, timeout: float = READ_TIMEOUT) -> bytes:
        if self._alive is not None:
            self._alive()
        chan = self._open(f"sudo -n cat -- {quote(path)}")
        chan.settimeout(timeout)
        try:
            data = chan.makefile("rb").read()
            err = chan.makefile_stderr("rb").read().decode(errors="replace")
            rc = chan.recv_exit_status()
        except TimeoutError:
            raise SSHError(
                f"reading {path} from the guest timed out after {timeout:.0f}s"
            ) from None
        finally:
            chan.close()
        if rc != 0:
            raise SSHError(f"cannot read {path} in the guest: {err.strip()}")
        return bytes(data)

    def boot_id(self, timeout: float = READ_TIMEOUT) -> str:
        return self.get("/proc/sys/kernel/random/boot_id", timeout=timeout).decode().strip()

    def reboot(self) -> None:
        before = self.boot_id()
        log.info("rebooting the guest")
        # Detach the reboot so the command returns before sshd goes away. A
        # timer's default AccuracySec is a minute: systemd may fire it anywhere
        # in 1-61 s to coalesce wake-ups (18 s measured, 30 s on average).
        scheduled = self._exec(
            "sudo -n systemd-run --no-block --on-active=1 "
            "--timer-property=AccuracySec=100ms systemctl reboot",
            timeout=60,
        )
        if not scheduled.lost and scheduled.rc > 0:
            # Otherwise the wait below would sit out the whole boot timeout.
            why = (scheduled.err or scheduled.out).strip() or "no reason given"
            raise SSHError(f"the guest refused to schedule its reboot (exit {scheduled.rc}): {why}")
        self._client.close()
        deadline = time.monotonic() + self.boot_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SSHError(f"the guest did not come back within {self.boot_timeout:.0f}s")
            fresh = SSHSession.connect(
                self.host, self.port, self.user, self.key_path, self.host_key,
                timeout=remaining, alive=self._alive,
            )  # fmt: skip
            try:
                # Bounded: this may be a login to the old system going down.
                now = fresh.boot_id(timeout=20)
            except (SSHError, paramiko.SSHException, OSError, EOFError):
                fresh.close()
                time.sleep(2)
                continue
            if now != before:
                self._client = fresh._client
                return
            fresh.close()  # still the old boot, going down
            time.sleep(2)

    @contextlib.contextmanager
    def frozen(self, timeout: float = 120.0) -> Iterator[None]:
        """Hold the guest's filesystems frozen (flushed, journals checkpointed)
        for the duration of the block: its disk is then clean as it stands.

        The freeze lives in one guest command that thaws when the host says
        so, when its connection drops, or after FREEZE_LIMIT seconds: a host
        that dies mid-checkpoint never leaves the guest frozen.
        """
        chan = self._open(FREEZE_COMMAND, keep_stdin=True)
        try:
            chan.settimeout(timeout)
            got = b""
            while b"FROZEN\n" not in got:
                chunk = chan.recv(256)
                if not chunk:
                    err = chan.recv_stderr(4096).decode(errors="replace").strip()
                    raise SSHError(f"cannot freeze the guest's filesystems: {err or 'no reason'}")
                got += chunk
            yield
            chan.sendall(b"thaw\n")
            chan.shutdown_write()
            if not chan.status_event.wait(timeout):
                raise SSHError(f"the guest did not thaw its filesystems within {timeout:.0f}s")
            rc = chan.recv_exit_status()
            if rc != 0:
                raise SSHError(f"thawing the guest's filesystems failed (exit {rc})")
        except TimeoutError:
            raise SSHError(
                f"freezing the guest's filesystems timed out after {timeout:.0f}s"
            ) from None
        except (paramiko.SSHException, EOFError) as exc:
            raise SSHError(f"freezing the guest's filesystems: {exc}") from None
        finally:
            chan.close()

    # -- internals ---------------------------------------------------------
    def _upload(self, path: str, data: bytes, mode: int) -> None:
        """Write `data` to `path` over SFTP, every write acknowledged, and check
        the size that landed; raise TransferError (naming a full disk) if not."""
        if self._alive is not None:
            self._alive()
        try:
            with self._client.open_sftp() as sftp, sftp.open(path, "wb") as f:
                # A guest that stopped answering must not hang the upload.
                f.settimeout(INTERNAL_TIMEOUT + len(data) / 1e6)
                # Restricted before the first byte is written (/dev/shm is shared).
                f.chmod(mode)
                # Not pipelined: each write waits for the server's status, so
                # ENOSPC/EIO raise here instead of vanishing.
                f.set_pipelined(False)
                f.write(data)
                f.flush()
                landed = f.stat().st_size
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise self._transfer_error(path, f"{type(exc).__name__}: {exc}") from None
        if landed != len(data):
            raise self._transfer_error(path, f"{landed} of {len(data)} bytes landed")

    def _transfer_error(self, path: str, why: str) -> TransferError:
        space = self._space_report()
        return TransferError(
            f"cannot upload {path} to the guest: {why}" + (f"; {space}" if space else ""),
            hint="a step filled the guest's disk or memory" if space else None,
        )

    def _space_report(self) -> str:
        """Name the guest filesystems that are full ('' if none, or unknown)."""
        try:
            res = self._exec(f"df -Pk / /tmp {STAGE_DIR} 2>/dev/null", timeout=30)
        except (SSHError, paramiko.SSHException, OSError, EOFError):
            return ""
        full = []
        for line in res.out.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 6 and fields[3].isdigit() and int(fields[3]) < 1024:
                mount = fields[5]
                what = "memory (tmpfs)" if mount == STAGE_DIR else "disk"
                item = f"the guest's {what} is full ({mount}: {fields[3]} KiB free)"
                if item not in full:
                    full.append(item)
        return "; ".join(full)

    def _name_lost_connection(self, doing: str) -> None:
        """A connection that drops mid-command means the guest went away: wait
        (briefly) for the watchdog to name why, else say the connection was lost."""
        end = time.monotonic() + LOST_GRACE
        while self._alive is not None and time.monotonic() < end:
            self._alive()  # raises GuestStopped once the VM has stopped
            time.sleep(0.5)
        if self._transport_alive():
            raise SSHError(
                f"the guest ended the SSH session without an exit status while {doing}"
                " (its shell was killed in the guest)"
            )
        raise SSHError(f"the SSH connection to {self.host}:{self.port} was lost while {doing}")

    def _open(
        self, command: str, stdin: bytes = b"", *, keep_stdin: bool = False
    ) -> paramiko.Channel:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise SSHError(f"SSH connection to {self.host}:{self.port} is closed")
        chan = transport.open_session()
        chan.exec_command(command)
        if stdin:
            try:
                _send_within(chan, stdin, max(INTERNAL_TIMEOUT, len(stdin) / STDIN_FLOOR))
            except BaseException:
                chan.close()  # else the guest's reader waits on a channel nobody feeds
                raise
        if not keep_stdin:
            chan.shutdown_write()  # then EOF: a guest command never waits on the host
        return chan

    def _exec(
        self,
        command: str,
        on_output: OutputCallback | None = None,
        timeout: float | None = INTERNAL_TIMEOUT,
        stdin: bytes = b"",
    ) -> _Exec:
        """Run a command, streaming lines, until it exits, the connection drops
        (`lost`), the host deadline passes (`deadline_hit`) or the watchdog raises."""
        if self._alive is not None:
            self._alive()
        try:
            chan = self._open(command, stdin)
        except StdinStalled:
            raise  # the connection is up: the guest command stopped reading its input
        except (SSHError, paramiko.SSHException, OSError, EOFError) as exc:
            log.info("cannot start a command: %s", exc)
            return _Exec(-1, "", str(exc), lost=True)
        bufs = {"stdout": b"", "stderr": b""}
        parts: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        deadline = None if timeout is None else time.monotonic() + timeout

        def feed(stream: str, data: bytes, final: bool = False) -> None:
            parts[stream].append(data)
            bufs[stream] += data
            *lines, bufs[stream] = bufs[stream].split(b"\n")
            if final and bufs[stream]:
                lines.append(bufs[stream])
                bufs[stream] = b""
            for line in lines:
                text = line.decode("utf-8", "replace")
                log.debug("[%s] %s", stream, text)
                if on_output is not None:
                    on_output(stream, text)

        rc = -1
        lost = deadline_hit = False
        try:
            while True:
                select.select([chan], [], [], 1.0)
                got = False
                while chan.recv_ready():
                    feed("stdout", chan.recv(65536))
                    got = True
                while chan.recv_stderr_ready():
                    feed("stderr", chan.recv_stderr(65536))
                    got = True
                if not got and chan.exit_status_ready():
                    rc = chan.recv_exit_status()
                    # paramiko also reports "ready" when the channel merely
                    # closed, with -1 (a real exit status is 0-255): the
                    # session ended without a result because sshd or the whole
                    # VM went away (QEMU killed, the guest powering off). The
                    # caller lets the watchdog name the cause.
                    lost = rc == -1
                    break
                if not got and (chan.closed or not self._transport_alive()):
                    lost = True
                    break
                if self._alive is not None:
                    self._alive()
                if deadline is not None and time.monotonic() > deadline:
                    log.warning("no answer from the guest within %.0fs; giving up", timeout)
                    deadline_hit = True
                    break
        except (paramiko.SSHException, OSError, EOFError) as exc:
            log.info("connection lost while running a command: %s", exc)
            lost = True
        finally:
            feed("stdout", b"", final=True)
            feed("stderr", b"", final=True)
            chan.close()
        out = b"".join(parts["stdout"]).decode("utf-8", "replace")
        err = b"".join(parts["stderr"]).decode("utf-8", "replace")
        return _Exec(rc, out, err, lost, deadline_hit)

    def _transport_alive(self) -> bool:
        transport = self._client.get_transport()
        return transport is not None and transport.is_active()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
