"""The run history: runs of pipelines and builds (local or on workers), plus the
scheduler's persisted state (the last slot fired per pipeline).

One schema through SQLAlchemy Core for two databases: an embedded SQLite file (the
default, one host) and PostgreSQL (`--history postgresql://...`, shared by many
workers). Several processes write at once (runs, the scheduler, workers), so:

- SQLite is in WAL mode (readers never block the writer), every connection waits on a
  busy database (busy_timeout), and each write is one short transaction taken with
  BEGIN IMMEDIATE (no lock upgrade, so no deadlock between two read-then-write
  transactions);
- on PostgreSQL each write is one transaction and every read-then-write is a single
  statement (UPDATE ... RETURNING, INSERT ... ON CONFLICT), so READ COMMITTED suffices.

Schema versions: SQLite keeps it in `PRAGMA user_version` (as version 1 did), other
databases in a one-row `vmbuild_schema` table. Migrations only add columns.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, RowMapping
from sqlalchemy.exc import SQLAlchemyError

from vmbuild.errors import VmbuildError
from vmbuild.secrets import mask, mask_json

Trigger = Literal["manual", "schedule", "dependency"]
Status = Literal["queued", "running", "succeeded", "failed", "cancelled", "skipped"]
TRIGGERS: tuple[str, ...] = ("manual", "schedule", "dependency")
STATUSES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled", "skipped")
FINISHED: tuple[str, ...] = ("succeeded", "failed", "cancelled", "skipped")
SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 60_000

metadata = sa.MetaData()
runs = sa.Table(
    "runs", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("pipeline", sa.Text, nullable=False),  # a pipeline's name, or a recipe's
    sa.Column("pipeline_file", sa.Text),
    sa.Column("trigger", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("reason", sa.Text),  # why it ran or was skipped (the dependency that changed)
    sa.Column("started", sa.Text, nullable=False),  # ISO 8601 UTC (queued: when submitted)
    sa.Column("ended", sa.Text),
    sa.Column("timings", sa.Text),  # JSON {stage: seconds}
    sa.Column("artifact", sa.Text),  # the build directory or s3:// URL
    sa.Column("image", sa.Text),  # name/version/build
    sa.Column("ami_ids", sa.Text),  # JSON {region: ami-id}
    sa.Column("log_path", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("log_tail", sa.Text),
    sa.Column("deps", sa.Text),  # JSON: the dependencies as seen when the run started
    sa.Column("pruned", sa.Text),  # JSON: builds the lifecycle policy deleted
    sa.Column("pid", sa.Integer),
    sa.Column("host", sa.Text),
    # Version 2: runs submitted to workers.
    sa.Column("kind", sa.Text),  # pipeline | build | noop (NULL: a local pipeline run)
    sa.Column("queue", sa.Text),
    sa.Column("task_id", sa.Text),  # the Celery task id
    sa.Column("worker", sa.Text),  # the Celery worker's node name
    sa.Column("heartbeat", sa.Text),  # refreshed while a worker runs it (its lease)
    sa.Column("attempts", sa.Integer),  # deliveries that started it (2+: redelivered)
    sa.Column("options", sa.Text),  # JSON: what the worker needs (store, accel, args)
    sqlite_autoincrement=True,
)  # fmt: skip
sa.Index("runs_by_pipeline", runs.c.pipeline, runs.c.id)
scheduler_state = sa.Table(
    "scheduler_state", metadata,
    sa.Column("pipeline", sa.Text, primary_key=True),
    sa.Column("schedule", sa.Text, nullable=False),  # a new schedule starts afresh
    sa.Column("last_slot", sa.Text, nullable=False),  # last slot fired, or when first seen
    sa.Column("updated", sa.Text, nullable=False),
)  # fmt: skip
schema_table = sa.Table("vmbuild_schema", metadata, sa.Column("version", sa.Integer))
V2_COLUMNS = ("kind", "queue", "task_id", "worker", "heartbeat", "attempts", "options")
JSON_FIELDS = ("timings", "ami_ids", "deps", "pruned", "options")
UPDATABLE = frozenset({
    "status", "reason", "ended", "timings", "artifact", "image", "ami_ids", "log_path",
    "error", "log_tail", "deps", "pruned", "trigger", "pid", "host", "queue", "task_id",
    "worker", "heartbeat", "attempts", "options", "started",
})  # fmt: skip


def default_path() -> Path:
    """`$VMBUILD_HISTORY`, else `$XDG_STATE_HOME/vmbuild/history.sqlite`
    (`~/.local/state/vmbuild/history.sqlite`): state outlives a cleared cache."""
    explicit = os.environ.get("VMBUILD_HISTORY")
    if explicit and not is_url(explicit):
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "vmbuild" / "history.sqlite"


def is_url(location: str | os.PathLike[str]) -> bool:
    return isinstance(location, str) and "://" in location


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def redact(url: str) -> str:
    """A database URL without its password (for messages and logs)."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return url.split("@")[-1]


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
    kind: str | None = None
    queue: str | None = None
    task_id: str | None = None
    worker: str | None = None
    heartbeat: datetime | None = None
    attempts: int = 0
    options: dict[str, Any] | None = None

    @property
    def duration(self) -> float | None:
        return (self.ended - self.started).total_seconds() if self.ended else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["started"] = iso(self.started)
        data["ended"] = iso(self.ended) if self.ended else None
        data["heartbeat"] = iso(self.heartbeat) if self.heartbeat else None
        data["duration"] = round(self.duration, 2) if self.duration is not None else None
        return data


