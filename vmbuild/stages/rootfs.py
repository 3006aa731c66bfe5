"""The parent of a container build: the offline Debian root filesystem as a tarball.

The same mirror as the VM base, no kernel, bootloader or cloud-init: mmdebstrap's
`minbase` variant written straight to a tar (`--format=tar`), which becomes the
image's first layer unchanged. `--mode=auto` runs as root where vmbuild is root
and in a user namespace (`unshare`) where it is not, so no root is needed on the
host. Cached like the VM base, keyed by release, mirrors and method:
`cache_dir()/bases/rootfs-<release>-<key>/rootfs.tar`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vmbuild.debian.sources import apt_source_lines, mirrors_for
from vmbuild.digest import sha256_file
from vmbuild.errors import VmbuildError
from vmbuild.paths import cache_dir
from vmbuild.run import run, write_atomic
from vmbuild.stages.base_image import RELEASES, _lock

log = logging.getLogger("vmbuild.stages.rootfs")

METHOD_VERSION = 1
# The host's name and resolver would otherwise end up in every image.
CUSTOMIZE = 'rm -f "$1/etc/hostname" "$1/etc/resolv.conf"; echo localhost > "$1/etc/hostname"'


@dataclass(frozen=True)
class RootfsTar:
    id: str
    path: Path  # an uncompressed tarball, never written after it is cached
    sha256: str
    source: str


def mmdebstrap_argv(codename: str, out: Path, sources: list[str]) -> list[str]:
    return [
        "mmdebstrap", "--mode=auto", "--variant=minbase", "--format=tar",
        f"--customize-hook={CUSTOMIZE}", codename, str(out), *sources,
    ]  # fmt: skip


def cache_key(release: str, sources: list[str]) -> str:
    material = {"method": METHOD_VERSION, "release": release, "sources": sources,
                "customize": CUSTOMIZE}  # fmt: skip
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def debian_rootfs(
    release: str, *, mirror: str | None = None, on_status: Callable[[str], None] = lambda _: None
) -> RootfsTar:
    """The cached rootfs tarball of `release`, built with mmdebstrap if missing."""
    if release not in RELEASES:
        raise VmbuildError(f"unknown release {release!r}", hint=f"supported: {', '.join(RELEASES)}")
    codename = RELEASES[release]
    sources = apt_source_lines(mirrors_for(mirror, codename), codename)
    rootfs_id = f"rootfs-{release}-{cache_key(release, sources)[:16]}"
    final = cache_dir() / "bases" / rootfs_id
    source = f"{release} rootfs (mmdebstrap minbase; {sources[0]})"
    with _lock("rootfs-build"):
        meta_file = final / "meta.json"
        if meta_file.is_file() and (final / "rootfs.tar").is_file():
            meta = json.loads(meta_file.read_text())
            return RootfsTar(rootfs_id, final / "rootfs.tar", str(meta["sha256"]), source)
        on_status(f"mmdebstrap {codename} (minbase, tar) for the container parent")
        final.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".tmp-rootfs-", dir=final.parent) as tmp:
            staged = Path(tmp) / rootfs_id
            staged.mkdir()
            start = time.monotonic()
            run(mmdebstrap_argv(codename, staged / "rootfs.tar", sources), timeout=1800)
            digest = sha256_file(staged / "rootfs.tar")
            took = round(time.monotonic() - start, 1)
            write_atomic(
                staged / "meta.json",
                json.dumps({"sha256": digest, "source": source, "seconds": took}) + "\n",
            )
            os.replace(staged, final)
        log.info("rootfs %s built in %.1fs: %s", rootfs_id, took, shlex.quote(str(final)))
        return RootfsTar(rootfs_id, final / "rootfs.tar", digest, source)
