"""`vmbuild scan REF`: the image's packages against the Debian security tracker, offline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vmbuild import paths
from vmbuild.cli.common import store_flag


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `scan`."""
    from vmbuild.supply.scan import SEVERITIES

    s = subparsers.add_parser(
        "scan",
        help="list open CVEs of a stored image's packages (Debian security tracker)",
        description="Matches the image's SBOM against the Debian security tracker JSON "
        "(--data FILE on air-gapped hosts; else downloaded once a day into the cache) with "
        "dpkg version ordering. Results go into the manifest (`scan`). Exit 1 when a finding "
        "is at or above --fail-on.",
    )
    s.add_argument("ref", metavar="REF", help="NAME[/VERSION[/BUILD]] or a build dir")
    s.add_argument("--data", type=Path, metavar="FILE", help="tracker JSON (tracker/data/json)")
    s.add_argument("--fail-on", choices=SEVERITIES[1:], help="fail at or above this severity")
    store_flag(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(handler=cmd_scan)


def cmd_scan(args: argparse.Namespace) -> int:
    from vmbuild.stages.store import read_manifest, resolve, update_manifest
    from vmbuild.supply.scan import raise_if_failed, scan_build

    build_dir = resolve(paths.store_dir(args.store), args.ref)
    result = scan_build(build_dir, read_manifest(build_dir), data=args.data, fail_on=args.fail_on)
    update_manifest(build_dir, "scan", result.to_json())
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 1 if result.failed else 0
    for f in result.findings:
        fix = f"fixed in {f.fixed_version}" if f.fixed_version else "no fix yet"
        print(f"{f.severity:11} {f.cve:16} {f.package} {f.version} ({f.status}, {fix})")
    counts = ", ".join(f"{n} {sev}" for sev, n in result.counts.items() if n)
    print(f"{result.packages} packages, {len(result.findings)} findings ({counts or 'none'})")
    raise_if_failed(result)
    return 0
