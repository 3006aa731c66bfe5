"""`vmbuild bundle rebuild FILE`: build the bundled recipe again, offline, from a bundle
exported with --with-inputs.

1. The bundle is verified exactly as `bundle import` verifies it (headers, signature,
   every member's digest) before anything is unpacked.
2. Its inputs are unpacked into a temporary dir (removed whatever happens), each member
   hashed again while written; then checked against the *signed* manifest: the base and
   the recipe by their sha256, every component document by its digest, each InRelease
   by the digest the build recorded (when it did). bundle.json itself is not signed:
   these checks, and apt's own (Debian's keyring over the InRelease, the InRelease over
   the indexes, the indexes over each .deb), are what make the inputs trustworthy.
3. The bundle's mirror is served on 127.0.0.1 (vmbuild.supply.mirror) and the recipe runs
   on the bundled base with every guest on a `restrict=on` user network whose only way
   out is a guest forward to that mirror: nothing reaches the internet.
4. The rebuilt image must have the original's package versions (checked before anything
   is stored); its manifest says `rebuilt_from: {bundle, sha256, ref}`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from securesystemslib.signer import Key

from vmbuild.build import BuildResult, build
from vmbuild.config.recipe import LoadedRecipe, load_recipe
from vmbuild.config.variables import Given
from vmbuild.errors import ConfigError, VmbuildError
from vmbuild.plan import BuildOptions, OfflineSource
from vmbuild.progress import Reporter
from vmbuild.supply import inputs
from vmbuild.supply.bundle import CHUNK, BundleError, _write_sparse, verify_bundle_checked
from vmbuild.supply.mirror import OfflineMirror


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _required(bundle: Path, meta: dict[str, Any], listed: dict[str, str]) -> None:
    """Every member the inputs section names is in the (verified) index."""
    names = [str(meta.get("recipe", "")), str(meta.get("base", ""))]
    for suite in meta.get("suites") or []:
        names += [str(suite.get("inrelease", "")), *(str(i) for i in suite.get("indexes", []))]
    for name in names:
        if name not in listed:
            raise BundleError(f"{bundle}: {name or 'inputs'}: missing from the bundle")


def unpack_inputs(bundle: Path, listed: dict[str, str], dest: Path) -> None:
    """Write the bundle's inputs/ members under `dest`, each checked against its digest."""
    with tarfile.open(bundle, "r:") as tar:
        for member in tar:
            name = str(PurePosixPath(member.name))
            if not member.isreg() or not name.startswith(f"{inputs.INPUTS}/"):
                continue
            target = dest.joinpath(*PurePosixPath(name).parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            fh = tar.extractfile(member)
            assert fh is not None  # a regular file, checked by the verification
            if _write_sparse(fh, target) != listed[name]:
                raise BundleError(f"{bundle}: {name}: changed while being unpacked")


def check_inputs(
    bundle: Path, meta: dict[str, Any], listed: dict[str, str], manifest: dict[str, Any]
) -> None:
    """The bundled base, recipe and index state are the ones the signed manifest names."""
    base, recipe = str(meta["base"]), str(meta["recipe"])
    if listed[base] != (manifest.get("base") or {}).get("sha256"):
        raise BundleError(f"{bundle}: {base}: not the base the signed manifest names")
    if listed[recipe] != (manifest.get("recipe") or {}).get("sha256"):
        raise BundleError(f"{bundle}: {recipe}: not the recipe the signed manifest names")
    recorded: dict[str, str] = dict(manifest.get("apt_indexes") or {})
    for suite in meta.get("suites") or []:
        want = recorded.get(inputs.list_name(str(suite["uri"]), str(suite["suite"])))
        if want is not None and listed[str(suite["inrelease"])] != want:
            raise BundleError(
                f"{bundle}: {suite['inrelease']}: not the index state the build recorded"
            )


def check_indexes(bundle: Path, root: Path, meta: dict[str, Any]) -> None:
    """Each bundled Packages index is the one its bundled InRelease lists (apt in the
    guest would refuse it too, but only after a VM has booted)."""
    from vmbuild.debian.index import parse_release

    for suite in meta.get("suites") or []:
        inrelease = str(suite["inrelease"])
        release = parse_release(inrelease, root.joinpath(inrelease).read_bytes())
        dists = inrelease.rsplit("/", 1)[0]
        for member in suite.get("indexes") or []:
            name = str(member).removeprefix(dists + "/")
            listed = release.files.get(name)
            if listed is None or _file_sha256(root.joinpath(str(member))) != listed[0]:
                raise BundleError(
                    f"{bundle}: {member}: not the index its InRelease ({inrelease}) lists"
                )


def load_bundled_recipe(
    bundle: Path, root: Path, meta: dict[str, Any], manifest: dict[str, Any],
    secrets: dict[str, str] | None, variables: Given | None,
) -> LoadedRecipe:  # fmt: skip
    member = str(meta["recipe"])
    recipe = root.joinpath(*PurePosixPath(member).parts)
    here = recipe.parent
    for where, ref in inputs.references(recipe):
        path = (here / ref).resolve()
        if not path.is_relative_to(here.resolve()) or not path.is_file():
            rel = PurePosixPath(member).parent / ref
            raise BundleError(
                f"{bundle}: {rel}: missing from the bundle (the recipe's {where} names it)"
            )
    for rel, want in dict(manifest.get("recipe_files") or {}).items():
        path = here.joinpath(*PurePosixPath(rel).parts)
        if not path.is_file() or _file_sha256(path) != want:
            raise BundleError(
                f"{bundle}: {PurePosixPath(member).parent / rel}: missing or not the file "
                "the signed manifest names"
            )
    try:
        loaded = load_recipe(recipe, secrets=secrets, variables=variables)
    except ConfigError as exc:
        where = f"{exc.field}: " if exc.field else ""
        raise BundleError(f"{bundle}: {member}: {where}{exc.message}", hint=exc.hint) from None
    signed = manifest.get("components") or []
    for i, doc in enumerate(loaded.documents):
        want = signed[i].get("sha256") if i < len(signed) else None
        if doc.sha256 != want:
            raise BundleError(
                f"{bundle}: component {doc.name} ({doc.path.name}): not the document the "
                "signed manifest names",
                hint="a built-in or library component differs on this host (vmbuild version?)",
            )
    return loaded


def rebuild(
    bundle: Path, opts: BuildOptions, progress: Reporter, *, keys: list[Key] | None,
    allow_unsigned: bool = False, secrets: dict[str, str] | None = None,
    variables: Given | None = None,
) -> BuildResult:  # fmt: skip
    from vmbuild.stages.base_image import local_base

    checked = verify_bundle_checked(bundle, keys, allow_unsigned=allow_unsigned)
    meta, manifest = checked.index.inputs, checked.manifest
    if meta is None:
        raise BundleError(
            f"{bundle}: carries no inputs; nothing to rebuild from",
            hint="export it again with `vmbuild bundle export REF --with-inputs`",
        )
    listed = {e.path: e.sha256 for e in checked.index.entries}
    _required(bundle, meta, listed)
    check_inputs(bundle, meta, listed, manifest)
    with tempfile.TemporaryDirectory(prefix="vmbuild-rebuild-") as tmp:
        root = Path(tmp)
        unpack_inputs(bundle, listed, root)
        check_indexes(bundle, root, meta)
        loaded = load_bundled_recipe(bundle, root, meta, manifest, secrets, variables)
        original = manifest.get("base") or {}
        base = dataclasses.replace(
            local_base(root.joinpath(*PurePosixPath(str(meta["base"])).parts)),
            id=str(original.get("id")), source=str(original.get("source")),
        )  # fmt: skip
        packages = tuple(
            (str(p["name"]), str(p["version"]), str(p.get("arch", "")))
            for p in manifest.get("packages") or []
        )
        with OfflineMirror(root / inputs.MIRROR) as mirror:
            offline = OfflineSource(
                base=base, mirror_port=mirror.port, bundle=str(bundle),
                bundle_sha256=_file_sha256(bundle), ref=checked.index.ref, packages=packages,
            )  # fmt: skip
            try:
                return build(loaded, dataclasses.replace(opts, offline=offline), progress)
            except VmbuildError as exc:
                if missing := mirror.missing_packages():
                    raise BundleError(
                        f"{bundle}: the rebuild needs packages the bundle does not carry: "
                        + ", ".join(missing),
                        hint="export the bundle on a host whose package cache holds them",
                    ) from exc
                raise
