"""`vmbuild component validate|list|run`: the component engine from the command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from vmbuild.config import settings
from vmbuild.errors import VmbuildError
from vmbuild.remote.base import Remote
from vmbuild.toe.actions import S3Config
from vmbuild.toe.document import load_document, validate_file
from vmbuild.toe.library import add_to_library, find_component, list_components, list_library
from vmbuild.toe.results import DocumentResult, Status
from vmbuild.toe.runner import check_phase_selection, run_document


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `component` verb and its actions to the main CLI."""
    component = subparsers.add_parser(
        "component",
        help="AWSTOE component documents: validate, list, run",
        description="Validate, list and run AWSTOE-compatible component documents.",
    )
    actions = component.add_subparsers(dest="component_action", required=True, metavar="ACTION")

    validate = actions.add_parser(
        "validate",
        help="check documents without running them",
        description="Check component documents (and their ExecuteDocument children); "
        "exit 1 and list every problem if any is invalid.",
    )
    validate.add_argument("files", nargs="+", help="document files or built-in component names")
    validate.set_defaults(handler=cmd_validate)

    listing = actions.add_parser(
        "list", help="show the built-in components and the local library's versions"
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=cmd_list)

    add = actions.add_parser(
        "add",
        help="add a document to the local component library as NAME/VERSION",
        description="Validate a component document and store it in the local library "
        "(versions are immutable, as in Image Builder). Recipes then name it NAME, "
        "NAME/VERSION, NAME/1.x.x or arn:aws:imagebuilder:REGION:ACCOUNT:component/NAME/VERSION.",
    )
    add.add_argument("file", type=Path, help="the AWSTOE document")
    add.add_argument("--version", required=True, help="semantic version, e.g. 1.0.0")
    add.add_argument(
        "--name", help="component name (default: the document's name, else the file's)"
    )
    add.set_defaults(handler=cmd_add)

    show = actions.add_parser(
        "show", help="print a component's document: NAME, NAME/VERSION (x.x.x allowed) or an ARN"
    )
    show.add_argument("ref", help="NAME[/VERSION] or a component ARN")
    show.set_defaults(handler=cmd_show)

    run = actions.add_parser(
        "run",
        help="run one document on a host or a throwaway VM",
        description="Run a component document against an SSH host, or a throwaway VM "
        "booted from a base image (to iterate on one component without a build).",
    )
    run.add_argument("file", help="document file or built-in component name")
    run.add_argument(
        "--phases",
        help="comma-separated phases to run (default: every phase the document has)",
    )
    run.add_argument(
        "--parameters",
        action="append",
        default=[],
        metavar="K=V[,K=V...]",
        help="parameter values, AWSTOE style; may be repeated",
    )
    target = run.add_mutually_exclusive_group(required=True)
    target.add_argument("--host", help="ssh://user@host[:port] (commands run through sudo)")
    target.add_argument("--base", help="boot a throwaway VM from this base (debian-12 or a file)")
    run.add_argument("--identity", type=Path, help="SSH private key for --host")
    settings.add_flag(run, "accelerator", default="auto")
    settings.add_flag(run, "no_cache")
    run.add_argument("--output", type=Path, help="write the detailed output (JSON) to this file")
    run.add_argument(
        "--working-directory",
        default="/tmp",
        help="guest folder the steps run in (default /tmp, Image Builder's default)",
    )
    run.add_argument("--s3-endpoint-url", help="S3 endpoint for S3Download/S3Upload")
    run.add_argument("--s3-region", help="S3 region for S3Download/S3Upload")
    run.set_defaults(handler=cmd_run)


def cmd_validate(args: argparse.Namespace) -> int:
    problems: list[str] = []
    for name in args.files:
        try:
            path = find_component(name, Path.cwd())
        except VmbuildError as exc:
            problems.append(str(exc))
            continue
        found = validate_file(path)
        problems += found
        if not found:
            print(f"{name}: valid")
    for line in problems:
        print(line)
    if problems:
        print(f"{len(problems)} problem(s) in {len(args.files)} document(s)", file=sys.stderr)
        return 1
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    components = [*list_components(), *list_library()]
    if args.json:
        data = [
            {
                "name": c.name,
                "version": c.version or None,
                "source": "library" if c.version else "built-in",
                "description": c.description,
                "phases": list(c.phases),
                "parameters": [
                    {"name": p.name, "default": p.default, "description": p.description}
                    for p in c.parameters
                ],
            }
            for c in components
        ]
        print(json.dumps(data, indent=2))
        return 0
    for c in components:
        label = f"{c.name}/{c.version}" if c.version else c.name
        print(f"{label}: {c.description}")
        for p in c.parameters:
            default = "required" if p.default is None else f"default {p.default!r}"
            print(f"    {p.name} ({default}): {p.description}")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    name = args.name or _document_name(args.file)
    stored = add_to_library(args.file, name, args.version)
    print(f"{name}/{args.version}: added ({stored})")
    return 0


