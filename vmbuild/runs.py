"""The registry of live vmbuild processes, and the reaper of dead ones.

`PR_SET_PDEATHSIG` (vmbuild/run.py) kills a command the moment vmbuild dies,
even by SIGKILL, but only the direct child: a grandchild (apt under
mmdebstrap) survives it, and files survive everything: a staging dir holding
the guest's host private key and the client key, overlays, QMP sockets. So
every vmbuild command registers itself here, in `<state>/runs/<pid>-<start>/`:

* `lock`, flock'd for the life of the process. The kernel drops the lock
  however the process ends, so "the lock can be taken" means "its owner is
  dead": no pid guessing, no timeout.
* `run.json`: the owner's argv, the child processes it started (pid plus
  kernel start time, so a recycled pid is never killed), the paths it owns and
  its log file.

Each new command first reaps every run whose lock it can take: it kills what
is left of its process groups, deletes its paths, and records it as failed
(`<state>/failed-runs/`, with the tail of its log, the log itself kept under
`<state>/logs/`). Failed-run records and logs older than LOG_RETENTION_DAYS are
pruned at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmbuild import paths

log = logging.getLogger("vmbuild.runs")

RUNS = "runs"
FAILED = "failed-runs"
LOGS = "logs"
LOG_RETENTION_DAYS = 30
TAIL_LINES = 40
NEW_PREFIX = ".new-"


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22),
    or None if there is no such process. (pid, start) names one process for ever."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # Atomic (readers see old or new) but not fsync'd: this guards against a
    # killed process, whose page cache survives it, not against a power loss.
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


class Run:
    """This process's entry in the registry. Thread-safe."""

    def __init__(self, directory: Path, fd: int, info: dict[str, Any]) -> None:
        self.dir = directory
        self._fd = fd
        self.info = info
        self._lock = threading.Lock()

    def _save(self) -> None:
        _write_json(self.dir / "run.json", self.info)

    def track(self, pid: int) -> None:
        """A child process to kill (with its process group) if vmbuild dies."""
        start = proc_start_time(pid)
        if start is None:
            return
        with self._lock:
            self.info["children"].append({"pid": pid, "start": start})
            self._save()

    def untrack(self, pid: int) -> None:
        with self._lock:
            self.info["children"] = [c for c in self.info["children"] if c["pid"] != pid]
            self._save()

    def own(self, path: Path) -> None:
        """A file or directory to delete if vmbuild dies before it does."""
        with self._lock:
            self.info["paths"].append(str(path.absolute()))
            self._save()

    def disown(self, path: Path) -> None:
        with self._lock:
            text = str(path.absolute())
            self.info["paths"] = [p for p in self.info["paths"] if p != text]
            self._save()

    def note(self, **fields: Any) -> None:
        """Record what a reaper should know (`log`: the run log to keep a tail of)."""
        with self._lock:
            self.info.update({k: str(v) if isinstance(v, Path) else v for k, v in fields.items()})
            self._save()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._fd)


_current: Run | None = None
_depth = 0
_register_lock = threading.Lock()


def current() -> Run | None:
    return _current


def track(pid: int) -> None:
    if _current is not None:
        _current.track(pid)


def untrack(pid: int) -> None:
    if _current is not None:
        _current.untrack(pid)


def own(path: Path) -> None:
    if _current is not None:
        _current.own(path)


def disown(path: Path) -> None:
    if _current is not None:
        _current.disown(path)


def note(**fields: Any) -> None:
    if _current is not None:
        _current.note(**fields)


@contextlib.contextmanager
def registered(argv: list[str], state: Path | None = None) -> Iterator[Run]:
    """Register this process for the duration of the block.

    Nested and concurrent calls (threads of one library caller) share one
    registration, closed when the last block ends."""
    global _current, _depth
    with _register_lock:
        if _current is None:
            _current = _open(argv, state)
        _depth += 1
        run = _current
    try:
        yield run
    finally:
        with _register_lock:
            _depth -= 1
            if _depth == 0:
                _current = None
                run.close()


@contextlib.contextmanager
def owning(path: Path) -> Iterator[None]:
    """Own `path` for the block: the next vmbuild command deletes it if this
    process dies first (SIGKILL, OOM) before the block's own cleanup ran.

    The process is registered for the block if it is not already. The CLI
    registers every command; this covers library callers (`build()` from a
    script, the test suite's scratch VMs), whose staging and scratch dirs
    hold keys and overlays and were left behind by a SIGKILL. Their run is
    named by their own argv in the failed-run record."""
    with registered(list(sys.argv)):
        own(path)
        try:
            yield
        finally:
            disown(path)


def _open(argv: list[str], state: Path | None) -> Run:
    root = (state or paths.state_dir()) / RUNS
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    pid = os.getpid()
    name = f"{pid}-{proc_start_time(pid)}"
    # Built under a hidden name and renamed into place with its lock already
    # held: a reaper never sees a registered run whose lock is free.
    tmp = root / f"{NEW_PREFIX}{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    fd = os.open(tmp / "lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    info: dict[str, Any] = {
        "pid": pid, "start": proc_start_time(pid), "argv": argv,
        "started": time.time(), "children": [], "paths": [], "log": None,
    }  # fmt: skip
    _write_json(tmp / "run.json", info)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)  # our pid+start is unique: a leftover of ours
    os.rename(tmp, final)
    return Run(final, fd, info)


