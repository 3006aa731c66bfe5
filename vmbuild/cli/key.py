"""`vmbuild key generate|show`: the local ed25519 signing key under the config dir."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vmbuild.errors import VmbuildError


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `key`."""
    key = subparsers.add_parser(
        "key",
        help="the local signing key (ed25519) for provenance",
        description="Builds sign their provenance with the local key (or with the AWS KMS "
        "key in $VMBUILD_KMS_KEY). The private key stays 0600 under the config dir "
        "($VMBUILD_CONFIG_DIR, else ~/.config/vmbuild).",
    )
    actions = key.add_subparsers(dest="key_verb", required=True, metavar="ACTION")
    gen = actions.add_parser("generate", help="create the local key pair")
    gen.add_argument("--force", action="store_true", help="replace an existing key")
    gen.add_argument("--json", action="store_true", help="machine-readable output")
    gen.set_defaults(handler=cmd_generate)
    show = actions.add_parser("show", help="where the key is and its key id")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=cmd_show)
    export = actions.add_parser(
        "export",
        help="the public key as PEM, to verify on another (air-gapped) host with --key",
        description="Writes the local public key, or with --kms-key the public half of an AWS "
        "KMS signing key (fetched through the KMS API), as PEM. `vmbuild verify REF|BUNDLE "
        "--key FILE` then needs no AWS access.",
    )
    export.add_argument("--kms-key", metavar="ARN", help="an AWS KMS asymmetric signing key")
    export.add_argument(
        "-o", "--output", type=Path, metavar="FILE", help="write here (default: stdout)"
    )
    export.set_defaults(handler=cmd_export)


def _describe() -> dict[str, str]:
    from vmbuild.supply.signing import load_public_key, local_key_paths

    where = local_key_paths()
    if not where.public.exists():
        raise VmbuildError(
            f"no signing key in {where.public.parent}", hint="create one: vmbuild key generate"
        )
    return {
        "private": str(where.private),
        "public": str(where.public),
        "keyid": load_public_key(where.public).keyid,
    }


def cmd_generate(args: argparse.Namespace) -> int:
    from vmbuild.supply.signing import generate_local_key

    generate_local_key(force=args.force)
    return cmd_show(args)


def cmd_show(args: argparse.Namespace) -> int:
    info = _describe()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"private key: {info['private']}\npublic key:  {info['public']}")
        print(f"key id:      {info['keyid']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vmbuild.run import write_atomic
    from vmbuild.supply.signing import public_key_pem

    pem = public_key_pem(args.kms_key)
    if args.output is None:
        print(pem.decode(), end="")
    else:
        write_atomic(args.output, pem)
    return 0
