"""The only way vmbuild starts external processes.

Every command is logged with its quoted argv, gets stdin from /dev/null (so a
prompt can never hang a build), a pinned `LC_ALL=C` environment and an optional
timeout, and raises `CommandError(argv, rc, output_tail)` on failure. Long-lived
processes (QEMU) go through `spawn()`, so they are logged the same way.
qemu-img goes through `run()` too (an earlier second path through the `sh`
library had no process-group kill and leaked its child on SIGTERM).

No orphans: every child is started with PR_SET_PDEATHSIG=SIGKILL, so the
kernel kills it the moment vmbuild dies, even by SIGKILL (a signal handler or
atexit never runs then). Chosen over a pidfd monitor or a watcher process
because it costs nothing and needs nobody alive to act. Its catch: the signal
fires when the *thread* that forked the child exits, not the process. That is
safe here because both entry points keep the child within the forking
thread's lifetime: `run()` waits for its child in the thread that started it,
and `spawn()`'s caller (a VM context manager) reaps the VM in the thread that
entered it. A child spawned from a short-lived thread would die with that
thread: an early kill, never an orphan. Grandchildren do not inherit it;
they share the child's process group, which the reaper (vmbuild/runs.py)
kills on the next command, from the pids each run records there.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from vmbuild import runs
from vmbuild.errors import CommandError, CommandTimeout, quote_argv

log = logging.getLogger("vmbuild.run")

TAIL_LINES = 25


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl


def _die_with_parent(parent: int) -> Callable[[], None]:
    """The preexec hook: between fork and exec, ask for SIGKILL on the parent's death.

    Looked up before the fork; the hook itself only makes two system calls.
    """

    def hook() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody would
        # ever send the signal, so go now.
        if os.getppid() != parent:
            os._exit(1)

    return hook


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # Tools parse each other's output (qemu-img, sfdisk): pin the locale.
    env["LC_ALL"] = "C.UTF-8"
    if extra:
        env.update(extra)
    return env


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    input: bytes | None = None,
    check: bool = True,
    on_line: Callable[[str], None] | None = None,
    on_frame: Callable[[str], None] | None = None,
    merge_stderr: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; stdout and stderr are merged into `.stdout`
    unless `merge_stderr` is False (for commands whose stdout is data).

    `on_line` receives each output line as it arrives (progress and run log);
    otherwise output is captured and logged at debug level. A line a tool
    redraws with carriage returns (`qemu-img convert -p`, apt) reaches
    `on_frame` frame by frame as it is drawn; `on_line` and the log get only
    its last frame (see FrameSplitter).
    """
    args = [str(a) for a in argv]
    log.info("$ %s", quote_argv(args))
    stdin: int | IO[bytes] = subprocess.DEVNULL if input is None else subprocess.PIPE
    try:
        proc = subprocess.Popen(
            args,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            env=_env(env),
            cwd=cwd,
            # Its own process group, so a timeout or Ctrl-C stops the whole
            # tree (mmdebstrap's apt and dpkg, not just mmdebstrap).
            process_group=0,
            preexec_fn=_die_with_parent(os.getpid()),
        )
    except FileNotFoundError as exc:
        raise CommandError(args, 127, f"{args[0]}: not found (is it installed?)") from exc
    runs.track(proc.pid)
    try:
        return _wait(proc, args, timeout, input, check, on_line, on_frame, merge_stderr)
    finally:
        runs.untrack(proc.pid)