@dataclass(frozen=True)
class Reaped:
    name: str
    argv: list[str]
    killed: list[int]
    removed: list[str]
    log_tail: str
    record: Path

    def summary(self) -> str:
        what = " ".join(self.argv[:4]) or "?"
        parts = []
        if self.killed:
            parts.append(f"killed {len(self.killed)} leftover process group(s)")
        if self.removed:
            parts.append(f"removed {len(self.removed)} leftover path(s)")
        return (
            f"an earlier vmbuild run ({what}; {self.name}) died without cleaning up: "
            + (", ".join(parts) or "nothing was left")
            + f"; recorded as failed in {self.record}"
        )


def reap(state: Path | None = None) -> list[Reaped]:
    """Clean up after every registered run whose owner is dead; prune old records."""
    base = state or paths.state_dir()
    root = base / RUNS
    if not root.is_dir():
        return []
    reaped = []
    for entry in sorted(root.iterdir()):
        if _current is not None and entry == _current.dir:
            continue
        try:
            fd = os.open(entry / "lock", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            # A run that died between mkdir and taking its lock (or mid-close).
            if entry.name.startswith(NEW_PREFIX) and _older_than(entry, 60):
                shutil.rmtree(entry, ignore_errors=True)
            continue
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # alive
            if entry.name.startswith(NEW_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
                continue
            reaped.append(_reap_one(entry, base))
        finally:
            os.close(fd)
    _prune(base)
    for r in reaped:
        log.warning("%s", r.summary())
    return reaped


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def _reap_one(entry: Path, base: Path) -> Reaped:
    try:
        info: dict[str, Any] = json.loads((entry / "run.json").read_text())
    except (OSError, ValueError):
        info = {}
    killed = []
    for child in info.get("children", []):
        pid, start = int(child.get("pid", 0)), child.get("start")
        if pid <= 1 or start is None:
            continue
        now = proc_start_time(pid)
        # The leader itself (same pid, same start time), or its group after it
        # died (usually by PR_SET_PDEATHSIG): the kernel never hands out a pid
        # that still names a process group, so a group with this id whose
        # leader pid is free is the one the leader made.
        if now == start or (now is None and _group_exists(pid)):
            _kill_group(pid)
            killed.append(pid)
    # The log usually lives in the staging dir about to be removed: keep it first.
    tail = ""
    kept_log = None
    log_path = info.get("log")
    if log_path and Path(log_path).is_file():
        tail = read_tail(Path(log_path), TAIL_LINES)
        logs = base / LOGS
        logs.mkdir(parents=True, exist_ok=True, mode=0o700)
        kept_log = logs / f"{entry.name}-{Path(log_path).name}"
        with contextlib.suppress(OSError):
            shutil.copyfile(log_path, kept_log)
            kept_log.chmod(0o600)
    removed = []
    for text in info.get("paths", []):
        path = Path(text)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            with contextlib.suppress(OSError):
                path.unlink()
        else:
            continue
        removed.append(text)
        # A failed first build leaves no empty name/version dirs (as store.staging does).
        for parent in (path.parent, path.parent.parent):
            if path.name.startswith(".staging-"):
                with contextlib.suppress(OSError):
                    parent.rmdir()
    failed = base / FAILED
    failed.mkdir(parents=True, exist_ok=True, mode=0o700)
    record = failed / f"{entry.name}.json"
    _write_json(
        record,
        {
            "status": "failed",
            "error": "the vmbuild process died (killed?) before it finished; cleaned up "
            "by a later vmbuild command",
            "argv": info.get("argv", []),
            "pid": info.get("pid"),
            "started": info.get("started"),
            "reaped": time.time(),
            "killed": killed,
            "removed": removed,
            "log": str(kept_log) if kept_log else None,
            "log_tail": tail,
        },
    )
    shutil.rmtree(entry, ignore_errors=True)
    return Reaped(entry.name, list(info.get("argv", [])), killed, removed, tail, record)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(pid: int) -> None:
    """SIGKILL the process group `pid` leads (every command runs in its own),
    else the process alone."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    except PermissionError as exc:
        print(f"vmbuild: cannot kill leftover process {pid}: {exc}", file=sys.stderr)


def _prune(base: Path) -> None:
    cutoff = LOG_RETENTION_DAYS * 86400
    for sub in (FAILED, LOGS):
        directory = base / sub
        if not directory.is_dir():
            continue
        for item in directory.iterdir():
            if _older_than(item, cutoff):
                if item.is_dir():
                    shutil.rmtree(item, ignore_errors=True)
                else:
                    item.unlink(missing_ok=True)


def read_tail(path: Path, lines: int) -> str:
    with path.open("rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 64 * 1024))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])
