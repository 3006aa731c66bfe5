"""OCI images with real parts: umoci writes the layout, the guest's layer script
turns an overlayfs upper directory (whiteouts, an opaque directory) into a layer,
skopeo pushes to Debian's docker-registry on 127.0.0.1 and pulls back by digest.
The stages that need the builder VM are in tests/vm/test_container.py."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import BUILD_A, isolated_env, stored_build, vmbuild
from tests.support.registry import Registry, docker_registry
from vmbuild.errors import VmbuildError
from vmbuild.oci import layout, registry
from vmbuild.stages.container import MKLAYER

LABELS = {"io.vmbuild.recipe": "ctr-test", "io.vmbuild.components": "a@sha256:00,b@sha256:11"}


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with docker_registry(tmp_path_factory.mktemp("registry")) as r:
        yield r


def parent_tar(path: Path) -> Path:
    """A tiny root filesystem: /etc/motd, /etc/keep, /var/cache/old."""
    with tarfile.open(path, "w") as tar:
        for name in ("etc", "var", "var/cache"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in (("etc/motd", b"motd\n"), ("etc/keep", b"keep\n"),
                           ("var/cache/old", b"old\n")):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def overlay_upper(upper: Path) -> Path:
    """What overlayfs leaves after a component: a new file, a deleted file (a 0:0
    character device) and a directory replaced wholesale (opaque)."""
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "vmbuild-hello").write_text("hi\n")
    os.chown(upper / "etc" / "vmbuild-hello", 1234, 1234)
    os.mknod(upper / "etc" / "motd", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (upper / "var" / "cache").mkdir(parents=True)
    os.setxattr(upper / "var" / "cache", "trusted.overlay.opaque", b"y")
    (upper / "var" / "cache" / "new").write_text("new\n")
    (upper / "etc" / "link").symlink_to("vmbuild-hello")
    return upper


def test_an_overlay_upper_dir_becomes_an_oci_layer(tmp_path: Path) -> None:
    out = tmp_path / "layer.tar"
    upper = overlay_upper(tmp_path / "upper")
    subprocess.run([sys.executable, "-c", MKLAYER, str(upper), str(out)], check=True)
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == [
        "etc", "etc/.wh.motd", "etc/link", "etc/vmbuild-hello",
        "var", "var/cache", "var/cache/.wh..wh..opq", "var/cache/new",
    ]  # fmt: skip
    hello = members["etc/vmbuild-hello"]
    assert (hello.uid, hello.gid, hello.uname, hello.gname) == (1234, 1234, "", "")
    assert members["etc/link"].issym() and members["etc/link"].linkname == "vmbuild-hello"
    assert members["etc/.wh.motd"].isfile() and members["etc/.wh.motd"].size == 0


def build_image(tmp_path: Path) -> tuple[Path, layout.OciImage]:
    oci = tmp_path / "oci"
    layout.create(oci, "work")
    layout.add_layer(oci, "work", parent_tar(tmp_path / "parent.tar"), "vmbuild parent test")
    layer = tmp_path / "01.tar"
    upper = overlay_upper(tmp_path / "upper")
    subprocess.run([sys.executable, "-c", MKLAYER, str(upper), str(layer)], check=True)
    layout.add_layer(oci, "work", layer, "vmbuild component hello")
    return oci, layout.finish(oci, "work", ["latest", "1.0.0"], LABELS, "/tmp")


def test_layout_push_and_pull_back_by_digest(tmp_path: Path, reg: Registry) -> None:
    oci, image = build_image(tmp_path)
    assert image.tags == ("1.0.0", "latest")  # the work tag is gone
    assert [x.created_by for x in image.layers] == [
        "vmbuild parent test",
        "vmbuild component hello",
    ]
    assert image.labels == LABELS
    index = json.loads((oci / "index.json").read_text())
    assert len(index["manifests"]) == 2

    refs = [reg.ref("vmbuild/ctr-test", t) for t in ("latest", "1.0.0")]
    first = registry.push(oci, "latest", image.digest, refs, tls_verify=False)
    assert [(p.reference, p.skipped) for p in first] == [(refs[0], False), (refs[1], False)]
    again = registry.push(oci, "latest", image.digest, refs, tls_verify=False)
    assert [(p.reference, p.skipped) for p in again] == [(refs[0], True), (refs[1], True)]
    for ref in refs:
        assert registry.remote_digest(ref, tls_verify=False) == image.digest

    pulled = tmp_path / "pulled"
    registry.pull(reg.ref("vmbuild/ctr-test", image.digest), pulled, "back", tls_verify=False)
    back = layout.describe(pulled, "back")
    assert back.digest == image.digest
    assert [x.digest for x in back.layers] == [x.digest for x in image.layers]
    assert back.labels == LABELS
    # The layers apply as a container runtime would: the whiteouts hide the parent's files.
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{pulled}:back", str(bundle)], check=True
    )
    root = bundle / "rootfs"
    assert (root / "etc" / "vmbuild-hello").read_text() == "hi\n"
    assert (root / "etc" / "keep").read_text() == "keep\n"
    assert not (root / "etc" / "motd").exists()
    assert sorted(p.name for p in (root / "var" / "cache").iterdir()) == ["new"]


def test_a_refusing_registry_is_one_error_and_no_image(tmp_path: Path) -> None:
    oci, image = build_image(tmp_path / "img")
    with docker_registry(tmp_path / "ro", read_only=True) as ro:
        ref = ro.ref("vmbuild/ctr-test", "latest")
        with pytest.raises(VmbuildError) as info:
            registry.push(oci, "latest", image.digest, [ref], tls_verify=False)
        assert str(info.value).startswith(f"pushing to {ref} failed: ")
        assert registry.remote_digest(ref, tls_verify=False) is None


def test_references_that_do_not_resolve(tmp_path: Path, reg: Registry) -> None:
    missing = reg.ref("vmbuild/none", "missing")
    assert registry.remote_digest(missing, tls_verify=False) is None
    with pytest.raises(VmbuildError) as info:
        registry.pull(missing, tmp_path / "dest", "x", tls_verify=False)
    assert str(info.value).startswith(f"pulling {missing} failed: ")
    assert "manifest unknown" in str(info.value)
    assert not (tmp_path / "dest").exists()
    closed = f"docker://127.0.0.1:{_closed_port()}/vmbuild/none:x"
    with pytest.raises(VmbuildError) as info:
        registry.remote_digest(closed, tls_verify=False)
    assert str(info.value).startswith(f"{closed}: ")
    assert "connection refused" in str(info.value)


def _closed_port() -> int:
    from tests.support.motoext import free_port

    return free_port()  # bound and released: nothing listens there


def stored_container(tmp_path: Path, target: Registry) -> tuple[Path, layout.OciImage]:
    """A container image in the store, as a build leaves it (layout + manifest)."""
    oci, image = build_image(tmp_path / "img")
    build_dir = stored_build(
        tmp_path / "store", "ctr-test", "1.0.0", BUILD_A, kind="container",
        oci={**image.to_json(), "target": {"registry": target.address,
                                            "repository": "vmbuild/ctr-test", "tls_verify": False}},
    )  # fmt: skip
    shutil.move(oci, build_dir / "oci")
    return build_dir, image


def test_images_push_pushes_a_stored_image_again_only_where_missing(
    tmp_path: Path, reg: Registry
) -> None:
    build_dir, image = stored_container(tmp_path, reg)
    env = isolated_env(tmp_path)
    refs = [reg.ref("vmbuild/ctr-push", t) for t in ("1.0.0", "latest")]
    manifest = json.loads((build_dir / "manifest.json").read_text())
    manifest["oci"]["target"]["repository"] = "vmbuild/ctr-push"
    (build_dir / "manifest.json").write_text(json.dumps(manifest))
    # One tag is there already (an earlier push that stopped half way).
    registry.push(build_dir / "oci", "latest", image.digest, [refs[1]], tls_verify=False)
    proc = vmbuild(env, "images", "push", "ctr-test")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{refs[0]}@{image.digest}: pushed in ")
    assert lines[1:] == [f"{refs[1]}@{image.digest}: already there"]
    recorded = json.loads((build_dir / "manifest.json").read_text())["distribution"]
    assert (recorded["digest"], recorded["references"]) == (image.digest, refs)


def test_images_push_to_a_refusing_registry_is_one_error(tmp_path: Path) -> None:
    with docker_registry(tmp_path / "ro", read_only=True) as ro:
        build_dir, _ = stored_container(tmp_path, ro)
        proc = vmbuild(isolated_env(tmp_path), "images", "push", "ctr-test")
        ref = ro.ref("vmbuild/ctr-test", "1.0.0")
        assert proc.returncode == 1
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(f"error: pushing to {ref} failed: ")
        assert errors[0].endswith(": StatusCode: 405, Method not allowed"), errors[0]
        assert proc.stderr.endswith(
            "hint: the image stays in the store; `vmbuild images push IMAGE` pushes again "
            "only what is missing\n"
        )
        assert registry.remote_digest(ref, tls_verify=False) is None
    assert "distribution" not in json.loads((build_dir / "manifest.json").read_text())
