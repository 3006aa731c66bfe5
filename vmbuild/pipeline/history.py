"""The run history: an embedded SQLite database shared by the scheduler, manual runs and
`vmbuild runs`, plus the scheduler's persisted state (the last slot fired per pipeline).

Several processes write at once (a scheduled run, a manual run, the scheduler), so the
database is in WAL mode (readers never block the writer), every connection waits on a
busy database rather than failing (busy_timeout), and each write is one short
transaction taken with BEGIN IMMEDIATE (no lock upgrade, so no deadlock between two
read-then-write transactions).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from vmbuild.errors import VmbuildError
from vmbuild.secrets import mask, mask_json

Trigger = Literal["manual", "schedule", "dependency"]
Status = Literal["running", "succeeded", "failed", "cancelled", "skipped"]
TRIGGERS: tuple[str, ...] = ("manual", "schedule", "dependency")
STATUSES: tuple[str, ...] = ("running", "succeeded", "failed", "cancelled", "skipped")
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 60_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline    TEXT NOT NULL,
    pipeline_file TEXT,
    trigger     TEXT NOT NULL,
    status      TEXT NOT NULL,
    reason      TEXT,           -- why it ran or was skipped (the dependency that changed)
    started     TEXT NOT NULL,  -- ISO 8601 UTC
    ended       TEXT,
    timings     TEXT,           -- JSON {stage: seconds}
    artifact    TEXT,           -- the build directory
    image       TEXT,           -- name/version/build
    ami_ids     TEXT,           -- JSON {region: ami-id}
    log_path    TEXT,
    error       TEXT,
    log_tail    TEXT,
    deps        TEXT,           -- JSON: the dependencies as seen when the run started
    pruned      TEXT,           -- JSON: builds the lifecycle policy deleted
    pid         INTEGER,
    host        TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_pipeline ON runs (pipeline, id);
CREATE TABLE IF NOT EXISTS scheduler_state (
    pipeline    TEXT PRIMARY KEY,
    schedule    TEXT NOT NULL,  -- the schedule the slot belongs to (a new one starts afresh)
    last_slot   TEXT NOT NULL,  -- the last slot fired, or when the schedule was first seen
    updated     TEXT NOT NULL
);
"""


def default_path() -> Path:
    """`$VMBUILD_HISTORY`, else `$XDG_STATE_HOME/vmbuild/history.sqlite`
    (`~/.local/state/vmbuild/history.sqlite`): state outlives a cleared cache."""
    explicit = os.environ.get("VMBUILD_HISTORY")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "vmbuild" / "history.sqlite"


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


@dataclass(frozen=True)
class RunRecord:
    id: int
    pipeline: str
    pipeline_file: str | None
    trigger: str
    status: str
    reason: str | None
    started: datetime
    ended: datetime | None
    timings: dict[str, float]
    artifact: str | None
    image: str | None
    ami_ids: dict[str, str]
    log_path: str | None
    error: str | None
    log_tail: str | None
    deps: dict[str, Any] | None
    pruned: list[dict[str, Any]]
    pid: int | None
    host: str | None

    @property
    def duration(self) -> float | None:
        return (self.ended - self.started).total_seconds() if self.ended else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["started"] = iso(self.started)
        data["ended"] = iso(self.ended) if self.ended else None
        data["duration"] = round(self.duration, 2) if self.duration is not None else None
        return data


def _loads(text: str | None, default: Any) -> Any:
    return json.loads(text) if text else default


def _record(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        id=row["id"], pipeline=row["pipeline"], pipeline_file=row["pipeline_file"],
        trigger=row["trigger"], status=row["status"], reason=row["reason"],
        started=parse_iso(row["started"]),
        ended=parse_iso(row["ended"]) if row["ended"] else None,
        timings=_loads(row["timings"], {}), artifact=row["artifact"], image=row["image"],
        ami_ids=_loads(row["ami_ids"], {}), log_path=row["log_path"], error=row["error"],
        log_tail=row["log_tail"], deps=_loads(row["deps"], None),
        pruned=_loads(row["pruned"], []), pid=row["pid"], host=row["host"],
    )  # fmt: skip


