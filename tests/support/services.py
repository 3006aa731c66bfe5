"""Real scale-out components started by the tests on 127.0.0.1, stopped after: Redis
(broker), PostgreSQL (shared history) and vmbuild workers as separate processes with
their own cache dirs (standing in for hosts). Readiness is each program's own
"ready" line, read from its output as it comes."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.motoext import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"  # created by the postgresql package (scripts/install-host-deps)
REPO = Path(__file__).resolve().parents[2]


class Output:
    """A process's merged output, pumped to a log file; waits for a line to appear."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with self.log.open("ab") as out:
            for raw in iter(self.proc.stdout.readline, b""):
                out.write(raw)
                out.flush()
                with self._changed:
                    self.lines.append(raw.decode("utf-8", "replace"))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> str:
        def found() -> str | None:
            return next((line for line in self.lines if text in line), None)

        with self._changed:
            ok = self._changed.wait_for(
                lambda: found() is not None or not self._thread.is_alive(), timeout
            )
            line = found()
        if not ok or line is None:
            raise AssertionError(f"{text!r} not seen in {timeout:.0f}s:\n{self.text()[-3000:]}")
        return line

    def text(self) -> str:
        return "".join(self.lines)


def _start(argv: list[str], log: Path, env: dict[str, str] | None = None,
           user: str | None = None) -> tuple[subprocess.Popen[bytes], Output]:  # fmt: skip
    if user is not None and os.geteuid() == 0:
        argv = ["runuser", "-u", user, "--", *argv]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=env, start_new_session=True,
    )  # fmt: skip
    return proc, Output(proc, log)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throwaway redis-server; yields its URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc, out = _start(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(workdir),
         "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
        workdir / "redis.log",
    )  # fmt: skip
    try:
        out.wait_for("Ready to accept connections", 30)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL cluster (initdb + postgres) owned by the postgres user
    (the server refuses to run as root); yields a URL for its superuser `vmbuild`."""
    # Not under pytest's tmp dirs: their root-only parents are closed to that user.
    data = Path(tempfile.mkdtemp(prefix="vmbuild-pg-"))
    if os.geteuid() == 0:
        user = pwd.getpwnam(PG_USER)
        os.chown(data, user.pw_uid, user.pw_gid)
    run_as = PG_USER if os.geteuid() == 0 else None
    port = free_port()
    try:
        proc, out = _start([str(PG_BIN / "initdb"), "-D", str(data / "db"), "-U", "vmbuild",
                            "--auth=trust", "-E", "UTF8", "--no-sync"],
                           data.with_suffix(".initdb.log"), user=run_as)  # fmt: skip
        assert proc.wait(120) == 0, out.text()
        proc, out = _start(
            [str(PG_BIN / "postgres"), "-D", str(data / "db"), "-p", str(port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={data}",
             "-c", "fsync=off", "-c", "max_connections=200"],
            data.with_suffix(".log"), user=run_as,
        )  # fmt: skip
        try:
            out.wait_for("database system is ready to accept connections", 60)
            yield f"postgresql://vmbuild@127.0.0.1:{port}/postgres"
        finally:
            _stop(proc, signal.SIGINT)  # "fast" shutdown
    finally:
        shutil.rmtree(data, ignore_errors=True)
        for log in (data.with_suffix(".initdb.log"), data.with_suffix(".log")):
            log.unlink(missing_ok=True)


@dataclass
class Worker:
    name: str
    queues: list[str]
    cache: Path
    proc: subprocess.Popen[bytes]
    output: Output
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM, 120)

    def kill(self) -> None:
        """SIGKILL of the worker process only (a host that dies): its runs' process
        groups are left to notice on their own."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def start_worker(
    root: Path, name: str, queues: list[str], *, broker: str, history: str,
    concurrency: int = 2, env: dict[str, str] | None = None,
) -> Worker:  # fmt: skip
    cache = root / name / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "vmbuild", "worker", "--broker", broker, "--history", history,
            "--name", f"{name}@test", "--concurrency", str(concurrency), "--cache-dir",
            str(cache), "--accel", "tcg"]  # fmt: skip
    for q in queues:
        argv += ["--queue", q]
    full_env = {**os.environ, **(env or {})}
    proc, out = _start(argv, root / f"{name}.log", env=full_env)
    worker = Worker(name, queues, cache, proc, out, env or {})
    out.wait_for(" ready.", 90)
    return worker
