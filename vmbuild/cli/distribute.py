"""`vmbuild distribute` and `vmbuild lint`: verbs over the artifact store."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from pathlib import Path
from typing import Any

from vmbuild import paths
from vmbuild.config.distribution import DistributionConfig, ImageSettings, load_distribution
from vmbuild.config.loader import load_yaml
from vmbuild.errors import ConfigError
from vmbuild.publish.events import DistributionEvent


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the `distribute` and `lint` verbs."""
    d = subparsers.add_parser(
        "distribute",
        help="turn a stored image into AMIs (upload, copy to regions, share, tag)",
        description="Distribute a stored, tested image to AWS as configured in a distribution "
        "file (or a recipe's distribution section). Safe to re-run: existing AMIs are reused "
        "and an interrupted upload resumes. Endpoints and credentials follow boto3 "
        "(AWS_PROFILE, AWS_ENDPOINT_URL, ...).",
    )
    d.add_argument(
        "image",
        metavar="IMAGE_REF|BUNDLE",
        help="NAME[/VERSION[/BUILD]], a build dir, or a bundle .tar (imported into the store, "
        "verified, then distributed)",
    )
    d.add_argument(
        "--config",
        "-c",
        required=True,
        type=Path,
        help="distribution YAML (its own file, or a recipe with `distribution:`)",
    )
    d.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and run the preflight checks and lint; upload nothing",
    )
    d.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="distribute an artifact that has no signed provenance (checksums still checked)",
    )
    d.add_argument("--key", type=Path, metavar="PUB", help="PEM public key to verify with")
    _common(d)
    d.set_defaults(handler=cmd_distribute)

    lint = subparsers.add_parser(
        "lint",
        help="check offline that an image would boot on EC2",
        description="Inspect a stored image's disk offline (partition table, file system, "
        "fstab, kernel drivers, GRUB, cloud-init, sshd, DHCP). Exit 1 on errors.",
    )
    lint.add_argument("image", metavar="IMAGE_REF", help="NAME[/VERSION[/BUILD]] or a build dir")
    lint.add_argument(
        "--config",
        "-c",
        type=Path,
        help="distribution YAML: its boot mode, architecture and ENA settings",
    )
    _common(lint)
    lint.set_defaults(handler=cmd_lint)


