"""`vmbuild images diff A B`: what changed between two stored builds.

Packages come from the SBOMs (added, removed, upgraded/downgraded by dpkg ordering); files
from the root file systems, read offline with the project's disk reader (partition table
from diskfs.rootfs, ext directories through debugfs); the partition layout and disk size
from the tables.

Files compare by type, mode, owner and size, then by content: symlinks by target, regular
files whose metadata is equal by the sha256 of their bytes. Every debugfs process serves a
batch (one per directory level for the walk, one `stat` script per image for the symlinks,
`dump` scripts of at most BATCH_BYTES for the contents), so the cost is a handful of
processes, not one per file. Reading contents is what costs on a big image, so it is
bounded: at most `content_limit` bytes per image (default 2 GiB), smallest files first, so
the many small configuration files are always compared and a few huge ones are what is left
over; the files not compared are reported as such (`unchecked`), never as identical.
Files that were added, removed or changed in size get their sha256 too while the budget lasts.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from debian.debian_support import version_compare

from vmbuild.diskfs.rootfs import PartitionTable, read_partition_table
from vmbuild.errors import VmbuildError
from vmbuild.run import run
from vmbuild.supply.sbom import sbom_packages

_LS = re.compile(r"^/(\d+)/(\d+)/(\d+)/(\d+)/(.*)/(\d*)/$")
_ECHO = re.compile(r'^debugfs: (ls -p|stat|dump) "(.*?)"')
_FAST_LINK = re.compile(r'^Fast link dest: "(.*)"$')
KINDS = {0o040000: "dir", 0o100000: "file", 0o120000: "symlink"}

DEFAULT_CONTENT_LIMIT = 2 << 30
# Bytes dumped to the scratch dir before they are hashed and removed: bounds the scratch
# space and the size of one debugfs command script (a file larger than this is a batch alone).
BATCH_BYTES = 256 << 20
BATCH_FILES = 4000
_HASH_CHUNK = 1 << 20


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


def _quotable(path: str) -> bool:
    # debugfs' command parser has no escape for these: such paths are listed, not read.
    return '"' not in path and "\n" not in path


def _root_offset(raw: Path) -> tuple[PartitionTable | None, int]:
    table = read_partition_table(raw)
    if table is None:
        return None, 0
    for part in table.partitions:
        if part.is_linux:
            return table, part.start
    raise VmbuildError(f"{raw}: no Linux partition in the {table.kind} partition table")


class RootFs:
    """The ext file system of one disk, read by batched debugfs command scripts."""

    def __init__(self, raw: Path, offset: int) -> None:
        self.spec = f"{raw}?offset={offset}" if offset else str(raw)

    def _script(self, commands: Iterable[str]) -> str:
        script = "".join(f"{c}\n" for c in commands).encode()
        return run(["debugfs", "-f", "-", self.spec], input=script, timeout=600,
                   merge_stderr=False).stdout  # fmt: skip

    def walk(self) -> dict[str, FileInfo]:
        """Every path of the file system (breadth first, one debugfs per directory level)."""
        found: dict[str, FileInfo] = {}
        level = ["/"]
        while level:
            out = self._script(f'ls -p "{d}"' for d in level if _quotable(d))
            current: str | None = None
            level = []
            for line in out.splitlines():
                echo = _ECHO.match(line)
                if echo:
                    current = echo[2]
                    continue
                match = _LS.match(line)
                if not match or current is None or match[5] in (".", ".."):
                    continue
                mode = int(match[2], 8)
                kind = KINDS.get(mode & 0o170000, "other")
                path = f"{current.rstrip('/')}/{match[5]}"
                found[path] = FileInfo(kind, mode & 0o7777, int(match[3]), int(match[4]),
                                       int(match[6] or 0) if kind != "dir" else 0)  # fmt: skip
                if kind == "dir":
                    level.append(path)
        return found

    def link_targets(self, links: Iterable[str], scratch: Path) -> dict[str, str]:
        """Symlink targets: a fast link's from `stat`, a slow link's (> 59 bytes, kept in a
        data block) from its dumped block."""
        wanted = sorted(p for p in links if _quotable(p))
        targets: dict[str, str] = {}
        current: str | None = None
        for line in self._script(f'stat "{p}"' for p in wanted).splitlines():
            echo = _ECHO.match(line)
            if echo:
                current = echo[2]
                continue
            fast = _FAST_LINK.match(line)
            if fast and current is not None:
                targets[current] = fast[1]
        slow = [p for p in wanted if p not in targets]
        for path, data in self._dump(slow, scratch):
            targets[path] = data.split(b"\0")[0].decode("utf-8", "replace")
        return targets

    def _dump(self, paths: list[str], scratch: Path) -> Iterator[tuple[str, bytes]]:
        # Small reads only (slow symlink targets); contents go through digests().
        for batch in _batches([(p, 0) for p in paths]):
            self._script(f'dump "{p}" "{scratch}/{i}"' for i, (p, _) in enumerate(batch))
            for i, (path, _) in enumerate(batch):
                out = scratch / str(i)
                if out.exists():
                    yield path, out.read_bytes()
                    out.unlink()

    def digests(self, files: list[tuple[str, int]], scratch: Path) -> dict[str, str]:
        """sha256 of regular files' contents, dumped batch by batch into `scratch`."""
        result: dict[str, str] = {}
        for batch in _batches(files):
            self._script(f'dump "{p}" "{scratch}/{i}"' for i, (p, _) in enumerate(batch))
            for i, (path, _) in enumerate(batch):
                out = scratch / str(i)
                if not out.exists():
                    continue  # debugfs said why on stderr; the file stays unchecked
                digest = hashlib.sha256()
                with out.open("rb") as fh:
                    while chunk := fh.read(_HASH_CHUNK):
                        digest.update(chunk)
                out.unlink()
                result[path] = digest.hexdigest()
        return result