class FrameSplitter:
    """Cuts a byte stream into lines (ended by `\\n` or `\\r\\n`) and frames (ended by a
    lone `\\r`: the tool will redraw the same line).

    Each frame goes to `on_frame` the moment its `\\r` arrives, so a progress
    display moves while the tool draws (reading by lines, it would arrive in one
    piece at the next `\\n`, i.e. at the end). Only the last frame of a redraw
    becomes a line (`on_line`, hence the log and the error tail): a convert of
    10 000 frames logs one line, and apt's frames are not glued into one.
    Blank frames (a tool clearing its line) are dropped. Bytes are cut before
    decoding: `\\r` and `\\n` never occur inside a UTF-8 sequence.
    """

    def __init__(
        self, on_line: Callable[[str], None], on_frame: Callable[[str], None] | None = None
    ) -> None:
        self.on_line = on_line
        self.on_frame = on_frame
        self._buf = b""
        self._frame: str | None = None  # the last frame not yet handed over as a line

    def feed(self, data: bytes) -> None:
        self._buf += data
        while True:
            cut = min((i for i in (self._buf.find(b"\r"), self._buf.find(b"\n")) if i >= 0),
                      default=-1)  # fmt: skip
            if cut < 0:
                return
            if self._buf[cut] == ord("\n"):
                self._line(self._buf[:cut])
                self._buf = self._buf[cut + 1 :]
                continue
            # A frame: handed over now, even when its `\\n` (a `\\r\\n` ending) is
            # still on its way; `_line(b"")` then makes the frame the line.
            self._frame_done(self._buf[:cut])
            if self._buf[cut + 1 : cut + 2] == b"\n":
                self._line(b"")
                self._buf = self._buf[cut + 2 :]
            else:
                self._buf = self._buf[cut + 1 :]

    def close(self) -> None:
        """End of stream: an unterminated rest is a line, else a pending frame is."""
        if self._buf:
            self._line(self._buf)
        else:
            self._flush_frame()
        self._buf = b""

    def _frame_done(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace")
        if not text.strip():
            return
        self._frame = text
        if self.on_frame is not None:
            self.on_frame(text)

    def _line(self, raw: bytes) -> None:
        if not raw and self._frame is not None:
            # `frame\\r\\n` (qemu-img's last frame): the frame is the line.
            self._flush_frame()
            return
        # Text after frames with no newline between redraws the same terminal
        # line: it is the final state, the frames before it are not lines.
        self._frame = None
        self.on_line(raw.decode("utf-8", "replace"))

    def _flush_frame(self) -> None:
        if self._frame is not None:
            text, self._frame = self._frame, None
            self.on_line(text)


def read_frames(
    stream: IO[bytes], splitter: FrameSplitter, raw: Callable[[bytes], None] | None = None
) -> None:
    """Feed `splitter` from `stream` until EOF, handing over whatever has arrived
    (not waiting for a newline); `raw` gets the bytes as read."""
    fd = stream.fileno()
    while chunk := os.read(fd, 65536):
        if raw is not None:
            raw(chunk)
        splitter.feed(chunk)
    splitter.close()


def _wait(
    proc: subprocess.Popen[bytes],
    args: list[str],
    timeout: float | None,
    input: bytes | None,
    check: bool,
    on_line: Callable[[str], None] | None,
    on_frame: Callable[[str], None] | None,
    merge_stderr: bool,
) -> subprocess.CompletedProcess[str]:
    lines: deque[str] = deque(maxlen=TAIL_LINES)
    chunks: list[bytes] = []

    def line(text: str) -> None:
        lines.append(text + "\n")
        if on_line is not None:
            on_line(text)
        else:
            log.debug("  %s", text)

    splitter = FrameSplitter(line, on_frame)

    def pump() -> None:
        assert proc.stdout is not None
        # `.stdout` keeps the bytes as written; only the callbacks, the log and
        # the error tail see lines and frames.
        read_frames(proc.stdout, splitter, chunks.append)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    err_chunks: list[bytes] = []
    err_reader = None
    if not merge_stderr:
        assert proc.stderr is not None
        err_stream = proc.stderr
        err_reader = threading.Thread(target=lambda: err_chunks.append(err_stream.read()))
        err_reader.start()
    try:
        if input is not None:
            assert proc.stdin is not None
            proc.stdin.write(input)
            proc.stdin.close()
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        reader.join(5)
        raise CommandTimeout(args, timeout or 0, "".join(lines)) from None
    except BaseException:
        # Ctrl-C / SIGTERM: never leave the child behind.
        _kill(proc)
        raise
    reader.join()
    stderr = ""
    if err_reader is not None:
        err_reader.join()
        stderr = b"".join(err_chunks).decode("utf-8", "replace")
    output = b"".join(chunks).decode("utf-8", "replace")
    if check and rc != 0:
        raise CommandError(args, rc, stderr[-2000:] + "".join(lines))
    return subprocess.CompletedProcess(args, rc, output, stderr)


def _kill(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the command's process group, SIGKILL it after 5 s; always reap."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue
    # Children that outlived their leader are still in the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def spawn(
    argv: Sequence[str | os.PathLike[str]],
    *,
    stdout: IO[Any] | int | None = subprocess.DEVNULL,
    stdin: IO[Any] | int | None = subprocess.DEVNULL,
    stderr: IO[Any] | int | None = subprocess.STDOUT,
    env: Mapping[str, str] | None = None,
    new_session: bool = True,
    shared_daemon: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a long-running process (a VM). The caller owns reaping it.

    `new_session` keeps a terminal's Ctrl-C away from the child so that vmbuild,
    not the terminal, decides how the VM stops (orderly shutdown, then kill).
    `shared_daemon` is for a service other vmbuild processes join (the package
    cache): it must outlive the process that happened to start it, so it gets
    no PR_SET_PDEATHSIG and is not in this run's record; its own users stop it.
    `stdin`/`stdout` may be pipes: a filter a VM's migration stream runs through.
    """
    args = [str(a) for a in argv]
    log.info("$ %s &", quote_argv(args))
    try:
        proc = subprocess.Popen(
            args,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=_env(env),
            start_new_session=new_session,
            preexec_fn=None if shared_daemon else _die_with_parent(os.getpid()),
        )
    except FileNotFoundError as exc:
        raise CommandError(args, 127, f"{args[0]}: not found (is it installed?)") from exc
    if not shared_daemon:
        # The caller reaps it and calls `reaped()`; until then a reaper may kill it.
        runs.track(proc.pid)
    return proc


def interactive(argv: Sequence[str | os.PathLike[str]]) -> int:
    """Run a command on vmbuild's own terminal (an SSH session a user types into) and
    return its exit status.

    Logged and tracked like every command and killed with vmbuild (PDEATHSIG), but
    in vmbuild's process group with the terminal as stdin: the terminal has to treat
    it as the foreground job. Ctrl-C reaches it through the terminal (ssh passes it
    to the guest); if vmbuild itself is interrupted, the command is stopped first.
    """
    args = [str(a) for a in argv]
    log.info("$ %s", quote_argv(args))
    try:
        proc = subprocess.Popen(args, env=_env(None), preexec_fn=_die_with_parent(os.getpid()))
    except FileNotFoundError as exc:
        raise CommandError(args, 127, f"{args[0]}: not found (is it installed?)") from exc
    runs.track(proc.pid)
    try:
        return proc.wait()
    except BaseException:
        # Not a group leader (it shares the terminal's job): signal it alone.
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        runs.untrack(proc.pid)


def reaped(proc: subprocess.Popen[Any]) -> None:
    """A spawned process was waited for: forget it in the run registry."""
    runs.untrack(proc.pid)


def which(name: str) -> str | None:
    from shutil import which as _which

    return _which(name)


def qemu_img(
    *args: str | os.PathLike[str],
    timeout: float | None = None,
    on_frame: Callable[[str], None] | None = None,
) -> str:
    """Run `qemu-img ARGS` like every other command; returns its stdout (JSON for
    `info --output=json` stays parseable: stderr is kept apart and goes into errors).
    `on_frame` gets the `-p` progress frames as they are drawn."""
    try:
        return run(
            ["qemu-img", *args], timeout=timeout, merge_stderr=False, on_frame=on_frame
        ).stdout
    except CommandError as exc:
        if exc.returncode == 127:
            hint = "qemu-img: not found (apt-get install qemu-utils)"
            raise CommandError(exc.argv, 127, hint) from None
        raise


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write a file so that readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
