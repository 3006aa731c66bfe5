"""Shared helpers for the pipeline unit tests (no tests here): an injectable clock, a
fake build, pipeline and recipe files, stored artifacts and a small Debian mirror
written to disk (served over file:// or a 127.0.0.1 HTTP server in a thread)."""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import json
import lzma
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import yaml

from vmbuild.build import BuildOptions, BuildResult
from vmbuild.config.recipe import LoadedRecipe
from vmbuild.log import Progress
from vmbuild.stages import store

T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)  # a Monday


class FakeClock:
    """Time that moves only when told (or when something sleeps)."""

    def __init__(self, start: datetime = T0) -> None:
        self.t = start
        self.sleeps: list[float] = []

    def now(self) -> datetime:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += timedelta(seconds=seconds)

    def advance(self, **kwargs: float) -> datetime:
        self.t += timedelta(**kwargs)
        return self.t


def write_recipe(directory: Path, name: str = "img", version: str = "1.0.0", **extra: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    data = {"name": name, "version": version, "base": "debian-12", **extra}
    path = directory / f"{name}-recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def write_pipeline(directory: Path, body: dict[str, Any] | str, name: str = "p") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return path


def fake_artifact(
    store_dir: Path, name: str = "img", version: str = "1.0.0", *,
    created: datetime = T0, packages: list[dict[str, str]] | None = None,
    tests: str = "passed", suffix: str = "aaaaaa",
) -> Path:  # fmt: skip
    build_id = f"{created:%Y%m%dT%H%M%SZ}-{suffix}"
    build_dir = store_dir / name / version / build_id
    build_dir.mkdir(parents=True)
    (build_dir / "disk.qcow2").write_bytes(b"QFI\xfb fake")
    store.write_manifest(
        build_dir,
        {
            "name": name, "version": version, "build": build_id,
            "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "packages": packages or [], "tests": {"status": tests},
            "outputs": [{"format": "qcow2", "file": "disk.qcow2", "size": 9, "sha256": "0"}],
            "timings": {"total": 1.0},
        },
    )  # fmt: skip
    return build_dir


@dataclass
class FakeBuild:
    """Stands in for vmbuild.build.build: stores a fake artifact, or fails, or waits."""

    packages: list[dict[str, str]] = field(default_factory=list)
    error: BaseException | None = None
    sleep: float = 0.0
    stage_sleep: dict[str, float] = field(default_factory=dict)
    calls: list[tuple[LoadedRecipe, BuildOptions]] = field(default_factory=list)
    clock: FakeClock | None = None
    # Run the real attest stage (SBOMs, the CVE scan with the recipe's `scan:`, signed
    # provenance) over the stored artifact, as vmbuild.build's attest step does.
    attest: bool = False

    def __call__(self, loaded: LoadedRecipe, opts: BuildOptions, progress: Progress) -> BuildResult:
        self.calls.append((loaded, opts))
        with progress.stage("builder", "fake builder"):
            if self.sleep:
                time.sleep(self.sleep)
            if self.error is not None:
                raise self.error
        for name, secs in self.stage_sleep.items():
            with progress.stage(name, f"fake {name}"):
                time.sleep(secs)
        created = self.clock.now() if self.clock else datetime.now(UTC)
        build_dir = fake_artifact(
            opts.store, loaded.recipe.name, loaded.recipe.version, created=created,
            packages=self.packages, tests="skipped" if opts.skip_tests else "passed",
            suffix=f"{len(self.calls):06x}",
        )  # fmt: skip
        if self.attest:
            from vmbuild.supply.stage import attest_stage

            manifest = json.loads((build_dir / "manifest.json").read_text())
            manifest["base"] = {"id": "debian-12", "sha256": "cd" * 32, "source": "test"}
            with progress.stage("attest", "SBOMs, CVE scan, provenance"):
                attest_stage(build_dir, manifest, scan_settings=loaded.recipe.scan,
                             recipe_dir=loaded.dir)  # fmt: skip
            store.write_manifest(build_dir, manifest)
        return BuildResult(build_dir, store.load_manifest(build_dir))


def pkg(name: str, version: str, arch: str = "amd64") -> dict[str, str]:
    return {"name": name, "version": version, "arch": arch}


def write_mirror(
    root: Path, suite: str, packages: list[dict[str, str]], *, compression: str = "xz",
    date: datetime = T0, component: str = "main", arch: str = "amd64", listed: bool = True,
) -> str:  # fmt: skip
    """A Debian archive at `root` with one suite; returns its file:// URI."""
    stanzas = "\n".join(
        f"Package: {p['name']}\nVersion: {p['version']}\nArchitecture: {p['arch']}\n"
        f"Description: test package\n continuation line: ignored\n"
        for p in packages
    )
    raw = stanzas.encode()
    data = {"xz": lzma.compress, "gz": gzip.compress, "": lambda b: b}[compression](raw)
    rel = f"{component}/binary-{arch}/Packages" + (f".{compression}" if compression else "")
    dists = root / "dists" / suite
    (dists / rel).parent.mkdir(parents=True, exist_ok=True)
    (dists / rel).write_bytes(data)
    sha = f" {hashlib.sha256(data).hexdigest()} {len(data)} {rel}\n" if listed else ""
    (dists / "Release").write_text(
        f"Origin: Test\nSuite: {suite}\nDate: {format_datetime(date, usegmt=True)}\n"
        f"Architectures: {arch}\nComponents: {component}\nSHA256:\n{sha}"
    )
    return root.as_uri()


@contextlib.contextmanager
def http_mirror(root: Path) -> Iterator[str]:
    """Serve `root` on 127.0.0.1 from a thread (unit tests spawn no processes)."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def manifest_packages(build_dir: Path) -> list[dict[str, str]]:
    packages: list[dict[str, str]] = json.loads((build_dir / "manifest.json").read_text())[
        "packages"
    ]
    return packages