def _batches(files: list[tuple[str, int]]) -> Iterator[list[tuple[str, int]]]:
    batch: list[tuple[str, int]] = []
    size = 0
    for path, length in files:
        if batch and (size + length > BATCH_BYTES or len(batch) >= BATCH_FILES):
            yield batch
            batch, size = [], 0
        batch.append((path, length))
        size += length
    if batch:
        yield batch


@dataclass
class ImageDiff:
    a: str
    b: str
    packages: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)
    partitions: dict[str, Any] = field(default_factory=dict)

    @property
    def differ(self) -> bool:
        return (
            any(self.packages.values())
            or any(self.files.get(k) for k in ("added", "removed", "changed"))
            or bool(self.partitions.get("changed"))
        )

    @property
    def complete(self) -> bool:
        """False when some files with equal metadata were not compared byte for byte."""
        return not self.files.get("unchecked", {}).get("files")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "differ": self.differ, "complete": self.complete}


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


@dataclass
class Contents:
    """What was read of each side: sha256 of regular files, targets of symlinks."""

    a_sha: dict[str, str] = field(default_factory=dict)
    b_sha: dict[str, str] = field(default_factory=dict)
    a_link: dict[str, str] = field(default_factory=dict)
    b_link: dict[str, str] = field(default_factory=dict)
    unchecked: list[tuple[str, int]] = field(default_factory=list)


def diff_files(
    a: dict[str, FileInfo], b: dict[str, FileInfo], contents: Contents | None = None
) -> dict[str, Any]:
    """Added, removed and changed paths; with `contents`, equal metadata but different
    bytes or link target is a change, and every entry carries what was read of it."""
    c = contents or Contents()

    def entry(
        path: str, info: FileInfo, sha: dict[str, str], link: dict[str, str]
    ) -> dict[str, Any]:
        extra = {"sha256": sha[path]} if path in sha else {}
        extra |= {"target": link[path]} if path in link else {}
        return {"path": path, **info.describe(), **extra}

    changed = []
    for path in sorted(set(a) & set(b)):
        before, after = a[path].describe(), b[path].describe()
        change = {k: [before[k], after[k]] for k in before if before[k] != after[k]}
        sha = (c.a_sha.get(path), c.b_sha.get(path))
        if None not in sha and sha[0] != sha[1]:
            change["sha256"] = list(sha)
        target = (c.a_link.get(path), c.b_link.get(path))
        if None not in target and target[0] != target[1]:
            change["target"] = list(target)
        if change:
            changed.append({"path": path, "kind": after["kind"], **change})
    return {
        "added": [entry(p, b[p], c.b_sha, c.b_link) for p in sorted(set(b) - set(a))],
        "removed": [entry(p, a[p], c.a_sha, c.a_link) for p in sorted(set(a) - set(b))],
        "changed": changed,
        "unchecked": {
            "files": len(c.unchecked),
            "bytes": sum(size for _, size in c.unchecked),
            "paths": sorted(p for p, _ in c.unchecked),
        },
    }


