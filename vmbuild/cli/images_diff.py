"""`vmbuild images diff A B`: packages, files and partition layout between two builds."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vmbuild import paths
from vmbuild.cli.common import store_flag
from vmbuild.config.loader import parse_size


def size(text: str) -> int:
    """An argparse type: '2G', '512M' or bytes."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_images_verb(images: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `images diff` under the `images` verb."""
    from vmbuild.supply.diff import DEFAULT_CONTENT_LIMIT

    d = images.add_parser(
        "diff",
        help="compare two stored images (packages, files, partitions); exit 1 if they differ",
        description="Packages from the SBOMs; files from the root file systems read offline "
        "(type, mode, owner, size, symlink target, and the sha256 of the contents of files "
        "whose metadata is equal, smallest first up to --content-limit per image; the rest "
        "is reported as not compared); partition layout and disk size. Exit 0 when no "
        "difference was found, 1 when they differ (as diff).",
    )
    d.add_argument("a", metavar="A", help="NAME[/VERSION[/BUILD]] or a build dir")
    d.add_argument("b", metavar="B", help="NAME[/VERSION[/BUILD]] or a build dir")
    d.add_argument("--no-files", action="store_true", help="skip the file system comparison")
    d.add_argument(
        "--content-limit",
        type=size,
        default=DEFAULT_CONTENT_LIMIT,
        metavar="SIZE",
        help=f"file content read per image, e.g. 512M (default {DEFAULT_CONTENT_LIMIT >> 30}G)",
    )
    d.add_argument("--no-content", action="store_true", help="compare file metadata and links only")
    store_flag(d)
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(handler=cmd_diff)


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "?"


def _describe(entry: dict[str, Any]) -> str:
    parts = [entry["kind"], f"mode {entry['mode']}", f"{entry['uid']}:{entry['gid']}"]
    if entry["kind"] == "file":
        parts.append(f"{entry['size']} bytes")
    if "sha256" in entry:
        parts.append(f"sha256 {_short(entry['sha256'])}")
    if "target" in entry:
        parts.append(f"-> {entry['target']}")
    return ", ".join(parts)


def cmd_diff(args: argparse.Namespace) -> int:
    from vmbuild.stages.store import resolve
    from vmbuild.supply.diff import diff_images

    store = paths.store_dir(args.store)
    result = diff_images(
        resolve(store, args.a),
        resolve(store, args.b),
        files=not args.no_files,
        content_limit=0 if args.no_content else args.content_limit,
    )
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
    for entry in result.files.get("added", []):
        print(f"+ file {entry['path']} ({_describe(entry)})")
    for entry in result.files.get("removed", []):
        print(f"- file {entry['path']} ({_describe(entry)})")
    for change in result.files.get("changed", []):
        detail = ", ".join(
            f"{k} {_short(v[0])} -> {_short(v[1])}" if k == "sha256" else f"{k} {v[0]} -> {v[1]}"
            for k, v in change.items()
            if k not in ("path", "kind")
        )
        print(f"~ file {change['path']} ({detail})")
    if result.partitions.get("changed"):
        a, b = result.partitions["a"], result.partitions["b"]
        print(f"~ disk {a['disk_size']} bytes, {len(a['partitions'])} partitions -> "
              f"{b['disk_size']} bytes, {len(b['partitions'])} partitions")  # fmt: skip
    unchecked = result.files.get("unchecked", {})
    if unchecked.get("files"):
        print(f"? {unchecked['files']} file(s), {unchecked['bytes']} bytes, with equal metadata "
              "were not compared byte for byte (--content-limit; --json lists them)")  # fmt: skip
    if not result.differ:
        print("identical" if result.complete else "no difference found in what was compared")
    return 1 if result.differ else 0
