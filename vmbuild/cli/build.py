"""`vmbuild build RECIPE`: build, test and store an image."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text

from vmbuild import console, paths
from vmbuild.cli.common import SubParsers, json_flag, store_flag, verb
from vmbuild.config import settings

if TYPE_CHECKING:
    from vmbuild.config.recipe import LoadedRecipe
    from vmbuild.plan import BuildOptions


def add_parser(sub: SubParsers) -> None:
    b = verb(sub, "build", cmd_build, "build (and test) an image from a recipe")
    b.add_argument("recipe", help="recipe YAML file")
    add_plan_flags(b)
    json_flag(b)


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    """The flags that shape a build's plan (shared with `vmbuild inspect`): every
    setting config/settings.py allows on the command line, and --store."""
    settings.add_flags(p)
    p.add_argument(
        "--secret", action="append", metavar="NAME=@FILE|NAME=env:VAR",
        help="a secret component parameter, read from a file or an environment variable "
        "(never from the command line); masked everywhere; repeatable",
    )  # fmt: skip
    add_variable_flags(p)
    store_flag(p)


def add_variable_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--var", action="append", default=[], metavar="KEY=VALUE",
        help="a value for the variable KEY (`{{ var.KEY }}`); repeatable; wins over "
        "--var-file and $VMBUILD_VAR_KEY",
    )  # fmt: skip
    p.add_argument(
        "--var-file", action="append", default=[], metavar="FILE",
        help="a YAML mapping of variable values; repeatable (later files win)",
    )  # fmt: skip


def load_from_args(args: argparse.Namespace) -> LoadedRecipe:
    """The recipe named on the command line, with its --secret and --var values."""
    from vmbuild.config.recipe import load_recipe
    from vmbuild.config.variables import parse_cli
    from vmbuild.secrets import parse_cli_secret

    given = dict(parse_cli_secret(spec) for spec in args.secret or [])
    variables = parse_cli(args.var, args.var_file)
    return load_recipe(Path(args.recipe), secrets=given, variables=variables)


def plan_options(args: argparse.Namespace) -> BuildOptions:
    from vmbuild.errors import VmbuildError
    from vmbuild.plan import BuildOptions

    if (args.store or "").startswith("s3://"):
        raise VmbuildError(
            f"--store {args.store}: a local build writes to a directory",
            hint="workers build to S3: vmbuild submit RECIPE --store " + args.store,
        )
    return BuildOptions(store=paths.store_dir(args.store), **settings.cli_values(args))


def is_container_recipe(path: Path) -> bool:
    """A container recipe (`parentImage:`) is built by vmbuild/container_build.py."""
    from vmbuild.config.detect import detect_kind
    from vmbuild.config.loader import load_yaml
    from vmbuild.errors import VmbuildError

    try:
        return detect_kind(load_yaml(path)) == "container-recipe"
    except VmbuildError:
        return False  # the recipe loader reports it


def _build_container(args: argparse.Namespace) -> int:
    from vmbuild.config.container import load_container_recipe
    from vmbuild.config.variables import parse_cli
    from vmbuild.container_build import build_container
    from vmbuild.errors import VmbuildError
    from vmbuild.log import Progress

    if args.json or args.secret:
        flag = "--json" if args.json else "--secret"
        raise VmbuildError(f"{flag} is not supported for container recipes yet")
    variables = parse_cli(args.var, args.var_file)
    loaded = load_container_recipe(Path(args.recipe), variables=variables)  # before side effects
    result = build_container(loaded, plan_options(args), Progress())
    m = result.manifest
    con = console.stdout()
    table = Table(title=Text(f"{m['name']} {m['version']} ({m['build']})"), show_edge=False)
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for name, secs in m["timings"].items():
        table.add_row(name, f"{secs:.1f}")
    con.print(table)
    con.print(Text(f"image  {result.image.digest}  tags: {', '.join(result.image.tags)}"))
    for layer in result.image.layers:
        con.print(Text(f"layer  {layer.digest}  {layer.size:>10}  {layer.created_by}"))
    for pushed in result.pushed:
        con.print(
            Text(f"pushed {pushed.reference}" + (" (already there)" if pushed.skipped else ""))
        )
    con.print(f"tests: {test_summary(m.get('tests') or {})}")
    con.print(console.styled("artifact:", "bold green", f" {result.build_dir}"))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    if is_container_recipe(Path(args.recipe)):
        return _build_container(args)
    if args.json:
        return _build_json(args)
    from vmbuild.build import build
    from vmbuild.log import Progress

    loaded = load_from_args(args)  # validated before any side effect
    result = build(loaded, plan_options(args), Progress())
    m = result.manifest
    con = console.stdout()
    table = Table(title=Text(f"{m.name} {m.version} ({m.build})"), show_edge=False)
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for name, secs in m.timings.items():
        table.add_row(name, f"{secs:.1f}")
    con.print(table)
    for o in m.outputs:
        con.print(f"{o.format:6} {result.build_dir / o.file}  sha256:{o.sha256}")
    con.print(f"tests: {test_summary(m.tests or {})}")
    con.print(console.styled("artifact:", "bold green", f" {result.build_dir}"))
    return 0


def _build_json(args: argparse.Namespace) -> int:
    """`build --json`: events on stdout as they happen (vmbuild/events.py), errors included."""
    from vmbuild.build import build
    from vmbuild.errors import VmbuildError
    from vmbuild.events import JsonReporter

    reporter = JsonReporter()
    try:
        loaded = load_from_args(args)
        recipe = loaded.recipe
        reporter.emit("start", recipe=str(loaded.path), name=recipe.name, version=recipe.version)
        with reporter.warnings():
            result = build(loaded, plan_options(args), reporter)
    except BaseException as exc:
        code = 1 if isinstance(exc, VmbuildError) else 130 if _interrupted(exc) else 2
        hint = exc.hint if isinstance(exc, VmbuildError) else None
        reporter.emit("error", message=str(exc), hint=hint, kind=type(exc).__name__, exit_code=code)
        raise  # the CLI prints it on stderr and exits with that code
    reporter.emit("result", path=str(result.build_dir), manifest=result.manifest.to_json())
    return 0


def _interrupted(exc: BaseException) -> bool:
    return isinstance(exc, KeyboardInterrupt)


def test_summary(tests: dict[str, Any]) -> str:
    """`passed: testinfra 6 passed (0 failed, 0 errors, 0 skipped); component tests 2/2 passed`."""
    status = str(tests.get("status", "unknown"))
    if status == "skipped":
        return "skipped (--skip-tests)"
    parts = []
    ti = tests.get("testinfra") or {}
    if ti.get("tests"):
        failed = int(ti.get("failures", 0)) + int(ti.get("errors", 0))
        passed = int(ti["tests"]) - failed - int(ti.get("skipped", 0))
        parts.append(
            f"testinfra {passed} passed ({ti.get('failures', 0)} failed, "
            f"{ti.get('errors', 0)} errors, {ti.get('skipped', 0)} skipped)"
        )
    components = tests.get("components") or []
    if components:
        ok = sum(1 for c in components if c.get("status") != "Failed")
        parts.append(f"component tests {ok}/{len(components)} passed")
    return f"{status}: {'; '.join(parts)}" if parts else status
