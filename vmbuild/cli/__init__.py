"""The `vmbuild` command line: verbs map to plain functions; errors become one line + hint."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table

from vmbuild import __version__, paths
from vmbuild.errors import VmbuildError

Handler = Callable[[argparse.Namespace], int]
log = logging.getLogger("vmbuild.cli")


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM/SIGHUP become KeyboardInterrupt, once, so every context manager
    # unwinds (VMs reaped, staging removed); a second signal is not re-raised
    # inside that cleanup.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def _out(args: argparse.Namespace, data: Any, human: Callable[[], None]) -> int:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        human()
    return 0


# -- build -------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    from vmbuild.build import BuildOptions, build
    from vmbuild.config.recipe import load_recipe
    from vmbuild.log import Progress

    loaded = load_recipe(Path(args.recipe))  # validated before any side effect
    opts = BuildOptions(
        store=paths.store_dir(args.store),
        accel=args.accel,
        skip_tests=args.skip_tests,
        keep_on_failure=args.keep_on_failure,
        backend=args.backend,
        mirror=args.mirror,
        libvirt_uri=args.libvirt_uri,
        libvirt_network=args.libvirt_network,
    )
    progress = Progress(quiet=args.json)
    result = build(loaded, opts, progress)
    m = result.manifest

    def human() -> None:
        console = Console()
        table = Table(title=f"{m['name']} {m['version']} ({m['build']})", show_edge=False)
        table.add_column("stage")
        table.add_column("seconds", justify="right")
        for name, secs in m["timings"].items():
            table.add_row(name, f"{secs:.1f}")
        console.print(table)
        for o in m["outputs"]:
            console.print(
                f"{o['format']:6} {result.build_dir / o['file']}  sha256:{o['sha256'][:16]}…"
            )
        console.print(f"tests: {m['tests']['status']}")
        console.print(f"[bold green]artifact:[/] {result.build_dir}")

    return _out(args, {"path": str(result.build_dir), "manifest": m}, human)


# -- base --------------------------------------------------------------------
def cmd_base_build(args: argparse.Namespace) -> int:
    from vmbuild.log import Progress
    from vmbuild.stages import base_image

    progress = Progress(quiet=args.json)
    with progress.stage("base", f"build base {args.release}"):
        base = base_image.build_debian(
            args.release, mirror=args.mirror, rebuild=args.rebuild, on_progress=progress.status
        )
    return _out(args, _base_json(base), lambda: print(f"{base.id}  {base.path}"))


def cmd_base_fetch(args: argparse.Namespace) -> int:
    from vmbuild.stages import base_image

    if not (args.sha256 or args.sha512 or args.checksum_url):
        raise VmbuildError(
            "a checksum is required", hint="pass --sha256 HEX, --sha512 HEX or --checksum-url URL"
        )
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    bar = Progress(
        *Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(),
        console=Console(stderr=True), transient=True,
        disable=args.json or not sys.stderr.isatty(),
    )  # fmt: skip
    task = bar.add_task("download", total=None)

    def progress(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)

    with bar:
        base = base_image.fetch_base(
            args.url, sha256=args.sha256, sha512=args.sha512, checksum_url=args.checksum_url,
            on_progress=progress,
        )  # fmt: skip
    return _out(args, _base_json(base), lambda: print(f"{base.id}  {base.path}"))


def cmd_base_list(args: argparse.Namespace) -> int:
    from vmbuild.stages import base_image

    bases = base_image.list_bases()

    def human() -> None:
        table = Table(show_edge=False)
        for col in ("id", "format", "size", "source"):
            table.add_column(col)
        for b in bases:
            table.add_row(b.id, b.format, f"{b.virtual_size >> 30} GiB", b.source)
        Console().print(table)

    return _out(args, [_base_json(b) for b in bases], human)


def _base_json(b: Any) -> dict[str, Any]:
    return {
        "id": b.id, "path": str(b.path), "format": b.format, "sha256": b.sha256,
        "source": b.source, "virtual_size": b.virtual_size,
    }  # fmt: skip


# -- images ------------------------------------------------------------------
def cmd_images_list(args: argparse.Namespace) -> int:
    from vmbuild.stages import store

    rows = [store.summary(b) for b in store.builds(paths.store_dir(args.store))]

    def human() -> None:
        table = Table(show_edge=False)
        for col in ("image", "created", "tests", "formats", "size"):
            table.add_column(col)
        for r in rows:
            table.add_row(
                r["ref"], r["created"] or "", r["tests"], ",".join(r["formats"]),
                f"{r['size'] / (1 << 20):.0f} MiB",
            )  # fmt: skip
        Console().print(table)

    return _out(args, rows, human)


def cmd_images_show(args: argparse.Namespace) -> int:
    from vmbuild.stages import store

    build_dir = store.resolve(paths.store_dir(args.store), args.ref)
    manifest = store.read_manifest(build_dir)
    manifest["path"] = str(build_dir)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    s = store.summary(build_dir)
    print(f"image:    {s['ref']}\npath:     {build_dir}\ncreated:  {s['created']}")
    print(f"base:     {manifest['base']['source']} ({manifest['base']['id']})")
    print(f"tests:    {s['tests']}")
    print(f"packages: {len(manifest.get('packages', []))}")
    for c in manifest.get("components", []):
        print(f"component {c['name']} sha256:{c['sha256'][:12]} {c.get('parameters') or ''}")
    for o in manifest.get("outputs", []):
        print(f"output    {o['format']:6} {o['file']} sha256:{o['sha256']}")
    return 0


def cmd_images_rm(args: argparse.Namespace) -> int:
    from vmbuild.stages import store

    build_dir = store.resolve(paths.store_dir(args.store), args.ref)
    store.remove(build_dir)
    return _out(args, {"removed": str(build_dir)}, lambda: print(f"removed {build_dir}"))


# -- doctor ------------------------------------------------------------------
DOCTOR_TOOLS = ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "sfdisk", "mke2fs", "debugfs")


def doctor_report(accel_mode: str = "auto", libvirt_uri: str | None = None) -> dict[str, Any]:
    import tempfile

    from vmbuild.hypervisor import accel
    from vmbuild.run import run, which

    report: dict[str, Any] = {"vmbuild": __version__}
    for tool in DOCTOR_TOOLS:
        path = which(tool)
        version = None
        if path and tool in ("qemu-system-x86_64", "qemu-img"):
            version = run([tool, "--version"], timeout=30).stdout.splitlines()[0]
        report[tool] = {"path": path, "version": version}
    probe = None
    try:
        from vmbuild.stages import base_image

        bases = base_image.list_bases()
        if bases:
            probe = (bases[0].path, bases[0].format)
    except VmbuildError:
        pass
    with tempfile.TemporaryDirectory(prefix="vmbuild-doctor-") as tmp:
        try:
            chosen = accel.choose(accel_mode, probe, Path(tmp))  # type: ignore[arg-type]
            report["accelerator"] = chosen.to_json()
        except VmbuildError as exc:
            report["accelerator"] = {"kind": None, "reason": str(exc)}
    from vmbuild.hypervisor.libvirt import libvirt_report

    report["libvirt"] = libvirt_report(libvirt_uri)
    cache = paths.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    store_dir = paths.store_dir()
    report["cache_dir"] = {"path": str(cache), "free_bytes": shutil.disk_usage(cache).free}
    existing = store_dir if store_dir.exists() else Path.cwd()
    report["store"] = {"path": str(store_dir), "free_bytes": shutil.disk_usage(existing).free}
    return report


def cmd_doctor(args: argparse.Namespace) -> int:
    report = doctor_report(args.accel, args.libvirt_uri)

    def human() -> None:
        for tool in DOCTOR_TOOLS:
            info = report[tool]
            state = info["version"] or info["path"] or "MISSING"
            print(f"{tool:20} {state}")
        a = report["accelerator"]
        print(f"{'accelerator':20} {a['kind']}: {a['reason']}")
        lv = report["libvirt"]
        if lv.get("reachable"):
            print(
                f"{'libvirt':20} {lv['uri']} reachable, libvirt {lv['version']}, {lv['hypervisor']}"
            )
        else:
            print(f"{'libvirt':20} {lv['uri']} not reachable: {lv.get('error')}")
            if lv.get("hint"):
                print(f"{'':20} hint: {lv['hint']}")
        for key in ("cache_dir", "store"):
            free = report[key]["free_bytes"] / (1 << 30)
            print(f"{key:20} {report[key]['path']} ({free:.1f} GiB free)")

    _out(args, report, human)
    missing = [t for t in ("qemu-system-x86_64", "qemu-img") if not report[t]["path"]]
    return 1 if missing else 0


# -- parser ------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmbuild", description="Build, test and distribute VM images locally."
    )
    parser.add_argument("--version", action="version", version=f"vmbuild {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, handler: Handler, help: str, parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    def json_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="machine-readable output")

    def store_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", help="artifact store (default: $VMBUILD_STORE or ./images)")

    b = verb("build", cmd_build, "build (and test) an image from a recipe")
    b.add_argument("recipe", help="recipe YAML file")
    b.add_argument("--skip-tests", action="store_true", help="do not boot the test VM")
    b.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    b.add_argument(
        "--backend", choices=["qemu", "libvirt"], help="default: the recipe's vm.backend, or qemu"
    )
    b.add_argument("--libvirt-uri", help="default: qemu:///system as root, else qemu:///session")
    b.add_argument("--libvirt-network", help="attach to this libvirt network (address from DHCP)")
    b.add_argument(
        "--keep-on-failure", action="store_true", help="leave the failed VM running for SSH"
    )
    b.add_argument("--mirror", help="Debian mirror for a debian-12 base (default: the host's)")
    store_flag(b)
    json_flag(b)

    base = sub.add_parser("base", help="base images: build, fetch, list").add_subparsers(
        dest="base_verb", required=True, metavar="ACTION"
    )
    bb = verb("build", cmd_base_build, "build a base image offline (mmdebstrap)", base)
    bb.add_argument("release", choices=["debian-12"])
    bb.add_argument("--mirror")
    bb.add_argument("--rebuild", action="store_true", help="ignore the cache")
    json_flag(bb)
    bf = verb("fetch", cmd_base_fetch, "download a vendor image and verify its checksum", base)
    bf.add_argument("url")
    group = bf.add_mutually_exclusive_group()
    group.add_argument("--sha256")
    group.add_argument("--sha512")
    group.add_argument("--checksum-url", help="a SHA256SUMS/SHA512SUMS file URL")
    json_flag(bf)
    bl = verb("list", cmd_base_list, "list cached base images", base)
    json_flag(bl)

    images = sub.add_parser("images", help="stored artifacts: list, show, rm").add_subparsers(
        dest="images_verb", required=True, metavar="ACTION"
    )
    for name, handler, help_text, takes_ref in (
        ("list", cmd_images_list, "list stored images", False),
        ("show", cmd_images_show, "show an image's manifest", True),
        ("rm", cmd_images_rm, "delete a stored build", True),
    ):
        p = verb(name, handler, help_text, images)
        if takes_ref:
            p.add_argument("ref", help="NAME[/VERSION[/BUILD]] or a build directory")
        store_flag(p)
        json_flag(p)

    d = verb("doctor", cmd_doctor, "check the host: QEMU, accelerator, disk, cache")
    d.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    d.add_argument("--libvirt-uri", help="the libvirt URI to check")
    json_flag(d)

    for module in _extension_modules():
        module.add_parser(sub)
    return parser


def _extension_modules() -> list[Any]:
    """Verbs that live with their feature (component, distribute, pipeline...)."""
    import importlib

    found = []
    for name in ("vmbuild.cli.component", "vmbuild.cli.distribute", "vmbuild.cli.pipeline"):
        try:
            found.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            # Only a feature package that is absent is skipped, never a
            # broken import inside one.
            if not exc.name or not name.startswith(exc.name):
                raise
    return found


def main(argv: Sequence[str] | None = None) -> int:
    from vmbuild.log import setup_console_logging

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_console_logging(args.debug)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    err = Console(stderr=True, highlight=False)
    try:
        handler: Handler = args.handler
        return handler(args)
    except VmbuildError as exc:
        if args.debug:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False, soft_wrap=True)
        if exc.hint:
            err.print(f"[yellow]hint:[/] {exc.hint}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("[bold red]interrupted[/]: cleaned up")
        return 130
    except Exception as exc:  # a bug: say so, with the traceback in --debug
        if args.debug:
            traceback.print_exc()
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc}")
        err.print("[yellow]hint:[/] rerun with --debug for the traceback")
        return 2
    finally:
        sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
