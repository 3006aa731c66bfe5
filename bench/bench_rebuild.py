"""Rebuild benchmark (`make bench`), every ratio measured side by side in one run.

1. vmbuild vs Packer 1.6.6 (Debian's `packer`, qemu builder), the same work on
   the same base: boot, `apt-get update`, install nginx, generalize, one
   standalone qcow2. Alternated rounds (Packer first in even rounds, last in
   odd ones); cold package cache for both (vmbuild gets a fresh apt-cacher-ng,
   Packer goes direct); vmbuild without checkpoints. Each round also runs
   vmbuild's whole pipeline on the same work (the test VM included).
2. The example recipe (tests included): a full build with an empty checkpoint
   cache, an identical rebuild, a rebuild after editing one word of the last
   component, and a second full build without checkpoints; the bytes
   apt-cacher-ng fetched from outside for each, packages and indexes apart.

Run it under the VM lock: `flock /tmp/vmbuild-vm.lock make bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vmbuild import paths
from vmbuild.cache import aptproxy
from vmbuild.hypervisor.seed import SeedConfig, write_seed
from vmbuild.remote.keys import generate_ed25519
from vmbuild.stages import base_image
from vmbuild.stages.generalize import generalize_script

REPO = Path(__file__).resolve().parents[1]
USER = "vmbuild-builder"
VMBUILD = [sys.executable, "-m", "vmbuild"]

WORK = """\
name: nginx-same-work
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: Install
        action: ExecuteBash
        inputs:
          commands:
            - apt-get update
            - DEBIAN_FRONTEND=noninteractive apt-get install -y nginx
