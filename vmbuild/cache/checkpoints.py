"""Build checkpoints: content-addressed qcow2 layers in the user cache.

After each component, the builder's disk is cut into a layer (QMP
`blockdev-snapshot-sync` with the guest's filesystems frozen) and kept as
`<cache>/checkpoints/<key>/disk.qcow2`, backed by the previous component's
layer (the first by a hard link of the base under `bases/`). A key covers
everything the disk after that step depends on (stages/key.py chains them),
so a rebuild reuses the longest prefix of steps whose keys match.

Safety:
- A checkpoint is written into a temp dir and renamed into place only when
  complete; `meta.json` records the layer's size and sha256, checked before a
  layer is ever booted: a half-written or corrupt one is ignored (and removed).
- Two builds saving the same key: the first rename wins, the second discards
  its copy. Same inputs, yet not the same bytes (logs, timestamps): the loser's
  next layers are diffs against its own copy, so save() tells it (`fresh`) and
  it saves no more layers. Each layer records its parent's sha256, so a layer
  whose parent was replaced is never booted.
- Checkpoints hold a VM's RAM and SSH keys: the cache's dirs are the owner's only.
- A full disk (or any I/O error) while saving turns checkpoints off for the
  rest of the build with a warning; the build goes on.
- Builds hold a shared lock on `use.lock` while they use layers; pruning
  removes nothing while any build holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from vmbuild import paths
from vmbuild.digest import sha256_file
from vmbuild.errors import VmbuildError
from vmbuild.run import qemu_img

log = logging.getLogger("vmbuild.checkpoints")

# Bump when what a checkpoint holds, or how it is made, changes: old ones
# then simply stop matching.
VERSION = 2  # 2: layers record their parent's sha256
ENV_MAX_SIZE = "VMBUILD_CACHE_MAX_SIZE"  # bytes, or with K/M/G/T suffix
ENV_MAX_AGE = "VMBUILD_CACHE_MAX_AGE_DAYS"
DEFAULT_MAX_SIZE = 20 << 30
DEFAULT_MAX_AGE_DAYS = 30.0


class CheckpointError(VmbuildError):
    pass


@dataclass(frozen=True)
class Checkpoint:
    key: str
    path: Path  # the checkpoint's directory
    meta: dict[str, Any]
    # Written by the save() that returned it, not found there (not part of its identity).
    fresh: bool = field(default=False, compare=False)

    @property
    def disk(self) -> Path | None:
        return self.path / "disk.qcow2" if self.meta.get("disk") else None

    @property
    def stage(self) -> str:
        return str(self.meta.get("stage", "?"))

    @property
    def label(self) -> str:
        return str(self.meta.get("label", ""))

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    @property
    def last_used(self) -> float:
        return (self.path / "meta.json").stat().st_mtime


ENV_DIR = "VMBUILD_CHECKPOINT_DIR"


def root() -> Path:
    """`$VMBUILD_CHECKPOINT_DIR`, else `checkpoints/` in the user cache dir."""
    explicit = os.environ.get(ENV_DIR)
    # Absolute: a layer's backing file is named relative to the layer's own dir.
    return Path(explicit).absolute() if explicit else paths.cache_dir() / "checkpoints"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def limits() -> tuple[int, float]:
    """(max total bytes, max age in days) from the environment, else defaults."""
    try:
        size = parse_size(os.environ.get(ENV_MAX_SIZE, "") or str(DEFAULT_MAX_SIZE))
        age = float(os.environ.get(ENV_MAX_AGE, "") or DEFAULT_MAX_AGE_DAYS)
    except ValueError:
        raise CheckpointError(
            f"${ENV_MAX_SIZE}/${ENV_MAX_AGE}: expected a size (e.g. 20G) and a number of days"
        ) from None
    return size, age


class CheckpointStore:
    """The checkpoint cache as one build sees it (disabled after a write error)."""

    def __init__(self, base_dir: Path | None = None, *, warn: Callable[[str], None] | None = None):
        self.root = base_dir or root()
        self.enabled = True
        self._warn = warn or (lambda msg: log.warning("%s", msg))
        self._use: IO[str] | None = None
        # Layers this store already hashed, by key: (size, mtime_ns, inode) as
        # they were then. A build looks up each component's key in turn, and each
        # lookup checks the whole chain below it: without this, the first layers
        # were read once per component after them.
        self._hashed: dict[str, tuple[int, int, int]] = {}

    # -- lifecycle --------------------------------------------------------
    def __enter__(self) -> CheckpointStore:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._use = (self.root / "use.lock").open("a")
            fcntl.flock(self._use, fcntl.LOCK_SH)
        except OSError as exc:
            self.disable(f"checkpoint cache unusable ({exc}); building without checkpoints")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._use is not None:
            self._use.close()
            self._use = None

    def disable(self, why: str) -> None:
        if self.enabled:
            self._warn(why)
        self.enabled = False

    # -- reading ----------------------------------------------------------
    def find(self, key: str) -> Checkpoint | None:
        """The checkpoint for `key` if it is complete and intact (its whole chain)."""
        if not self.enabled:
            return None
        found = self._load(key)
        if found is None:
            return None
        problem = self._check(found)
        if problem:
            self._warn(f"ignoring checkpoint {key[:16]} ({found.label}): {problem}")
            self._discard(found.path)
            return None
        with contextlib.suppress(OSError):
            os.utime(found.path / "meta.json")  # LRU: last used now
        return found

    def has(self, key: str) -> bool:
        """Whether a checkpoint is kept under `key` (not checked: a save would find it)."""
        return self.enabled and (self.root / key / "meta.json").exists()

    def _load(self, key: str) -> Checkpoint | None:
        path = self.root / key
        try:
            meta = json.loads((path / "meta.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self._warn(f"ignoring checkpoint {key[:16]}: unreadable meta.json ({exc})")
            self._discard(path)
            return None
        if not isinstance(meta, dict) or meta.get("key") != key:
            self._warn(f"ignoring checkpoint {key[:16]}: meta.json is not its own")
            self._discard(path)
            return None
        return Checkpoint(key, path, meta)

    def _check(self, cp: Checkpoint, depth: int = 0) -> str | None:
        if cp.meta.get("version") != VERSION:
            return f"made by another checkpoint version ({cp.meta.get('version')})"
        disk = cp.disk
        if disk is not None:
            try:
                st = disk.stat()
            except FileNotFoundError:
                return "its disk layer is missing"
            if st.st_size != cp.meta.get("size"):
                return f"its disk layer is {st.st_size} bytes, {cp.meta.get('size')} expected"
            seen = (st.st_size, st.st_mtime_ns, st.st_ino)
            if self._hashed.get(cp.key) != seen:
                if sha256_file(disk) != cp.meta.get("sha256"):
                    return "its disk layer does not match its checksum"
                self._hashed[cp.key] = seen
        parent = cp.meta.get("parent")
        if parent:
            if depth > 256:
                return "its chain of layers loops"
            above = self._load(str(parent))
            if above is None:
                return "the layer it is based on is gone"
            if above.meta.get("sha256") != cp.meta.get("parent_sha256"):
                return "the layer it is based on was replaced"
            return self._check(above, depth + 1)
        backing = cp.meta.get("backing")
        if backing and not Path(backing).exists():
            return "its base image is gone"
        return None

    # -- writing ----------------------------------------------------------
    def base_link(self, base: Path, sha256: str, fmt: str) -> Path | None:
        """The base under the cache (a hard link), so a rebuilt base never
        changes what a first layer is backed by."""
        if not self.enabled:
            return None
        target = self.root / "bases" / f"{sha256}.{fmt}"
        if target.exists():
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
            try:
                os.link(base, tmp)
            except OSError:
                shutil.copyfile(base, tmp)
            tmp.replace(target)
        except OSError as exc:
            self.disable(f"cannot keep checkpoints ({exc}); building without them")
            return None
        return target

    def save(
        self,
        key: str,
        *,
        stage: str,
        label: str,
        layer: Path | None = None,
        parent: Checkpoint | None = None,
        backing: Path | None = None,
        data: dict[str, Any] | None = None,
        files: dict[str, Path] | None = None,
        link: bool = False,
        moved: dict[str, Path] | None = None,
        secret: dict[str, str] | None = None,
    ) -> Checkpoint | None:
        """Keep `layer` (a qcow2 whose backing is the same content as `parent`'s
        disk, or as `backing`) under `key`, with `data` and extra `files`.

        `link`: the files are hard-linked, not copied (stored artifacts, which
        nothing writes again). Where that is impossible (another file system)
        nothing is saved, and the store stays on. `moved`: files made in
        scratch_path() and renamed in (a VM's saved state: too big to copy).
        `secret`: texts written readable by the owner only, never into meta.json."""
        if not self.enabled:
            return None
        existing = self._load(key)
        if existing is not None:
            return existing  # another build (or an earlier run) saved the same content
        tmp = self.root / f".tmp-{uuid.uuid4().hex[:12]}"
        try:
            tmp.mkdir(mode=0o700, parents=True)
            meta: dict[str, Any] = {
                "version": VERSION, "key": key, "stage": stage, "label": label,
                "created": time.time(), "parent": parent.key if parent else None,
                "backing": str(backing) if backing and not parent else None,
                "parent_sha256": parent.meta.get("sha256") if parent else None,
                "disk": layer is not None, "data": data or {},
            }  # fmt: skip
            if layer is not None:
                dst = tmp / "disk.qcow2"
                shutil.copyfile(layer, dst)
                below = parent.disk if parent is not None else backing
                if below is None:
                    raise CheckpointError(f"layer {label} has nothing below it")
                # The copy's backing still names the build's work file; point it
                # at the cached copy of the same content.
                qemu_img("rebase", "-u", "-f", "qcow2", "-b", below, "-F", _format(below), dst)
                meta["size"] = dst.stat().st_size
                meta["sha256"] = sha256_file(dst)
            for name, src in (moved or {}).items():
                src.rename(tmp / name)
            for name, text in (secret or {}).items():
                fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
            for name, src in (files or {}).items():
                if not link:
                    shutil.copyfile(src, tmp / name)
                    continue
                try:
                    os.link(src, tmp / name)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise
                    log.info("not keeping %s (%s): cannot link %s: %s", key[:16], label, src, exc)
                    shutil.rmtree(tmp, ignore_errors=True)
                    return None
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            try:
                tmp.rename(self.root / key)
            except OSError:
                if (self.root / key).exists():
                    # A racing build won: its copy holds the same content.
                    shutil.rmtree(tmp, ignore_errors=True)
                    return self._load(key)
                raise
        except (OSError, VmbuildError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            for src in (moved or {}).values():
                src.unlink(missing_ok=True)
            self.disable(f"cannot save a checkpoint ({exc}); building on without checkpoints")
            return None
        log.info("checkpoint %s saved (%s)", key[:16], label)
        return Checkpoint(key, self.root / key, meta, fresh=True)

    def scratch_path(self, name: str) -> Path:
        """A path inside the cache for a file a later save() moves in (same file
        system: a rename). Named like a killed save's leftovers, which prune
        and the next save's cleanup remove."""
        return self.root / f".tmp-{uuid.uuid4().hex[:12]}-{name}"

    def checked_file(self, cp: Checkpoint, name: str, what: str) -> Path | None:
        """`name` in `cp`, if its size and sha256 are what meta.json's data[what]
        recorded; else None, and the file is removed with a warning (its
        checkpoint stays usable without it). Checked at use: big, and needed
        only for the one checkpoint a build resumes from."""
        info = cp.meta.get("data", {}).get(what)
        path = cp.path / name
        if not isinstance(info, dict) or not path.exists():
            return None
        try:
            if path.stat().st_size != info.get("size"):
                problem = f"it is {path.stat().st_size} bytes, {info.get('size')} expected"
            elif sha256_file(path) != info.get("sha256"):
                problem = "it does not match its checksum"
            else:
                return path
        except OSError as exc:
            problem = str(exc)
        self._warn(f"ignoring the {what} of checkpoint {cp.key[:16]} ({cp.label}): {problem}")
        path.unlink(missing_ok=True)
        return None

    def discard(self, cp: Checkpoint) -> None:
        """Forget a checkpoint found wanting (its files did not match)."""
        self._discard(cp.path)

    def _discard(self, path: Path) -> None:
        # Renamed away first, so no reader ever sees a half-removed checkpoint.
        doomed = path.with_name(f".tmp-gone-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(OSError):
            path.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    # -- listing and pruning ----------------------------------------------
    def entries(self) -> list[Checkpoint]:
        out: list[Checkpoint] = []
        if not self.root.is_dir():
            return out
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") or not path.is_dir() or path.name == "bases":
                continue
            cp = self._load(path.name)
            if cp is not None:
                out.append(cp)
        return out


def _format(path: Path) -> str:
    return "raw" if path.suffix == ".raw" else "qcow2"


@dataclass(frozen=True)
class Pruned:
    removed: list[str]
    freed: int
    kept: int
    busy: bool = False  # a build was using the cache: nothing removed


def prune(
    base_dir: Path | None = None,
    *,
    max_size: int | None = None,
    max_age_days: float | None = None,
    everything: bool = False,
) -> Pruned:
    """Remove checkpoints older than the max age, then least recently used ones
    (with everything built on them) until the cache fits the size cap."""
    store_root = base_dir or root()
    if not store_root.is_dir():
        return Pruned([], 0, 0)
    size_cap, age_cap = limits()
    size_cap = size_cap if max_size is None else max_size
    age_cap = age_cap if max_age_days is None else max_age_days
    with (store_root / "use.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return Pruned([], 0, 0, busy=True)
        store = CheckpointStore(store_root, warn=lambda _m: None)
        entries = store.entries()
        children: dict[str, list[str]] = {}
        for cp in entries:
            if cp.meta.get("parent"):
                children.setdefault(str(cp.meta["parent"]), []).append(cp.key)
        by_key = {cp.key: cp for cp in entries}
        sizes = {cp.key: cp.size for cp in entries}
        gone: set[str] = set()
        # A layer is used whenever one built on it is: a rebuild finds (and so
        # touches) only the last layer it resumes from, and its parents, the
        # booted builder first, must not age out from under it.
        recency: dict[str, float] = {}

        def last_used(key: str) -> float:
            if key not in recency:
                recency[key] = by_key[key].last_used  # set first: a looping chain ends here
                for child in children.get(key, []):
                    if child in by_key:
                        recency[key] = max(recency[key], last_used(child))
            return recency[key]

        def drop(key: str) -> None:
            if key in gone or key not in by_key:
                return
            gone.add(key)
            for child in children.get(key, []):
                drop(child)  # a layer without its parent is useless

        now = time.time()
        for cp in entries:
            if everything or now - last_used(cp.key) > age_cap * 86400:
                drop(cp.key)
        for cp in sorted(entries, key=lambda c: last_used(c.key)):
            if sum(s for k, s in sizes.items() if k not in gone) <= size_cap:
                break
            drop(cp.key)
        freed = 0
        for key in gone:
            freed += sizes[key]
            store._discard(by_key[key].path)
        # Bases no remaining layer is built on.
        used = {str(cp.meta.get("backing")) for k, cp in by_key.items() if k not in gone}
        bases = store_root / "bases"
        if bases.is_dir():
            for base in bases.iterdir():
                if str(base) not in used:
                    base.unlink(missing_ok=True)
        for stale in store_root.glob(".tmp-*"):
            # Saves killed midway: dirs, and states made in scratch_path().
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        return Pruned(sorted(gone), freed, len(entries) - len(gone))


def prune_after_build(store_root: Path, say: Callable[[str], None]) -> Pruned | None:
    """Keep the cache within its caps once a build is done with it (the build's own
    shared lock released). Skipped while another build uses the cache: the next
    one to finish prunes. Never fails the build."""
    try:
        result = prune(store_root)
    except (OSError, VmbuildError) as exc:
        say(f"checkpoints: not pruned ({exc})")
        return None
    if result.removed:
        say(
            f"checkpoints: removed {len(result.removed)} least recently used "
            f"({result.freed / (1 << 20):.0f} MiB) to fit the cache's caps"
        )
    return result


@contextlib.contextmanager
def opened(enabled: bool, warn: Callable[[str], None]) -> Iterator[CheckpointStore | None]:
    if not enabled:
        yield None
        return
    with CheckpointStore(warn=warn) as store:
        yield store
