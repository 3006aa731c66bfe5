"""The installed Debian packages of an OCI image, read from its layers on the host.

The image's SBOM describes the image as stored, not the builder it was made in: dpkg's
database (`var/lib/dpkg/status`) is taken from the topmost layer that has it, with the
layers' whiteouts applied (a component that removes the file, or replaces a directory
above it opaquely, hides the parent's copy). dpkg rewrites the whole file on every change,
so the topmost copy is the image's. The layers are streamed (gzip included) and the parent
layer is read only when no component touched dpkg's database.
"""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

from debian.deb822 import Deb822

from vmbuild.errors import VmbuildError
from vmbuild.manifest import Package
from vmbuild.oci import layout as oci_layout

log = logging.getLogger("vmbuild.oci.packages")

STATUS = "var/lib/dpkg/status"
# dpkg states in which the package's files are on disk (dpkg-query -W lists these too);
# not-installed and config-files leave only a database entry.
_ON_DISK = {"installed", "half-configured", "unpacked", "half-installed",
            "triggers-awaiting", "triggers-pending"}  # fmt: skip
_TAR_LAYERS = {
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
}


def _hidden_by(name: str) -> bool:
    """True if layer entry `name` is a whiteout of the status file or a directory above it,
    or an opaque marker on one of those directories (lower layers then do not count)."""
    parent, _, base = name.rpartition("/")
    if base == ".wh..wh..opq":
        return STATUS.startswith(parent + "/")
    if base.startswith(".wh."):
        hidden = f"{parent}/{base[4:]}" if parent else base[4:]
        return hidden == STATUS or STATUS.startswith(hidden + "/")
    return False


def _status_in_layer(blob: Path, media_type: str) -> tuple[bytes | None, bool]:
    """(the status file's bytes if this layer has it, whether it hides lower layers' copy)."""
    if media_type not in _TAR_LAYERS:
        raise VmbuildError(f"{blob}: layer media type {media_type} is not a tar vmbuild reads")
    hidden = False
    try:
        with tarfile.open(blob, mode="r|*") as tar:
            for member in tar:
                name = member.name.removeprefix("./").lstrip("/")
                if name == STATUS and member.isfile():
                    data = tar.extractfile(member)
                    # A file in a layer wins over a whiteout in the same layer (the
                    # whiteout applies to lower layers only).
                    return (data.read() if data is not None else b""), True
                hidden = hidden or _hidden_by(name)
    except (OSError, tarfile.TarError) as exc:
        raise VmbuildError(f"{blob}: unreadable layer ({exc})") from None
    return None, hidden


def dpkg_status(layout: Path, tag: str) -> bytes | None:
    """dpkg's status file as the image `tag` of `layout` has it; None when it has none."""
    image = oci_layout.describe(layout, tag)
    for layer in reversed(image.layers):
        algo, _, hexdigest = layer.digest.partition(":")
        found, hidden = _status_in_layer(layout / "blobs" / algo / hexdigest, layer.media_type)
        if found is not None:
            return found
        if hidden:
            return None
    return None


def parse_status(text: str) -> list[Package]:
    """The packages whose files are on disk, sorted by name and architecture, with the
    source package as dpkg-query's ${source:Package} ${source:Version} give it."""
    found = []
    for para in Deb822.iter_paragraphs(io.StringIO(text), use_apt_pkg=False):
        name, version = para.get("Package", ""), para.get("Version", "")
        state = para.get("Status", "").split()
        if not name or not version or len(state) != 3 or state[2] not in _ON_DISK:
            continue
        source, _, rest = para.get("Source", name).partition(" ")
        source_version = rest.strip().strip("()") or version
        found.append(Package(name, version, para.get("Architecture", ""), source, source_version))
    return sorted(found, key=lambda p: (p.name, p.arch))


def installed(layout: Path, tag: str) -> list[Package]:
    """The image's installed packages (empty for an image without dpkg, said in the
    log: an empty SBOM would otherwise read as "nothing installed")."""
    status = dpkg_status(layout, tag)
    if status is None:
        log.warning(
            "the image has no dpkg database (%s): its SBOMs list no packages, as vmbuild "
            "reads only dpkg's; packages installed another way (rpm, apk) are not in them",
            STATUS,
        )
        return []
    return parse_status(status.decode("utf-8", "replace"))
