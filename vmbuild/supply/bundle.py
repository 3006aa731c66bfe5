"""Air-gapped bundles: one uncompressed tar carrying a stored build across a gap.

    bundle.json                 index: ref, and every member's path, size and sha256
    artifact/manifest.json      the build dir's manifest, provenance, SBOMs and disks
    artifact/...
    inputs/...                  with --with-inputs: base image, recipe, component documents

Import never trusts the tar: every header is checked first (only regular files and
directories, relative paths without `..`, names listed in the index, sizes within the
limits and inside the file), then the signed provenance, then a streamed pass hashes every
member against the index and the signed subjects -- all before a byte goes into the store.
Only then is it unpacked into a hidden staging dir (hashed again while written, so a file
changed in between is caught) and renamed into place. Everything streams in 1 MiB chunks:
memory stays flat whatever the disk size, and runs of zeros are written back as holes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from securesystemslib.dsse import Envelope
from securesystemslib.signer import Key

from vmbuild.errors import VmbuildError
from vmbuild.publish.artifact import manifest_digest
from vmbuild.supply import CYCLONEDX, PROVENANCE, SPDX, provenance, signing
from vmbuild.supply.signing import VerificationFailed

FORMAT = "vmbuild-bundle/1"
INDEX = "bundle.json"
ARTIFACT_DIR = "artifact"
INPUTS_DIR = "inputs"
CHUNK = 1 << 20
MAX_INDEX_BYTES = 1 << 20
MAX_MEMBERS = 10_000
DEFAULT_MAX_BYTES = 256 << 30  # 256 GiB: far above any disk, far below a filled-up host


class BundleError(VmbuildError):
    """A bundle is malformed, truncated, tampered with or unsafe; names the bundle file."""


@dataclass(frozen=True)
class Entry:
    path: str  # inside the tar
    size: int
    sha256: str


@dataclass(frozen=True)
class BundleIndex:
    ref: str
    name: str
    version: str
    build: str
    entries: tuple[Entry, ...]
    # --with-inputs: what an offline rebuild needs (vmbuild.supply.inputs); None without.
    inputs: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "ref": self.ref,
            "name": self.name,
            "version": self.version,
            "build": self.build,
            "files": [{"path": e.path, "size": e.size, "sha256": e.sha256} for e in self.entries],
        }
        if self.inputs is not None:
            out["inputs"] = self.inputs
        return out


# -- export ------------------------------------------------------------------
def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def artifact_files(build_dir: Path, manifest: Mapping[str, Any]) -> list[str]:
    """The build dir's files a bundle carries (relative names)."""
    names = ["manifest.json"]
    names += [n for n in (PROVENANCE, SPDX, CYCLONEDX) if (build_dir / n).is_file()]
    names += [str(o["file"]) for o in manifest.get("outputs", [])]
    return names


def export(
    build_dir: Path, output: Path, *, with_inputs: bool = False,
    fetch: Callable[[str], bytes] | None = None,
) -> BundleIndex:  # fmt: skip
    """Write the bundle tar for `build_dir` to `output` (atomically: temp name, then rename).
    `fetch`: how --with-inputs reads the mirror for index files the package cache lacks."""
    import tempfile

    from vmbuild.stages.store import read_manifest

    manifest = read_manifest(build_dir)
    with tempfile.TemporaryDirectory(prefix=".bundle-inputs-", dir=output.parent) as scratch:
        return _export(build_dir, manifest, output, with_inputs, Path(scratch), fetch)


def _export(
    build_dir: Path, manifest: dict[str, Any], output: Path, with_inputs: bool, scratch: Path,
    fetch: Callable[[str], bytes] | None,
) -> BundleIndex:  # fmt: skip
    from vmbuild.debian.index import fetch_url
    from vmbuild.supply import inputs as inputs_mod

    sources: dict[str, Path] = {
        f"{ARTIFACT_DIR}/{name}": build_dir / name for name in artifact_files(build_dir, manifest)
    }
    meta = None
    if with_inputs:
        found = inputs_mod.collect(manifest, scratch, fetch=fetch or fetch_url)
        sources.update(found.files)
        meta = found.meta
    entries = []
    for tar_path, src in sources.items():
        if not src.is_file():
            raise VmbuildError(f"{src}: missing from the artifact")
        size, sha = _hash_file(src)
        entries.append(Entry(tar_path, size, sha))
    index = BundleIndex(
        ref=f"{manifest['name']}/{manifest['version']}/{manifest['build']}",
        name=str(manifest["name"]),
        version=str(manifest["version"]),
        build=str(manifest["build"]),
        entries=tuple(entries),
        inputs=meta,
    )
    tmp = output.with_name(f".{output.name}.partial")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            blob = json.dumps(index.to_json(), indent=2).encode()
            info = tarfile.TarInfo(INDEX)
            info.size, info.mode, info.mtime = len(blob), 0o644, 0
            tar.addfile(info, io.BytesIO(blob))
            for entry in entries:
                info = tarfile.TarInfo(entry.path)
                info.size, info.mode, info.mtime = entry.size, 0o644, 0
                with sources[entry.path].open("rb") as fh:
                    # addfile copies in bounded blocks: a 4 GiB disk never sits in memory.
                    tar.addfile(info, _Checked(fh, entry))
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return index


