"""The scheduler daemon as a real process, firing real builds (QEMU, TCG here).

The pipeline is the cheapest real build: the cached offline Debian base, no
components, no test VM, qcow2 only (tests/data/pipelines/minimal.yaml). A missed slot
is pre-seeded in the persisted state, so the daemon fires at start rather than at
the next minute. QEMU processes and staging dirs are matched by this test's own
store path: other builds may be running on the host at the same time.
"""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.vm.conftest import REPO
from vmbuild.cache import checkpoints
from vmbuild.pipeline.history import History, RunRecord
from vmbuild.stages import base_image, store

pytestmark = pytest.mark.vm

DATA = REPO / "tests" / "data" / "pipelines"
VMBUILD = [sys.executable, "-m", "vmbuild"]


def qemu_using(path: Path) -> list[int]:
    """QEMU processes whose command line mentions `path` (this test's store)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and any(str(path).encode() in a for a in argv):
            found.append(int(proc.name))
    return found


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory for the store: QEMU's QMP socket lives in the build's work
    dir, and a UNIX socket path must stay under 108 bytes (pytest's tmp_path is long)."""
    path = Path(tempfile.mkdtemp(prefix="vmbp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def leftovers(store_dir: Path) -> list[Path]:
    return [p for p in store_dir.rglob("*") if p.name.startswith((".staging-", "work-"))]


class Daemon:
    """`vmbuild scheduler` on a private pipelines dir, history and store."""

    def __init__(self, tmp_path: Path, store_dir: Path, cron: str, **extra: Any) -> None:
        self.tmp = tmp_path
        self.store = store_dir
        self.history_path = tmp_path / "state" / "history.sqlite"
        body = yaml.safe_load((DATA / "minimal.yaml").read_text())
        body["recipe"] = str(DATA / "recipes" / "minimal.yaml")
        body["schedule"]["cron"] = cron
        body.update(extra)
        self.pipeline = tmp_path / "pipelines" / "minimal.yaml"
        self.pipeline.parent.mkdir(parents=True)
        self.pipeline.write_text(yaml.safe_dump(body))
        self.log = tmp_path / "scheduler.log"
        self.env = {**os.environ, "VMBUILD_HISTORY": str(self.history_path),
                    "VMBUILD_STORE": str(self.store)}  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def seed_missed_slots(self, key: str, minutes_ago: float) -> None:
        now = datetime.now(UTC)
        with History(self.history_path) as h:
            h.set_schedule_state("minimal", key, now - timedelta(minutes=minutes_ago), now)

    def start(self) -> None:
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [*VMBUILD, "scheduler", "--pipelines", str(self.pipeline.parent)],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
            )  # fmt: skip

    def stop(self, timeout: float = 180) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def runs(self) -> list[RunRecord]:
        with History(self.history_path) as h:
            return h.list_runs("minimal")

    def wait(self, what: str, predicate: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            if value := predicate():
                return value
            time.sleep(1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log.read_text()}")

    def vmbuild(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*VMBUILD, *args], env=self.env, capture_output=True, text=True,
                              timeout=300, cwd=REPO)  # fmt: skip


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A package index on 127.0.0.1, written by the test."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))  # fmt: skip
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/debian"
    server.shutdown()


def write_index(root: Path, packages: list[dict[str, str]]) -> None:
    text = "".join(f"Package: {p['name']}\nVersion: {p['version']}\nArchitecture: {p['arch']}\n\n"
                   for p in packages)  # fmt: skip
    index = root / "debian" / "dists" / "bookworm" / "main" / "binary-amd64" / "Packages.gz"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_bytes(gzip.compress(text.encode()))


def test_a_scheduled_run_is_recorded_prunes_and_a_newer_package_is_detected(
    tmp_path: Path, short_tmp: Path, debian_base: base_image.BaseImage, mirror: tuple[Path, str]
) -> None:
    www, mirror_url = mirror
    # A daily slot 10 minutes ago; the daemon was last seen two days ago: one run, now.
    slot = datetime.now(UTC) - timedelta(minutes=10)
    cron = f"{slot.minute} {slot.hour} * * *"
    d = Daemon(
        tmp_path, short_tmp, cron, dependencies={"apt_sources": [f"deb {mirror_url} bookworm main"]}
    )
    d.seed_missed_slots(f"{cron} @ UTC", minutes_ago=2 * 24 * 60)
    old = d.store / "pipeline-minimal" / "1.0.0" / "20260101T000000Z-0000aa"
    old.mkdir(parents=True)  # an earlier build, for the lifecycle (keep_last: 1) to prune
    store.write_manifest(old, {"name": "pipeline-minimal", "version": "1.0.0", "build": old.name,
                               "created": "2026-01-01T00:00:00Z", "tests": {"status": "skipped"},
                               "outputs": []})  # fmt: skip
    d.start()
    try:
        runs = d.wait("the run to end", lambda: [r for r in d.runs() if r.status != "running"], 1500)  # fmt: skip
        # The run is recorded just before its process exits: let the daemon reap it.
        d.wait("the daemon to reap the run", lambda: "minimal: run process" in d.log.read_text(), 120)  # fmt: skip
    finally:
        code = d.stop()
    log = d.log.read_text()
    assert code == 0, log
    [run] = runs
    assert (run.trigger, run.status, run.error) == ("schedule", "succeeded", None), run
    assert "1 earlier slot(s)" in log and "running once for all of them" in log
    assert f"exited 0 (run {run.id} succeeded)" in log
    assert "scheduler stopped" in log

    artifact = Path(run.artifact or "")
    manifest = store.read_manifest(artifact)
    assert run.image == f"pipeline-minimal/1.0.0/{manifest['build']}"
    assert (artifact / "disk.qcow2").is_file()
    assert run.timings["builder"] > 0 and run.timings["convert"] > 0
    assert [p["image"] for p in run.pruned] == [f"pipeline-minimal/1.0.0/{old.name}"]
    assert not old.exists() and store.builds(d.store) == [artifact]
    assert Path(run.log_path or "").is_file()
    assert not leftovers(d.store) and not qemu_using(d.store)

    # The package index: the image's own versions first (nothing changed), then a
    # newer openssl appears (changed), checked against the real artifact's SBOM.
    packages = manifest["packages"]
    assert {p["name"] for p in packages} >= {"openssl", "openssh-server", "cloud-init"}
    write_index(www, packages)
    check = d.vmbuild("pipeline", "check", str(d.pipeline), "--json")
    assert check.returncode == 1, check.stdout + check.stderr
    assert json.loads(check.stdout)["changes"] == []
    bumped = [dict(p, version=p["version"] + "+security1") if p["name"] == "openssl" else p
              for p in packages]  # fmt: skip
    write_index(www, bumped)
    check = d.vmbuild("pipeline", "check", str(d.pipeline))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "packages: 1 package newer in the mirror (openssl)" in check.stdout

    listing = d.vmbuild("runs", "list")
    assert listing.returncode == 0 and "succeeded" in listing.stdout
    print(listing.stdout)  # shown with -s: the closing note's `vmbuild runs list`


def test_sigterm_mid_run_cancels_the_build_and_leaves_nothing(
    tmp_path: Path, short_tmp: Path, debian_base: base_image.BaseImage
) -> None:
    d = Daemon(tmp_path, short_tmp, "* * * * *")
    # An empty checkpoint cache of its own: the session's may hold this very
    # image's generalized disk, and then no builder VM would boot to be cancelled.
    d.env[checkpoints.ENV_DIR] = str(tmp_path / "checkpoints")
    d.seed_missed_slots("* * * * * @ UTC", minutes_ago=3)
    d.start()
    try:
        d.wait("the builder VM to start", lambda: qemu_using(d.store), 300)
        child = int(d.log.read_text().split("started a run (pid ")[1].split(")")[0])
    finally:
        code = d.stop()
    log = d.log.read_text()
    assert code == 0, log
    assert f"stopping: cancelling minimal (pid {child})" in log
    assert f"minimal: run process {child} exited 130" in log
    assert "scheduler stopped" in log
    assert not Path(f"/proc/{child}").exists()
    assert not qemu_using(d.store), "a VM was left behind"
    assert not leftovers(d.store), leftovers(d.store)
    # A minute boundary during the boot is a slot while the run goes: recorded skipped.
    skipped = [r for r in d.runs() if r.status == "skipped"]
    assert all("is still going" in (r.reason or "") for r in skipped)
    [run] = [r for r in d.runs() if r.status != "skipped"]
    assert (run.trigger, run.status) == ("schedule", "cancelled")
    assert run.error == "cancelled (SIGTERM or Ctrl-C); cleaned up"
    assert run.ended is not None and run.log_tail
