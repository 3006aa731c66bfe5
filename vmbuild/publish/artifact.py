"""The artifact being distributed: its manifest, its disks, and the disk forms uploads need.

EBS snapshots need the *raw* disk content; VM Import wants VMDK, VHD or RAW. Whatever the
store holds is turned into that form in a temporary directory that is always removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from vmbuild.digest import sha256_file
from vmbuild.errors import VmbuildError
from vmbuild.manifest import Manifest
from vmbuild.publish.events import DistributionEvent, EventCallback
from vmbuild.run import qemu_img

# Keys written into the manifest after the build (distribution results, a later `vmbuild scan`,
# the signature's summary); the artifact's identity (the digest AMIs are tagged with, the
# manifest subject of the signed provenance) must not change when they do.
MUTABLE_KEYS = frozenset({"distribution", "scan", "provenance"})
QEMU_FORMAT = {"qcow2": "qcow2", "raw": "raw", "vmdk": "vmdk", "vhd": "vpc"}
AWS_FORMAT = {"vmdk": "VMDK", "vhd": "VHD", "raw": "RAW"}
GIB = 1024**3


@dataclass(frozen=True)
class Output:
    """One disk file of the artifact, as the manifest describes it."""

    format: str
    path: Path
    sha256: str | None
    size: int
    virtual_size: int


@dataclass(frozen=True)
class Artifact:
    """A stored build, read from its manifest.json."""

    build_dir: Path
    manifest: Manifest
    name: str
    version: str
    build: str
    created: datetime
    outputs: tuple[Output, ...]
    digest: str

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}/{self.build}"

    @property
    def virtual_size(self) -> int:
        return max(o.virtual_size for o in self.outputs)

    @property
    def volume_gib(self) -> int:
        """The smallest EBS volume (whole GiB) that holds the disk."""
        return max(1, -(-self.virtual_size // GIB))

    @property
    def tests_status(self) -> str | None:
        tests = self.manifest.tests
        return str(tests.get("status")) if isinstance(tests, dict) and "status" in tests else None

    def variables(self) -> dict[str, str]:
        """Values for `{{ name }}`-style templates in AMI names and descriptions."""
        return {
            "name": self.name,
            "version": self.version,
            "build": self.build,
            "build_date": self.created.strftime("%Y%m%dT%H%M%SZ"),
        }

    def output(self, *formats: str) -> Output | None:
        """The first output present among `formats`, in that order of preference."""
        for fmt in formats:
            for out in self.outputs:
                if out.format == fmt:
                    return out
        return None


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON, minus what distribution adds to it."""
    stable = {k: v for k, v in manifest.items() if k not in MUTABLE_KEYS}
    blob = json.dumps(stable, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _required(value: int | None, key: str) -> int:
    if value is None:
        raise KeyError(key)
    return value


def load_artifact(build_dir: Path) -> Artifact:
    """Read and check the manifest of `build_dir`."""
    from vmbuild.stages.store import read_manifest

    raw = read_manifest(build_dir)
    where = build_dir / "manifest.json"
    manifest = Manifest.from_json(raw, str(where))
    try:
        created = manifest.created_at
        if created is None:
            raise ValueError("created")
        outputs = tuple(
            Output(
                format=o.format,
                path=build_dir / o.file,
                sha256=o.sha256,
                size=o.size,
                virtual_size=_required(o.virtual_size, "virtual_size"),
            )
            for o in manifest.outputs
        )
        artifact = Artifact(
            build_dir=build_dir,
            manifest=manifest,
            name=manifest.name,
            version=manifest.version,
            build=str(raw["build"]),
            created=created,
            outputs=outputs,
            # Over the bytes as stored: the digest AMIs are tagged with.
            digest=manifest_digest(raw),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise VmbuildError(f"{where}: incomplete manifest ({exc!r})") from None
    if not outputs:
        raise VmbuildError(f"{where}: the artifact has no disk outputs")
    for out in outputs:
        if out.format not in QEMU_FORMAT:
            raise VmbuildError(f"{where}: unknown disk format {out.format!r}")
    return artifact


def verify_output(out: Output, on_bytes: Callable[[int], None] | None = None) -> None:
    """Check a disk file against the manifest's sha256: upload exactly what was tested."""
    if not out.path.is_file():
        raise VmbuildError(f"{out.path}: disk file missing from the artifact")
    if not out.sha256:
        return
    if sha256_file(out.path, on_bytes) != out.sha256:
        raise VmbuildError(
            f"{out.path}: sha256 differs from the manifest; the disk changed after the build",
            hint="rebuild the image, or restore the file",
        )


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """A scratch directory for converted disks, removed whatever happens."""
    with tempfile.TemporaryDirectory(prefix="vmbuild-publish-") as path:
        yield Path(path)


class Disks:
    """The artifact's disk in the forms uploads need: each output verified once, each
    conversion done once, all in `scratch` (removed by the caller's `workdir()`)."""

    def __init__(
        self,
        artifact: Artifact,
        scratch: Path,
        on_progress: EventCallback | None = None,
        verified: set[Path] | None = None,
    ) -> None:
        self.artifact = artifact
        self.scratch = scratch
        self.emit = on_progress or (lambda _event: None)
        self._verified: set[Path] = set(verified or ())

    def _verify(self, out: Output) -> None:
        if out.path not in self._verified:
            self.emit(DistributionEvent("verify", message=f"sha256 of {out.path.name}"))
            verify_output(out)
            self._verified.add(out.path)

    def raw(self) -> Path:
        """A raw image of the disk: a sparse conversion of the qcow2, or the raw output itself.

        The sha256 check decides the order: hashing a raw output reads its whole virtual size
        (holes included: 5-13 s for 4 GiB here), while hashing the qcow2 and converting it to a
        sparse raw costs about its allocated size (~1.5 s for the same disk). Without a qcow2,
        the raw is read in place (holes skipped by SEEK_DATA), then vhd, then vmdk.
        """
        source = self.artifact.output("qcow2", "raw", "vhd", "vmdk")
        assert source is not None  # load_artifact guarantees at least one output
        self._verify(source)
        if source.format == "raw":
            return source.path
        target = self.scratch / "disk.raw"
        if not target.exists():
            self.emit(DistributionEvent("convert", message=f"{source.format} -> sparse raw"))
            # qemu-img writes a sparse file: zero clusters become holes, so the scratch copy
            # costs only the allocated size, and the reader skips the holes again.
            qemu_img("convert", "-f", QEMU_FORMAT[source.format], "-O", "raw", source.path, target)
        return target

    def for_import(self, fmt: str) -> Path:
        """A file in `fmt` (vmdk | vhd | raw) for VM Import, converted if the store lacks it."""
        existing = self.artifact.output(fmt)
        if existing is not None:
            self._verify(existing)
            return existing.path
        source = self.artifact.output("qcow2", "raw", "vmdk", "vhd")
        assert source is not None
        self._verify(source)
        target = self.scratch / f"disk.{fmt}"
        if target.exists():
            return target
        options: list[str] = []
        if fmt == "vmdk":
            # streamOptimized is compressed: the smallest upload, and the VMDK flavour
            # VM Import documents as supported.
            options = ["-o", "subformat=streamOptimized"]
        elif fmt == "vhd":
            # force_size keeps the virtual size exact instead of rounding to CHS geometry.
            options = ["-o", "subformat=dynamic,force_size=on"]
        self.emit(DistributionEvent("convert", message=f"{source.format} -> {fmt}"))
        qemu_img(
            "convert",
            "-f",
            QEMU_FORMAT[source.format],
            "-O",
            QEMU_FORMAT[fmt],
            *options,
            source.path,
            target,
        )
        return target
