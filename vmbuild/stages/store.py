"""The artifact store: images/<name>/<version>/<build>/ with disks, manifest.json and logs.

A build is assembled in a hidden staging dir next to its final place and
renamed only on success, so readers never see a half-written artifact and a
failed build leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmbuild import runs
from vmbuild.errors import VmbuildError
from vmbuild.manifest import FILE as manifest_file
from vmbuild.manifest import Manifest
from vmbuild.run import write_atomic
from vmbuild.secrets import mask_json

MANIFEST = manifest_file
STAGING_PREFIX = ".staging-"
BUILD_ID = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")


def new_build_id(now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Staging:
    path: Path  # where the build writes its files
    final: Path  # where they land on commit


@contextlib.contextmanager
def staging(store: Path, name: str, version: str, build: str) -> Iterator[Staging]:
    """A staging dir; removed unless `commit()` renamed it into place."""
    parent = store / name / version
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f"{STAGING_PREFIX}{build}"
    # Private: it holds the client key, the seed (the guest's host key) and
    # logs that may quote parameters.
    path.mkdir(mode=0o700)
    try:
        # Removed by the next vmbuild command if this process is killed.
        with runs.owning(path):
            try:
                yield Staging(path, parent / build)
            finally:
                if path.exists():
                    shutil.rmtree(path, ignore_errors=True)
    finally:
        # Leave no empty name/version dirs behind a failed first build.
        for d in (parent, parent.parent):
            with contextlib.suppress(OSError):
                d.rmdir()


def commit(stage: Staging) -> Path:
    os.replace(stage.path, stage.final)
    return stage.final


def write_manifest(build_dir: Path, manifest: Manifest | dict[str, Any]) -> None:
    data = manifest.to_json() if isinstance(manifest, Manifest) else manifest
    # 0600: a manifest lists parameters (secret values masked, the rest in clear).
    text = json.dumps(mask_json(data), indent=2, sort_keys=False) + "\n"
    write_atomic(build_dir / MANIFEST, text, mode=0o600)


def load_manifest(build_dir: Path) -> Manifest:
    """The typed manifest of a stored build."""
    return Manifest.from_json(read_manifest(build_dir), str(build_dir / MANIFEST))


def read_manifest(build_dir: Path) -> dict[str, Any]:
    """The manifest exactly as stored (its digest identifies the artifact)."""
    try:
        data: dict[str, Any] = json.loads((build_dir / MANIFEST).read_text())
    except FileNotFoundError:
        raise VmbuildError(f"{build_dir}: not an artifact (no {MANIFEST})") from None
    except ValueError as exc:
        raise VmbuildError(f"{build_dir / MANIFEST}: invalid JSON: {exc}") from None
    return data


def update_manifest(build_dir: Path, key: str, value: object) -> None:
    """Set one top-level key of an artifact's manifest (atomic rewrite)."""
    manifest = read_manifest(build_dir)
    manifest[key] = value
    write_manifest(build_dir, manifest)


def _version_key(version: str) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
    """Semver precedence: build metadata ignored, a release after its pre-releases, and
    pre-release identifiers compared field by field (numeric ones as numbers, so rc.10
    comes after rc.2; numeric before alphanumeric; more fields after fewer)."""
    core, _, pre = version.partition("+")[0].partition("-")
    nums = [int(x) if x.isdigit() else 0 for x in core.split(".")[:3]] + [0, 0, 0]
    fields = tuple((0, int(f), "") if f.isdigit() else (1, 0, f) for f in pre.split(".") if pre)
    return nums[0], nums[1], nums[2], 0 if pre else 1, fields


def builds(store: Path) -> list[Path]:
    """Every committed build dir, oldest first within name and version."""
    found = []
    if not store.is_dir():
        return []
    for name_dir in sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = [p for p in name_dir.iterdir() if p.is_dir()]
        for version_dir in sorted(versions, key=lambda p: _version_key(p.name)):
            for build_dir in sorted(version_dir.iterdir()):
                if BUILD_ID.match(build_dir.name) and (build_dir / MANIFEST).is_file():
                    found.append(build_dir)
    return found


def _inside(path: Path, root: Path) -> bool:
    return path.is_relative_to(root) and path != root


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or ref in (".", "..")


def _check_build_dir(store: Path, build_dir: Path, ref: str) -> Path:
    """`build_dir` (resolved) must be `<store>/<name>/<version>/<build>` holding a manifest."""
    root = store.resolve()
    if not _inside(build_dir, root):
        raise VmbuildError(
            f"{ref!r} is outside the store {root}",
            hint="store operations only touch the store; pass --store DIR to use another one",
        )
    rel = build_dir.relative_to(root).parts
    if len(rel) != 3 or not BUILD_ID.match(rel[2]) or not (build_dir / MANIFEST).is_file():
        raise VmbuildError(
            f"{ref!r} is not a build in the store {root}",
            hint="a build is <store>/NAME/VERSION/BUILD; `vmbuild images list` shows them",
        )
    manifest = read_manifest(build_dir)
    if [manifest.get("name"), manifest.get("version"), manifest.get("build")] != list(rel):
        raise VmbuildError(
            f"{build_dir / MANIFEST}: not a vmbuild manifest for {'/'.join(rel)}",
            hint="its name, version and build fields must match the directory",
        )
    return build_dir


def resolve(store: Path, ref: str) -> Path:
    """`NAME`, `NAME/VERSION`, `NAME/VERSION/BUILD` (latest match) in the store.

    A path (absolute or starting with `.`, `..` or `~`) is accepted only when it
    resolves to a build inside the store: a directory elsewhere that happens to
    hold a manifest.json is never treated as an image, and never shadows a
    stored image of the same name.
    """
    if _looks_like_path(ref):
        return _check_build_dir(store, Path(ref).expanduser().resolve(), ref)
    parts = ref.strip("/").split("/")
    if not 1 <= len(parts) <= 3 or not all(parts) or any(p in (".", "..") for p in parts):
        raise VmbuildError(f"invalid image reference {ref!r}", hint="use NAME[/VERSION[/BUILD]]")
    matches = [b for b in builds(store) if list(b.parts[-3:][: len(parts)]) == parts]
    if not matches:
        raise VmbuildError(
            f"no image {ref!r} in {store}", hint="`vmbuild images list` shows what is stored"
        )
    return _check_build_dir(store, matches[-1].resolve(), ref)


def remove(store: Path, build_dir: Path) -> None:
    """Delete a build of `store`; then its version and name dirs if they became empty.

    Only ever below the store: the build must be `<store>/NAME/VERSION/BUILD`, and
    the parents removed are that version and name directory, never the store or
    anything above it.
    """
    root = store.resolve()
    build_dir = _check_build_dir(store, build_dir.resolve(), str(build_dir))
    tomb = build_dir.with_name(f"{STAGING_PREFIX}rm-{build_dir.name}")
    os.replace(build_dir, tomb)  # atomic: listings never see a half-deleted build
    shutil.rmtree(tomb)
    for d in (build_dir.parent, build_dir.parent.parent):
        if _inside(d, root):
            with contextlib.suppress(OSError):
                d.rmdir()


def summary(build_dir: Path) -> dict[str, Any]:
    m = load_manifest(build_dir)
    return {
        "ref": m.ref,
        "name": m.name,
        "version": m.version,
        "build": m.build,
        "created": m.created,
        "kind": str(m.extra.get("kind", "vm")),
        "tests": m.tests_status,
        "formats": [o.format for o in m.outputs],
        "size": sum(o.size for o in m.outputs),
        "path": str(build_dir),
    }