"""


def uptime() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def timed(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> float:
    start = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    took = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:3]} failed (exit {proc.returncode}); see {log}")
    return took


# -- vmbuild vs Packer ------------------------------------------------------------
def packer_template(
    base: base_image.BaseImage, seed: Path, key: Path, out: Path
) -> dict[str, object]:
    # The generalize script without its finish unit: Packer powers off itself.
    body = generalize_script(USER).split("# The builder's user goes last")[0]
    return {
        "builders": [
            {
                "type": "qemu",
                "accelerator": "none",  # the flags below: the same TCG settings as vmbuild
                "qemuargs": [
                    ["-machine", "type=pc"],
                    ["-accel", "tcg,thread=multi"],
                    ["-cpu", "qemu64"],
                    [
                        "-drive",
                        "file={{ .OutputDir }}/{{ .Name }},if=virtio,cache=writeback,"
                        "discard=unmap,detect-zeroes=unmap,format=qcow2",
                    ],
                    ["-drive", f"file={seed},if=virtio,format=raw,readonly=on"],
                    ["-device", "virtio-rng-pci"],
                ],
                "disk_image": True,
                "iso_url": str(base.path),
                "iso_checksum": f"sha256:{base.sha256}",
                "disk_size": "4096M",
                "format": "qcow2",
                "headless": True,
                "vnc_bind_address": "127.0.0.1",
                "memory": 2048,
                "cpus": 2,
                "net_device": "virtio-net",
                "boot_wait": "0s",
                "ssh_username": USER,
                "ssh_private_key_file": str(key),
                "ssh_timeout": "30m",
                "shutdown_command": (
                    f"sudo -n systemd-run --no-block sh -c 'sleep 1; pkill -KILL -u {USER}; "
                    f"userdel -f -r {USER}; fstrim -av; poweroff'"
                ),
                "shutdown_timeout": "10m",
                "output_directory": str(out),
                "vm_name": "disk.qcow2",
            }
        ],
        "provisioners": [
            {
                "type": "shell",
                "execute_command": "sudo -n sh -c '{{ .Vars }} bash {{ .Path }}'",
                "inline": [
                    "apt-get update",
                    "DEBIAN_FRONTEND=noninteractive apt-get install -y nginx",
                    body,
                ],
            }
        ],
    }


def packer_run(base: base_image.BaseImage, work: Path, n: int) -> float:
    d = work / f"packer-{n}"
    d.mkdir()
    client, host = generate_ed25519("packer"), generate_ed25519("packer-host")
    key = client.write_private(d / "id_ed25519")
    cfg = SeedConfig(f"packer-{n}-{int(time.time())}", f"packer-{n}", USER, client, host,
                     minimal_cloud_init=True)  # fmt: skip
    seed = write_seed(cfg, d / "seed.iso")
    template = d / "template.json"
    template.write_text(json.dumps(packer_template(base, seed, key, d / "out"), indent=2))
    env = {**os.environ, "PACKER_CACHE_DIR": str(d / "cache"), "CHECKPOINT_DISABLE": "1"}
    took = timed(["packer", "build", "-color=false", str(template)], env, d, d / "packer.log")
    shutil.rmtree(d / "out")
    return took


def vmbuild_same_work(work: Path, n: int, *, tests: bool) -> float:
    d = work / f"vmbuild-{n}-{'pipeline' if tests else 'build'}"
    d.mkdir()
    (d / "nginx.yaml").write_text(WORK)
    recipe = d / "recipe.yaml"
    recipe.write_text(
        "name: same-work\nversion: 1.0.0\nbase: debian-12\ndisk_size: 4G\n"
        "components:\n  - name: ./nginx.yaml\noutputs: [qcow2]\nvm: {memory: 2G, cpus: 2}\n"
    )
    # A cold package cache: a fresh apt-cacher-ng for this run alone.
    with aptproxy.shared_instance(d / "acng") as proxy:
        env = {**os.environ, "VMBUILD_STORE": str(d / "store")}
        argv = [*VMBUILD, "build", str(recipe), "--no-cache", "--apt-proxy", proxy.host_url]
        if not tests:
            argv.append("--skip-tests")
        took = timed(argv, env, REPO, d / "vmbuild.log")
    SAME_WORK_STAGES.append(
        f"{'pipeline' if tests else 'build'} {n + 1}: {stage_times(d / 'store')}"
    )
    shutil.rmtree(d / "store")
    shutil.rmtree(d / "acng")
    return took


# -- rebuilds -----------------------------------------------------------------------
def example_copy(d: Path) -> Path:
    """The example recipe with both components as local files, to be edited."""
    for name in ("update-linux", "nginx-app"):
        shutil.copy(REPO / "vmbuild" / "components" / f"{name}.yaml", d / f"{name}.yaml")
    recipe = (REPO / "examples/nginx/recipe.yaml").read_text()
    recipe = recipe.replace("  - name: update-linux\n", "  - name: ./update-linux.yaml\n")
    recipe = recipe.replace("  - name: nginx-app\n", "  - name: ./nginx-app.yaml\n")
    recipe = recipe.replace("tests/test_image.py", str(REPO / "examples/nginx/tests/test_image.py"))
    (d / "recipe.yaml").write_text(recipe)
    return d / "recipe.yaml"


Fetched = tuple[int, int]  # bytes fetched from outside: (packages, indexes)


def fetched(transfer_log: Path, since: int) -> Fetched:
    """Bytes apt-cacher-ng fetched from outside after `since`: .debs, and the rest."""
    files = aptproxy.fetched_from_outside(transfer_log, since)
    debs = sum(size for size, path in files if path.endswith(".deb"))
    return debs, sum(size for size, _path in files) - debs


def rebuilds(work: Path) -> dict[str, tuple[float, Fetched]]:
    d = work / "rebuild"
    d.mkdir()
    recipe = example_copy(d)
    env = {**os.environ, "VMBUILD_STORE": str(d / "store"),
           "VMBUILD_CHECKPOINT_DIR": str(d / "checkpoints")}  # fmt: skip
    out: dict[str, tuple[float, Fetched]] = {}
    # A package cache of its own, so the first build is cold and no other user's
    # traffic lands in its log.
    with aptproxy.shared_instance(d / "acng") as proxy:
        assert proxy.transfer_log is not None
        argv = [*VMBUILD, "build", str(recipe), "--apt-proxy", proxy.host_url]
        for name in ("full", "identical", "edited", "first edited", "second"):
            if name == "edited":  # one word of the last component's description
                doc = d / "nginx-app.yaml"
                doc.write_text(doc.read_text().replace("serving one page", "serving a page", 1))
            if name == "first edited":  # ... and then one of the first one's
                doc = d / "update-linux.yaml"
                text = doc.read_text()
                assert "description: " in text
                doc.write_text(text.replace("description: ", "description: Edited. ", 1))
            before = proxy.transfer_log.stat().st_size if proxy.transfer_log.exists() else 0
            extra = ["--no-cache"] if name == "second" else []
            took = timed(argv + extra, env, REPO, d / f"{name.replace(' ', '-')}.log")
            out[name] = (took, fetched(proxy.transfer_log, since=before))
            STAGES[name] = stage_times(d / "store")
    return out


STAGES: dict[str, str] = {}  # per build: where its time went (its manifest's timings)
SAME_WORK_STAGES: list[str] = []


def stage_times(store: Path) -> str:
    """The newest build's stage timings, and how its builder came back."""
    newest = max(store.glob("*/*/*/manifest.json"), key=lambda p: p.stat().st_mtime)
    m = json.loads(newest.read_text())
    t = m["timings"]
    disk = [t.get(k, 0) for k in ("generalize", "convert", "verify")]
    out = (
        f"builder {t.get('builder', 0):.1f}, components {t.get('components', 0):.1f}, "
        f"generalize+convert+verify {sum(disk):.1f} ({'+'.join(f'{x:.1f}' for x in disk)}), "
        f"test {t.get('test', 0):.1f}"
    )
    restore = (m.get("checkpoints") or {}).get("restore")
    return out + (f"; builder restore: {restore}" if restore else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="vmbuild/Packer rounds (alternated)")
    parser.add_argument("--no-packer", action="store_true")
    parser.add_argument("--no-rebuild", action="store_true")
    args = parser.parse_args()
    console = Console()
    base = base_image.build_debian("debian-12")
    loads = [f"start {uptime()}"]
    results = Table(title="vmbuild rebuild benchmark (TCG)")
    for col in ("measure", "value", "runs", "target"):
        results.add_column(col)
    with tempfile.TemporaryDirectory(prefix="bench-", dir=paths.cache_dir()) as tmp:
        work = Path(tmp)
        if not args.no_packer:
            ours, pipeline, theirs = [], [], []
            for n in range(args.rounds):  # alternated: drift and load hit both alike
                if n % 2 == 0:
                    theirs.append(packer_run(base, work, n))
                ours.append(vmbuild_same_work(work, n, tests=False))
                pipeline.append(vmbuild_same_work(work, n, tests=True))
                if n % 2 == 1:
                    theirs.append(packer_run(base, work, n))
                loads.append(f"round {n + 1} {uptime()}")
                console.print(f"round {n + 1}: packer {theirs[-1]:.1f} s, vmbuild "
                              f"{ours[-1]:.1f} s, pipeline {pipeline[-1]:.1f} s")  # fmt: skip
            packer = statistics.median(theirs)
            for label, runs in (("Packer 1.6.6, same work (s)", theirs),
                                ("vmbuild, same work (s)", ours),
                                ("vmbuild, same work + test VM (s)", pipeline)):  # fmt: skip
                results.add_row(label, f"{statistics.median(runs):.1f}",
                                ", ".join(f"{x:.1f}" for x in runs), "")  # fmt: skip
            results.add_row("vmbuild / Packer", f"{statistics.median(ours) / packer:.2f}", "",
                            "<= 0.80")  # fmt: skip
            whole = statistics.median(pipeline) / packer
            results.add_row("vmbuild pipeline / Packer build", f"{whole:.2f}", "", "<= 1.10")
        if not args.no_rebuild:
            r = rebuilds(work)
            loads.append(f"rebuilds {uptime()}")
            full = r["full"][0]
            for name, target in (("full", ""), ("identical", "<= 0.15"), ("edited", "<= 0.25"),
                                 ("first edited", ""), ("second", "")):  # fmt: skip
                took, (debs, indexes) = r[name]
                results.add_row(f"example recipe, {name} build (s)", f"{took:.1f}",
                                f"from outside: {debs} B of .debs, {indexes} B of indexes; "
                                f"{STAGES.get(name, '')}", "")  # fmt: skip
                if name in ("identical", "edited", "first edited"):
                    results.add_row(f"{name} / full", f"{took / full:.2f}", "", target)
            debs, indexes = r["second"][1]
            results.add_row("2nd build (no checkpoints): .deb bytes from outside", str(debs), "",
                            "0")  # fmt: skip
    console.print(results)
    for line in SAME_WORK_STAGES:
        console.print(f"vmbuild same work, {line}", markup=False)
    console.print("load (1/5/15 min): " + "; ".join(loads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
