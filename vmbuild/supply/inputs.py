"""What `bundle export --with-inputs` carries so the recipe can be rebuilt offline.

    inputs/base/FILE                      the cached base image (sha256 = the signed manifest's)
    inputs/recipe/RECIPE.yaml             the recipe, and every file it names by a relative
    inputs/recipe/...                       path (testinfra files, component documents,
                                            scan data, distribution config), same layout
    inputs/components/NAME.yaml           components from outside the recipe's directory
    inputs/mirror/HOST/PATH/dists/SUITE/InRelease          per suite of the build's sources:
    inputs/mirror/HOST/PATH/dists/SUITE/main/binary-ARCH/Packages.xz   the signed index
    inputs/mirror/HOST/PATH/pool/...                      state, and the image's packages

The index state is the one the build saw: a build records the sha256 of each InRelease
its guest's apt read (manifest `apt_indexes`, signed with the manifest); export takes the
InRelease from the host package cache (apt-cacher-ng) or, online, from the mirror, and
refuses one with another digest. A build made before that was recorded has no such
digest: its bundle says `index_state: unrecorded`, and the rebuild's own check (the same
package versions as the signed manifest) is then the only proof. Packages indexes are
checked against the InRelease, .debs against the Packages index, before they are carried.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from vmbuild.debian import index as apt
from vmbuild.debian.sources import DebianMirrors, apt_source_lines
from vmbuild.errors import VmbuildError
from vmbuild.supply.mirror import mirror_key
from vmbuild.yamlio import load_file

log = logging.getLogger("vmbuild.supply.inputs")

INPUTS = "inputs"
BASE = f"{INPUTS}/base"
RECIPE = f"{INPUTS}/recipe"
COMPONENTS = f"{INPUTS}/components"
MIRROR = f"{INPUTS}/mirror"
# Where the guest's apt keeps what it read; apt names each file after its URI.
APT_LISTS = "/var/lib/apt/lists"


def list_name(uri: str, suite: str, leaf: str = "InRelease") -> str:
    """apt's file name under /var/lib/apt/lists for `URI/dists/SUITE/LEAF` (URItoFileName)."""
    return f"{mirror_key(uri)}/dists/{suite}/{leaf}".replace("/", "_")


@dataclass
class Inputs:
    """tar path -> host file, and the `inputs` section of bundle.json."""

    files: dict[str, Path] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def references(recipe: Path) -> list[tuple[str, str]]:
    """(field, relative path) of every file the recipe names beside itself: testinfra
    files, component documents given as paths, scan data, a distribution config file."""
    from vmbuild.toe.library import builtin_names

    raw, _ = load_file(recipe)
    raw = raw if isinstance(raw, dict) else {}
    root = recipe.resolve().parent
    named: list[tuple[str, str]] = []
    tests = raw.get("tests")
    files = tests.get("files") if isinstance(tests, dict) else tests
    prefix = "tests.files" if isinstance(tests, dict) else "tests"
    named += [
        (f"{prefix}[{i}]", t) for i, t in enumerate(files or []) if isinstance(t, str)
    ]  # fmt: skip
    builtins = set(builtin_names())
    for i, comp in enumerate(raw.get("components") or []):
        name = str(comp.get("name", "")) if isinstance(comp, dict) else ""
        # A path by its look (as the loader tells them apart), or a file beside the recipe.
        path_like = name.endswith((".yaml", ".yml", ".json")) or "/" in name
        if name and name not in builtins and (path_like or (root / name).is_file()):
            named.append((f"components[{i}].name", name))
    scan = raw.get("scan")
    if isinstance(scan, dict) and isinstance(scan.get("data"), str):
        named.append(("scan.data", scan["data"]))
    if isinstance(raw.get("distribution"), str):
        named.append(("distribution", raw["distribution"]))
    return named


def recorded_files(recipe: Path) -> dict[str, str]:
    """What a build records of the files its recipe names (manifest `recipe_files`,
    signed with the manifest): relative path -> sha256, for those inside its directory.
    A rebuild from a bundle checks the bundled copies against these."""
    root = recipe.resolve().parent
    out = {}
    for _where, ref in references(recipe):
        path = (root / ref).resolve()
        if path.is_relative_to(root) and path.is_file():
            out[PurePosixPath(*path.relative_to(root).parts).as_posix()] = _file_sha256(path)
    return out


