"""Verbs: `vmbuild worker [export-systemd]`, `vmbuild submit RECIPE|PIPELINE`.
Loaded by vmbuild.cli as an extension module; `runs cancel` lives with `runs`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vmbuild import paths
from vmbuild.cli.common import confirm
from vmbuild.errors import VmbuildError


def history_location(explicit: str | None) -> str:
    """A database URL as given; a SQLite file path made absolute (workers resolve
    nothing against the submitter's working directory)."""
    from vmbuild.pipeline.history import default_path, is_url

    value = explicit or os.environ.get("VMBUILD_HISTORY")
    if value and is_url(value):
        return value
    return str(Path(value).resolve() if value else default_path().resolve())


def store_location(explicit: str | None) -> str:
    from vmbuild.scaleout.artifacts import is_s3

    value = explicit or os.environ.get("VMBUILD_STORE")
    if value and is_s3(value):
        return value.rstrip("/")
    return str(paths.store_dir(value).resolve())


# -- worker --------------------------------------------------------------------
def cmd_worker(args: argparse.Namespace) -> int:
    from vmbuild.scaleout.app import broker_url
    from vmbuild.scaleout.worker import run_worker

    broker = broker_url(args.broker)
    history = history_location(args.history)
    cache = Path(args.cache_dir).resolve() if args.cache_dir else paths.cache_dir()
    run_worker(
        broker=broker, history=history, queues=args.queue, concurrency=args.concurrency,
        name=args.name, cache_dir=cache, accel_mode=args.accel,
        loglevel="DEBUG" if args.debug else "INFO",
    )  # fmt: skip
    return 0


def cmd_worker_export_systemd(args: argparse.Namespace) -> int:
    from vmbuild.scaleout.app import broker_url
    from vmbuild.scaleout.worker import systemd_unit

    cache = Path(args.cache_dir).resolve() if args.cache_dir else paths.cache_dir()
    text = systemd_unit(
        broker=broker_url(args.broker), history=history_location(args.history),
        queues=args.queue, concurrency=args.concurrency, cache_dir=cache,
    )  # fmt: skip
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    unit = out / "vmbuild-worker@.service"
    unit.write_text(text)
    print(unit)
    print(
        f"install: cp {unit} /etc/systemd/system/ && systemctl daemon-reload && "
        "systemctl enable --now vmbuild-worker@1 vmbuild-worker@2",
        file=sys.stderr,
    )
    return 0


# -- submit --------------------------------------------------------------------
def _app(args: argparse.Namespace) -> tuple[Any, Any]:
    from vmbuild.scaleout import events
    from vmbuild.scaleout.app import broker_url, make_app

    broker = broker_url(args.broker)
    return make_app(broker), events.connect(broker)


def _print_event(event: dict[str, Any]) -> None:
    kind = event["kind"]
    if kind == "start":
        print(f"started on {event['worker']} (attempt {event['attempt']})", flush=True)
    elif kind == "stage" and event["state"] != "started":
        secs = event.get("seconds")
        took = f" ({secs:.1f}s)" if isinstance(secs, int | float) else ""
        print(f"{'✓' if event['state'] == 'done' else '✗'} {event['title']}{took}", flush=True)
    elif kind == "stage":
        print(f"▶ {event['title']}", flush=True)
    elif kind in ("status", "output"):
        print(f"  {event['text']}", flush=True)


def cmd_submit(args: argparse.Namespace) -> int:
    from vmbuild.pipeline.history import History
    from vmbuild.scaleout import submit as sub

    options: dict[str, Any] = {"store": store_location(args.store)}
    if args.noop is not None:
        kind, name, file = "noop", "noop", None
        options.update(seconds=args.noop, fail=args.noop_fail)
        queue = args.queue or "tcg"
    else:
        if not args.file:
            raise VmbuildError("submit what?", hint="vmbuild submit RECIPE|PIPELINE")
        file = Path(args.file)
        kind, name, queue = _what(file, args.queue)
        options.update(accelerator=args.accelerator, skip_tests=args.skip_tests)
    app, client = _app(args)
    with History(history_location(args.history)) as history:
        sent = sub.submit(app, history, kind=kind, name=name, queue=queue, file=file,
                          options=options)  # fmt: skip
        served = sub.served_queues(app)
        workers = served.get(queue)
        note = (
            f"served by {', '.join(sorted(workers))}"
            if workers
            else f"NO worker serves queue {queue!r} now: the run stays queued until one does"
        )
        if args.json and not args.wait:
            print(json.dumps({"run": sent.run_id, "task": sent.task_id, "queue": queue,
                              "served_by": sorted(workers or [])}))  # fmt: skip
        else:
            print(f"run {sent.run_id} queued on {queue} ({note})", flush=True)
        if not workers:
            print(f"warning: no worker consumes queue {queue!r}", file=sys.stderr)
        if not args.wait:
            return 0
        record = sub.wait(history, client, sent.run_id,
                          on_event=None if args.json else _print_event)  # fmt: skip
    if args.json:
        print(json.dumps(record.to_json(), indent=2))
    else:
        print(f"run {record.id} {record.status} on {record.worker or '-'}")
        if record.artifact:
            print(f"artifact: {record.artifact}")
    if record.status not in ("succeeded", "skipped"):
        raise VmbuildError(f"run {record.id} {record.status}: {record.error or '-'}",
                           hint=f"vmbuild runs show {record.id}")  # fmt: skip
    return 0


def _what(file: Path, queue: str | None) -> tuple[str, str, str]:
    """Validate the file here, before anything is queued: a recipe or a pipeline."""
    from vmbuild.config.loader import load_yaml
    from vmbuild.scaleout.submit import pipeline_queue

    doc = load_yaml(file) if file.is_file() else None
    if doc is None:
        raise VmbuildError(f"{file}: no such file")
    if isinstance(doc, dict) and "recipe" in doc:
        from vmbuild.config.pipeline import load_pipeline

        loaded = load_pipeline(file)
        return "pipeline", loaded.name, queue or pipeline_queue(loaded, "tcg")
    from vmbuild.config.recipe import load_recipe

    recipe = load_recipe(file)
    return "build", recipe.recipe.name, queue or "tcg"


# -- images on an S3 store ------------------------------------------------------
def cmd_images_s3(args: argparse.Namespace, action: str) -> int:
    """`images list|show|rm --store s3://...` (the local store's verbs call this)."""
    from vmbuild.scaleout.artifacts import S3Store

    store = S3Store(store_location(args.store))
    if action == "list":
        rows = store.images()
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for r in rows:
            print(f"{r['ref']:50} {r['created'] or '':21} {r['tests']:8} "
                  f"{','.join(r['formats']):20} {r['size'] / (1 << 20):8.0f} MiB")  # fmt: skip
        return 0
    if action == "show":
        where, manifest = store.manifest(args.ref)
        manifest["path"] = where
        if args.json:
            print(json.dumps(manifest, indent=2))
            return 0
        ref = f"{manifest['name']}/{manifest['version']}/{manifest['build']}"
        print(f"image:    {ref}\npath:     {where}\ncreated:  {manifest.get('created')}")
        print(f"tests:    {(manifest.get('tests') or {}).get('status', 'unknown')}")
        for o in manifest.get("outputs") or []:
            print(f"output    {o.get('format', '?'):6} {o.get('file')} sha256:{o.get('sha256')}")
        return 0
    where, _ = store.manifest(args.ref)
    if not args.yes and not confirm(f"remove {where}? [y/N] "):
        raise VmbuildError(f"{args.ref} not removed", hint="answer y, or pass --yes")
    removed = store.remove(args.ref)
    print(json.dumps({"removed": removed}) if args.json else f"removed {removed}")
    return 0


# -- parser --------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--broker", help="Redis broker URL (default: $VMBUILD_BROKER)")
        p.add_argument(
            "--history", help="run history: postgresql://... shared by every host, or a "
            "SQLite file (default: $VMBUILD_HISTORY or ~/.local/state/vmbuild/history.sqlite)",
        )  # fmt: skip

    w = sub.add_parser("worker", help="run builds from a Redis queue (Celery worker)",
                       description="run builds from a Redis queue (Celery worker)")  # fmt: skip
    w.set_defaults(handler=cmd_worker)
    common(w)

    def worker_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--queue",
            action="append",
            help="a queue (capability) to serve: kvm, tcg, arm64, aws... (repeat; "
            "default: tcg, plus kvm when the KVM probe proves a guest boots)",
        )
        p.add_argument(
            "--concurrency",
            type=int,
            help="runs at once (default: from cores and memory for a 2-CPU, 2 GiB VM)",
        )
        p.add_argument("--cache-dir", help="this worker's cache (bases, staging, logs)")

    worker_flags(w)
    w.add_argument("--name", help="Celery node name (default: vmbuild@HOSTNAME)")
    w.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto",
                   help="auto: the KVM probe decides (default)")  # fmt: skip
    actions = w.add_subparsers(dest="worker_verb", metavar="ACTION")
    sd = actions.add_parser("export-systemd", help="write a vmbuild-worker@.service template")
    sd.set_defaults(handler=cmd_worker_export_systemd)
    common(sd)
    worker_flags(sd)
    sd.add_argument("--output-dir", default=".", help="where to write the unit (default: .)")

    s = sub.add_parser("submit", help="queue a build or pipeline run for the workers",
                       description="queue a build or pipeline run for the workers")  # fmt: skip
    s.set_defaults(handler=cmd_submit)
    s.add_argument("file", nargs="?", help="recipe or pipeline YAML (same path on the workers)")
    common(s)
    s.add_argument("--queue", help="default: tcg (kvm for a pipeline asking for KVM)")
    s.add_argument("--wait", action="store_true", help="follow the run's progress to its end")
    s.add_argument("--store", help="artifact store: a directory or s3://BUCKET/PREFIX")
    s.add_argument("--accelerator", "--accel", choices=["auto", "kvm", "tcg"],
                   help="default: the recipe's, else auto")  # fmt: skip
    s.add_argument("--skip-tests", action="store_true", help="do not boot the test VM")
    s.add_argument(
        "--noop",
        type=float,
        metavar="SECONDS",
        help="a task that only waits: checks a deployment's routing and overhead",
    )
    s.add_argument("--noop-fail", metavar="MESSAGE", help=argparse.SUPPRESS)
    s.add_argument("--json", action="store_true", help="machine-readable output")
