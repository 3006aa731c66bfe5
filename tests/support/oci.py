"""Container images as a build leaves them in the store, made without a VM: umoci writes
the layout (a parent with dpkg's database, a component layer from the guest's layer
script), skopeo the docker-archive, and the image is signed as a build signs it."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

from tests.support.cli import BUILD_A, stored_build
from vmbuild.digest import sha256_file
from vmbuild.oci import layout, packages
from vmbuild.stages.container import MKLAYER

LABELS = {"io.vmbuild.recipe": "ctr-test", "io.vmbuild.components": "a@sha256:00,b@sha256:11"}

STATUS_PARENT = """Package: libc6
Status: install ok installed
Architecture: amd64
Source: glibc (2.36-9+deb12u9)
Version: 2.36-9+deb12u9

Package: base-files
Status: install ok installed
Architecture: amd64
Version: 12.4+deb12u8

Package: oldpkg
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0-1
"""
# What the component's apt run leaves: dpkg rewrites the whole file.
STATUS_AFTER = (
    STATUS_PARENT
    + """
Package: hello
Status: install ok installed
Architecture: amd64
Version: 2.10-3
"""
)
PACKAGES = [
    {"name": "base-files", "version": "12.4+deb12u8", "arch": "amd64",
     "source": "base-files", "source_version": "12.4+deb12u8"},
    {"name": "hello", "version": "2.10-3", "arch": "amd64",
     "source": "hello", "source_version": "2.10-3"},
    {"name": "libc6", "version": "2.36-9+deb12u9", "arch": "amd64",
     "source": "glibc", "source_version": "2.36-9+deb12u9"},
]  # fmt: skip


def tar_of(path: Path, files: dict[str, bytes]) -> Path:
    """A layer tarball holding `files` (parent directories added, 0755)."""
    with tarfile.open(path, "w") as tar:
        dirs = sorted(
            {"/".join(n.split("/")[:i]) for n in files for i in range(1, n.count("/") + 1)}
        )
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def dpkg_image(tmp_path: Path, top: dict[str, bytes] | None = None) -> tuple[Path, layout.OciImage]:
    """A layout as a container build leaves it, made without a VM: a parent with dpkg's
    database, and a component layer (written by the guest's layer script) that rewrote it."""
    oci = tmp_path / "oci"
    layout.create(oci, "work")
    parent = {"etc/motd": b"motd\n", "var/lib/dpkg/status": STATUS_PARENT.encode()}
    layout.add_layer(oci, "work", tar_of(tmp_path / "parent.tar", parent), "vmbuild parent test")
    upper = tmp_path / "upper"
    (upper / "var" / "lib" / "dpkg").mkdir(parents=True)
    (upper / "var" / "lib" / "dpkg" / "status").write_text(STATUS_AFTER)
    layer = tmp_path / "01.tar"
    subprocess.run([sys.executable, "-c", MKLAYER, str(upper), str(layer)], check=True)
    layout.add_layer(oci, "work", layer, "vmbuild component hello")
    if top is not None:
        layout.add_layer(oci, "work", tar_of(tmp_path / "02.tar", top), "vmbuild component top")
    return oci, layout.finish(oci, "work", ["1.0.0", "latest"], LABELS, "/tmp")


def stored_container(
    tmp_path: Path, target: dict[str, Any], *, sign: bool = True
) -> tuple[Path, layout.OciImage]:
    """A container image in the store as a build leaves it: layout, docker-archive, the
    packages read from its layers, and (unless `sign` is false) both SBOMs and the
    provenance signed with the local key of `$VMBUILD_CONFIG_DIR`; `target` is the
    manifest's oci.target (where `images push` sends it)."""
    from vmbuild.supply import signing
    from vmbuild.supply.attest import attest

    oci, image = dpkg_image(tmp_path / "img")
    archive = tmp_path / "img" / "image.tar"
    layout.to_docker_archive(oci, "1.0.0", archive, "ctr-test:1.0.0")
    build_dir = stored_build(
        tmp_path / "store", "ctr-test", "1.0.0", BUILD_A, kind="container",
        base={"id": "rootfs-debian-12-0123456789abcdef", "sha256": "cd" * 32,
              "source": "debian-12 rootfs", "format": "rootfs-tar"},
        outputs=[{"format": "oci", "file": "oci", "sha256": image.digest.removeprefix("sha256:"),
                  "size": 1},
                 {"format": "docker-archive", "file": "image.tar", "sha256": sha256_file(archive),
                  "size": archive.stat().st_size}],
        packages=[p.to_json() for p in packages.installed(oci, "1.0.0")],
        oci={**image.to_json(), "target": target},
    )  # fmt: skip
    (build_dir / "ctr-test.qcow2").unlink()
    shutil.move(oci, build_dir / "oci")
    shutil.move(archive, build_dir / "image.tar")
    if sign:
        if signing.local_signer() is None:
            signing.generate_local_key()
        signer, label = signing.default_signer()
        manifest = json.loads((build_dir / "manifest.json").read_text())
        result = attest(build_dir, manifest, signer=signer, signed_by=label)
        manifest["provenance"] = result.to_json()
        (build_dir / "manifest.json").write_text(json.dumps(manifest))
    return build_dir, image