def recipe_files(recipe: Path) -> dict[str, Path]:
    """The recipe and every file it names by a path relative to its directory:
    tar path under inputs/recipe/ -> host file. A file outside that directory is refused
    (the other side could not put it where the recipe looks)."""
    if not recipe.is_file():
        raise VmbuildError(
            f"the recipe {recipe} is no longer on this host",
            hint="export without --with-inputs, or from the host that built it",
        )
    root = recipe.resolve().parent
    out = {f"{RECIPE}/{recipe.name}": recipe}
    for where, ref in references(recipe):
        path = (root / ref).resolve()
        if not path.is_relative_to(root):
            raise VmbuildError(
                f"{recipe}: {where}: {ref} is outside the recipe's directory; "
                "an offline rebuild could not find it",
                hint="keep the files a recipe names beside it (or below it)",
            )
        if not path.is_file():
            raise VmbuildError(f"{recipe}: {where}: {ref} is no longer on this host")
        out[f"{RECIPE}/{PurePosixPath(*path.relative_to(root).parts)}"] = path
    return out


def sources_of(base_meta: Mapping[str, Any], release: str) -> list[tuple[str, str]]:
    """(uri, suite) of every apt source the base was built with (its guest's sources)."""
    mirror = str(base_meta.get("mirror") or "")
    if not mirror:
        return []
    mirrors = DebianMirrors(mirror, base_meta.get("security_mirror") or None)
    return [(line.split()[1], line.split()[2]) for line in apt_source_lines(mirrors, release)]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass
class IndexState:
    """Where export found the index state, and the packages it lists."""

    inputs: Inputs
    scratch: Path  # fetched files are written here (the caller removes it)
    acng: Path  # apt-cacher-ng's cache dir (HOST/PATH/... as fetched)
    fetch: apt.Fetch | None  # None: offline, the package cache only
    pool: dict[tuple[str, str, str], tuple[str, str, str]] = field(default_factory=dict)

    def _keep(self, tar_path: str, cached: Path, want: str, url: str) -> str:
        """Carry the cached file if its sha256 is `want`, else fetch it (when allowed)."""
        if cached.is_file() and not cached.is_symlink() and _file_sha256(cached) == want:
            self.inputs.files[tar_path] = cached
            return "cache"
        if self.fetch is None:
            raise VmbuildError(
                f"{url}: not in the host package cache ({self.acng}) with the digest "
                "the build saw, and fetching is off (VMBUILD_OFFLINE)"
            )
        data = self.fetch(url)
        if _sha256(data) != want:
            raise VmbuildError(
                f"{url}: the mirror no longer serves the file the build used (sha256 differs)",
                hint="the mirror moved on: export on a host whose package cache kept it",
            )
        return self._write(tar_path, data)

    def _write(self, tar_path: str, data: bytes) -> str:
        dest = self.scratch / tar_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        self.inputs.files[tar_path] = dest
        return "fetched"

    def suite(self, uri: str, suite: str, arch: str, recorded: str | None) -> dict[str, Any]:
        key = mirror_key(uri)
        dists = f"{key}/dists/{suite}"
        url = f"{uri.rstrip('/')}/dists/{suite}/InRelease"
        cached = self.acng / dists / "InRelease"
        tar_inrelease = f"{MIRROR}/{dists}/InRelease"
        if recorded is not None:
            origin = self._keep(tar_inrelease, cached, recorded, url)
            data = self.inputs.files[tar_inrelease].read_bytes()
        elif cached.is_file():
            data, origin = cached.read_bytes(), "cache"
            self.inputs.files[tar_inrelease] = cached
        elif self.fetch is not None:
            data = self.fetch(url)
            origin = self._write(tar_inrelease, data)
        else:
            raise VmbuildError(f"{url}: not in the host package cache ({self.acng})")
        release = apt.parse_release(url, data)
        indexes = []
        stem = f"main/binary-{arch}/Packages"
        listed = [s for s in apt.INDEX_SUFFIXES if stem + s in release.files]
        if not listed:
            raise VmbuildError(f"{url}: lists no {stem} index")
        name = stem + listed[0]
        want, _size = release.files[name]
        by_hash = self.acng / dists / f"main/binary-{arch}/by-hash/SHA256/{want}"
        cached_index = by_hash if by_hash.is_file() else self.acng / dists / name
        tar_index = f"{MIRROR}/{dists}/{name}"
        self._keep(tar_index, cached_index, want, f"{uri.rstrip('/')}/dists/{suite}/{name}")
        indexes.append(name)
        lines = apt._decompress(name, self.inputs.files[tar_index].read_bytes())
        fields = ("Package", "Version", "Architecture", "Filename", "SHA256")
        for stanza in apt.iter_stanzas(lines, fields):
            ident = (stanza.get("Package", ""), stanza.get("Version", ""))
            pkg_key = (*ident, stanza.get("Architecture", ""))
            where = (key, stanza.get("Filename", ""), stanza.get("SHA256", ""))
            self.pool.setdefault(pkg_key, where)
        return {
            "uri": uri, "suite": suite, "inrelease": tar_inrelease,
            "inrelease_sha256": _sha256(data),
            "indexes": [f"{MIRROR}/{dists}/{n}" for n in indexes], "from": origin,
        }  # fmt: skip

    def debs(self, packages: Iterable[Mapping[str, Any]]) -> tuple[int, list[str]]:
        """Carry each package (exact name, version, arch) found in the package cache with
        the digest its index lists; returns (carried, names not in the cache)."""
        carried, absent = 0, []
        for p in packages:
            hit = self.pool.get((str(p["name"]), str(p["version"]), str(p.get("arch", ""))))
            if hit is None:
                absent.append(f"{p['name']}={p['version']}")  # not from these suites
                continue
            key, filename, sha = hit
            cached = self.acng / key / filename
            if cached.is_file() and not cached.is_symlink() and _file_sha256(cached) == sha:
                self.inputs.files[f"{MIRROR}/{key}/{filename}"] = cached
                carried += 1
            else:
                # Not downloaded by the build through the cache: usually already in the base.
                absent.append(f"{p['name']}={p['version']}")
        return carried, absent


