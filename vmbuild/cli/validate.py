"""`vmbuild validate FILE...`: check recipes, pipelines, distribution files and components.

The kind of each file is told by its content; the same loaders a build uses check it,
so a file that validates here fails no later validation. Nothing is created: no disk,
no VM, no AWS call, no cache entry.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmbuild.cli.build import add_variable_flags
from vmbuild.cli.common import SubParsers, json_flag, verb
from vmbuild.config.detect import KINDS, Kind, detect_kind
from vmbuild.errors import VmbuildError

if TYPE_CHECKING:
    from vmbuild.config.variables import Given


def add_parser(sub: SubParsers) -> None:
    p = verb(
        sub, "validate", cmd_validate,
        "check recipes, pipelines, distribution files and components without building",
    )  # fmt: skip
    p.add_argument("files", nargs="+", metavar="FILE", help="YAML files of any vmbuild kind")
    p.add_argument(
        "--kind", choices=KINDS, help="check every FILE as this kind instead of detecting it"
    )
    add_variable_flags(p)
    json_flag(p)


def validate_file(
    path: Path, kind: Kind | None = None, variables: Given | None = None
) -> tuple[Kind | None, list[str]]:
    """The file's kind and its problems, one line each (empty when valid)."""
    from vmbuild.config.loader import load_yaml

    display = str(path)
    if kind is None:
        try:
            data = load_yaml(path, display)
        except VmbuildError as exc:
            return None, [str(exc)]
        kind = detect_kind(data)
        if kind is None:
            return None, [
                f"{display}: not a vmbuild file: expected a recipe (base:), a container "
                "recipe (parentImage:), a pipeline (recipe:), a distribution file (regions:) "
                "or a component (phases:)"
            ]
    try:
        if kind == "component":
            from vmbuild.toe.document import validate_file as validate_component

            return kind, validate_component(path)
        if kind == "recipe":
            from vmbuild.config.recipe import load_recipe

            load_recipe(path, variables=variables)
        elif kind == "container-recipe":
            from vmbuild.config.container import load_container_recipe

            load_container_recipe(path, variables=variables)
        elif kind == "pipeline":
            from vmbuild.config.pipeline import load_pipeline

            load_pipeline(path, variables=variables)
        else:
            from vmbuild.config.distribution import load_distribution
            from vmbuild.config.loader import load_yaml

            load_distribution(load_yaml(path, display), display, "")
    except VmbuildError as exc:
        return kind, [str(exc)]
    return kind, []


def cmd_validate(args: argparse.Namespace) -> int:
    from vmbuild.config.variables import parse_cli

    variables = parse_cli(args.var, args.var_file)
    results: list[dict[str, Any]] = []
    for name in args.files:
        kind, problems = validate_file(Path(name), args.kind, variables)
        results.append({"file": name, "kind": kind, "valid": not problems, "problems": problems})
    bad = [r for r in results if not r["valid"]]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if r["valid"]:
                print(f"{r['file']}: valid {r['kind']}")
            for line in r["problems"]:
                print(f"error: {line}", file=sys.stderr)
        if bad:
            print(f"{len(bad)} of {len(results)} file(s) invalid", file=sys.stderr)
    return 1 if bad else 0