def _document_name(path: Path) -> str:
    """The document's `name` when it is a usable component name, else the file stem."""
    from vmbuild.toe.document import parse

    doc, problems = parse(path, {}, display_name=str(path), require_values=False)
    if doc is None:
        raise problems[0].error() if problems else VmbuildError(f"{path}: invalid document")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", doc.name).strip("-.")
    return slug or path.stem


def cmd_show(args: argparse.Namespace) -> int:
    path = find_component(args.ref, Path.cwd())
    sys.stdout.write(path.read_text())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    path = find_component(args.file, Path.cwd())
    doc = load_document(path, parse_parameters(args.parameters), display_name=args.file)
    # As AWSTOE: the phases the document has, or those asked for (in document order).
    phases = [p.strip() for p in args.phases.split(",") if p.strip()] if args.phases else doc.phases
    unknown = [p for p in phases if p not in doc.phases]
    if unknown:
        raise VmbuildError(
            f"{args.file} has no phase {', '.join(unknown)} (it has: {', '.join(doc.phases)})"
        )
    check_phase_selection(doc, phases)  # before a VM is booted for nothing
    s3 = None
    if args.s3_endpoint_url or args.s3_region:
        s3 = S3Config(endpoint_url=args.s3_endpoint_url, region=args.s3_region)
    with _remote(args) as remote:
        result = run_document(
            doc, remote, phases=phases, on_output=_print, s3=s3,
            working_directory=args.working_directory,
        )  # fmt: skip
    if args.output:
        args.output.write_text(json.dumps(result.to_detailed_output(), indent=2) + "\n")
    _summary(result)
    return 1 if result.status is Status.FAILED else 0


@contextlib.contextmanager
def _remote(args: argparse.Namespace) -> Iterator[Remote]:
    if args.base:
        from vmbuild import console
        from vmbuild.scratch import scratch_vm  # boots QEMU: only when asked

        err = console.stderr()
        with scratch_vm(
            args.base, base_dir=Path.cwd(), accel=args.accelerator, keep_boot=not args.no_cache,
            on_status=lambda text: err.print(f"  {text}"),
        ) as session:  # fmt: skip
            yield session
        return
    if args.identity is None:
        raise VmbuildError("--host needs --identity KEY (the SSH private key)")
    user, host, port = parse_host(args.host)
    from vmbuild.remote.ssh import SSHSession

    with SSHSession.connect(host, port, user, args.identity, host_key=None) as session:
        yield session


def parse_host(url: str) -> tuple[str, str, int]:
    """`ssh://user@host[:port]` → (user, host, port)."""
    parts = urlsplit(url)
    try:
        port = parts.port or 22
    except ValueError:
        port = -1
    if parts.scheme != "ssh" or not parts.username or not parts.hostname or port < 1:
        raise VmbuildError(
            f"--host: expected ssh://user@host[:port], got {url!r}",
            hint="for example --host ssh://admin@192.0.2.10:22 --identity ~/.ssh/id_ed25519",
        )
    return parts.username, parts.hostname, port


def parse_parameters(values: Sequence[str]) -> dict[str, str]:
    """AWSTOE's `--parameters name1=value1,name2=value2` (the flag may repeat)."""
    parameters: dict[str, str] = {}
    for value in values:
        for pair in value.split(","):
            name, equals, text = pair.partition("=")
            if not equals or not name.strip() or not text:
                raise VmbuildError(
                    f"--parameters: expected NAME=VALUE, got {pair!r}",
                    hint="both the name and the value are required, e.g. --parameters Port=8080",
                )
            parameters[name.strip()] = text
    return parameters


def _print(line: str) -> None:
    print(line, flush=True)


def _summary(result: DocumentResult) -> None:
    print(f"\n{result.name}: {result.status.value} in {result.duration:.1f}s")
    for phase in result.phases:
        for step in phase.steps:
            attempts = f", {step.attempts} attempts" if step.attempts > 1 else ""
            line = (
                f"  {phase.name}/{step.name}: {step.status.value} ({step.duration:.1f}s{attempts})"
            )
            if step.failure_message and step.status is not Status.SUCCESS:
                line += f" - {step.failure_message}"
            print(line)
