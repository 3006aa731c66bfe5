"""Benchmark distribution against the local AWS endpoint (moto + vmbuild's import extension).

For a sparse multi-GiB disk it prints, as a table: bytes allocated versus bytes sent, the
EBS-direct and import-snapshot methods end to end, and vmbuild's peak RSS while uploading.
Each method runs in a child process so its peak RSS is its own (`ru_maxrss`).

Endpoints use boto3's per-service variables: AWS_ENDPOINT_URL points at moto itself (S3, STS,
...), AWS_ENDPOINT_URL_EC2 and AWS_ENDPOINT_URL_EBS at the test front server, which adds
ImportSnapshot/ImportImage to moto and corrects moto's StartSnapshot BlockSize (so EBS-direct
pays the front's Python proxying and S3 does not: the comparison leans against EBS-direct). The
import task's own work (S3 read, conversion, snapshot) is simulated locally, so that column
measures vmbuild plus a local stand-in for AWS, not AWS's import speed (often an hour).

Usage: python bench/bench_publish.py [--size-gib 4] [--data-mib 384]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024
BLOCK = 512 * 1024


def child(method: str, build_dir: Path, bucket: str) -> None:
    """Run one distribution in this process and print its numbers as JSON."""
    from vmbuild.config.distribution import load_distribution
    from vmbuild.publish.distributor import distribute

    config = load_distribution(
        {
            "import": {"method": method, "s3_bucket": bucket},
            "wait": {"poll_interval": 0.2},
            "regions": [{"region": "us-east-1"}],
        },
        "bench",
        "",
    )
    started = time.monotonic()
    result = distribute(build_dir, config)
    seconds = time.monotonic() - started
    if not result.ok:
        raise SystemExit(json.dumps(result.to_json(), default=str))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "method": method,
        "seconds": seconds,
        "upload_seconds": result.upload.seconds,
        "bytes_sent": result.upload.bytes_sent,
        "bytes_allocated": result.upload.bytes_allocated,
        "blocks_sent": result.upload.blocks_sent,
        "blocks_zero_skipped": result.upload.blocks_zero_skipped,
        "maxrss_mib": usage.ru_maxrss / 1024,
        "image": result.regions[0].image_id,
    }))


def nonzero_blocks(raw: Path) -> int:
    from vmbuild.publish.rawdisk import ScanStats, scan_blocks

    stats = ScanStats()
    for _ in scan_blocks(raw, stats):
        pass
    return stats.blocks_data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=int, default=4)
    parser.add_argument("--data-mib", type=int, default=384)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--build-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--bucket", default="vmbuild-bench", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.build_dir, args.bucket)
        return 0

    import boto3

    from tests.aws.disks import make_artifact, make_disk
    from tests.aws.motoext import aws_env, local_aws
    from vmbuild.run import run

    with tempfile.TemporaryDirectory(prefix="vmbuild-bench-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        raw = make_disk(work / "disk", size_mib=args.size_gib * 1024, data_mib=args.data_mib)
        build_dir = make_artifact(work / "images", raw, formats=("qcow2",))
        made = time.monotonic() - t0
        allocated = raw.stat().st_blocks * 512
        blocks = nonzero_blocks(raw)
        rows: list[dict[str, Any]] = []
        with local_aws(work) as (moto, front):
            s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=moto.url,
                              aws_access_key_id="x", aws_secret_access_key="x")
            iam = boto3.client("iam", region_name="us-east-1", endpoint_url=moto.url,
                               aws_access_key_id="x", aws_secret_access_key="x")
            env = {**aws_env(moto.url), "AWS_ENDPOINT_URL_EC2": front.url,
                   "AWS_ENDPOINT_URL_EBS": front.url,
                   "VMBUILD_CACHE_DIR": str(work / "cache")}
            for method in ("ebs-direct", "import-snapshot"):
                moto.reset()  # each method starts from an empty account
                s3.create_bucket(Bucket=args.bucket)
                iam.create_role(RoleName="vmimport", AssumeRolePolicyDocument="{}")
                proc = run([sys.executable, __file__, "--child", method, "--build-dir",
                            build_dir, "--bucket", args.bucket], env=env, timeout=1800,
                           cwd=ROOT)
                line = [x for x in proc.stdout.splitlines() if x.startswith("{")][-1]
                rows.append(json.loads(line))
    print_table(args, raw_size=args.size_gib * 1024 * MIB, allocated=allocated, blocks=blocks,
                rows=rows, made=made)
    return 0


def print_table(args: argparse.Namespace, *, raw_size: int, allocated: int, blocks: int,
                rows: list[dict[str, Any]], made: float) -> None:
    ebs, imp = rows
    mib = lambda n: f"{n / MIB:,.1f} MiB"  # noqa: E731
    lines = [
        ("disk (virtual)", mib(raw_size), f"sparse raw, {args.data_mib} MiB of random data, "
         f"made in {made:.1f}s"),
        ("allocated (st_blocks)", mib(allocated), "what the file system stores"),
        ("allocated, in 512 KiB blocks", mib(blocks * BLOCK),
         f"{blocks} non-zero EBS blocks: the least any EBS upload sends"),
        ("ebs-direct: bytes sent", mib(ebs["bytes_sent"]),
         f"{ebs['blocks_sent']} PutSnapshotBlock, {ebs['blocks_zero_skipped']} allocated "
         f"zero blocks skipped; sent/allocated-blocks = "
         f"{ebs['bytes_sent'] / max(1, blocks * BLOCK):.3f}"),
        ("import-snapshot: bytes sent", mib(imp["bytes_sent"]), "S3 object (VMDK "
         "streamOptimized, converted from the stored qcow2)"),
        ("ebs-direct: end to end", f"{ebs['seconds']:.1f} s",
         f"upload {ebs['upload_seconds']:.1f} s (lint, convert, StartSnapshot..RegisterImage)"),
        ("import-snapshot: end to end", f"{imp['seconds']:.1f} s",
         f"upload+import {imp['upload_seconds']:.1f} s (VMDK conversion, S3 multipart, "
         "simulated import task, RegisterImage)"),
        ("peak RSS, ebs-direct", f"{ebs['maxrss_mib']:.0f} MiB", "target < 200 MB"),
        ("peak RSS, import-snapshot", f"{imp['maxrss_mib']:.0f} MiB", "target < 200 MB"),
    ]
    width = max(len(a) for a, _, _ in lines)
    vwidth = max(len(b) for _, b, _ in lines)
    print(f"\nvmbuild distribution benchmark ({os.cpu_count()} CPUs, local moto endpoint)")
    print(f"{'metric'.ljust(width)}  {'value'.rjust(vwidth)}  note")
    print(f"{'-' * width}  {'-' * vwidth}  {'-' * 40}")
    for metric, value, note in lines:
        print(f"{metric.ljust(width)}  {value.rjust(vwidth)}  {note}")


if __name__ == "__main__":
    raise SystemExit(main())
