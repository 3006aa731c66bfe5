"""`vmbuild import SOURCE... --output DIR [--base BASE]`: EC2 Image Builder
definitions (CloudFormation YAML/JSON, Terraform .tf or `terraform show -json`,
`aws imagebuilder create-* --cli-input-json` files) into recipe.yaml,
pipeline.yaml, distribution.yaml and components/, with a report of every field
mapped, converted or dropped."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    imp = subparsers.add_parser(
        "import",
        help="import EC2 Image Builder definitions (CloudFormation, Terraform, CLI JSON)",
        description="Convert Image Builder recipes, components, infrastructure, "
        "distribution settings, pipelines and lifecycle policies into vmbuild files.",
    )
    imp.add_argument("sources", nargs="+", type=Path, help="templates, .tf files or CLI JSON")
    imp.add_argument("--output", "-o", type=Path, required=True, help="folder to write")
    imp.add_argument("--base", help="the base for the recipe (when the parent image maps to none)")
    imp.add_argument("--region", help="the build region, put first in the distribution")
    imp.set_defaults(handler=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from vmbuild.imports import import_sources, write_output

    converted = import_sources(list(args.sources), base=args.base, region=args.region)
    written = write_output(converted, args.output)
    for path in written:
        print(path)
    dropped = sum(1 for line in converted.report.lines if line[0] == "dropped")
    print(
        f"{len(converted.report.lines)} field(s): {dropped} dropped "
        f"(see {args.output / 'import-report.txt'})",
        file=sys.stderr,
    )
    return 0
