"""Verbs: `vmbuild pipeline run|check|prune|export-systemd|export-cron`, `vmbuild scheduler`,
`vmbuild runs list|show|logs`. Loaded by vmbuild.cli as an extension module."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from vmbuild import console, paths
from vmbuild.errors import VmbuildError
from vmbuild.pipeline.history import STATUSES, History

Handler = Callable[[argparse.Namespace], int]
EXIT_CHANGED, EXIT_UNCHANGED, EXIT_CHECK_FAILED = 0, 1, 2


def _history_path(args: argparse.Namespace) -> Path:
    """The history as a SQLite file (exports write it into units); a URL is refused."""
    from vmbuild.pipeline.history import is_url

    location = _history(args)
    if is_url(location):
        raise VmbuildError(f"{location}: this needs a SQLite history file, not a database URL")
    return Path(location)


def _history(args: argparse.Namespace) -> str:
    """--history / $VMBUILD_HISTORY: a database URL, or a SQLite file (made absolute)."""
    from vmbuild.cli.scale import history_location

    return history_location(args.history)


def _store(args: argparse.Namespace, loaded: Any) -> Path:
    # A pipeline's own `store:` wins: --store is the default for those without one.
    store: Path = loaded.store or paths.store_dir(args.store)
    return store.resolve()


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _when(record: Any) -> str:
    return str(record.started.strftime("%Y-%m-%d %H:%M:%S"))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# -- pipeline ----------------------------------------------------------------
def _services() -> Any:
    """The real build, distribution and checks (a seam for in-process CLI tests)."""
    from vmbuild.pipeline.runner import Services

    return Services()


def _variables(args: argparse.Namespace) -> Any:
    """The --var / --var-file values (plus VMBUILD_VAR_*), for the pipeline and its recipe."""
    from vmbuild.config.variables import parse_cli

    return parse_cli(args.var, args.var_file)


def _export_variables(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The values an exported unit or crontab line will run with, and its arguments.

    Checked now exactly as the scheduled `pipeline run` will see them: --var and
    --var-file only, because a timer or cron job does not have this shell's
    VMBUILD_VAR_* environment (a value given only there would be missing then).
    """
    from dataclasses import replace

    from vmbuild.config.variables import as_arguments

    given = replace(_variables(args), environment=False)
    return given, as_arguments(given)


