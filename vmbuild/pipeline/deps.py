"""What "dependencies updated" means, and the check that answers it without a VM.

Everything is relative to the pipeline's last successful run: what it saw when it
started (recorded in the history as a snapshot) and the artifact it produced.

- recipe: the recipe file's sha256;
- components: (name, document sha256, parameters) in order: a document edited, a
  component added, removed or reordered, or given other parameters;
- base:
  - `debian-12` (built offline): the `Release` file of the base suite (`bookworm`) on
    the mirror the base is built from: a point release or any other change to it;
    `-updates` and `-security` move daily and are covered, precisely, by `packages`;
  - a URL: its expected checksum: the one pinned in the recipe, or the image's entry
    in the checksum file (re-read at every check);
  - a local file: its sha256 (re-hashed only when its size or mtime changed);
- packages: a package in the last artifact's SBOM has a newer version, in dpkg's
  ordering, in the apt sources (`dependencies.apt_sources`; for `debian-12` by default
  the base's mirror: the suite, `-updates` and `-security`).
"""

from __future__ import annotations

import logging
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmbuild.config.pipeline import LoadedPipeline
from vmbuild.config.recipe import UrlBase
from vmbuild.debian import index as apt
from vmbuild.debian import sources as aptsources
from vmbuild.digest import sha256_file as _sha256_file
from vmbuild.errors import VmbuildError
from vmbuild.pipeline.history import History
from vmbuild.stages import base_image

log = logging.getLogger("vmbuild.pipeline.deps")


@dataclass(frozen=True)
class Change:
    kind: str  # history | recipe | component | base | artifact | packages
    summary: str
    details: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "summary": self.summary, "details": list(self.details)}


@dataclass(frozen=True)
class CheckReport:
    pipeline: str
    last_run: int | None
    changes: list[Change]
    errors: list[str] = field(default_factory=list)  # what could not be checked, and why
    notes: list[str] = field(default_factory=list)  # what was not checked by design
    snapshot: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.changes)

    def summary(self) -> str:
        return "; ".join(c.summary for c in self.changes) or "no dependency changed"

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "changed": self.changed,
            "last_run": self.last_run,
            "changes": [c.to_json() for c in self.changes],
            "errors": self.errors,
            "notes": self.notes,
        }


def _debian_mirrors(loaded: LoadedPipeline, release: str) -> aptsources.DebianMirrors:
    return aptsources.mirrors_for(
        loaded.pipeline.infrastructure.mirror, base_image.RELEASES[release]
    )


def _base_state(
    loaded: LoadedPipeline, previous: dict[str, Any] | None, fetch: apt.Fetch
) -> dict[str, Any]:
    recipe = loaded.recipe
    spec = recipe.recipe.base
    try:
        if isinstance(spec, UrlBase):
            state: dict[str, Any] = {"kind": "url", "url": spec.url}
            if spec.sha256 or spec.sha512:
                algo = "sha256" if spec.sha256 else "sha512"
                state["checksum"] = f"{algo}:{(spec.sha256 or spec.sha512 or '').lower()}"
            else:
                assert spec.checksum_url is not None
                text = fetch(spec.checksum_url).decode("utf-8", "replace")
                name = urllib.parse.unquote(urllib.parse.urlparse(spec.url).path.rsplit("/", 1)[-1])
                algo, digest = base_image.parse_checksum_file(text, name)
                state.update(checksum=f"{algo}:{digest}", checksum_url=spec.checksum_url)
            return state
        if recipe.base_path is not None:
            st = recipe.base_path.stat()
            state = {"kind": "file", "path": str(recipe.base_path), "size": st.st_size,
                     "mtime_ns": st.st_mtime_ns}  # fmt: skip
            same = previous is not None and all(
                previous.get(k) == state[k] for k in ("kind", "path", "size", "mtime_ns")
            )
            state["sha256"] = (
                previous["sha256"] if same and previous else _sha256_file(recipe.base_path)
            )
            return state
        assert isinstance(spec, str)
        mirrors = _debian_mirrors(loaded, spec)
        codename = base_image.RELEASES[spec]
        state = {"kind": "debian", "release": spec, "mirror": mirrors.mirror, "suite": codename}
        state["release_file"] = apt.fetch_release(mirrors.mirror, codename, fetch).to_json()
        return state
    except (VmbuildError, OSError) as exc:
        return {"kind": "unknown", "error": f"base: {exc}"}


def package_sources(loaded: LoadedPipeline) -> list[str]:
    """The apt source lines the packages check reads (see the module docstring)."""
    configured = loaded.pipeline.dependencies.apt_sources
    if configured is not None:
        return list(configured)
    spec = loaded.recipe.recipe.base
    if isinstance(spec, str) and spec in base_image.RELEASES:
        try:
            return aptsources.apt_source_lines(
                _debian_mirrors(loaded, spec), base_image.RELEASES[spec]
            )
        except VmbuildError as exc:
            log.warning("no default apt sources: %s", exc)
    return []


def snapshot(
    loaded: LoadedPipeline, previous: dict[str, Any] | None = None, fetch: apt.Fetch = apt.fetch_url
) -> dict[str, Any]:
    """The dependencies as they are now (network reads, no VM, no writes)."""
    recipe = loaded.recipe
    components = [
        {"name": ref.name, "path": str(path), "sha256": _sha256_file(path),
         "parameters": dict(ref.parameters)}
        for ref, path in zip(recipe.recipe.components, recipe.component_paths, strict=True)
    ]  # fmt: skip
    return {
        "recipe": {"path": str(recipe.path), "sha256": recipe.sha256},
        "components": components,
        "base": _base_state(loaded, (previous or {}).get("base"), fetch),
        "apt_sources": package_sources(loaded),
    }