def _loads(text: str | None, default: Any) -> Any:
    return json.loads(text) if text else default


def _record(row: RowMapping) -> RunRecord:
    return RunRecord(
        id=row["id"], pipeline=row["pipeline"], pipeline_file=row["pipeline_file"],
        trigger=row["trigger"], status=row["status"], reason=row["reason"],
        started=parse_iso(row["started"]),
        ended=parse_iso(row["ended"]) if row["ended"] else None,
        timings=_loads(row["timings"], {}), artifact=row["artifact"], image=row["image"],
        ami_ids=_loads(row["ami_ids"], {}), log_path=row["log_path"], error=row["error"],
        log_tail=row["log_tail"], deps=_loads(row["deps"], None),
        pruned=_loads(row["pruned"], []), pid=row["pid"], host=row["host"],
        kind=row["kind"], queue=row["queue"], task_id=row["task_id"], worker=row["worker"],
        heartbeat=parse_iso(row["heartbeat"]) if row["heartbeat"] else None,
        attempts=row["attempts"] or 0, options=_loads(row["options"], None),
    )  # fmt: skip


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    values = {}
    for name, value in fields.items():
        if isinstance(value, datetime):
            value = iso(value)
        elif isinstance(value, dict | list):
            value = json.dumps(mask_json(value))
        elif isinstance(value, str):
            value = mask(value)  # errors and log tails may quote a secret
        values[name] = value
    return values


