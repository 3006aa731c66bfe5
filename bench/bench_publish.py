"""Benchmark EBS direct upload against the local AWS endpoint: blocks and bytes per mode.

For a representative disk it prints what each mode sends: `upload_blocks: used` (every block
the file systems use, zero or not, plus data outside them), `all` (every block), and an
incremental upload of version 2 after version 1 where v2 differs by one component (files
written into the file system offline, standing in for a component's install). Then vmbuild's
peak RSS while uploading an 8 GiB disk. Each upload runs in a child process, so its peak RSS
is its own (VmHWM).

The disk: vmbuild's cached offline Debian 12 base (~/.cache/vmbuild/bases) when there is one,
grown to --size-gib like a build's `disk_size` (partition and ext4 grown offline, as
cloud-init's growpart does in the builder VM); else a synthetic ext4 disk with --data-mib of
random data. Endpoints: AWS_ENDPOINT_URL at moto, EC2 and EBS through the test front server,
which models ParentSnapshotId lineage and corrects moto's StartSnapshot BlockSize.

Usage: python bench/bench_publish.py [--size-gib 4] [--rss-size-gib 8] [--data-mib 384]
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


def child(build_dir: Path, upload_blocks: str) -> None:
    """Run one distribution in this process and print its numbers as JSON."""
    from vmbuild.config.distribution import load_distribution
    from vmbuild.publish.distributor import distribute

    config = load_distribution(
        {
            "lint": False,
            "import": {"upload_blocks": upload_blocks},
            "wait": {"poll_interval": 0.2},
            "regions": [{"region": "us-east-1"}],
        },
        "bench",
        "",
    )
    started = time.monotonic()
    result = distribute(build_dir, config, allow_unsigned=True)
    if not result.ok:
        raise SystemExit(json.dumps(result.to_json(), default=str))
    up = result.upload
    print(
        json.dumps(
            {
                "seconds": round(time.monotonic() - started, 1),
                "upload_seconds": up.seconds,
                "blocks_total": up.blocks_total,
                "blocks_selected": up.blocks_selected,
                "blocks_sent": up.blocks_sent,
                "blocks_unchanged": up.blocks_unchanged,
                "blocks_free": up.blocks_free,
                "bytes_sent": up.bytes_sent,
                "parent": up.parent_snapshot_id,
                "lineage": up.lineage,
                # VmHWM, not ru_maxrss: the latter keeps the parent's high-water mark across exec.
                "maxrss_mib": round(peak_rss_kib() / 1024, 1),
            }
        )
    )


def peak_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def cached_base() -> Path | None:
    bases = Path(os.environ.get("VMBUILD_CACHE_DIR", Path.home() / ".cache/vmbuild")) / "bases"
    found = sorted(bases.glob("debian-12-*/disk.qcow2"))
    return found[-1] if found else None


def grown_disk(base: Path, work: Path, size_gib: int) -> Path:
    """The base as a raw disk of `size_gib`, its first partition and ext4 grown to fill it."""
    from vmbuild.run import run

    raw = work / "disk.raw"
    run(["qemu-img", "convert", "-O", "raw", base, raw])
    run(["qemu-img", "resize", "-f", "raw", raw, f"{size_gib}G"])
    run(["sfdisk", "-q", "-N", "1", "--no-reread", raw], input=b", +\n")
    part = work / "part.raw"
    # resize2fs cannot open `file?offset=`: grow a sparse copy of the partition, put it back.
    run(["dd", f"if={raw}", f"of={part}", "bs=1M", "skip=1", "conv=sparse", "status=none"])
    run(["e2fsck", "-fy", part], check=False)
    run(["resize2fs", part])
    run(["dd", f"if={part}", f"of={raw}", "bs=1M", "seek=1", "conv=sparse,notrunc", "status=none"])
    part.unlink()
    return raw


def nonzero_blocks(raw: Path) -> int:
    """Blocks with any non-zero byte: what the old zero-skipping upload sent."""
    zero = bytes(BLOCK)
    count = 0
    fd = os.open(raw, os.O_RDONLY)
    try:
        from vmbuild.diskfs.partitions import block_indexes

        size = os.fstat(fd).st_size
        for index in block_indexes(fd, size):
            count += os.pread(fd, BLOCK, index * BLOCK).ljust(BLOCK, b"\0") != zero
    finally:
        os.close(fd)
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=int, default=4)
    parser.add_argument("--rss-size-gib", type=int, default=8)
    parser.add_argument("--data-mib", type=int, default=384)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--build-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.build_dir, args.child)
        return 0

    from tests.support.disks import make_artifact, make_disk, write_guest_file
    from tests.support.motoext import aws_env, local_aws
    from vmbuild.diskfs.allocation import BlockClass, allocation_map
    from vmbuild.run import run

    with tempfile.TemporaryDirectory(prefix="vmbuild-bench-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        base = cached_base()
        if base is not None:
            raw1 = grown_disk(base, work, args.size_gib)
            source = (
                f"vmbuild's offline Debian 12 base ({base.parent.name}) "
                f"grown to {args.size_gib} GiB"
            )
        else:
            raw1 = make_disk(
                work / "synthetic", size_mib=args.size_gib * 1024, data_mib=args.data_mib
            )
            source = f"synthetic ext4 disk, {args.data_mib} MiB random data"
        # Version 2: one component more (a 3 MiB program and its config, written offline).
        raw2 = work / "v2.raw"
        run(["cp", "--sparse=always", raw1, raw2])
        write_guest_file(raw2, "/usr/local/bin/app", os.urandom(3 * MIB), work)
        write_guest_file(raw2, "/etc/app.conf", b"listen 8080\n", work)
        # The 8 GiB disk for the RSS figure: the same content, more (unpartitioned) space.
        raw8 = work / "disk8.raw"
        run(["cp", "--sparse=always", raw1, raw8])
        run(["qemu-img", "resize", "-f", "raw", raw8, f"{args.rss_size_gib}G"])
        made = time.monotonic() - t0

        amap = allocation_map(raw1)
        counts = {
            "blocks_total": amap.blocks_total,
            "blocks_used_map": amap.count(BlockClass.USED),
            "nonzero": nonzero_blocks(raw1),
        }
        store = work / "images"
        v1 = make_artifact(
            store, raw1, version="1.0.0", build="20261130T100000Z-000001", sign=False
        )
        v2 = make_artifact(
            store, raw2, version="1.1.0", build="20261130T110000Z-000002", sign=False
        )
        v1_all = make_artifact(work / "store-all", raw1, sign=False)
        v8 = make_artifact(work / "store-8g", raw8, sign=False)
        rows: dict[str, dict[str, Any]] = {}
        with local_aws(work) as (moto, front):
            env = {
                **aws_env(moto.url),
                "AWS_ENDPOINT_URL_EC2": front.url,
                "AWS_ENDPOINT_URL_EBS": front.url,
                "VMBUILD_CACHE_DIR": str(work / "cache"),
            }

            def upload(name: str, build_dir: Path, mode: str, reset: bool) -> None:
                if reset:
                    moto.reset()  # an empty account (and moto's memory back)
                    front.reset()
                proc = run(
                    [sys.executable, __file__, "--child", mode, "--build-dir", build_dir],
                    env=env,
                    timeout=3600,
                    cwd=ROOT,
                )
                line = [x for x in proc.stdout.splitlines() if x.startswith("{")][-1]
                rows[name] = {**json.loads(line), "mode": mode}

            upload("used", v1, "used", reset=True)
            upload("incremental", v2, "used", reset=False)  # v1's snapshot is the parent
            upload("all", v1_all, "all", reset=True)
            upload("used-8g", v8, "used", reset=True)
    print_table(args, source=source, made=made, counts=counts, rows=rows)
    return 0


def print_table(
    args: argparse.Namespace,
    *,
    source: str,
    made: float,
    counts: dict[str, int],
    rows: dict[str, dict[str, Any]],
) -> None:
    def mib(blocks: int) -> str:
        return f"{blocks * BLOCK / MIB:,.1f} MiB"

    used = rows["used"]
    lines = [
        ("disk", f"{args.size_gib} GiB", f"{source}; made in {made:.0f}s"),
        ("blocks of the volume", str(counts["blocks_total"]), "512 KiB EBS blocks"),
        (
            "non-zero blocks",
            str(counts["nonzero"]),
            f"{mib(counts['nonzero'])}: what the old zero-skipping upload sent",
        ),
        (
            "used blocks (allocation map)",
            str(counts["blocks_used_map"]),
            "ext4 bitmaps + MBR; zero or not",
        ),
    ]
    for name, label in (
        ("used", "upload_blocks: used"),
        ("all", "upload_blocks: all"),
        ("incremental", "incremental v2 (one component more)"),
        ("used-8g", f"used, {args.rss_size_gib} GiB disk"),
    ):
        row = rows[name]
        note = (
            f"{mib(row['blocks_sent'])} sent; a full upload sends {row['blocks_selected']}; "
            f"{row['blocks_free']} free-space blocks never read; {row['seconds']}s end to end, "
            f"peak RSS {row['maxrss_mib']:.0f} MiB"
        )
        if name == "incremental":
            note += f"; {row['blocks_unchanged']} unchanged; {row['lineage']}"
        lines.append((label, f"{row['blocks_sent']} blocks", note))
    inc = rows["incremental"]
    lines.append(
        (
            "incremental / full v2",
            f"{inc['blocks_sent'] / max(1, inc['blocks_selected']):.3f}",
            f"v1 full: {used['blocks_sent']} blocks",
        )
    )
    width = max(len(a) for a, _, _ in lines)
    vwidth = max(len(b) for _, b, _ in lines)
    print(
        f"\nvmbuild EBS direct benchmark ({os.cpu_count()} CPUs, local moto endpoint, "
        f"load average {os.getloadavg()[0]:.1f})"
    )
    print(f"{'metric'.ljust(width)}  {'value'.rjust(vwidth)}  note")
    print(f"{'-' * width}  {'-' * vwidth}  {'-' * 40}")
    for metric, value, note in lines:
        print(f"{metric.ljust(width)}  {value.rjust(vwidth)}  {note}")
    print(json.dumps({"counts": counts, "rows": rows}, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