def _short(digest: str | None) -> str:
    return (digest or "?").split(":")[-1][:12]


def compare(previous: dict[str, Any], current: dict[str, Any]) -> list[Change]:
    """Changes between two snapshots (packages are compared separately, with the mirror)."""
    changes = []
    old_recipe, new_recipe = previous.get("recipe", {}), current["recipe"]
    if old_recipe.get("sha256") != new_recipe["sha256"]:
        name = Path(new_recipe["path"]).name
        what = f"{_short(old_recipe.get('sha256'))} → {_short(new_recipe['sha256'])}"
        changes.append(Change("recipe", f"recipe {name} changed ({what})"))
    old_c, new_c = previous.get("components", []), current["components"]
    if [c["name"] for c in old_c] != [c["name"] for c in new_c]:
        before = ", ".join(c["name"] for c in old_c)
        after = ", ".join(c["name"] for c in new_c)
        changes.append(Change("component", f"components changed: [{before}] → [{after}]"))
    else:
        for old, new in zip(old_c, new_c, strict=True):
            if old.get("sha256") != new["sha256"]:
                what = f"{_short(old.get('sha256'))} → {_short(new['sha256'])}"
                changes.append(
                    Change("component", f"component {new['name']}: document changed ({what})")
                )
            if old.get("parameters") != new["parameters"]:
                changes.append(Change("component", f"component {new['name']}: parameters changed"))
    changes += _compare_base(previous.get("base") or {}, current["base"])
    return changes


def _compare_base(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    if "error" in new or "error" in old:
        return []  # reported as an error (new) or unknowable (old): not a change
    identity = {"debian": ("release", "mirror", "suite"), "url": ("url",), "file": ("path",)}
    keys = identity.get(new.get("kind", ""), ())
    if old.get("kind") != new.get("kind") or any(old.get(k) != new.get(k) for k in keys):
        return [Change("base", f"base changed: {_describe_base(old)} → {_describe_base(new)}")]
    if new["kind"] == "debian":
        before, after = old.get("release_file", {}), new["release_file"]
        if before.get("sha256") != after["sha256"]:
            dates = f"Date {before.get('date')} → {after.get('date')}"
            return [Change("base", f"base: {after['url']} changed ({dates})")]
    elif new["kind"] == "url" and old.get("checksum") != new.get("checksum"):
        what = f"{_short(old.get('checksum'))} → {_short(new.get('checksum'))}"
        return [Change("base", f"base: {new['url']}: checksum changed ({what})")]
    elif new["kind"] == "file" and old.get("sha256") != new.get("sha256"):
        what = f"{_short(old.get('sha256'))} → {_short(new.get('sha256'))}"
        return [Change("base", f"base: {new['path']} changed ({what})")]
    return []


def _describe_base(state: dict[str, Any]) -> str:
    kind = state.get("kind")
    if kind == "debian":
        return f"{state.get('release')} from {state.get('mirror')}"
    if kind == "url":
        return str(state.get("url"))
    if kind == "file":
        return str(state.get("path"))
    return "unknown"


def check_packages(
    packages: list[dict[str, str]], sources: list[str], fetch: apt.Fetch = apt.fetch_url
) -> Change | None:
    """A `packages` change if any SBOM package has a newer version in the sources."""
    archs = {p.get("arch", "") for p in packages} - {"all", ""} or {"amd64"}
    wanted = {p["name"] for p in packages if p.get("name")}
    mirror = apt.newest_versions(apt.sources_from_lines(sources), archs, wanted, fetch)
    found = apt.upgrades(packages, mirror)
    if not found:
        return None
    names = ", ".join(u.name for u in found[:5]) + (", ..." if len(found) > 5 else "")
    return Change(
        "packages",
        f"{len(found)} package{'s' if len(found) > 1 else ''} newer in the mirror ({names})",
        tuple(f"{u.name}:{u.arch} {u.installed} → {u.available} ({u.index})" for u in found),
    )


def check(
    loaded: LoadedPipeline, history: History, *, fetch: apt.Fetch = apt.fetch_url
) -> CheckReport:
    """Compare the dependencies now with the pipeline's last successful run."""
    last = history.last_succeeded(loaded.name)
    current = snapshot(loaded, last.deps if last else None, fetch)
    errors = [current["base"]["error"]] if "error" in current["base"] else []
    notes: list[str] = []
    if last is None or last.deps is None:
        never = Change("history", f"no successful run of {loaded.name} recorded yet")
        return CheckReport(loaded.name, None, [never], errors, notes, current)
    changes = compare(last.deps, current)
    packages: list[dict[str, str]] = []
    try:
        if last.artifact is None:
            raise VmbuildError("the last successful run recorded no artifact")
        from vmbuild.manifest import Manifest
        from vmbuild.scaleout.artifacts import read_manifest_at

        # A local build dir, or the s3:// URL a worker committed it to.
        manifest = Manifest.from_json(read_manifest_at(last.artifact), last.artifact)
        packages = [p.to_json() for p in manifest.packages]
    except VmbuildError as exc:
        changes.append(Change("artifact", f"the last artifact is gone: {exc}"))
    if not current["apt_sources"]:
        notes.append("packages not checked: no apt sources (set dependencies.apt_sources)")
    elif not packages:
        notes.append("packages not checked: the last artifact has no package list")
    else:
        try:
            newer = check_packages(packages, current["apt_sources"], fetch)
            if newer is not None:
                changes.append(newer)
        except VmbuildError as exc:
            errors.append(f"packages: {exc}")
    return CheckReport(loaded.name, last.id, changes, errors, notes, current)
