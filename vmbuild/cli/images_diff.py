"""`vmbuild images diff A B`: packages, files and partition layout between two builds."""

from __future__ import annotations

import argparse
import json

from vmbuild import paths
from vmbuild.cli.common import store_flag


def add_images_verb(images: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `images diff` under the `images` verb."""
    d = images.add_parser(
        "diff",
        help="compare two stored images (packages, files, partitions); exit 1 if they differ",
        description="Packages from the SBOMs, files from the root file systems read offline, "
        "partition layout and disk size. Exit 0 when identical, 1 when they differ (as diff).",
    )
    d.add_argument("a", metavar="A", help="NAME[/VERSION[/BUILD]] or a build dir")
    d.add_argument("b", metavar="B", help="NAME[/VERSION[/BUILD]] or a build dir")
    d.add_argument("--no-files", action="store_true", help="skip the file system comparison")
    store_flag(d)
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(handler=cmd_diff)


def cmd_diff(args: argparse.Namespace) -> int:
    from vmbuild.stages.store import resolve
    from vmbuild.supply.diff import diff_images

    store = paths.store_dir(args.store)
    result = diff_images(resolve(store, args.a), resolve(store, args.b), files=not args.no_files)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 1 if result.differ else 0
    print(f"--- {result.a}\n+++ {result.b}")
    pk = result.packages
    for p in pk["added"]:
        print(f"+ package {p['name']}:{p['arch']} {p['version']}")
    for p in pk["removed"]:
        print(f"- package {p['name']}:{p['arch']} {p['version']}")
    for p in pk["upgraded"] + pk["downgraded"]:
        print(f"~ package {p['name']}:{p['arch']} {p['from']} -> {p['to']}")
    for path in result.files.get("added", []):
        print(f"+ file {path}")
    for path in result.files.get("removed", []):
        print(f"- file {path}")
    for change in result.files.get("changed", []):
        detail = ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in change.items() if k != "path")
        print(f"~ file {change['path']} ({detail})")
    if result.partitions.get("changed"):
        a, b = result.partitions["a"], result.partitions["b"]
        print(f"~ disk {a['disk_size']} bytes, {len(a['partitions'])} partitions -> "
              f"{b['disk_size']} bytes, {len(b['partitions'])} partitions")  # fmt: skip
    if not result.differ:
        print("identical")
    return 1 if result.differ else 0