def _sqlite_engine(path: Path) -> Engine:
    engine = sa.create_engine(
        f"sqlite:///{path}", connect_args={"timeout": BUSY_TIMEOUT_MS / 1000}, future=True
    )

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # pysqlite's own transaction handling would BEGIN (deferred) behind our back;
        # the begin hook below emits the BEGIN instead.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        # NORMAL is durable across application crashes in WAL mode; only a power
        # loss can drop the last transactions, which only cost history.
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("vmbuild_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


class History:
    """The history database: a SQLite file (a path) or a database URL
    (`postgresql://user@host/db`, `sqlite:///path`). One per thread or process."""

    def __init__(self, location: Path | str) -> None:
        self.url: str | None = None
        self.path: Path | None = None
        self.label = redact(str(location)) if is_url(location) else str(location)
        try:
            if is_url(location):
                assert isinstance(location, str)
                self.url = location
                url = sa.make_url(location)
                if url.drivername in ("postgresql", "postgres"):
                    url = url.set(drivername="postgresql+psycopg")  # psycopg 3
                if url.get_backend_name() == "sqlite" and url.database:
                    self.path = Path(url.database)
                    self._engine = _sqlite_engine(self.path)
                else:
                    self._engine = sa.create_engine(url, pool_pre_ping=True, future=True)
            else:
                self.path = Path(location)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._engine = _sqlite_engine(self.path)
            self._sqlite = self._engine.dialect.name == "sqlite"
            self._migrate()
        except (SQLAlchemyError, OSError, ModuleNotFoundError) as exc:
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            hint = None
            if isinstance(exc, ModuleNotFoundError):
                hint = "PostgreSQL needs psycopg: pip install 'vmbuild[scale]'"
            raise VmbuildError(
                f"{self.label}: cannot open the run history: {detail}", hint=hint
            ) from None

    @property
    def state_dir(self) -> Path:
        """Where per-host state lives (locks, run logs): next to a SQLite file, else
        the default state directory."""
        return (self.path or default_path()).resolve().parent

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._engine.connect().execution_options(vmbuild_write=True) as conn, conn.begin():
            yield conn

    def _read(self, statement: sa.Executable) -> list[RowMapping]:
        with self._engine.connect() as conn:
            return list(conn.execute(statement).mappings().all())

    # -- schema -------------------------------------------------------------------
    def _migrate(self) -> None:
        with self._write() as db:
            metadata.create_all(db, checkfirst=True)
            version = self._version(db)
            if version > SCHEMA_VERSION:
                raise VmbuildError(
                    f"{self.label}: history schema {version} is newer than this vmbuild's "
                    f"({SCHEMA_VERSION})",
                    hint="use a newer vmbuild, or point --history at another database",
                )
            if version < 2:  # version 1 files predate the worker columns
                present = {c["name"] for c in sa.inspect(db).get_columns("runs")}
                for name in V2_COLUMNS:
                    if name not in present:
                        kind = "INTEGER" if name == "attempts" else "TEXT"
                        db.exec_driver_sql(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
            if version != SCHEMA_VERSION:
                self._set_version(db, SCHEMA_VERSION)

    def _version(self, db: Connection) -> int:
        if self._sqlite:
            return int(db.exec_driver_sql("PRAGMA user_version").scalar_one())
        value = db.execute(sa.select(schema_table.c.version)).scalar()
        return int(value) if value is not None else 0

    def _set_version(self, db: Connection, version: int) -> None:
        if self._sqlite:
            db.exec_driver_sql(f"PRAGMA user_version = {int(version)}")
        db.execute(schema_table.delete())
        db.execute(schema_table.insert().values(version=version))

    # -- runs ------------------------------------------------------------------
    def start_run(
        self, pipeline: str, pipeline_file: str | None, trigger: str, started: datetime,
        *, status: str = "running", reason: str | None = None, deps: dict[str, Any] | None = None,
        **extra: Any,
    ) -> int:  # fmt: skip
        """Insert a run; its id. `running` (or `queued`) until `finish_run`."""
        fields = {
            "pipeline": pipeline, "pipeline_file": pipeline_file, "trigger": trigger,
            "status": status, "reason": reason, "started": started, "deps": deps,
            "pid": os.getpid(), "host": socket.gethostname(), **extra,
        }  # fmt: skip
        unknown = set(extra) - UPDATABLE - {"kind"}
        if unknown:
            raise ValueError(f"unknown run fields: {sorted(unknown)}")
        with self._write() as db:
            run_id = db.execute(runs.insert().values(_encode(fields)).returning(runs.c.id))
            return int(run_id.scalar_one())

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Set columns of a run (dicts and lists stored as JSON, datetimes as ISO)."""
        unknown = set(fields) - UPDATABLE
        if unknown:
            raise ValueError(f"unknown run fields: {sorted(unknown)}")
        with self._write() as db:
            db.execute(runs.update().where(runs.c.id == run_id).values(_encode(fields)))

    def transition(
        self, run_id: int, from_statuses: tuple[str, ...], *,
        expect: dict[str, Any] | None = None, **fields: Any,
    ) -> RunRecord | None:  # fmt: skip
        """Update a run only if its status is one of `from_statuses` (and its columns
        equal `expect`): one atomic statement, so of two workers, or of a worker and a
        `runs cancel`, exactly one wins. The updated record, or None."""
        unknown = (set(fields) | set(expect or {})) - UPDATABLE
        if unknown:
            raise ValueError(f"unknown run fields: {sorted(unknown)}")
        statement = runs.update().where(runs.c.id == run_id, runs.c.status.in_(from_statuses))
        for name, value in _encode(expect or {}).items():
            column = runs.c[name]
            statement = statement.where(column.is_(None) if value is None else column == value)
        statement = statement.values(_encode(fields)).returning(*runs.c)
        with self._write() as db:
            row = db.execute(statement).mappings().first()
        return _record(row) if row is not None else None

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
        rows = self._read(sa.select(runs).where(runs.c.id == run_id))
        if not rows:
            raise VmbuildError(f"no run {run_id} in {self.label}", hint="vmbuild runs list")
        return _record(rows[0])

    def list_runs(
        self, pipeline: str | None = None, *, limit: int = 50, status: str | None = None,
        worker: str | None = None,
    ) -> list[RunRecord]:  # fmt: skip
        """Runs, newest first."""
        query = sa.select(runs)
        if pipeline is not None:
            query = query.where(runs.c.pipeline == pipeline)
        if status is not None:
            query = query.where(runs.c.status == status)
        if worker is not None:
            query = query.where(runs.c.worker == worker)
        return [_record(r) for r in self._read(query.order_by(runs.c.id.desc()).limit(limit))]

    def last_succeeded(self, pipeline: str) -> RunRecord | None:
        found = self.list_runs(pipeline, limit=1, status="succeeded")
        return found[0] if found else None

    def abandon_stale(self, pipeline: str, now: datetime, reason: str) -> list[int]:
        """Mark `running` rows of `pipeline` failed: called with the pipeline's lock held,
        so no live process owns them (it was killed, or the host rebooted). Runs that
        belong to workers are not this host's to judge (their lease says)."""
        statement = (
            runs.update()
            .where(runs.c.pipeline == pipeline, runs.c.status == "running")
            .where(runs.c.task_id.is_(None))
            .values(status="failed", ended=iso(now), error=reason)
            .returning(runs.c.id)
        )
        with self._write() as db:
            return sorted(int(i) for i in db.execute(statement).scalars())

    # -- scheduler state ---------------------------------------------------------
    def schedule_state(self, pipeline: str) -> tuple[str, datetime] | None:
        rows = self._read(
            sa.select(scheduler_state.c.schedule, scheduler_state.c.last_slot).where(
                scheduler_state.c.pipeline == pipeline
            )
        )
        return (rows[0]["schedule"], parse_iso(rows[0]["last_slot"])) if rows else None

    def set_schedule_state(
        self, pipeline: str, schedule: str, last_slot: datetime, now: datetime
    ) -> None:
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        insert = sqlite_insert if self._sqlite else pg_insert
        values = {"pipeline": pipeline, "schedule": schedule,
                  "last_slot": iso(last_slot), "updated": iso(now)}  # fmt: skip
        statement = insert(scheduler_state).values(values)
        statement = statement.on_conflict_do_update(
            index_elements=[scheduler_state.c.pipeline],
            set_={k: statement.excluded[k] for k in ("schedule", "last_slot", "updated")},
        )
        with self._write() as db:
            db.execute(statement)
