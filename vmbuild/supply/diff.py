"""`vmbuild images diff A B`: what changed between two stored builds.

Packages come from the SBOMs (added, removed, upgraded/downgraded by dpkg ordering); files
from the root file systems, read offline with the project's disk reader (partition table
from diskfs.rootfs, ext directories through debugfs, one debugfs process per directory
level rather than per directory); the partition layout and disk size from the tables.
Files compare by type, mode, owner and size: a same-size content change is not detected
(that would need every file's bytes).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from debian.debian_support import version_compare

from vmbuild.diskfs.rootfs import PartitionTable, read_partition_table
from vmbuild.errors import VmbuildError
from vmbuild.run import run
from vmbuild.supply.sbom import sbom_packages

_LS = re.compile(r"^/(\d+)/(\d+)/(\d+)/(\d+)/(.*)/(\d*)/$")
_ECHO = re.compile(r'^debugfs: ls -p "(.*)"$')
KINDS = {0o040000: "dir", 0o100000: "file", 0o120000: "symlink"}


@dataclass(frozen=True)
class FileInfo:
    kind: str
    mode: int
    uid: int
    gid: int
    size: int

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "mode": f"{self.mode:o}", "uid": self.uid, "gid": self.gid,
                "size": self.size}  # fmt: skip


def _root_offset(raw: Path) -> tuple[PartitionTable | None, int]:
    table = read_partition_table(raw)
    if table is None:
        return None, 0
    for part in table.partitions:
        if part.is_linux:
            return table, part.start
    raise VmbuildError(f"{raw}: no Linux partition in the {table.kind} partition table")


def walk(raw: Path, offset: int) -> dict[str, FileInfo]:
    """Every path of the ext file system at `offset` (breadth first, batched debugfs)."""
    spec = f"{raw}?offset={offset}" if offset else str(raw)
    found: dict[str, FileInfo] = {}
    level = ["/"]
    while level:
        # Names with a quote or newline cannot be passed to debugfs; they are listed but
        # not descended into.
        batch = [d for d in level if '"' not in d and "\n" not in d]
        script = "".join(f'ls -p "{d}"\n' for d in batch).encode()
        out = run(["debugfs", "-f", "-", spec], input=script, timeout=600, merge_stderr=False)
        current: str | None = None
        level = []
        for line in out.stdout.splitlines():
            echo = _ECHO.match(line)
            if echo:
                current = echo[1]
                continue
            match = _LS.match(line)
            if not match or current is None:
                continue
            name = match[5]
            if name in (".", ".."):
                continue
            mode = int(match[2], 8)
            kind = KINDS.get(mode & 0o170000, "other")
            path = f"{current.rstrip('/')}/{name}"
            found[path] = FileInfo(kind, mode & 0o7777, int(match[3]), int(match[4]),
                                   int(match[6] or 0) if kind != "dir" else 0)  # fmt: skip
            if kind == "dir":
                level.append(path)
    return found


@dataclass
class ImageDiff:
    a: str
    b: str
    packages: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    files: dict[str, list[Any]] = field(default_factory=dict)
    partitions: dict[str, Any] = field(default_factory=dict)

    @property
    def differ(self) -> bool:
        return (
            any(self.packages.values())
            or any(self.files.values())
            or bool(self.partitions.get("changed"))
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "differ": self.differ}


def diff_packages(a_dir: Path, b_dir: Path) -> dict[str, list[dict[str, str]]]:
    a, b = sbom_packages(a_dir), sbom_packages(b_dir)
    result: dict[str, list[dict[str, str]]] = {
        "added": [], "removed": [], "upgraded": [], "downgraded": []
    }  # fmt: skip
    for key in sorted(set(a) | set(b)):
        pa, pb = a.get(key), b.get(key)
        if pa is None and pb is not None:
            result["added"].append({"name": pb.name, "arch": pb.arch, "version": pb.version})
        elif pb is None and pa is not None:
            result["removed"].append({"name": pa.name, "arch": pa.arch, "version": pa.version})
        elif pa is not None and pb is not None and pa.version != pb.version:
            order = "upgraded" if version_compare(pb.version, pa.version) > 0 else "downgraded"
            result[order].append(
                {"name": pa.name, "arch": pa.arch, "from": pa.version, "to": pb.version}
            )
    return result


def diff_files(a: dict[str, FileInfo], b: dict[str, FileInfo]) -> dict[str, list[Any]]:
    changed = []
    for path in sorted(set(a) & set(b)):
        if a[path] != b[path]:
            before, after = a[path].describe(), b[path].describe()
            changed.append(
                {
                    "path": path,
                    **{k: [before[k], after[k]] for k in before if before[k] != after[k]},
                }
            )
    return {
        "added": sorted(set(b) - set(a)),
        "removed": sorted(set(a) - set(b)),
        "changed": changed,
    }


def _layout(table: PartitionTable | None, size: int) -> dict[str, Any]:
    return {
        "disk_size": size,
        "table": table.kind if table else None,
        "partitions": [
            {
                "number": p.number,
                "start": p.start,
                "size": p.size,
                "type": p.type,
                "bootable": p.bootable,
            }
            for p in (table.partitions if table else ())
        ],
    }


def diff_images(a_dir: Path, b_dir: Path, *, files: bool = True) -> ImageDiff:
    """Compare two stored builds (disks converted to sparse raw in a scratch dir)."""
    from vmbuild.publish.artifact import Disks, load_artifact, workdir

    art_a, art_b = load_artifact(a_dir), load_artifact(b_dir)
    result = ImageDiff(art_a.ref, art_b.ref, packages=diff_packages(a_dir, b_dir))
    with workdir() as scratch:
        (scratch / "a").mkdir()
        (scratch / "b").mkdir()
        raw_a = Disks(art_a, scratch / "a").raw()
        raw_b = Disks(art_b, scratch / "b").raw()
        table_a, off_a = _root_offset(raw_a)
        table_b, off_b = _root_offset(raw_b)
        la, lb = _layout(table_a, raw_a.stat().st_size), _layout(table_b, raw_b.stat().st_size)
        result.partitions = {"a": la, "b": lb, "changed": la != lb}
        if files:
            result.files = diff_files(walk(raw_a, off_a), walk(raw_b, off_b))
    return result
