"""Convert the builder's disk to the formats a recipe lists."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vmbuild.cache.checkpoints import CheckpointStore
from vmbuild.digest import sha256_file
from vmbuild.diskfs.scrub import zero_free_space
from vmbuild.manifest import OutputRecord
from vmbuild.progress import Reporter, reporter_or_null
from vmbuild.run import qemu_img
from vmbuild.stages.key import StageKey, stage_key

log = logging.getLogger("vmbuild.convert")

# format -> (qemu-img driver, creation options, file extension)
FORMATS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "qcow2": ("qcow2", ("-o", "compat=1.1"), "qcow2"),
    "raw": ("raw", (), "raw"),
    # streamOptimized is what VM Import and VMware accept as a single file.
    "vmdk": ("vmdk", ("-o", "subformat=streamOptimized"), "vmdk"),
    # force_size keeps the virtual size exact instead of rounding it to CHS
    # geometry, which AWS would reject as a size mismatch.
    "vhd": ("vpc", ("-o", "subformat=dynamic,force_size=on"), "vhd"),
}


@dataclass(frozen=True)
class Output:
    format: str
    file: str  # name inside the artifact dir
    sha256: str
    size: int  # bytes on disk
    virtual_size: int

    def record(self) -> OutputRecord:
        return OutputRecord(self.format, self.file, self.sha256, self.size, self.virtual_size)

    def to_json(self) -> dict[str, object]:
        return {
            "format": self.format,
            "file": self.file,
            "sha256": self.sha256,
            "size": self.size,
            "virtual_size": self.virtual_size,
        }


def convert_argv(src: Path, src_format: str, dst: Path, fmt: str) -> list[str]:
    driver, options, _ = FORMATS[fmt]
    # -p: progress frames on stdout ("    (12.34/100%)\r"), read frame by frame
    # by run(); only the last one reaches the log.
    return ["convert", "-p", "-f", src_format, "-O", driver, *options, str(src), str(dst)]


def output_name(fmt: str) -> str:
    return f"disk.{FORMATS[fmt][2]}"


PROGRESS = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


def progress_bytes(frame: str, total: int) -> int | None:
    """The bytes done that a `qemu-img convert -p` frame stands for (None: not a frame).

    qemu-img counts percent of the work over the source's virtual size, so the
    virtual size is the total (the same for every format).
    """
    found = PROGRESS.search(frame)
    if found is None:
        return None
    return min(total, round(float(found.group(1)) * total / 100))


def _progress(reporter: Reporter | None, total: int) -> Callable[[str], None] | None:
    if reporter is None:
        return None
    report = reporter

    def on_frame(frame: str) -> None:
        done = progress_bytes(frame, total)
        if done is not None:
            report.bytes(done, total)

    return on_frame


def flatten_raw(overlay: Path, dst: Path, reporter: Reporter | None = None) -> None:
    """Collapse the overlay and its backing chain into a sparse raw disk (to scrub it)."""
    total = virtual_size(overlay, "qcow2") if reporter is not None else 0
    qemu_img(*convert_argv(overlay, "qcow2", dst, "raw"), on_frame=_progress(reporter, total))


def from_raw(raw: Path, dst: Path, reporter: Reporter | None = None) -> None:
    """Store a raw disk as qcow2; zero ranges (the scrubbed free space) take no clusters."""
    on_frame = _progress(reporter, raw.stat().st_size)
    qemu_img(*convert_argv(raw, "raw", dst, "qcow2"), on_frame=on_frame)


def virtual_size(path: Path, fmt: str) -> int:
    info = json.loads(qemu_img("info", "--output=json", "-f", FORMATS[fmt][0], path))
    return int(info["virtual-size"])


def convert(src: Path, fmt: str, outdir: Path) -> Output:
    """Convert the flattened qcow2 `src` to `fmt` in `outdir` (qcow2: reuse it)."""
    dst = outdir / output_name(fmt)
    if fmt == "qcow2":
        if src.resolve() != dst.resolve():
            src.replace(dst)
    else:
        qemu_img(*convert_argv(src, "qcow2", dst, fmt))
    return Output(
        format=fmt,
        file=dst.name,
        sha256=sha256_file(dst),
        size=dst.stat().st_size,
        virtual_size=virtual_size(dst, fmt),
    )


@dataclass(frozen=True)
class Converted:
    final: Path  # the flattened qcow2 the test VM and the offline check read
    outputs: tuple[Output, ...]  # in the recipe's order, qcow2 first when listed
    reused: bool = False  # the formats but qcow2 came from the checkpoint cache


def key(disk: StageKey, formats: Sequence[str]) -> StageKey:
    return stage_key("convert", disk=disk.digest, formats=list(formats))


def flatten_final(
    overlay: Path,
    formats: Sequence[str],
    outdir: Path,
    work: Path,
    *,
    keep_source: bool = False,
    reporter: Reporter | None = None,
) -> Converted:
    """Flatten the builder's overlay into the qcow2 the test VM and the offline
    check read; the other formats are `convert_rest`'s (run while the tests do).

    Flattened to raw, the free space of its ext file systems zeroed, then stored
    with zero detection: nothing the guest deleted survives into any output
    (every other format is converted from this one), which also shrinks it.
    The overlay is deleted once flattened (it is the largest scratch file)
    unless `keep_source` (a checkpoint still owns it). `reporter` gets a status
    per step and qemu-img's progress as bytes of the virtual size.
    """
    final = outdir / output_name("qcow2") if "qcow2" in formats else work / "final.qcow2"
    scrubbed = work / "scrubbed.raw"
    report = reporter_or_null(reporter)
    try:
        report.status("flattening the disk")
        flatten_raw(overlay, scrubbed, reporter)
        if not keep_source:
            overlay.unlink()
        report.status("zeroing free space")
        zero_free_space(scrubbed)
        report.status("writing the qcow2")
        from_raw(scrubbed, final, reporter)
    finally:
        scrubbed.unlink(missing_ok=True)
    return Converted(final, (convert(final, "qcow2", outdir),) if "qcow2" in formats else ())


@dataclass(frozen=True)
class OutputCache:
    """The other formats of one flattened qcow2, kept in the checkpoint cache.

    Keyed by the qcow2's own sha256 and the conversion settings, so what is
    reused is exactly what converting it again would give (vmdk and vhd carry
    random ids: a rebuild with identical inputs then gives identical bytes).
    The files are hard links to the stored artifact's (stored files are never
    written again); each is checked against its recorded size and sha256
    before it is used, and converted afresh if it does not match.
    """

    store: CheckpointStore
    key: str

    @classmethod
    def of(cls, store: CheckpointStore, first: Converted, convert_key: StageKey) -> OutputCache:
        qcow2 = [o.sha256 for o in first.outputs if o.format == "qcow2"]
        digest = qcow2[0] if qcow2 else sha256_file(first.final)
        key = stage_key("checkpoint-outputs", qcow2=digest, convert=convert_key.digest)
        return cls(store, key.digest)

    def restore(self, outdir: Path) -> list[Output] | None:
        cached = self.store.find(self.key)
        if cached is None:
            return None
        outputs = [Output(**o) for o in cached.meta["data"]["outputs"]]
        linked: list[Path] = []
        try:
            for out in outputs:
                dst = outdir / out.file
                os.link(cached.path / out.file, dst)
                linked.append(dst)
                if dst.stat().st_size != out.size or sha256_file(dst) != out.sha256:
                    raise ValueError(f"{out.file} does not match its checksum")
        except (OSError, ValueError) as exc:
            log.warning("not reusing the cached %s outputs: %s", self.key[:16], exc)
            for path in linked:
                path.unlink(missing_ok=True)
            self.store.discard(cached)  # converted afresh, and kept again
            return None
        return outputs

    def keep(self, outdir: Path, outputs: Sequence[Output]) -> None:
        self.store.save(
            self.key, stage="outputs", label=f"outputs {', '.join(o.format for o in outputs)}",
            data={"outputs": [o.to_json() for o in outputs]},
            files={o.file: outdir / o.file for o in outputs}, link=True,
        )  # fmt: skip


def convert_rest(
    first: Converted, formats: Sequence[str], outdir: Path, cache: OutputCache | None = None
) -> Converted:
    """Every format but qcow2 from the flattened disk; outputs in the recipe's order.

    With `cache`: reused from an earlier build of the very same qcow2 when the
    cache has them (`Converted.reused`), else converted and kept there."""
    if all(f == "qcow2" for f in formats):
        return first
    reused = cache.restore(outdir) if cache is not None else None
    if reused is not None:
        return Converted(first.final, (*first.outputs, *reused), reused=True)
    rest = [convert(first.final, f, outdir) for f in formats if f != "qcow2"]
    if cache is not None:
        cache.keep(outdir, rest)
    return Converted(first.final, (*first.outputs, *rest))
