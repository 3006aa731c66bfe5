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
    merge_stderr: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; stdout and stderr are merged into `.stdout`
    unless `merge_stderr` is False (for commands whose stdout is data).

    `on_line` receives each output line as it arrives (progress and run log);
    otherwise output is captured and logged at debug level.
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
        return _wait(proc, args, timeout, input, check, on_line, merge_stderr)
    finally:
        runs.untrack(proc.pid)


def _wait(
    proc: subprocess.Popen[bytes],
    args: list[str],
    timeout: float | None,
    input: bytes | None,
    check: bool,
    on_line: Callable[[str], None] | None,
    merge_stderr: bool,
) -> subprocess.CompletedProcess[str]:
    lines: deque[str] = deque(maxlen=TAIL_LINES)
    chunks: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            chunks.append(line)
            lines.append(line)
            if on_line is not None:
                on_line(line.rstrip("\n"))
            else:
                log.debug("  %s", line.rstrip("\n"))

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
    output = "".join(chunks)
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
    """
    args = [str(a) for a in argv]
    log.info("$ %s &", quote_argv(args))
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
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


def reaped(proc: subprocess.Popen[Any]) -> None:
    """A spawned process was waited for: forget it in the run registry."""
    runs.untrack(proc.pid)


def which(name: str) -> str | None:
    from shutil import which as _which

    return _which(name)


def qemu_img(*args: str | os.PathLike[str], timeout: float | None = None) -> str:
    """Run `qemu-img ARGS` like every other command; returns its stdout (JSON for
    `info --output=json` stays parseable: stderr is kept apart and goes into errors)."""
    try:
        return run(["qemu-img", *args], timeout=timeout, merge_stderr=False).stdout
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