def cmd_run(args: argparse.Namespace) -> int:
    from vmbuild.config.pipeline import load_pipeline
    from vmbuild.events import JsonReporter
    from vmbuild.pipeline.history import History
    from vmbuild.pipeline.runner import BUSY_REASON, EXIT_BUSY, RunContext, run_pipeline

    # Validated (variables substituted) before anything runs.
    loaded = load_pipeline(Path(args.file), variables=_variables(args))
    # --json: the build's event stream (vmbuild/events.py, heartbeats included),
    # then one `run` event with the run's record.
    events = JsonReporter() if args.json else None
    if events is not None:
        recipe = loaded.recipe
        events.emit(
            "start", recipe=str(recipe.path), name=recipe.recipe.name,
            version=recipe.recipe.version, pipeline=str(loaded.path),
        )  # fmt: skip
    with History(_history(args)) as history:
        ctx = RunContext(
            history, _store(args, loaded), history.state_dir, quiet=args.quiet,
            reporter=events, services=_services(),
        )  # fmt: skip
        with events.warnings() if events is not None else contextlib.nullcontext():
            record = run_pipeline(loaded, ctx, args.trigger)
    if events is not None:
        events.emit("run", record=record.to_json())
    elif record.status == "skipped":
        print(f"run {record.id} skipped: {record.reason}")
    else:
        print(f"run {record.id} {record.status} in {_duration(record.duration)}")
        if record.image:
            print(f"image:  {record.image}\npath:   {record.artifact}")
        for region, ami in record.ami_ids.items():
            print(f"ami:    {region} {ami}")
        for d in record.pruned:
            print(f"pruned: {d['image']} ({d['reason']})")
        print(f"log:    {record.log_path}")
    if record.status == "failed":
        raise VmbuildError(
            f"run {record.id} of {loaded.name} failed: {record.error}",
            hint=f"vmbuild runs logs {record.id}",
        )
    if record.status == "skipped" and (record.reason or "").startswith(BUSY_REASON):
        return EXIT_BUSY
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from vmbuild.config.pipeline import load_pipeline
    from vmbuild.pipeline import deps
    from vmbuild.pipeline.history import History

    try:
        loaded = load_pipeline(Path(args.file), variables=_variables(args))
        with History(_history(args)) as history:
            report = deps.check(loaded, history)
    except VmbuildError as exc:
        # Exit 1 means "unchanged": a check that could not even read its pipeline
        # must not look like one (`pipeline check p.yaml && build` would skip).
        err = console.stderr()
        err.print(console.styled("error:", "bold red", f" {exc}"))
        if exc.hint:
            err.print(console.styled("hint:", "yellow", f" {exc.hint}"))
        return EXIT_CHECK_FAILED
    code = (
        EXIT_CHANGED if report.changed else EXIT_CHECK_FAILED if report.errors else EXIT_UNCHANGED
    )
    if args.json:
        _print_json({**report.to_json(), "exit_code": code})
        return code
    since = f" since run {report.last_run}" if report.last_run else ""
    if report.changed:
        n = len(report.changes)
        print(f"{loaded.name}: {n} dependenc{'ies' if n > 1 else 'y'} changed{since}:")
        for change in report.changes:
            print(f"  {change.kind}: {change.summary}")
            for line in change.details[: args.max_details]:
                print(f"      {line}")
            if len(change.details) > args.max_details:
                print(f"      ... and {len(change.details) - args.max_details} more")
    else:
        print(f"{loaded.name}: no dependency changed{since}")
    for note in report.notes:
        print(f"  note: {note}")
    err = console.stderr()
    for problem in report.errors:
        err.print(console.styled("warning:", "yellow", f" could not check {problem}"))
    return code


