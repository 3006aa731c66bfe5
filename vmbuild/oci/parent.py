"""A container recipe's parent image: what `parentImage` names, and fetching it.

The recipe syntax is skopeo's own transport syntax, plus the bare registry reference
Image Builder itself writes (`amazonlinux:latest`, `123….dkr.ecr….amazonaws.com/repo:tag`):

    debian-12                      the offline Debian root filesystem (stages/rootfs.py)
    oci:PATH[:TAG]                 a local OCI image layout (PATH relative to the recipe)
    docker-archive:PATH            a `docker save` tarball
    docker://REF                   a registry reference, REF as below
    [HOST[:PORT]/]REPO[:TAG][@sha256:HEX]   the same, as Image Builder writes it

Why this syntax: skopeo fetches every kind, so a `parentImage` is exactly what a user
would give `skopeo copy` (no second grammar to learn or to translate), and a real Image
Builder recipe's bare reference works unchanged. A release name (`debian-12`) means the
offline rootfs, not Docker Hub's `library/debian-12`; a transport prefix wins over a
reference that looks like one (`oci:x` is a layout, not Docker Hub's `oci` tagged `x`).

Fetching (host side, before any VM): `skopeo inspect` resolves the reference to a
manifest digest and architecture (amd64 only: the builder VM is amd64), then
`skopeo copy` brings the image into an OCI layout cached by that digest under
`cache_dir()/parents/`. Registry and OCI-layout parents keep their layer blobs byte for
byte (checked against what `skopeo inspect` listed); a docker-archive holds uncompressed
layers, which skopeo gzips into the layout (their diff_ids, the content, are unchanged).
A parent whose layers vmbuild cannot unpack in the guest (zstd, encrypted,
non-distributable) is refused and nothing of it is cached.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmbuild import runs
from vmbuild.config.parent_ref import ParentError, ParentSource
from vmbuild.errors import CommandError
from vmbuild.oci import layout as oci_layout
from vmbuild.oci.registry import skopeo_message
from vmbuild.paths import cache_dir
from vmbuild.run import run

log = logging.getLogger("vmbuild.oci.parent")

TAG = "parent"
TIMEOUT = 1800.0
ARCH, OS = "amd64", "linux"
# What the guest unpacks: GNU tar reads plain and gzip tars (Docker's gzip layers
# become these two when skopeo writes an OCI layout).
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
)


@dataclass(frozen=True)
class FetchedParent:
    source: ParentSource
    digest: str  # sha256:… of the manifest skopeo resolved the reference to
    layout: Path  # a cached OCI layout; its image is tagged TAG; never written
    image: oci_layout.OciImage
    config: dict[str, Any]  # the image config's `config` (Env, Entrypoint, Cmd, …)


def _global() -> list[str]:
    # A manifest list resolves to its linux/amd64 image, the builder's platform.
    return ["skopeo", "--override-arch", ARCH, "--override-os", OS]


def inspect_argv(source: ParentSource, *, tls_verify: bool) -> list[str]:
    tls = [] if tls_verify or source.kind != "docker" else ["--tls-verify=false"]
    return [*_global(), "inspect", *tls, source.skopeo]


def pinned(source: ParentSource, digest: str) -> str:
    """What to copy once `skopeo inspect` resolved the source to `digest`: for a registry,
    REPO@DIGEST (tag and any digest dropped), so a tag moved since cannot put another
    image into the cache dir named by `digest`. Local sources cannot move underfoot."""
    if source.kind != "docker":
        return source.skopeo
    name = source.skopeo.removeprefix("docker://").partition("@")[0]
    head, slash, last = name.rpartition("/")
    return f"docker://{head}{slash}{last.partition(':')[0]}@{digest}"


def copy_argv(source: ParentSource, digest: str, dest: Path, *, tls_verify: bool) -> list[str]:
    tls = [] if tls_verify or source.kind != "docker" else ["--src-tls-verify=false"]
    return [*_global(), "copy", "--quiet", *tls, pinned(source, digest), f"oci:{dest}:{TAG}"]


def _skopeo(argv: list[str], source: ParentSource, doing: str) -> str:
    try:
        return run(argv, timeout=TIMEOUT, merge_stderr=False).stdout
    except CommandError as exc:
        # skopeo wraps every registry error in the reference, which the message names already.
        reason = re.sub(r'^Error parsing image name "[^"]*": ', "", skopeo_message(exc))
        raise ParentError(f"{source.text}: {doing} failed: {reason}") from None


def resolve(source: ParentSource, *, tls_verify: bool) -> tuple[str, list[str]]:
    """(manifest digest, layer digests as the source lists them); refuses another
    architecture before anything is fetched."""
    info = json.loads(_skopeo(inspect_argv(source, tls_verify=tls_verify), source, "resolving"))
    arch, os_ = info.get("Architecture"), info.get("Os")
    if (arch, os_) != (ARCH, OS):
        raise ParentError(
            f"{source.text}: the image is {os_}/{arch}; vmbuild builds {OS}/{ARCH} containers"
        )
    return str(info["Digest"]), [str(x) for x in info.get("Layers") or []]


def _check(source: ParentSource, path: Path, listed: list[str]) -> FetchedParent:
    image = oci_layout.describe(path, TAG)
    for i, layer in enumerate(image.layers):
        if layer.media_type not in LAYER_TYPES:
            raise ParentError(
                f"{source.text}: layer {i} ({layer.digest}) has media type {layer.media_type!r}; "
                f"vmbuild unpacks {' and '.join(LAYER_TYPES)}"
            )
    got = [x.digest for x in image.layers]
    # A docker-archive lists uncompressed diff_ids; skopeo gzips them into the layout.
    if source.kind != "docker-archive" and listed and got != listed:
        raise ParentError(f"{source.text}: the fetched layers {got} are not the source's {listed}")
    config = json.loads((path / "blobs" / "sha256" / image.config_digest[7:]).read_text())
    if (config.get("architecture"), config.get("os")) != (ARCH, OS):
        raise ParentError(f"{source.text}: the image config is not {OS}/{ARCH}")
    return FetchedParent(source, "", path, image, dict(config.get("config") or {}))


def fetch(
    source: ParentSource, *, tls_verify: bool, on_status: Callable[[str], None] = lambda _: None
) -> FetchedParent:
    """The parent as a cached OCI layout, fetched once per manifest digest."""
    from vmbuild.stages.base_image import _lock

    digest, listed = resolve(source, tls_verify=tls_verify)
    root = cache_dir() / "parents"
    final = root / digest.replace(":", "-")
    with _lock(f"parent-{digest.replace(':', '-')}"):
        if not (final / "oci" / "index.json").is_file():
            on_status(f"fetching parent image {source.text} ({digest})")
            root.mkdir(parents=True, exist_ok=True)
            # Owned: if this process is SIGKILLed mid-copy, the next vmbuild command
            # removes the partial layout (it can be gigabytes).
            with (
                tempfile.TemporaryDirectory(prefix=".tmp-parent-", dir=root) as tmp,
                runs.owning(Path(tmp)),
            ):
                staged = Path(tmp) / "parent"
                staged.mkdir()
                argv = copy_argv(source, digest, staged / "oci", tls_verify=tls_verify)
                _skopeo(argv, source, "fetch")
                _check(source, staged / "oci", listed)  # refused: the temp dir goes
                os.replace(staged, final)
        fetched = _check(source, final / "oci", listed)
    return FetchedParent(source, digest, fetched.layout, fetched.image, fetched.config)


def copy_into(fetched: FetchedParent, dest: Path, tag: str) -> oci_layout.OciImage:
    """A build's own layout holding the parent image as `tag` (blobs hard-linked
    where the file system allows: they are content-addressed and never written)."""

    def link(src: str, dst: str) -> None:
        # index.json is rewritten by umoci below: only blobs are shared.
        if f"{os.sep}blobs{os.sep}" in src:
            try:
                os.link(src, dst)
                return
            except OSError:
                pass
        shutil.copy2(src, dst)

    shutil.copytree(fetched.layout, dest, copy_function=link)
    run(oci_layout.tag_argv(dest, TAG, tag), timeout=oci_layout.TIMEOUT)
    run(oci_layout.rm_argv(dest, TAG), timeout=oci_layout.TIMEOUT)
    return oci_layout.describe(dest, tag)