class History:
    """One connection to the history database (one per thread or process)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode = WAL")
            # NORMAL is durable across application crashes in WAL mode; only a
            # power loss can drop the last transactions, which only cost history.
            self._db.execute("PRAGMA synchronous = NORMAL")
            with self._write() as db:
                for statement in _SCHEMA.split(";\n"):
                    if statement.strip():
                        db.execute(statement)
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise VmbuildError(
                        f"{path}: history schema {version} is newer than this vmbuild's "
                        f"({SCHEMA_VERSION})",
                        hint="use a newer vmbuild, or point --history at another file",
                    )
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as exc:
            raise VmbuildError(f"{path}: cannot open the run history: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- runs ------------------------------------------------------------------
    def start_run(
        self, pipeline: str, pipeline_file: str | None, trigger: str, started: datetime,
        *, status: str = "running", reason: str | None = None, deps: dict[str, Any] | None = None,
    ) -> int:  # fmt: skip
        """Insert a run; its id. `running` until `finish_run`."""
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO runs (pipeline, pipeline_file, trigger, status, reason, started,"
                " deps, pid, host) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (pipeline, pipeline_file, trigger, status, reason, iso(started),
                 json.dumps(deps) if deps is not None else None, os.getpid(),
                 socket.gethostname()),
            )  # fmt: skip
            run_id = cursor.lastrowid
        assert run_id is not None
        return run_id

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Set columns of a run (dicts and lists stored as JSON, datetimes as ISO)."""
        allowed = {
            "status", "reason", "ended", "timings", "artifact", "image", "ami_ids",
            "log_path", "error", "log_tail", "deps", "pruned", "trigger",
        }  # fmt: skip
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown run fields: {sorted(unknown)}")
        values = []
        for value in fields.values():
            if isinstance(value, datetime):
                value = iso(value)
            elif isinstance(value, dict | list):
                value = json.dumps(mask_json(value))
            elif isinstance(value, str):
                value = mask(value)  # errors and log tails may quote a secret
            values.append(value)
        assignments = ", ".join(f"{name} = ?" for name in fields)
        with self._write() as db:
            db.execute(f"UPDATE runs SET {assignments} WHERE id = ?", (*values, run_id))

    def record_skipped(
        self, pipeline: str, pipeline_file: str | None, trigger: str, when: datetime, reason: str
    ) -> int:
        """A trigger that did not start a build (already running, nothing changed)."""
        run_id = self.start_run(
            pipeline, pipeline_file, trigger, when, status="skipped", reason=reason
        )
        self.update_run(run_id, ended=when)
        return run_id

    def get(self, run_id: int) -> RunRecord:
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise VmbuildError(f"no run {run_id} in {self.path}", hint="vmbuild runs list")
        return _record(row)

    def list_runs(
        self, pipeline: str | None = None, *, limit: int = 50, status: str | None = None
    ) -> list[RunRecord]:
        """Runs, newest first."""
        query, args = "SELECT * FROM runs", []
        where = []
        if pipeline is not None:
            where.append("pipeline = ?")
            args.append(pipeline)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY id DESC LIMIT ?"
        return [_record(r) for r in self._db.execute(query, (*args, limit)).fetchall()]

    def last_succeeded(self, pipeline: str) -> RunRecord | None:
        runs = self.list_runs(pipeline, limit=1, status="succeeded")
        return runs[0] if runs else None

    def abandon_stale(self, pipeline: str, now: datetime, reason: str) -> list[int]:
        """Mark `running` rows of `pipeline` failed: called with the pipeline's lock held,
        so no live process owns them (it was killed, or the host rebooted)."""
        with self._write() as db:
            rows = db.execute(
                "SELECT id FROM runs WHERE pipeline = ? AND status = 'running'", (pipeline,)
            ).fetchall()
            ids = [r["id"] for r in rows]
            db.executemany(
                "UPDATE runs SET status = 'failed', ended = ?, error = ? WHERE id = ?",
                [(iso(now), reason, i) for i in ids],
            )
        return ids

    # -- scheduler state ---------------------------------------------------------
    def schedule_state(self, pipeline: str) -> tuple[str, datetime] | None:
        row = self._db.execute(
            "SELECT schedule, last_slot FROM scheduler_state WHERE pipeline = ?", (pipeline,)
        ).fetchone()
        return (row["schedule"], parse_iso(row["last_slot"])) if row else None

    def set_schedule_state(
        self, pipeline: str, schedule: str, last_slot: datetime, now: datetime
    ) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO scheduler_state (pipeline, schedule, last_slot, updated)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (pipeline) DO UPDATE SET"
                " schedule = excluded.schedule, last_slot = excluded.last_slot,"
                " updated = excluded.updated",
                (pipeline, schedule, iso(last_slot), iso(now)),
            )