def read_contents(
    fs_a: RootFs, a: dict[str, FileInfo], fs_b: RootFs, b: dict[str, FileInfo],
    scratch: Path, limit: int,
) -> Contents:  # fmt: skip
    """Read what the comparison needs within `limit` bytes per image (see the module doc)."""
    common = set(a) & set(b)
    same = [p for p in common if a[p] == b[p]]
    # Needed for a correct answer: same-metadata regular files (empty ones are equal).
    needed = sorted(((p, a[p].size) for p in same if a[p].kind == "file" and a[p].size),
                    key=lambda f: (f[1], f[0]))  # fmt: skip
    contents = Contents()
    budget_a = budget_b = limit
    compare: list[tuple[str, int]] = []
    for path, size in needed:
        if size <= budget_a and _quotable(path):
            compare.append((path, size))
            budget_a -= size
            budget_b -= size
        else:
            contents.unchecked.append((path, size))
    # Nice to have, from what is left: the sha256 of files that differ anyway.
    extra_a = sorted(((p, a[p].size) for p in a if a[p].kind == "file" and p not in same),
                     key=lambda f: (f[1], f[0]))  # fmt: skip
    extra_b = sorted(((p, b[p].size) for p in b if b[p].kind == "file" and p not in same),
                     key=lambda f: (f[1], f[0]))  # fmt: skip
    take_a = _within(extra_a, budget_a)
    take_b = _within(extra_b, budget_b)
    contents.a_sha = fs_a.digests(compare + take_a, scratch)
    contents.b_sha = fs_b.digests(compare + take_b, scratch)
    for path, size in compare:
        if path not in contents.a_sha or path not in contents.b_sha:
            contents.unchecked.append((path, size))
    contents.a_link = fs_a.link_targets((p for p in a if a[p].kind == "symlink"), scratch)
    contents.b_link = fs_b.link_targets((p for p in b if b[p].kind == "symlink"), scratch)
    return contents


def _within(files: list[tuple[str, int]], budget: int) -> list[tuple[str, int]]:
    taken = []
    for path, size in files:
        if size > budget:
            break  # sorted by size: nothing after fits either
        if _quotable(path):
            taken.append((path, size))
            budget -= size
    return taken


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


def diff_images(
    a_dir: Path, b_dir: Path, *, files: bool = True, content_limit: int = DEFAULT_CONTENT_LIMIT
) -> ImageDiff:
    """Compare two stored builds (disks converted to sparse raw in a scratch dir).

    `content_limit` is the most file content read per image (0: metadata and links only).
    """
    from vmbuild.publish.artifact import Disks, load_artifact, workdir

    art_a, art_b = load_artifact(a_dir), load_artifact(b_dir)
    result = ImageDiff(art_a.ref, art_b.ref, packages=diff_packages(a_dir, b_dir))
    with workdir() as scratch:
        for sub in ("a", "b", "dump"):
            (scratch / sub).mkdir()
        raw_a = Disks(art_a, scratch / "a").raw()
        raw_b = Disks(art_b, scratch / "b").raw()
        table_a, off_a = _root_offset(raw_a)
        table_b, off_b = _root_offset(raw_b)
        la, lb = _layout(table_a, raw_a.stat().st_size), _layout(table_b, raw_b.stat().st_size)
        result.partitions = {"a": la, "b": lb, "changed": la != lb}
        if files:
            fs_a, fs_b = RootFs(raw_a, off_a), RootFs(raw_b, off_b)
            tree_a, tree_b = fs_a.walk(), fs_b.walk()
            contents = read_contents(fs_a, tree_a, fs_b, tree_b, scratch / "dump", content_limit)
            result.files = diff_files(tree_a, tree_b, contents)
    return result