def collect(
    manifest: Mapping[str, Any], scratch: Path, *, fetch: apt.Fetch | None = apt.fetch_url,
    on_status: Callable[[str], None] = lambda _m: None,
) -> Inputs:  # fmt: skip
    """Every input of the build in `manifest`; fetched files go under `scratch`."""
    from vmbuild import paths
    from vmbuild.hypervisor.arch import DEBIAN_ARCH
    from vmbuild.stages import base_image

    if os.environ.get("VMBUILD_OFFLINE") == "1":
        fetch = None
    inputs = Inputs()
    base_sha = str((manifest.get("base") or {}).get("sha256", ""))
    for base, meta in base_image._cached():
        if base.sha256 == base_sha:
            inputs.files[f"{BASE}/{base.path.name}"] = base.path
            base_meta = meta
            break
    else:
        raise VmbuildError(
            f"the base image (sha256 {base_sha[:16]}…) is not in this host's cache",
            hint="export without --with-inputs, or rebuild the base first",
        )
    recipe = Path(str((manifest.get("recipe") or {}).get("path", "")))
    inputs.files.update(recipe_files(recipe))
    for comp in manifest.get("components", []):
        path = Path(str(comp.get("path", "")))
        if not path.is_file():
            raise VmbuildError(f"component {comp.get('name')}: {path} is no longer on this host")
        if not any(src.resolve() == path.resolve() for src in inputs.files.values()):
            inputs.files[f"{COMPONENTS}/{path.name}"] = path
    arch = "arm64" if manifest.get("architecture") == "arm64" else DEBIAN_ARCH["x86_64"]
    state = IndexState(inputs, scratch, paths.cache_dir() / "apt-cacher-ng" / "cache", fetch)
    recorded: dict[str, str] = dict(manifest.get("apt_indexes") or {})
    release = base_image.RELEASES.get(str(base_meta.get("release") or ""), "")
    suites = []
    for uri, suite in sources_of(base_meta, release) if release else []:
        suites.append(state.suite(uri, suite, arch, recorded.get(list_name(uri, suite))))
    carried, absent = state.debs(manifest.get("packages") or [])
    on_status(f"inputs: {len(suites)} suites, {carried} packages from the package cache")
    inputs.meta = {
        "recipe": f"{RECIPE}/{recipe.name}",
        "base": next(p for p in inputs.files if p.startswith(f"{BASE}/")),
        "index_state": "recorded" if recorded else "unrecorded",
        "suites": suites,
        "packages": carried,
        # In the image but not carried: from the base (not downloaded by the build).
        "not_carried": len(absent),
    }
    return inputs