class _Checked(io.RawIOBase):
    """A reader that fails if the file changed between hashing and archiving it."""

    def __init__(self, fh: IO[bytes], entry: Entry) -> None:
        self.fh, self.entry, self.digest, self.done = fh, entry, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.digest.update(data)
        self.done += len(data)
        # tarfile reads exactly the header's size: check when that much has gone through.
        if self.done >= self.entry.size and self.digest.hexdigest() != self.entry.sha256:
            raise VmbuildError(f"{self.entry.path}: changed while being exported")
        return data


# -- reading a bundle safely -------------------------------------------------
def _safe_name(bundle: Path, name: str) -> str:
    path = PurePosixPath(name)
    if name.startswith("/") or path.is_absolute():
        raise BundleError(f"{bundle}: member {name!r} has an absolute path; nothing was imported")
    if ".." in path.parts or "\\" in name or "\0" in name:
        raise BundleError(
            f"{bundle}: member {name!r} escapes the bundle (..); nothing was imported"
        )
    normal = str(path)
    if normal in ("", ".") or path.parts[0] not in (INDEX, ARTIFACT_DIR, INPUTS_DIR):
        raise BundleError(f"{bundle}: unexpected member {name!r}; nothing was imported")
    return normal


def _members(bundle: Path, max_bytes: int) -> list[tarfile.TarInfo]:
    """Every header, checked, before any data is read."""
    file_size = bundle.stat().st_size
    members: list[tarfile.TarInfo] = []
    total = 0
    try:
        with tarfile.open(bundle, "r:") as tar:
            for member in tar:
                if len(members) >= MAX_MEMBERS:
                    raise BundleError(f"{bundle}: more than {MAX_MEMBERS} members")
                name = _safe_name(bundle, member.name)
                if member.issym() or member.islnk():
                    raise BundleError(
                        f"{bundle}: member {name!r} is a link; bundles carry regular files only"
                    )
                if not (member.isreg() or member.isdir()):
                    raise BundleError(
                        f"{bundle}: member {name!r} is a device, FIFO or other special file"
                    )
                if member.isreg():
                    total += member.size
                    if member.offset_data + member.size > file_size:
                        raise BundleError(
                            f"{bundle}: truncated (member {name!r} ends past the end of the file)"
                        )
                if total > max_bytes:
                    raise BundleError(
                        f"{bundle}: unpacks to more than the limit of {max_bytes} bytes",
                        hint="raise it with --max-size if the bundle is trusted",
                    )
                members.append(member)
    except tarfile.TarError as exc:
        raise BundleError(f"{bundle}: not a readable tar ({exc})") from None
    if not members or members[0].name != INDEX:
        raise BundleError(f"{bundle}: not a vmbuild bundle (no {INDEX} first)")
    return members


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    fh = tar.extractfile(member)
    assert fh is not None  # regular file, checked by _members
    data = fh.read(limit + 1)
    return data


