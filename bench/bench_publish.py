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
import itertools
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
    from vmbuild.publish.events import DistributionEvent

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
    phases: dict[str, float] = {}
    last = [""]

    def record(event: DistributionEvent) -> None:
        # A change of stage starts a new phase; conversions are told apart by what they make.
        label = f"{event.stage} {event.message}" if event.stage == "convert" else event.stage
        if label != last[0]:
            last[0] = label
            phases.setdefault(label, time.monotonic() - started)

    result = distribute(build_dir, config, on_progress=record, allow_unsigned=True)
    seconds = time.monotonic() - started
    if not result.ok:
        raise SystemExit(json.dumps(result.to_json(), default=str))
    marks = [*sorted(phases.items(), key=lambda kv: kv[1]), ("end", seconds)]
    marks.insert(0, ("preflight", 0.0))
    durations = {a: round(t2 - t1, 1) for (a, t1), (_b, t2) in itertools.pairwise(marks)}
    print(
        json.dumps(
            {
                "method": method,
                "seconds": seconds,
                "upload_seconds": result.upload.seconds,
                "bytes_sent": result.upload.bytes_sent,
                "bytes_allocated": result.upload.bytes_allocated,
                "blocks_sent": result.upload.blocks_sent,
                "blocks_selected": result.upload.blocks_selected,
                # VmHWM, not ru_maxrss: the latter keeps the parent's high-water mark across exec.
                "maxrss_mib": peak_rss_kib() / 1024,
                "phases": durations,
                "image": result.regions[0].image_id,
            }
        )
    )


def warm_up(url: str) -> None:
    """moto imports each service's code on its first request: pay that before measuring."""
    import boto3

    def client(service: str) -> Any:
        return boto3.client(
            service,
            region_name="us-east-1",
            endpoint_url=url,
            aws_access_key_id="x",
            aws_secret_access_key="x",
        )

    client("sts").get_caller_identity()
    client("ec2").describe_regions()
    client("ec2").describe_images(Owners=["self"])
    client("s3").list_buckets()
    client("iam").list_roles()
    client("kms").list_keys()
    client("ssm").describe_parameters()
    snap = client("ebs").start_snapshot(VolumeSize=1)
    client("ebs").complete_snapshot(SnapshotId=snap["SnapshotId"], ChangedBlocksCount=0)


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def nonzero_blocks(raw: Path) -> int:
    zero = bytes(BLOCK)
    count = 0
    with raw.open("rb") as fh:
        while block := fh.read(BLOCK):
            count += block.ljust(BLOCK, b"\0") != zero
    return count


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

    from tests.support.disks import make_artifact, make_disk, write_zero_region
    from tests.support.motoext import aws_env, local_aws
    from vmbuild.run import run

    with tempfile.TemporaryDirectory(prefix="vmbuild-bench-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        raw = make_disk(work / "disk", size_mib=args.size_gib * 1024, data_mib=args.data_mib)
        made = time.monotonic() - t0
        artifacts = {
            fmt: make_artifact(work / fmt, raw, formats=(fmt,), sign=False)
            for fmt in ("qcow2", "raw")
        }
        # Written zeros in the stored raw (after the partition; same content, same sha256):
        # allocated on disk, so only the zero check can keep them from being sent.
        write_zero_region(artifacts["raw"] / "disk.raw", args.size_gib * 1024 - 8, 8)
        allocated = (artifacts["raw"] / "disk.raw").stat().st_blocks * 512
        blocks = nonzero_blocks(raw)
        rows: list[dict[str, Any]] = []
        with local_aws(work) as (moto, front):

            def client(service: str) -> Any:
                return boto3.client(
                    service,
                    region_name="us-east-1",
                    endpoint_url=moto.url,
                    aws_access_key_id="x",
                    aws_secret_access_key="x",
                )

            env = {
                **aws_env(moto.url),
                "AWS_ENDPOINT_URL_EC2": front.url,
                "AWS_ENDPOINT_URL_EBS": front.url,
                "VMBUILD_CACHE_DIR": str(work / "cache"),
            }
            warm_up(moto.url)
            for method, fmt in (
                ("ebs-direct", "qcow2"),
                ("ebs-direct", "raw"),
                ("import-snapshot", "qcow2"),
            ):
                moto.reset()  # each run starts from an empty account
                client("s3").create_bucket(Bucket=args.bucket)
                client("iam").create_role(RoleName="vmimport", AssumeRolePolicyDocument="{}")
                proc = run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        method,
                        "--build-dir",
                        artifacts[fmt],
                        "--bucket",
                        args.bucket,
                    ],
                    env=env,
                    timeout=1800,
                    cwd=ROOT,
                )
                line = [x for x in proc.stdout.splitlines() if x.startswith("{")][-1]
                rows.append({**json.loads(line), "stored": fmt})
    print_table(
        args,
        raw_size=args.size_gib * 1024 * MIB,
        allocated=allocated,
        blocks=blocks,
        rows=rows,
        made=made,
    )
    return 0


