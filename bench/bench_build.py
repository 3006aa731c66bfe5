"""Build benchmark (`make bench`).

1. Time-to-SSH, side by side in one run: vmbuild's builder VM (overlay, seed,
   keys, QEMU, pinned login) against a bare `qemu-system-x86_64` started with
   the very same argv on a prepared overlay and seed. Target: vmbuild <= 1.05x.
   (bench_rebuild.py has the build and rebuild timings.)
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vmbuild import paths
from vmbuild.hypervisor import accel as accel_mod
from vmbuild.hypervisor.base import VMSpec, free_port
from vmbuild.hypervisor.guest import GuestRequest, booted_guest, create_overlay
from vmbuild.hypervisor.qemu import qemu_argv
from vmbuild.hypervisor.seed import SeedConfig, write_seed
from vmbuild.remote.keys import generate_ed25519
from vmbuild.stages import base_image

REPO = Path(__file__).resolve().parents[1]
USER = "vmbuild-builder"


def bare_qemu(base: base_image.BaseImage, accel: accel_mod.Accel, work: Path) -> float:
    """Seconds from exec of a bare qemu-system to an SSH login (setup not timed).

    Its readiness probe is OpenSSH's `ssh` run every 0.2 s: nothing of
    vmbuild's own polling code, so the comparison measures that code too.
    """
    client, host = generate_ed25519("bench"), generate_ed25519("bench-host")
    key = client.write_private(work / "bare-key")
    seed = write_seed(
        SeedConfig("bare-" + secrets.token_hex(3), "bare", USER, client, host,
                   minimal_cloud_init=True),
        work / "bare-seed.iso",
    )  # fmt: skip
    overlay = work / "bare.qcow2"
    create_overlay(base.path, base.format, overlay, 4 << 30)
    spec = VMSpec(
        name="vmbuild-bench-bare", disk=overlay, seed=seed, memory_mib=2048, cpus=2, accel=accel,
        ssh_port=free_port(), console_log=work / "bare-console.log", workdir=work,
    )  # fmt: skip
    probe = [
        "ssh", "-i", str(key), "-p", str(spec.ssh_port), "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", f"{USER}@127.0.0.1", "true",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(qemu_argv(spec), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = start + accel.timeout(60)
        while time.monotonic() < deadline:
            done = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True)
            if done.returncode == 0:
                return time.monotonic() - start
            time.sleep(0.2)
        raise SystemExit("the bare VM never answered SSH")
    finally:
        proc.kill()
        proc.wait()
        for p in (overlay, seed, key):
            p.unlink(missing_ok=True)


def vmbuild_boot(base: base_image.BaseImage, accel: accel_mod.Accel, work: Path) -> float:
    """Seconds from asking vmbuild for a builder VM to its pinned SSH login (ready for work)."""
    req = GuestRequest(
        run_id=secrets.token_hex(3), role="builder", base=base.path, base_format=base.format,
        disk_size=4 << 30, memory_mib=2048, cpus=2, accel=accel, workdir=work, user=USER,
        dispose="kill",
    )  # fmt: skip
    start = time.monotonic()
    with booted_guest(req):
        return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=1, help="boots of each kind")
    args = parser.parse_args()
    console = Console()
    base = base_image.build_debian("debian-12")
    cache = paths.cache_dir()
    with tempfile.TemporaryDirectory(prefix="bench-", dir=cache) as tmp:
        work = Path(tmp)
        accel = accel_mod.choose("auto", (base.path, base.format), work)
        console.print(f"accelerator: {accel.kind} ({accel.reason})")
        bare, ours = [], []
        for _ in range(args.rounds):  # alternate, so drift hits both alike
            bare.append(bare_qemu(base, accel, work))
            ours.append(vmbuild_boot(base, accel, work))
    table = Table(title="time to SSH login (s)")
    for col in ("boot", "median", "runs"):
        table.add_column(col)
    table.add_row(
        "bare qemu-system", f"{statistics.median(bare):.1f}", ", ".join(f"{x:.1f}" for x in bare)
    )
    table.add_row(
        "vmbuild builder", f"{statistics.median(ours):.1f}", ", ".join(f"{x:.1f}" for x in ours)
    )
    ratio = statistics.median(ours) / statistics.median(bare)
    table.add_row("ratio (target <= 1.05)", f"{ratio:.3f}", "")
    console.print(table)

    return 0


if __name__ == "__main__":
    sys.exit(main())