def _index(bundle: Path, tar: tarfile.TarFile, members: list[tarfile.TarInfo]) -> BundleIndex:
    if members[0].size > MAX_INDEX_BYTES:
        raise BundleError(f"{bundle}: {INDEX} is larger than {MAX_INDEX_BYTES} bytes")
    try:
        data = json.loads(_read_member(tar, members[0], MAX_INDEX_BYTES))
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT}")
        entries = tuple(
            Entry(_safe_name(bundle, str(f["path"])), int(f["size"]), str(f["sha256"]))
            for f in data["files"]
        )
        inputs = data.get("inputs")
        if inputs is not None and not isinstance(inputs, dict):
            raise ValueError("inputs is not an object")
        index = BundleIndex(
            str(data["ref"]),
            str(data["name"]),
            str(data["version"]),
            str(data["build"]),
            entries,
            inputs,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{bundle}: {INDEX} is invalid ({exc})") from None
    for part in (index.name, index.version, index.build):
        if not part or "/" in part or part in (".", "..") or part.startswith("."):
            raise BundleError(f"{bundle}: {INDEX} names an invalid image {index.ref!r}")
    listed = {e.path: e for e in entries}
    present = {str(PurePosixPath(m.name)): m for m in members[1:] if m.isreg()}
    if set(listed) != set(present):
        extra = sorted(set(present) - set(listed)) or sorted(set(listed) - set(present))
        raise BundleError(f"{bundle}: members and {INDEX} disagree (e.g. {extra[0]!r})")
    for path, entry in listed.items():
        if present[path].size != entry.size:
            raise BundleError(f"{bundle}: {path}: size {present[path].size} != {entry.size}")
    if f"{ARTIFACT_DIR}/manifest.json" not in listed:
        raise BundleError(f"{bundle}: no {ARTIFACT_DIR}/manifest.json")
    return index


@dataclass
class CheckedBundle:
    """What verify_bundle established: the index, signed subjects and the manifest."""

    index: BundleIndex
    signed: bool
    keyids: list[str]
    subjects: dict[str, str]
    manifest: dict[str, Any]


def _stream_hash(fh: IO[bytes], on_chunk: Callable[[bytes], None] | None = None) -> str:
    digest = hashlib.sha256()
    while chunk := fh.read(CHUNK):
        digest.update(chunk)
        if on_chunk is not None:
            on_chunk(chunk)
    return digest.hexdigest()


def verify_bundle_checked(
    bundle: Path,
    keys: list[Key] | None,
    *,
    allow_unsigned: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> CheckedBundle:
    """Every check an import makes, without writing anything."""
    if not bundle.is_file():
        raise BundleError(f"{bundle}: no such bundle file")
    members = _members(bundle, max_bytes)
    with tarfile.open(bundle, "r:") as tar:
        index = _index(bundle, tar, members)
        by_name = {str(PurePosixPath(m.name)): m for m in members}
        manifest_raw = _read_member(tar, by_name[f"{ARTIFACT_DIR}/manifest.json"], 64 << 20)
        try:
            manifest: dict[str, Any] = json.loads(manifest_raw)
        except ValueError as exc:
            raise BundleError(
                f"{bundle}: {ARTIFACT_DIR}/manifest.json: invalid JSON ({exc})"
            ) from None
        prov_name = f"{ARTIFACT_DIR}/{PROVENANCE}"
        signed, keyids, subjects = False, [], {}
        if prov_name in by_name:
            raw = _read_member(tar, by_name[prov_name], 16 << 20)
            try:
                envelope = Envelope.from_dict(json.loads(raw))
            except (ValueError, KeyError, TypeError) as exc:
                raise VerificationFailed(
                    f"{bundle}: {prov_name}: not a DSSE envelope ({exc})"
                ) from None
            where = Path(f"{bundle}:{prov_name}")
            if envelope.signatures or not allow_unsigned:
                trusted = keys if keys is not None else signing.trusted_keys()
                signing.verify(envelope, trusted, where)
            try:
                subjects = provenance.subject_digests(provenance.parse_statement(envelope.payload))
            except (ValueError, KeyError, TypeError) as exc:
                raise VerificationFailed(
                    f"{where}: not an in-toto SLSA statement ({exc})"
                ) from None
            signed, keyids = bool(envelope.signatures), sorted(envelope.signatures)
        elif not allow_unsigned:
            raise VerificationFailed(
                f"{bundle}: the bundle has no provenance (unsigned)",
                hint="pass --allow-unsigned to accept it on its checksums alone",
            )
        if subjects:
            want = subjects.get(provenance.MANIFEST_SUBJECT)
            if want != manifest_digest(manifest):
                raise VerificationFailed(
                    f"{bundle}: {ARTIFACT_DIR}/manifest.json differs from the signed provenance"
                )
            for out in manifest.get("outputs", []):
                if str(out.get("file")) not in subjects:
                    raise VerificationFailed(f"{bundle}: {out.get('file')} is not signed")
        for entry in index.entries:
            member = by_name[entry.path]
            fh = tar.extractfile(member)
            assert fh is not None
            got = _stream_hash(fh)
            if got != entry.sha256:
                raise BundleError(f"{bundle}: {entry.path}: sha256 differs from {INDEX}")
            inner = entry.path.removeprefix(f"{ARTIFACT_DIR}/")
            # The manifest's subject is its canonical digest, checked above.
            signed_sha = (
                subjects.get(inner)
                if entry.path.startswith(f"{ARTIFACT_DIR}/")
                and inner != provenance.MANIFEST_SUBJECT
                else None
            )
            if signed_sha is not None and signed_sha != got:
                raise VerificationFailed(
                    f"{bundle}: {entry.path}: differs from the signed provenance"
                )
        if not subjects:
            for out in manifest.get("outputs", []):
                name = f"{ARTIFACT_DIR}/{out.get('file')}"
                entry_sha = {e.path: e.sha256 for e in index.entries}.get(name)
                if entry_sha is None or entry_sha != out.get("sha256"):
                    raise BundleError(f"{bundle}: {name}: missing or differs from the manifest")
    return CheckedBundle(index, signed, keyids, subjects, manifest)


def verify_bundle(
    bundle: Path, keys: list[Key] | None, *, allow_unsigned: bool = False
) -> dict[str, Any]:
    """`vmbuild verify BUNDLE`: the JSON report, or an error naming the first problem."""
    checked = verify_bundle_checked(bundle, keys, allow_unsigned=allow_unsigned)
    return {
        "path": str(bundle),
        "ok": True,
        "ref": checked.index.ref,
        "signed": checked.signed,
        "keyids": checked.keyids,
        "subjects": checked.subjects or {e.path: e.sha256 for e in checked.index.entries},
    }


# -- import ------------------------------------------------------------------
def _write_sparse(src: IO[bytes], dest: Path) -> str:
    """Copy `src` to a new file, leaving holes for all-zero chunks; returns its sha256."""
    digest = hashlib.sha256()
    zero = bytes(CHUNK)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        size = 0
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if chunk == zero[: len(chunk)]:
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
        out.truncate(size)
    return digest.hexdigest()


@contextlib.contextmanager
def _cleanup_store(store: Path) -> Iterator[None]:
    """Leave no store dir behind if the import fails and the store did not exist before."""
    existed = store.exists()
    try:
        yield
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                store.rmdir()
        raise


def import_bundle(
    bundle: Path,
    store: Path,
    keys: list[Key] | None,
    *,
    allow_unsigned: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Path:
    """Verify `bundle` completely, then unpack it into `store`; returns the build dir."""
    from vmbuild.stages import store as store_mod
    from vmbuild.supply.verify import verify_build

    checked = verify_bundle_checked(
        bundle, keys, allow_unsigned=allow_unsigned, max_bytes=max_bytes
    )
    index = checked.index
    final = store / index.name / index.version / index.build
    if final.exists():
        raise BundleError(
            f"{index.ref} is already in {store}", hint=f"vmbuild images rm {index.ref}"
        )
    with (
        _cleanup_store(store),
        store_mod.staging(store, index.name, index.version, index.build) as stage,
        tarfile.open(bundle, "r:") as tar,
    ):
        hashes: dict[str, str] = {}
        for member in tar:
            name = str(PurePosixPath(member.name))
            if not member.isreg() or name == INDEX:
                continue
            entry = next(e for e in index.entries if e.path == name)
            rel = (
                PurePosixPath(name).relative_to(ARTIFACT_DIR)
                if name.startswith(f"{ARTIFACT_DIR}/")
                else PurePosixPath(name)
            )
            dest = stage.path.joinpath(*rel.parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            fh = tar.extractfile(member)
            assert fh is not None
            got = _write_sparse(fh, dest)
            if got != entry.sha256:
                raise BundleError(f"{bundle}: {name}: changed while being imported")
            hashes[str(rel)] = got
        verify_build(
            stage.path,
            keys,
            allow_unsigned=allow_unsigned,
            known_digests=hashes,
        )
        return store_mod.commit(stage)


def read_index(bundle: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> BundleIndex:
    """The bundle's index, after the header checks (no member data is read)."""
    members = _members(bundle, max_bytes)
    with tarfile.open(bundle, "r:") as tar:
        return _index(bundle, tar, members)


def import_or_find(
    bundle: Path, store: Path, keys: list[Key] | None, *, allow_unsigned: bool = False
) -> str:
    """`distribute BUNDLE`: import the bundle unless that build is already in the store
    (a re-run, which distribute verifies again anyway). Returns the build's ref."""
    index = read_index(bundle)
    if not (store / index.name / index.version / index.build).exists():
        import_bundle(bundle, store, keys, allow_unsigned=allow_unsigned)
    return index.ref