def cmd_prune(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from vmbuild.config.pipeline import load_pipeline
    from vmbuild.pipeline import lifecycle

    loaded = load_pipeline(Path(args.file), variables=_variables(args))
    policy = loaded.pipeline.lifecycle
    deleted = lifecycle.prune(
        _store(args, loaded), loaded.recipe.recipe.name, policy, datetime.now(UTC),
        dry_run=args.dry_run,
    )  # fmt: skip
    if args.json:
        _print_json([d.to_json() for d in deleted])
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for d in deleted:
        print(f"{verb} {d.build.ref} ({d.reason})")
    if not deleted:
        print("nothing to prune")
    return 0


def cmd_export_systemd(args: argparse.Namespace) -> int:
    from vmbuild.config.pipeline import load_pipeline
    from vmbuild.pipeline.export import systemd_units, unit_name

    given, variables = _export_variables(args)
    loaded = load_pipeline(Path(args.file), variables=given)
    units = systemd_units(loaded, _history_path(args), _store(args, loaded), variables=variables)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in units.items():
        (out / name).write_text(text)
        print(out / name)
    timer = unit_name(loaded) + ".timer"
    print(
        f"install: cp {' '.join(str(out / n) for n in units)} /etc/systemd/system/ && "
        f"systemctl daemon-reload && systemctl enable --now {timer}",
        file=sys.stderr,
    )
    return 0


def cmd_export_cron(args: argparse.Namespace) -> int:
    from vmbuild.config.pipeline import load_pipeline
    from vmbuild.pipeline.export import crontab_line

    given, variables = _export_variables(args)
    loaded = load_pipeline(Path(args.file), variables=given)
    line = crontab_line(loaded, _history_path(args), _store(args, loaded), variables=variables)
    print(line, end="")
    return 0


# -- scheduler ---------------------------------------------------------------
def _scheduler_logging(debug: bool) -> None:
    logger = logging.getLogger("vmbuild.pipeline.scheduler")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s vmbuild scheduler: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False  # the console handler would repeat warnings


def cmd_scheduler(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from vmbuild.config.variables import as_environment
    from vmbuild.pipeline.history import History
    from vmbuild.pipeline.scheduler import (
        Launcher,
        ProcessLauncher,
        Scheduler,
        log,
        scheduler_lock,
    )

    _scheduler_logging(args.debug)
    directory = Path(args.pipelines).resolve()
    # Resolved now: runs must not depend on the daemon's working directory.
    store = paths.store_dir(args.store).resolve()
    # A bad --var-file stops the daemon before it starts. One value may serve several
    # pipelines: a pipeline that does not declare it is not an error here.
    variables = replace(_variables(args), strict=False)
    if args.broker and (args.var or args.var_file):
        raise VmbuildError(
            "--var/--var-file with --broker: the values do not reach the workers yet",
            hint="set VMBUILD_VAR_KEY in the workers' environment instead",
        )
    with History(_history(args)) as history:
        lock = scheduler_lock(history.state_dir)
        if not lock.acquire():
            raise VmbuildError(
                f"another scheduler (pid {lock.holder()}) is using {history.label}",
                hint="stop it first; two schedulers would fire every slot twice",
            )
        with lock:
            launcher: Launcher
            if args.broker:
                from vmbuild.cli.scale import store_location
                from vmbuild.scaleout import events
                from vmbuild.scaleout.app import broker_url, make_app
                from vmbuild.scaleout.submit import BrokerLauncher

                broker = broker_url(args.broker)
                launcher = BrokerLauncher(
                    make_app(broker), history, events.connect(broker), args.queue,
                    store_location(args.store) if args.store else None,
                )  # fmt: skip
            else:
                if history.path is None:
                    raise VmbuildError(
                        "local runs need a SQLite history file",
                        hint="with a shared database, give --broker: workers run the pipelines",
                    )
                launcher = ProcessLauncher(
                    history.path, store, debug=args.debug,
                    var_env=as_environment(variables),
                )  # fmt: skip
            scheduler = Scheduler(
                directory, history, launcher, max_parallel=args.max_parallel,
                stop_timeout=args.stop_timeout, variables=variables,
            )  # fmt: skip
            scheduler.start()  # refuses to start with a broken pipeline, naming it
            looping = False
            try:
                where = f"enqueued on {args.queue}" if args.broker else "run here"
                log.info(
                    "started (pid %d): %d pipeline(s) in %s, history %s, runs %s",
                    os.getpid(), len(scheduler.pipelines), directory, history.label, where,
                )  # fmt: skip
                looping = True
                scheduler.run_forever()  # stops itself (cancels runs) when interrupted
            except KeyboardInterrupt:
                if not looping:
                    scheduler.stop()  # a SIGTERM right after start: nothing runs yet
                return 0  # SIGTERM/Ctrl-C is how a daemon is stopped: not a failure
    return 0


# -- runs --------------------------------------------------------------------
@contextlib.contextmanager
def _history_reaped(args: argparse.Namespace) -> Iterator[History]:
    """The run history, after this host's runs whose process died (SIGKILL) are
    recorded as failed with their log tail: what is shown is never a ghost `running`."""
    from datetime import UTC, datetime

    from vmbuild.pipeline.reaper import reap_dead_runs

    with History(_history(args)) as history:
        reap_dead_runs(history, datetime.now(UTC))
        yield history


def cmd_runs_list(args: argparse.Namespace) -> int:
    with _history_reaped(args) as history:
        runs = history.list_runs(args.pipeline, limit=args.limit, status=args.status)
    if args.json:
        _print_json([r.to_json() for r in runs])
        return 0
    table = Table(show_edge=False)
    columns = ("id", "pipeline", "trigger", "status", "started (UTC)", "duration", "worker",
               "image", "note")  # fmt: skip
    for col in columns:
        table.add_column(col, no_wrap=col != "note")
    style = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "skipped": "dim",
             "queued": "cyan"}  # fmt: skip
    for r in runs:
        note = (r.error if r.status in ("failed", "cancelled") else r.reason) or ""
        note = note.splitlines()[0][:70] if note else ""
        status = Text(r.status, style=style.get(r.status, ""))
        table.add_row(
            str(r.id), r.pipeline, r.trigger, status, _when(r),
            _duration(r.duration) if r.status != "skipped" else "-",
            r.worker or (r.queue and f"({r.queue})") or "local", r.image or "", note,
        )  # fmt: skip
    # Piped (a log, grep): wide rows rather than wrapped cells, as ps does.
    console.stdout().print(table)
    return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
    with _history_reaped(args) as history:
        r = history.get(args.id)
    if args.json:
        _print_json(r.to_json())
        return 0
    ended = r.ended.strftime("%Y-%m-%d %H:%M:%S") if r.ended else "-"
    print(f"run:      {r.id}\npipeline: {r.pipeline} ({r.pipeline_file})")
    print(f"trigger:  {r.trigger}\nstatus:   {r.status}")
    if r.reason:
        print(f"reason:   {r.reason}")
    print(f"started:  {_when(r)} UTC\nended:    {ended} UTC\nduration: {_duration(r.duration)}")
    if r.image:
        print(f"image:    {r.image}\nartifact: {r.artifact}")
    for region, ami in r.ami_ids.items():
        print(f"ami:      {region} {ami}")
    for stage, secs in r.timings.items():
        print(f"stage     {stage:14} {secs:8.1f}s")
    for d in r.pruned:
        print(f"pruned    {d['image']} ({d['reason']})")
    if r.task_id:
        print(f"queue:    {r.queue}\nworker:   {r.worker or '- (not started)'}"
              f"\nattempts: {r.attempts}\ntask:     {r.task_id}")  # fmt: skip
    print(f"log:      {r.log_path or '-'}  (host {r.host}, pid {r.pid})")
    if r.error:
        print(f"error:    {r.error}")
    if r.log_tail:
        print("--- log (last lines) ---\n" + r.log_tail)
    return 0


def cmd_runs_logs(args: argparse.Namespace) -> int:
    with _history_reaped(args) as history:
        r = history.get(args.id)
    path = Path(r.log_path) if r.log_path else None
    broker = os.environ.get("VMBUILD_BROKER")
    if (path is None or not path.is_file()) and r.task_id and broker:
        # A worker's run: its log is on that host; its events are in the broker.
        from vmbuild.scaleout import events

        print(f"# the log is on {r.worker or r.host} ({path}); the run's events:",
              file=sys.stderr)  # fmt: skip
        text = "".join(events.render(e) for e in events.history(events.connect(broker), r.id))
    elif path is None or not path.is_file():
        if not r.log_tail:
            raise VmbuildError(f"run {r.id} has no log ({r.status}: {r.reason or r.error or '-'})")
        print(f"# {path or 'the log'} is gone; the tail recorded with the run:", file=sys.stderr)
        text = r.log_tail + "\n"
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
    if args.tail:
        text = "\n".join(text.splitlines()[-args.tail :]) + "\n"
    sys.stdout.write(text)
    return 0


def cmd_runs_cancel(args: argparse.Namespace) -> int:
    from vmbuild.pipeline.history import History
    from vmbuild.scaleout import events
    from vmbuild.scaleout import submit as sub
    from vmbuild.scaleout.app import broker_url, make_app

    broker = broker_url(args.broker)
    client = events.connect(broker)
    with History(_history(args)) as history:
        print(sub.cancel(make_app(broker), history, client, args.id), flush=True)
        if not args.wait:
            return 0
        record = sub.wait(history, client, args.id, timeout=args.timeout)
    print(f"run {record.id} {record.status}")
    return 0 if record.status == "cancelled" else 1


# -- parser ------------------------------------------------------------------
def add_parser(subparsers: Any) -> None:
    """Add the `pipeline`, `scheduler` and `runs` verbs to vmbuild's parser."""
    from vmbuild.cli.build import add_variable_flags

    def verb(parent: Any, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        p.add_argument(
            "--history",
            help="run history database (default: $VMBUILD_HISTORY or "
            "~/.local/state/vmbuild/history.sqlite); locks and run logs live next to it",
        )
        return p

    def store_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--store", help="artifact store for pipelines without store: "
            "(default: $VMBUILD_STORE or ./images)",
        )  # fmt: skip

    def json_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="machine-readable output")

    pipeline = subparsers.add_parser(
        "pipeline", help="pipelines: run, check dependencies, export schedules"
    ).add_subparsers(dest="pipeline_verb", required=True, metavar="ACTION")
    run = verb(pipeline, "run", cmd_run, "run a pipeline now (recorded in the run history)")
    run.add_argument("file", help="pipeline YAML file")
    run.add_argument(
        "--trigger", choices=["manual", "schedule"], default="manual",
        help="schedule: as a timer would (honours schedule.start_condition)",
    )  # fmt: skip
    run.add_argument("--quiet", action="store_true", help="no progress output")
    add_variable_flags(run)
    store_flag(run)
    run.add_argument(
        "--json", action="store_true",
        help="one JSON event per line as the run goes (as build --json), then a `run` event",
    )  # fmt: skip
    check = verb(
        pipeline, "check", cmd_check,
        "which dependencies changed since the last successful run, without building "
        "(exit 0: changed, 1: nothing changed, 2: could not check)",
    )  # fmt: skip
    check.add_argument("file", help="pipeline YAML file")
    check.add_argument("--max-details", type=int, default=20, help="lines per change (default 20)")
    add_variable_flags(check)
    json_flag(check)
    prune = verb(pipeline, "prune", cmd_prune, "apply the pipeline's lifecycle rules now")
    prune.add_argument("file", help="pipeline YAML file")
    prune.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    add_variable_flags(prune)
    store_flag(prune)
    json_flag(prune)
    sd = verb(pipeline, "export-systemd", cmd_export_systemd, "write a .service and .timer pair")
    sd.add_argument("file", help="pipeline YAML file")
    sd.add_argument("--output-dir", default=".", help="where to write the units (default: .)")
    add_variable_flags(sd)
    store_flag(sd)
    cron = verb(pipeline, "export-cron", cmd_export_cron, "print a crontab line for the pipeline")
    cron.add_argument("file", help="pipeline YAML file")
    add_variable_flags(cron)
    store_flag(cron)

    sched = verb(
        subparsers, "scheduler", cmd_scheduler, "run pipelines on their schedules (daemon)"
    )
    sched.add_argument(
        "--pipelines",
        default="pipelines",
        help="directory of pipeline YAML files (default: ./pipelines)",
    )
    sched.add_argument(
        "--max-parallel", type=int, default=1, help="runs at the same time (default 1)"
    )
    sched.add_argument(
        "--stop-timeout", type=float, default=300.0,
        help="on SIGTERM, seconds to wait for cancelled builds to clean up (default 300)",
    )  # fmt: skip
    add_variable_flags(sched)
    store_flag(sched)
    sched.add_argument(
        "--broker", help="Redis broker URL: enqueue due pipelines for workers instead of "
        "running them here (default: $VMBUILD_BROKER when set)",
        default=os.environ.get("VMBUILD_BROKER"),
    )  # fmt: skip
    sched.add_argument("--queue", default="tcg", help="queue for enqueued runs (default: tcg)")

    runs = subparsers.add_parser(
        "runs", help="run history (pipelines, worker runs): list, show, logs, cancel"
    ).add_subparsers(dest="runs_verb", required=True, metavar="ACTION")
    rl = verb(runs, "list", cmd_runs_list, "list pipeline runs, newest first")
    rl.add_argument("--pipeline", help="only this pipeline's runs")
    rl.add_argument("--status", choices=list(STATUSES))
    rl.add_argument("--limit", type=int, default=50)
    json_flag(rl)
    rs = verb(runs, "show", cmd_runs_show, "one run: timings, artifact, AMIs, error, log tail")
    rs.add_argument("id", type=int)
    json_flag(rs)
    rlog = verb(runs, "logs", cmd_runs_logs, "print a run's log")
    rlog.add_argument("id", type=int)
    rlog.add_argument("--tail", type=int, help="only the last N lines")
    rc = verb(runs, "cancel", cmd_runs_cancel,
              "cancel a queued or running worker run (from any host)")  # fmt: skip
    rc.add_argument("id", type=int)
    rc.add_argument("--broker", help="Redis broker URL (default: $VMBUILD_BROKER)")
    rc.add_argument("--wait", action="store_true", help="wait until the run has stopped")
    rc.add_argument("--timeout", type=float, default=600.0, help="for --wait (default 600 s)")
