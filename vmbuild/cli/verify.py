"""`vmbuild sign REF` and `vmbuild verify REF|BUNDLE`: signed provenance of stored builds."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vmbuild import paths
from vmbuild.cli.common import store_flag


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `sign` and `verify`."""
    v = subparsers.add_parser(
        "verify",
        help="check an image or bundle against its signed provenance",
        description="Checks the DSSE signature of the provenance, then every subject: disks, "
        "SBOMs and the manifest. Exit 1 naming the first file that differs.",
    )
    v.add_argument(
        "ref", metavar="REF|BUNDLE", help="NAME[/VERSION[/BUILD]], a build dir or a .tar"
    )
    _key_flags(v)
    v.add_argument("--allow-unsigned", action="store_true", help="accept an unsigned artifact")
    store_flag(v)
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(handler=cmd_verify)

    s = subparsers.add_parser(
        "sign",
        help="(re)write the SBOMs and signed provenance of a stored image",
        description="For images stored before signing was set up, or to sign with another "
        "key. Signs with --kms-key, else $VMBUILD_KMS_KEY, else the local key.",
    )
    s.add_argument("ref", metavar="REF", help="NAME[/VERSION[/BUILD]] or a build dir")
    s.add_argument("--kms-key", help="AWS KMS asymmetric key id or ARN to sign with")
    store_flag(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(handler=cmd_sign)


def _key_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--key", type=Path, metavar="PUB", help="PEM public key to trust")
    group.add_argument("--kms-key", metavar="ARN", help="AWS KMS key whose public key to trust")


def cmd_verify(args: argparse.Namespace) -> int:
    from vmbuild.stages.store import resolve
    from vmbuild.supply import signing
    from vmbuild.supply.verify import verify_build

    keys = signing.trusted_keys(args.key, args.kms_key) if (args.key or args.kms_key) else None
    target = Path(args.ref)
    if target.is_file():
        from vmbuild.supply.bundle import verify_bundle

        data = verify_bundle(target, keys, allow_unsigned=args.allow_unsigned)
    else:
        import os

        from vmbuild.scaleout.artifacts import is_s3, local_copy

        location: str = args.store or os.environ.get("VMBUILD_STORE") or ""
        if is_s3(location):  # a verified download of the build, then the same checks
            build_dir = local_copy(location, args.ref, paths.cache_dir())
        else:
            build_dir = resolve(paths.store_dir(args.store), args.ref)
        data = verify_build(build_dir, keys, allow_unsigned=args.allow_unsigned).to_json()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        state = "signed" if data["signed"] else "UNSIGNED (allowed)"
        print(f"{data['path']}: OK, {state}, {len(data['subjects'])} subjects verified")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from vmbuild.stages.store import read_manifest, resolve, update_manifest
    from vmbuild.supply import signing
    from vmbuild.supply.attest import attest

    if TYPE_CHECKING:
        from securesystemslib.signer import Signer

    build_dir = resolve(paths.store_dir(args.store), args.ref)
    signer: Signer | None
    if args.kms_key:
        signer, label = signing.kms_signer(args.kms_key), f"awskms:{args.kms_key}"
    else:
        signer, label = signing.default_signer()
    if signer is None:
        print("warning: no signing key; writing unsigned provenance", file=sys.stderr)
    result = attest(build_dir, read_manifest(build_dir), signer=signer, signed_by=label)
    update_manifest(build_dir, "provenance", result.to_json())
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(f"{result.path} ({result.signed_by}) sha256:{result.digest}")
    return 0
