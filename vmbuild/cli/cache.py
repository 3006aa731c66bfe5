"""`vmbuild cache list|prune`: the build checkpoints in the user cache."""

from __future__ import annotations

import argparse
import time

from rich.table import Table
from rich.text import Text

from vmbuild import console
from vmbuild.cache import checkpoints
from vmbuild.cli.common import SubParsers, json_flag, out, verb
from vmbuild.stages.resume import STATE_FILE


def add_parser(sub: SubParsers) -> None:
    cache = sub.add_parser("cache", help="build checkpoints: list, prune").add_subparsers(
        dest="cache_verb", required=True, metavar="ACTION"
    )
    cl = verb(
        cache, "list", cmd_cache_list, "list the build checkpoints, least recently used first"
    )
    json_flag(cl)
    cp = verb(cache, "prune", cmd_cache_prune, "remove old checkpoints (or all) to fit the cap")
    cp.add_argument("--all", action="store_true", help="remove every checkpoint")
    cp.add_argument(
        "--max-size",
        help=f"size cap, e.g. 20G (default: ${checkpoints.ENV_MAX_SIZE}, else 20G)",
    )
    cp.add_argument(
        "--max-age",
        type=float,
        metavar="DAYS",
        help=f"age cap in days since last use (default: ${checkpoints.ENV_MAX_AGE}, else 30)",
    )
    json_flag(cp)


def cmd_cache_list(args: argparse.Namespace) -> int:
    store = checkpoints.CheckpointStore(warn=lambda _m: None)
    entries = sorted(store.entries(), key=lambda c: c.last_used)
    sizes = {cp.key: cp.size for cp in entries}
    rows = [
        {
            "key": cp.key,
            "stage": cp.stage,
            "label": cp.label,
            "parent": cp.meta.get("parent"),
            "size": sizes[cp.key],
            # The builder's running state is kept with it: a resume needs no boot.
            "running_vm": (cp.path / STATE_FILE).exists(),
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(cp.last_used)),
        }
        for cp in entries
    ]

    def human() -> None:
        table = Table(show_edge=False)
        for column in ("key", "stage", "label", "MiB", "running VM", "last used (UTC)"):
            table.add_column(column)
        for cp, row in zip(entries, rows, strict=True):
            table.add_row(
                cp.key[:16], cp.stage, Text(cp.label), f"{sizes[cp.key] / (1 << 20):.0f}",
                "yes" if row["running_vm"] else "", str(row["last_used"]),
            )  # fmt: skip
        console.stdout().print(table)
        total = sum(sizes.values())
        console.stdout().print(f"{len(rows)} checkpoints, {total / (1 << 20):.0f} MiB")

    return out(args, rows, human)


def cmd_cache_prune(args: argparse.Namespace) -> int:
    size = checkpoints.parse_size(args.max_size) if args.max_size else None
    result = checkpoints.prune(max_size=size, max_age_days=args.max_age, everything=args.all)
    data = {
        "removed": result.removed,
        "freed": result.freed,
        "kept": result.kept,
        "busy": result.busy,
    }

    def human() -> None:
        if result.busy:
            print("a build is using the cache: nothing removed (try again when it is done)")
        else:
            print(f"removed {len(result.removed)} checkpoints ({result.freed / (1 << 20):.0f} MiB),"
                  f" kept {result.kept}")  # fmt: skip

    return out(args, data, human)
