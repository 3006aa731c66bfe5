"""`vmbuild images list|show|rm`: the local artifact store, and only the store."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rich.table import Table

from vmbuild import console, paths
from vmbuild.cli.common import REF_HELP, SubParsers, confirm, json_flag, out, store_flag, verb
from vmbuild.errors import VmbuildError


def add_parser(sub: SubParsers) -> None:
    images = sub.add_parser(
        "images", help="stored artifacts: list, show, rm, diff, run"
    ).add_subparsers(dest="images_verb", required=True, metavar="ACTION")
    p = verb(images, "list", cmd_images_list, "list stored images")
    store_flag(p)
    json_flag(p)
    p = verb(images, "show", cmd_images_show, "show an image's manifest")
    p.add_argument("ref", help=REF_HELP)
    store_flag(p)
    json_flag(p)
    p = verb(images, "rm", cmd_images_rm, "delete a stored build (asks first unless --yes)")
    p.add_argument("ref", help=REF_HELP)
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    store_flag(p)
    json_flag(p)
    p = verb(images, "push", cmd_images_push, "push a stored container image to its registry")
    p.add_argument("ref", help="NAME[/VERSION[/BUILD]] of a container image")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--key", type=Path, metavar="PUB", help="PEM public key to verify with")
    keys.add_argument("--kms-key", metavar="ARN", help="AWS KMS key whose public key to trust")
    p.add_argument(
        "--allow-unsigned", action="store_true",
        help="push an image without signed provenance (its layout's digests are still checked)",
    )  # fmt: skip
    store_flag(p)
    from vmbuild.cli.images_diff import add_images_verb
    from vmbuild.cli.images_run import add_run_verb

    add_images_verb(images)
    add_run_verb(images)


def cmd_images_list(args: argparse.Namespace) -> int:
    from vmbuild.stages import store

    if _on_s3(args):
        from vmbuild.cli.scale import cmd_images_s3

        return cmd_images_s3(args, "list")

    rows = [store.summary(b) for b in store.builds(paths.store_dir(args.store))]

    def human() -> None:
        table = Table(show_edge=False)
        for col in ("image", "kind", "created", "tests", "formats", "size"):
            table.add_column(col)
        for r in rows:
            table.add_row(
                r["ref"], r["kind"], r["created"] or "", r["tests"], ",".join(r["formats"]),
                f"{r['size'] / (1 << 20):.0f} MiB",
            )  # fmt: skip
        console.stdout().print(table)

    return out(args, rows, human)


def cmd_images_show(args: argparse.Namespace) -> int:
    from vmbuild.stages import store

    if _on_s3(args):
        from vmbuild.cli.scale import cmd_images_s3

        return cmd_images_s3(args, "show")

    build_dir = store.resolve(paths.store_dir(args.store), args.ref)
    if args.json:
        print(json.dumps({**store.read_manifest(build_dir), "path": str(build_dir)}, indent=2))
        return 0
    m = store.load_manifest(build_dir)
    print(f"image:    {m.ref}\npath:     {build_dir}\ncreated:  {m.created}")
    base_source, base_id = (m.base.source, m.base.id) if m.base else ("?", "?")
    print(f"base:     {base_source} ({base_id})")
    print(f"tests:    {m.tests_status}")
    print(f"packages: {len(m.packages)}")
    for c in m.components:
        digest = str(c.get("sha256", ""))[:12]
        print(f"component {c.get('name')} sha256:{digest} {c.get('parameters') or ''}")
    for o in m.outputs:
        print(f"output    {o.format:6} {o.file} sha256:{o.sha256}")
    return 0


def cmd_images_rm(args: argparse.Namespace) -> int:
    from vmbuild.stages import store

    if _on_s3(args):
        from vmbuild.cli.scale import cmd_images_s3

        return cmd_images_s3(args, "rm")

    store_dir = paths.store_dir(args.store)
    build_dir = store.resolve(store_dir, args.ref)
    ref = store.summary(build_dir)["ref"]
    if not args.yes and not confirm(f"remove {ref} ({build_dir})? [y/N] "):
        raise VmbuildError(f"{ref} not removed", hint="answer y, or pass --yes")
    store.remove(store_dir, build_dir)
    return out(args, {"removed": str(build_dir), "ref": ref}, lambda: print(f"removed {ref}"))


def _on_s3(args: argparse.Namespace) -> bool:
    """An S3 store (`--store s3://...`, $VMBUILD_STORE) goes to the scale-out verbs."""
    from vmbuild.scaleout.artifacts import is_s3

    return is_s3(args.store or os.environ.get("VMBUILD_STORE"))


def cmd_images_push(args: argparse.Namespace) -> int:
    """Push a stored container image again (idempotent by digest), verified first."""
    from vmbuild.container_build import push_stored
    from vmbuild.log import Progress
    from vmbuild.stages import store
    from vmbuild.supply import signing

    keys = signing.trusted_keys(args.key, args.kms_key) if (args.key or args.kms_key) else None
    build_dir = store.resolve(paths.store_dir(args.store), args.ref)
    for pushed in push_stored(build_dir, Progress(), keys=keys,
                              allow_unsigned=args.allow_unsigned):  # fmt: skip
        state = "already there" if pushed.skipped else f"pushed in {pushed.seconds:.1f}s"
        print(f"{pushed.reference}@{pushed.digest}: {state}")
    return 0
