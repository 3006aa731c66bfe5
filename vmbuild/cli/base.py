"""`vmbuild base build|fetch|list`: the cached base images builds start from."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rich.table import Table

from vmbuild import console
from vmbuild.cli.common import SubParsers, json_flag, out, verb
from vmbuild.errors import VmbuildError


def add_parser(sub: SubParsers) -> None:
    base = sub.add_parser("base", help="base images: build, fetch, list, rm, prune").add_subparsers(
        dest="base_verb", required=True, metavar="ACTION"
    )
    bb = verb(base, "build", cmd_base_build, "build a base image offline (mmdebstrap)")
    bb.add_argument("release", choices=["debian-12"])
    bb.add_argument("--mirror")
    bb.add_argument("--rebuild", action="store_true", help="ignore the cache")
    bb.add_argument(
        "--arch", choices=["x86_64", "arm64"], default="x86_64",
        help="the base's architecture (arm64: GPT with an ESP, GRUB arm64-efi; built with "
        "qemu-user on an x86_64 host)",
    )  # fmt: skip
    bb.add_argument(
        "--boot-mode", choices=["legacy-bios", "uefi", "uefi-preferred"], default=None,
        help="the recipe boot_mode the base is for: legacy-bios an MBR disk, uefi-preferred a "
        "hybrid GPT disk, uefi a UEFI-only GPT disk (default: legacy-bios; arm64: uefi)",
    )  # fmt: skip
    json_flag(bb)
    bf = verb(base, "fetch", cmd_base_fetch, "download a vendor image and verify its checksum")
    bf.add_argument("url")
    group = bf.add_mutually_exclusive_group()
    group.add_argument("--sha256")
    group.add_argument("--sha512")
    group.add_argument("--checksum-url", help="a SHA256SUMS/SHA512SUMS file URL")
    json_flag(bf)
    bl = verb(base, "list", cmd_base_list, "list cached base images")
    json_flag(bl)
    br = verb(base, "rm", cmd_base_rm, "delete cached base images by id")
    br.add_argument("ids", nargs="+", metavar="ID", help="base ids, as `vmbuild base list` shows")
    json_flag(br)
    bp = verb(base, "prune", cmd_base_prune, "delete all but the newest base of each origin")
    bp.add_argument("--keep", type=int, default=1, help="bases kept per release or URL (default 1)")
    bp.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    json_flag(bp)


def cmd_base_build(args: argparse.Namespace) -> int:
    from vmbuild.log import Progress
    from vmbuild.stages import base_image

    if args.arch != "x86_64" and args.boot_mode not in (None, "uefi"):
        # Refused, not quietly built as UEFI: the recipe refuses the same pair.
        raise VmbuildError(
            f"--boot-mode {args.boot_mode}: {args.arch} images boot UEFI only",
            hint="drop --boot-mode, or pass --boot-mode uefi",
        )
    progress = Progress(quiet=args.json)
    with progress.stage("base", f"build base {args.release}"):
        base = base_image.build_debian(
            args.release, mirror=args.mirror, rebuild=args.rebuild, on_progress=progress,
            layout=base_image.layout_for(args.boot_mode or "legacy-bios", args.arch),
            arch=args.arch,
        )  # fmt: skip
    return out(args, _base_json(base), lambda: print(f"{base.id}  {base.path}"))


def cmd_base_fetch(args: argparse.Namespace) -> int:
    from vmbuild.stages import base_image

    if not (args.sha256 or args.sha512 or args.checksum_url):
        raise VmbuildError(
            "a checksum is required", hint="pass --sha256 HEX, --sha512 HEX or --checksum-url URL"
        )
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    from vmbuild.progress import NullReporter

    bar = Progress(
        *Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(),
        console=console.stderr(), transient=True,
        disable=args.json or not sys.stderr.isatty(),
    )  # fmt: skip
    task = bar.add_task("download", total=None)

    class BarReporter(NullReporter):
        def bytes(self, done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

    progress = BarReporter()
    with bar:
        base = base_image.fetch_base(
            args.url, sha256=args.sha256, sha512=args.sha512, checksum_url=args.checksum_url,
            on_progress=progress,
        )  # fmt: skip
    return out(args, _base_json(base), lambda: print(f"{base.id}  {base.path}"))


def cmd_base_list(args: argparse.Namespace) -> int:
    from vmbuild.stages import base_image

    bases = base_image.list_bases()

    def human() -> None:
        table = Table(show_edge=False)
        for col in ("id", "format", "size", "source"):
            table.add_column(col)
        for b in bases:
            table.add_row(b.id, b.format, f"{b.virtual_size >> 30} GiB", b.source)
        console.stdout().print(table)

    return out(args, [_base_json(b) for b in bases], human)


def _base_json(b: Any) -> dict[str, Any]:
    return {
        "id": b.id, "path": str(b.path), "format": b.format, "sha256": b.sha256,
        "source": b.source, "virtual_size": b.virtual_size,
    }  # fmt: skip


def cmd_base_rm(args: argparse.Namespace) -> int:
    from vmbuild.stages import base_image

    removed = [base_image.remove_base(base_id) for base_id in args.ids]
    return out(
        args, [_base_json(b) for b in removed],
        lambda: print("\n".join(f"removed {b.id}" for b in removed)),
    )  # fmt: skip


def cmd_base_prune(args: argparse.Namespace) -> int:
    from vmbuild.stages import base_image

    if args.keep < 1:
        raise VmbuildError("--keep must be at least 1", hint="`vmbuild base rm ID` removes one")
    doomed = base_image.prunable_bases(args.keep)
    if not args.dry_run:
        doomed = [base_image.remove_base(b.id) for b in doomed]
    verb = "would remove" if args.dry_run else "removed"

    def human() -> None:
        for b in doomed:
            print(f"{verb} {b.id}  ({b.source})")
        if not doomed:
            print("nothing to prune")

    return out(args, [_base_json(b) for b in doomed], human)
