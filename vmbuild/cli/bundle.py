"""`vmbuild bundle export|import`: carry a stored build to an air-gapped host and back."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vmbuild import paths
from vmbuild.cli.build import add_plan_flags
from vmbuild.cli.common import store_flag


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `bundle`."""
    bundle = subparsers.add_parser(
        "bundle",
        help="air-gapped bundles: export a stored image, import it on another host",
        description="A bundle is one tar with the artifact (disks, manifest, SBOMs, signed "
        "provenance) and, with --with-inputs, what an offline rebuild needs (bundle rebuild). "
        "Import verifies everything (paths, types, sizes, signature, digests) before "
        "anything is written to the store.",
    )
    actions = bundle.add_subparsers(dest="bundle_verb", required=True, metavar="ACTION")
    exp = actions.add_parser("export", help="write a stored image as a bundle tar")
    exp.add_argument("ref", metavar="REF", help="NAME[/VERSION[/BUILD]] or a build dir")
    exp.add_argument("-o", "--output", type=Path, required=True, help="the .tar to write")
    exp.add_argument(
        "--with-inputs",
        action="store_true",
        help="also carry what an offline rebuild needs (`bundle rebuild`): the base image, "
        "the recipe and the files it names, the package index state the build saw and "
        "the image's packages from the host package cache",
    )
    store_flag(exp)
    exp.add_argument("--json", action="store_true", help="machine-readable output")
    exp.set_defaults(handler=cmd_export)

    imp = actions.add_parser("import", help="verify a bundle, then unpack it into the store")
    imp.add_argument("bundle", type=Path, metavar="FILE", help="a bundle .tar")
    key = imp.add_mutually_exclusive_group()
    key.add_argument("--key", type=Path, metavar="PUB", help="PEM public key to trust")
    key.add_argument("--kms-key", metavar="ARN", help="AWS KMS key whose public key to trust")
    imp.add_argument("--allow-unsigned", action="store_true", help="accept an unsigned bundle")
    imp.add_argument(
        "--max-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="refuse bundles that unpack to more than this (default 256 GiB)",
    )
    store_flag(imp)
    imp.add_argument("--json", action="store_true", help="machine-readable output")
    imp.set_defaults(handler=cmd_import)

    # A bundle verb rather than `build --from-bundle`: it takes the bundle's trust flags
    # (--key, --kms-key, --allow-unsigned) like import, and has no recipe argument.
    reb = actions.add_parser(
        "rebuild",
        help="verify a --with-inputs bundle, then rebuild its recipe offline",
        description="Verifies the bundle as import does, unpacks its inputs into a temporary "
        "dir, serves its mirror on 127.0.0.1 and builds the recipe on the bundled base with "
        "guests that reach nothing but that mirror. The result must have the original's "
        "package versions; its manifest names the bundle (rebuilt_from).",
    )
    reb.add_argument("bundle", type=Path, metavar="FILE", help="a bundle .tar (--with-inputs)")
    rkey = reb.add_mutually_exclusive_group()
    rkey.add_argument("--key", type=Path, metavar="PUB", help="PEM public key to trust")
    rkey.add_argument("--kms-key", metavar="ARN", help="AWS KMS key whose public key to trust")
    reb.add_argument("--allow-unsigned", action="store_true", help="accept an unsigned bundle")
    add_plan_flags(reb)
    reb.set_defaults(handler=cmd_rebuild)


def cmd_export(args: argparse.Namespace) -> int:
    from vmbuild.stages.store import resolve
    from vmbuild.supply.bundle import export

    build_dir = resolve(paths.store_dir(args.store), args.ref)
    index = export(build_dir, args.output, with_inputs=args.with_inputs)
    size = args.output.stat().st_size
    if args.json:
        print(json.dumps({"bundle": str(args.output), "size": size, **index.to_json()}, indent=2))
    else:
        print(f"{args.output}: {index.ref}, {len(index.entries)} files, {size / 2**20:.1f} MiB")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from vmbuild.supply import signing
    from vmbuild.supply.bundle import DEFAULT_MAX_BYTES, import_bundle

    keys = signing.trusted_keys(args.key, args.kms_key) if (args.key or args.kms_key) else None
    build_dir = import_bundle(
        args.bundle,
        paths.store_dir(args.store),
        keys,
        allow_unsigned=args.allow_unsigned,
        max_bytes=args.max_size or DEFAULT_MAX_BYTES,
    )
    if args.json:
        print(json.dumps({"path": str(build_dir)}, indent=2))
    else:
        print(f"imported {build_dir}")
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    from vmbuild.cli.build import plan_options, test_summary
    from vmbuild.config.variables import parse_cli
    from vmbuild.errors import VmbuildError
    from vmbuild.log import Progress
    from vmbuild.rebuild import rebuild
    from vmbuild.secrets import parse_cli_secret
    from vmbuild.supply import signing

    for flag in ("mirror", "apt_proxy"):
        if getattr(args, flag, None):
            raise VmbuildError(
                f"--{flag.replace('_', '-')}: an offline rebuild uses only the bundle's mirror"
            )
    keys = signing.trusted_keys(args.key, args.kms_key) if (args.key or args.kms_key) else None
    result = rebuild(
        args.bundle, plan_options(args), Progress(), keys=keys,
        allow_unsigned=args.allow_unsigned,
        secrets=dict(parse_cli_secret(spec) for spec in args.secret or []),
        variables=parse_cli(args.var, args.var_file),
    )  # fmt: skip
    m = result.manifest
    for o in m.outputs:
        print(f"{o.format:6} {result.build_dir / o.file}  sha256:{o.sha256}")
    print(f"tests: {test_summary(m.tests or {})}")
    print(f"rebuilt from {args.bundle} ({m.extra['rebuilt_from']['ref']}), same package versions")
    print(f"artifact: {result.build_dir}")
    return 0
