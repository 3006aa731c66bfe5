"""An OCI image layout on disk, written with umoci (Debian's `umoci`).

umoci is a maintained OCI tool that works without root or a daemon: layers
are appended verbatim (`umoci raw add-layer`, which gzips them and records a
history entry), the config's labels set with `umoci config`. Reading a layout
back (index -> manifest -> config) is plain JSON and done here, so what is
stored and tested is exactly what the files say.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmbuild.errors import VmbuildError
from vmbuild.run import run

TIMEOUT = 900.0


def image(layout: Path, tag: str) -> str:
    """umoci's image argument: PATH:TAG."""
    return f"{layout}:{tag}"


def init_argv(layout: Path) -> list[str]:
    return ["umoci", "init", "--layout", str(layout)]


def new_argv(layout: Path, tag: str) -> list[str]:
    return ["umoci", "new", "--image", image(layout, tag)]


def add_layer_argv(layout: Path, tag: str, layer_tar: Path, created_by: str) -> list[str]:
    return [
        "umoci", "raw", "add-layer", "--image", image(layout, tag),
        "--history.created_by", created_by, str(layer_tar),
    ]  # fmt: skip


def config_argv(
    layout: Path, tag: str, labels: Mapping[str, str], *, cmd: Sequence[str], workdir: str | None
) -> list[str]:
    """Labels are added to the config's (umoci keeps the others); Cmd and WorkingDir
    only where given (an OCI parent's stay)."""
    argv = ["umoci", "config", "--image", image(layout, tag), "--no-history"]
    for key, value in labels.items():
        argv += ["--config.label", f"{key}={value}"]
    argv += [f"--config.cmd={c}" for c in cmd]
    return argv if workdir is None else [*argv, "--config.workingdir", workdir]


def tag_argv(layout: Path, tag: str, new_tag: str) -> list[str]:
    return ["umoci", "tag", "--image", image(layout, tag), new_tag]


def rm_argv(layout: Path, tag: str) -> list[str]:
    return ["umoci", "rm", "--image", image(layout, tag)]


def gc_argv(layout: Path) -> list[str]:
    return ["umoci", "gc", "--layout", str(layout)]


def docker_archive_argv(layout: Path, tag: str, out: Path, reference: str) -> list[str]:
    """skopeo copies a layout's image to a `docker load`-able tarball."""
    return ["skopeo", "copy", "--quiet", f"oci:{layout}:{tag}", f"docker-archive:{out}:{reference}"]


@dataclass(frozen=True)
class Layer:
    digest: str  # sha256:... of the compressed blob
    size: int
    media_type: str
    created_by: str


@dataclass(frozen=True)
class OciImage:
    """One tagged image of a layout, as its JSON files say."""

    digest: str  # the manifest's: what registries and `@sha256:` references name
    config_digest: str
    layers: tuple[Layer, ...]
    labels: dict[str, str]
    tags: tuple[str, ...]  # every tag in the layout that names this manifest

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "config": self.config_digest,
            "tags": list(self.tags),
            "labels": self.labels,
            "layers": [
                {"digest": x.digest, "size": x.size, "media_type": x.media_type,
                 "created_by": x.created_by}
                for x in self.layers
            ],
        }  # fmt: skip


def _blob(layout: Path, digest: str) -> Any:
    algo, _, hexdigest = digest.partition(":")
    return json.loads((layout / "blobs" / algo / hexdigest).read_text())


def describe(layout: Path, tag: str) -> OciImage:
    """The image `tag` names in `layout`: manifest digest, layers, labels."""
    try:
        index = json.loads((layout / "index.json").read_text())
        entries = index["manifests"]
        by_tag = {
            str(m.get("annotations", {}).get("org.opencontainers.image.ref.name")): m
            for m in entries
        }
        if tag not in by_tag:
            raise VmbuildError(f"{layout}: no image tagged {tag!r}")
        digest = str(by_tag[tag]["digest"])
        manifest = _blob(layout, digest)
        config = _blob(layout, manifest["config"]["digest"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VmbuildError(f"{layout}: not a readable OCI layout ({exc})") from None
    history = [h for h in config.get("history", []) if not h.get("empty_layer")]
    layers = tuple(
        Layer(
            digest=str(entry["digest"]),
            size=int(entry["size"]),
            media_type=str(entry["mediaType"]),
            created_by=str(history[i].get("created_by", "")) if i < len(history) else "",
        )
        for i, entry in enumerate(manifest["layers"])
    )
    tags = tuple(sorted(t for t, m in by_tag.items() if m["digest"] == digest))
    labels = dict((config.get("config") or {}).get("Labels") or {})
    return OciImage(digest, str(manifest["config"]["digest"]), layers, labels, tags)


def create(layout: Path, tag: str) -> None:
    """An empty layout with one empty image `tag` (no layers yet)."""
    run(init_argv(layout), timeout=TIMEOUT)
    run(new_argv(layout, tag), timeout=TIMEOUT)


def add_layer(layout: Path, tag: str, layer_tar: Path, created_by: str) -> None:
    """Append an uncompressed layer tarball (umoci gzips it into a blob)."""
    run(add_layer_argv(layout, tag, layer_tar, created_by), timeout=TIMEOUT)


def finish(
    layout: Path, work_tag: str, tags: Sequence[str], labels: Mapping[str, str],
    workdir: str | None,
) -> OciImage:  # fmt: skip
    """Set the labels, give the image its tags, drop the work tag, collect garbage.
    `workdir` None: the config's Cmd and WorkingDir are the parent's, left alone;
    else Cmd is /bin/bash and WorkingDir `workdir` (a parent without a config)."""
    cmd = [] if workdir is None else ["/bin/bash"]
    run(config_argv(layout, work_tag, labels, cmd=cmd, workdir=workdir), timeout=TIMEOUT)
    for tag in tags:
        run(tag_argv(layout, work_tag, tag), timeout=TIMEOUT)
    run(rm_argv(layout, work_tag), timeout=TIMEOUT)
    run(gc_argv(layout), timeout=TIMEOUT)
    return describe(layout, tags[0])


def to_docker_archive(layout: Path, tag: str, out: Path, reference: str) -> None:
    run(docker_archive_argv(layout, tag, out, reference), timeout=TIMEOUT)


def check_blobs(layout: Path) -> None:
    """Raise VmbuildError naming the first blob whose sha256 is not its name (a layout is
    content-addressed: this needs no signature to catch a changed layer)."""
    from vmbuild.digest import sha256_file

    for blob in sorted((layout / "blobs" / "sha256").iterdir()):
        got = sha256_file(blob)
        if got != blob.name:
            raise VmbuildError(f"{blob}: content differs from its digest (sha256 {got[:16]}…)")