def _common(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: never overwrite a --store the top-level parser may already have set.
    p.add_argument(
        "--store",
        default=argparse.SUPPRESS,
        help="artifact store (default: $VMBUILD_STORE or ./images)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def read_config(path: Path) -> DistributionConfig:
    """Load a distribution file: top-level keys, `distribution:`, or a whole recipe."""
    data: Any = load_yaml(path)  # the loader (and errors) every file kind shares
    if isinstance(data, dict) and "distribution" in data and "regions" not in data:
        if data["distribution"] is None:
            raise ConfigError(str(path), "distribution", "the distribution section is empty")
        return load_distribution(data["distribution"], str(path), "distribution")
    if isinstance(data, dict) and "regions" not in data and _looks_like_recipe(data):
        # A recipe without `distribution:` would otherwise fail with one "unknown field"
        # line per recipe key, none of which says what is actually missing.
        raise ConfigError(
            str(path),
            None,
            "has no distribution section (it looks like a recipe)",
            hint="add a `distribution:` section with `regions:` to the recipe, "
            "or pass a distribution file to --config",
        )
    return load_distribution(data, str(path), "")


def _looks_like_recipe(data: dict[Any, Any]) -> bool:
    from vmbuild.config.recipe import Recipe

    recipe_keys = set(Recipe.model_fields) - {"distribution"}
    return bool(recipe_keys & {str(k) for k in data})


def _resolve(args: argparse.Namespace) -> Path:
    from vmbuild.scaleout.artifacts import is_s3, local_copy
    from vmbuild.stages.store import resolve

    location = getattr(args, "store", None) or os.environ.get("VMBUILD_STORE")
    if is_s3(location):
        assert location is not None
        return local_copy(location, args.image, paths.cache_dir())
    return resolve(paths.store_dir(location), args.image)


def _printer(quiet: bool) -> Any:
    def show(event: DistributionEvent) -> None:
        if not quiet:
            print(f"  {event}", file=sys.stderr, flush=True)

    return show


def cmd_distribute(args: argparse.Namespace) -> int:
    """Handler of `vmbuild distribute`."""
    from vmbuild import preflight

    preflight.require("boto3")  # an extra: `pip install 'vmbuild[aws]'`
    from vmbuild.publish.distributor import distribute
    from vmbuild.supply.signing import trusted_keys

    config = read_config(args.config)
    keys = trusted_keys(args.key) if args.key else None
    if Path(args.image).is_file() and tarfile.is_tarfile(args.image):
        from vmbuild.stages.store import resolve
        from vmbuild.supply.bundle import import_or_find

        store = paths.store_dir(getattr(args, "store", None))
        build_dir = resolve(
            store, import_or_find(Path(args.image), store, keys, allow_unsigned=args.allow_unsigned)
        )
    else:
        build_dir = _resolve(args)
    result = distribute(
        build_dir,
        config,
        dry_run=args.dry_run,
        on_progress=_printer(args.json),
        allow_unsigned=args.allow_unsigned,
        trusted_keys=keys,
    )
    if args.json:
        print(json.dumps(result.to_json(), indent=2, default=str))
    else:
        print(result.plan if args.dry_run else _summary(result))
    return 0 if result.ok else 1


def _summary(result: Any) -> str:
    lines = [f"{result.artifact} -> account {result.account} ({result.method})"]
    for r in result.regions:
        detail = r.image_id or ""
        if r.snapshot_ids:
            detail += f" [{', '.join(r.snapshot_ids)}]"
        if r.error:
            detail += f" {r.error}"
        lines.append(f"  {r.region:16} {r.status:9} {r.name}  {detail}".rstrip())
    up = result.upload
    if up.method and up.status == "failed":
        lines.append(f"upload: failed ({up.method}); nothing was kept")
    elif up.method == "ebs-direct" and up.status == "done":
        lines.append(
            f"upload: {up.blocks_sent} of {up.blocks_total} blocks sent "
            f"({up.bytes_sent / 2**20:.1f} MiB; a full upload of this disk sends "
            f"{up.blocks_selected} blocks), upload_blocks: {up.upload_blocks}, "
            f"{up.seconds:.1f}s"
            + (
                f", {up.blocks_unchanged} unchanged since the parent"
                if up.parent_snapshot_id
                else ""
            )
            + (f", {up.blocks_resumed} sent by an earlier run" if up.blocks_resumed else "")
            + (f", {up.throttled_retries} throttled retries" if up.throttled_retries else "")
        )
        lines.append(f"  {up.lineage}")
    elif up.method and up.status != "failed":
        lines.append(
            f"upload: {up.bytes_sent / 2**20:.1f} MiB sent for {up.bytes_allocated / 2**20:.1f} "
            f"MiB allocated of a {up.disk_size / 2**30:.1f} GiB disk in {up.seconds:.1f}s"
            + (f", {up.throttled_retries} throttled retries" if up.throttled_retries else "")
        )
    if result.lint is not None and result.lint.warnings:
        lines += ["lint warnings:", *(f"  {w.check}: {w.message}" for w in result.lint.warnings)]
    return "\n".join(lines)


def cmd_lint(args: argparse.Namespace) -> int:
    """Handler of `vmbuild lint`."""
    from vmbuild.diskfs.lint import lint_disk
    from vmbuild.publish.artifact import Disks, load_artifact, workdir

    artifact = load_artifact(_resolve(args))
    given = read_config(args.config).image if args.config else ImageSettings()
    image = given.for_image(
        artifact.manifest.boot_mode, architecture=artifact.manifest.architecture
    )
    with workdir() as scratch:
        report = lint_disk(
            Disks(artifact, scratch).raw(),
            boot_mode=image.mode,
            architecture=image.arch,
            ena_support=image.ena_support,
        )
    if args.json:
        print(json.dumps({"image": artifact.ref, **report.to_json()}, indent=2))
    else:
        print(
            f"{artifact.ref}: {report.partition_table or 'no'} partition table, root "
            f"{report.root_fs or '?'} on partition {report.root_partition or '?'}"
        )
        print(report.render())
    return 0 if report.ok else 1
