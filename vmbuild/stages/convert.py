"""Convert the builder's disk to the formats a recipe lists."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vmbuild.digest import sha256_file
from vmbuild.diskfs.scrub import zero_free_space
from vmbuild.manifest import OutputRecord
from vmbuild.run import qemu_img
from vmbuild.stages.key import StageKey, stage_key

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
    return ["convert", "-f", src_format, "-O", driver, *options, str(src), str(dst)]


def output_name(fmt: str) -> str:
    return f"disk.{FORMATS[fmt][2]}"


def flatten_raw(overlay: Path, dst: Path) -> None:
    """Collapse the overlay and its backing chain into a sparse raw disk (to scrub it)."""
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(overlay), str(dst))


def from_raw(raw: Path, dst: Path) -> None:
    """Store a raw disk as qcow2; zero ranges (the scrubbed free space) take no clusters."""
    qemu_img(*convert_argv(raw, "raw", dst, "qcow2"))


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


def key(disk: StageKey, formats: Sequence[str]) -> StageKey:
    return stage_key("convert", disk=disk.digest, formats=list(formats))


def flatten_final(
    overlay: Path, formats: Sequence[str], outdir: Path, work: Path, *, keep_source: bool = False
) -> Converted:
    """Flatten the builder's overlay into the qcow2 the test VM and the offline
    check read; the other formats are `convert_rest`'s (run while the tests do).

    Flattened to raw, the free space of its ext file systems zeroed, then stored
    with zero detection: nothing the guest deleted survives into any output
    (every other format is converted from this one), which also shrinks it.
    The overlay is deleted once flattened (it is the largest scratch file)
    unless `keep_source` (a checkpoint still owns it).
    """
    final = outdir / output_name("qcow2") if "qcow2" in formats else work / "final.qcow2"
    scrubbed = work / "scrubbed.raw"
    try:
        flatten_raw(overlay, scrubbed)
        if not keep_source:
            overlay.unlink()
        zero_free_space(scrubbed)
        from_raw(scrubbed, final)
    finally:
        scrubbed.unlink(missing_ok=True)
    return Converted(final, (convert(final, "qcow2", outdir),) if "qcow2" in formats else ())


def convert_rest(first: Converted, formats: Sequence[str], outdir: Path) -> Converted:
    """Every format but qcow2 from the flattened disk; outputs in the recipe's order."""
    rest = [convert(first.final, f, outdir) for f in formats if f != "qcow2"]
    return Converted(first.final, (*first.outputs, *rest))