def phases(row: dict[str, Any]) -> str:
    names = {
        "verify": "sha256",
        "s3-upload": "S3 upload",
        "import": "import task (simulated)",
        "share": "tag+share",
        "done": "end",
    }
    return ", ".join(f"{names.get(k, k)} {v:.1f}s" for k, v in row["phases"].items())


def print_table(
    args: argparse.Namespace,
    *,
    raw_size: int,
    allocated: int,
    blocks: int,
    rows: list[dict[str, Any]],
    made: float,
) -> None:
    def mib(n: float) -> str:
        return f"{n / MIB:,.1f} MiB"

    lines = [
        (
            "disk (virtual)",
            mib(raw_size),
            f"sparse raw, {args.data_mib} MiB of random data in ext4, made in {made:.1f}s",
        ),
        (
            "allocated (st_blocks of disk.raw)",
            mib(allocated),
            "the stored raw, including 8 MiB of written (allocated) zeros",
        ),
        (
            "non-zero data, in 512 KiB blocks",
            mib(blocks * BLOCK),
            f"{blocks} EBS blocks: the least any EBS upload can send",
        ),
    ]
    for row in rows:
        name = f"{row['method']} ({row['stored']})"
        if row["method"] == "ebs-direct":
            note = (
                f"{row['blocks_sent']} PutSnapshotBlock ({row['blocks_selected']} blocks the "
                f"file system uses or data outside it); sent/non-zero "
                f"{row['bytes_sent'] / max(1, blocks * BLOCK):.3f}, sent/allocated "
                f"{row['bytes_sent'] / max(1, allocated):.3f}"
            )
        else:
            note = "the S3 object: VMDK streamOptimized converted from the stored qcow2"
        lines.append((f"{name}: bytes sent", mib(row["bytes_sent"]), note))
    for row in rows:
        lines.append(
            (
                f"{row['method']} ({row['stored']}): end to end",
                f"{row['seconds']:.1f} s",
                phases(row),
            )
        )
    for row in rows:
        lines.append(
            (
                f"{row['method']} ({row['stored']}): peak RSS",
                f"{row['maxrss_mib']:.0f} MiB",
                "VmHWM of the vmbuild process; target < 200 MB",
            )
        )
    width = max(len(a) for a, _, _ in lines)
    vwidth = max(len(b) for _, b, _ in lines)
    print(
        f"\nvmbuild distribution benchmark ({os.cpu_count()} CPUs, local moto endpoint, "
        f"load average {os.getloadavg()[0]:.1f})"
    )
    print(f"{'metric'.ljust(width)}  {'value'.rjust(vwidth)}  note")
    print(f"{'-' * width}  {'-' * vwidth}  {'-' * 40}")
    for metric, value, note in lines:
        print(f"{metric.ljust(width)}  {value.rjust(vwidth)}  {note}")


if __name__ == "__main__":
    raise SystemExit(main())
