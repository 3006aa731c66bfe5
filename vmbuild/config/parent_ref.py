"""What a container recipe's `parentImage` names: the syntax only, no fetching.

Read when the recipe is validated, before any side effect; vmbuild/oci/parent.py
resolves and fetches what it names, and says why this syntax (skopeo's own).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vmbuild.errors import VmbuildError

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REFERENCE = re.compile(
    rf"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*(?::[0-9]{{1,5}})?/)?{_COMPONENT}(?:/{_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"
)
_OCI_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

Kind = Literal["rootfs", "oci", "docker-archive", "docker"]


class ParentError(VmbuildError):
    """A parent image that cannot be used (the caller names file and field)."""


@dataclass(frozen=True)
class ParentSource:
    kind: Kind
    text: str  # as the recipe wrote it
    skopeo: str = ""  # the transport:reference skopeo reads; "" for the rootfs


def parse(text: str, base_dir: Path, releases: tuple[str, ...]) -> ParentSource:
    """What `parentImage` names; local paths resolved against the recipe's directory.
    Raises ParentError (no side effects beyond looking at the named path)."""
    if text in releases:
        return ParentSource("rootfs", text)
    if text.startswith("oci:"):
        where, tag = text[4:], ""
        head, sep, tail = where.rpartition(":")
        if sep and _OCI_TAG.match(tail):
            where, tag = head, tail
        path = (base_dir / where).resolve()
        if not (path / "index.json").is_file():
            raise ParentError(f"{path}: not an OCI image layout (no index.json)")
        return ParentSource("oci", text, f"oci:{path}" + (f":{tag}" if tag else ""))
    if text.startswith("docker-archive:"):
        path = (base_dir / text.removeprefix("docker-archive:")).resolve()
        if not path.is_file():
            raise ParentError(f"{path}: no such docker-archive file")
        return ParentSource("docker-archive", text, f"docker-archive:{path}")
    if text.startswith("arn:"):
        raise ParentError(
            f"{text!r}: an Image Builder image ARN names an image in AWS, which vmbuild cannot "
            "resolve; name its registry reference (the ECR URI) instead"
        )
    ref = text.removeprefix("docker://")
    if not REFERENCE.match(ref):
        raise ParentError(
            f"{text!r} is not a parent image: expected {', '.join(releases)}, oci:PATH[:TAG], "
            "docker-archive:PATH, docker://REF or a registry reference [HOST/]REPO[:TAG][@sha256:…]"
        )
    return ParentSource("docker", text, f"docker://{ref}")
