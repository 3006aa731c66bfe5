"""`vmbuild init [DIR] [--from minimal|example]`: a recipe, a component, a testinfra file
and a pipeline to start from, each valid as written (`vmbuild validate` passes on them).

The templates are package data (vmbuild/data/init/): `minimal` is a small image with
one custom component and a variable; `example` is examples/nginx from the repository.
Existing files are never overwritten.
"""

from __future__ import annotations

import argparse
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

from vmbuild.cli.common import SubParsers, verb
from vmbuild.errors import VmbuildError

TEMPLATES = ("minimal", "example")


def add_parser(sub: SubParsers) -> None:
    p = verb(sub, "init", cmd_init, "scaffold a recipe, component, tests and pipeline")
    p.add_argument("directory", nargs="?", default=".", help="where to write them (default: .)")
    p.add_argument(
        "--from", dest="template", choices=TEMPLATES, default="minimal",
        help="minimal (default) or example (the nginx example)",
    )  # fmt: skip


def _files(root: Traversable, prefix: str = "") -> list[tuple[str, Traversable]]:
    found = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name == "__pycache__":
            continue
        rel = f"{prefix}{entry.name}"
        found += _files(entry, f"{rel}/") if entry.is_dir() else [(rel, entry)]
    return found


def cmd_init(args: argparse.Namespace) -> int:
    target = Path(args.directory)
    files = _files(resources.files("vmbuild") / "data" / "init" / args.template)
    existing = [rel for rel, _ in files if (target / rel).exists()]
    if existing:
        raise VmbuildError(
            f"{target}: would overwrite {', '.join(existing)}",
            hint="choose an empty directory: vmbuild init DIR",
        )
    for rel, source in files:
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(source.read_bytes())
        print(dest)
    recipe = target / "recipe.yaml"
    print(f"next: vmbuild validate {recipe} && vmbuild inspect {recipe} && vmbuild build {recipe}")
    return 0
