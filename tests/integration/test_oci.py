"""OCI images with real parts: umoci writes the layout, the guest's layer script
turns an overlayfs upper directory (whiteouts, an opaque directory) into a layer,
skopeo pushes to Debian's docker-registry on 127.0.0.1 and pulls back by digest.
The stages that need the builder VM are in tests/vm/test_container.py."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import isolated_env, vmbuild
from tests.support.oci import LABELS, PACKAGES, dpkg_image, stored_container
from tests.support.registry import Registry, docker_registry
from tests.support.supply import flip_byte
from vmbuild.digest import sha256_file
from vmbuild.errors import VmbuildError
from vmbuild.oci import layout, packages, registry
from vmbuild.stages.container import MKLAYER


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


def target(reg: Registry, repository: str = "vmbuild/ctr-test") -> dict[str, Any]:
    return {"service": "registry", "registry": reg.address, "repository": repository,
            "tls_verify": False}  # fmt: skip


def errors(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The CLI's error lines (stderr also carries the stage progress)."""
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture
def keyed_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The CLI's environment; the in-process signing uses the same config dir (key)."""
    monkeypatch.setenv("VMBUILD_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("VMBUILD_KMS_KEY", raising=False)
    return isolated_env(tmp_path, VMBUILD_CONFIG_DIR=str(tmp_path / "config"))


def test_packages_are_read_from_the_layers_with_whiteouts_applied(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def said() -> list[tuple[str, str]]:  # other loggers' records (commands run) aside
        return [
            (r.levelname, r.getMessage()) for r in caplog.records if r.name == packages.log.name
        ]

    oci, _ = dpkg_image(tmp_path / "a")
    assert [p.to_json() for p in packages.installed(oci, "latest")] == PACKAGES
    assert said() == []
    # A later layer that deletes dpkg's directory (a whiteout) leaves no package
    # database: an empty list, and the log says the SBOM cannot list packages.
    gone, _ = dpkg_image(tmp_path / "b", top={"var/lib/.wh.dpkg": b""})
    assert packages.installed(gone, "latest") == []
    assert said() == [
        ("WARNING", "the image has no dpkg database (var/lib/dpkg/status): its SBOMs list "
         "no packages, as vmbuild reads only dpkg's; packages installed another way (rpm, "
         "apk) are not in them"),
    ]  # fmt: skip
    # An opaque var/lib/dpkg with a new status file: that file is the image's.
    status = b"Package: only\nStatus: install ok installed\nArchitecture: all\nVersion: 1\n"
    opaque, _ = dpkg_image(
        tmp_path / "c",
        top={"var/lib/dpkg/.wh..wh..opq": b"", "var/lib/dpkg/status": status},
    )
    assert [p.to_json() for p in packages.installed(opaque, "latest")] == [
        {"name": "only", "version": "1", "arch": "all", "source": "only", "source_version": "1"}
    ]


def test_a_container_image_gets_valid_sboms_and_verifiable_provenance(
    tmp_path: Path, reg: Registry, keyed_env: dict[str, str]
) -> None:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    build_dir, image = stored_container(tmp_path, target(reg))
    cdx_text = (build_dir / "sbom.cdx.json").read_text()
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(cdx_text) is None
    cdx = json.loads(cdx_text)
    root = cdx["metadata"]["component"]
    assert (root["type"], root["purl"]) == (
        "container",
        f"pkg:oci/ctr-test@{image.digest}",
    )
    assert sorted(c["purl"] for c in cdx["components"]) == [
        "pkg:deb/debian/base-files@12.4%2Bdeb12u8?arch=amd64&distro=debian-12",
        "pkg:deb/debian/hello@2.10-3?arch=amd64&distro=debian-12",
        "pkg:deb/debian/libc6@2.36-9%2Bdeb12u9?arch=amd64&distro=debian-12",
    ]
    spdx = parse_file(str(build_dir / "sbom.spdx.json"))
    assert validate_full_spdx_document(spdx, "SPDX-2.3") == []
    assert sorted(p.name for p in spdx.packages) == ["base-files", "ctr-test", "hello", "libc6"]

    proc = vmbuild(keyed_env, "verify", "ctr-test", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["signed"] is True
    blobs = sorted(f"oci/blobs/sha256/{p.name}" for p in (build_dir / "oci/blobs/sha256").iterdir())
    assert sorted(report["subjects"]) == sorted([
        *blobs, "oci/index.json", "oci/oci-layout", "image.tar", "sbom.spdx.json",
        "sbom.cdx.json", "manifest.json", f"oci-image:{reg.address}/vmbuild/ctr-test",
    ])  # fmt: skip
    assert report["subjects"][f"oci-image:{reg.address}/vmbuild/ctr-test"] == (
        image.digest.removeprefix("sha256:")
    )


def test_a_changed_layer_blob_stops_the_push_before_any_registry_call(
    tmp_path: Path, reg: Registry, keyed_env: dict[str, str]
) -> None:
    build_dir, image = stored_container(tmp_path, target(reg, "vmbuild/ctr-tampered"))
    blob = build_dir / "oci" / "blobs" / "sha256" / image.layers[-1].digest.removeprefix("sha256:")
    flip_byte(blob, 10)
    for extra in ((), ("--allow-unsigned",)):  # a signed image is checked all the same
        proc = vmbuild(keyed_env, "images", "push", "ctr-test", *extra)
        assert proc.returncode == 1
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert errors == [f"error: {blob}: differs from the signed provenance "
                          f"(sha256 {sha256_file(blob)[:16]}…, signed "
                          f"{image.layers[-1].digest[7:23]}…)"], proc.stderr  # fmt: skip
    assert "ctr-tampered" not in (reg.storage.parent / "registry.log").read_text()
    proc = vmbuild(keyed_env, "verify", "ctr-test")
    assert proc.returncode == 1 and f"error: {blob}: differs" in proc.stderr


def test_an_unsigned_image_is_pushed_only_with_allow_unsigned(
    tmp_path: Path, reg: Registry, keyed_env: dict[str, str]
) -> None:
    build_dir, image = stored_container(tmp_path, target(reg, "vmbuild/unsigned"), sign=False)
    refused = vmbuild(keyed_env, "images", "push", "ctr-test")
    assert refused.returncode == 1
    assert errors(refused)[0].startswith(
        f"error: {build_dir / 'provenance.intoto.jsonl'}: no provenance (the artifact was never signed)"
    ), refused.stderr
    assert "vmbuild/unsigned" not in (reg.storage.parent / "registry.log").read_text()
    ok = vmbuild(keyed_env, "images", "push", "ctr-test", "--allow-unsigned")
    assert ok.returncode == 0, ok.stderr
    assert registry.remote_digest(reg.ref("vmbuild/unsigned", "1.0.0"), tls_verify=False) == (
        image.digest
    )
    # Without a signature the layout is still content-addressed: a changed blob is caught.
    blob = build_dir / "oci" / "blobs" / "sha256" / image.layers[0].digest.removeprefix("sha256:")
    flip_byte(blob, 10)
    again = vmbuild(keyed_env, "images", "push", "ctr-test", "--allow-unsigned")
    assert again.returncode == 1
    assert errors(again) == [
        f"error: {blob}: content differs from its digest (sha256 {sha256_file(blob)[:16]}…)"
    ], again.stderr


def test_images_push_pushes_a_stored_image_again_only_where_missing(
    tmp_path: Path, reg: Registry, keyed_env: dict[str, str]
) -> None:
    build_dir, image = stored_container(tmp_path, target(reg, "vmbuild/ctr-push"))
    env = keyed_env
    refs = [reg.ref("vmbuild/ctr-push", t) for t in ("1.0.0", "latest")]
    # One tag is there already (an earlier push that stopped half way).
    registry.push(build_dir / "oci", "latest", image.digest, [refs[1]], tls_verify=False)
    proc = vmbuild(env, "images", "push", "ctr-test")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{refs[0]}@{image.digest}: pushed in ")
    assert lines[1:] == [f"{refs[1]}@{image.digest}: already there"]
    recorded = json.loads((build_dir / "manifest.json").read_text())["distribution"]
    assert (recorded["digest"], recorded["references"]) == (image.digest, refs)


def test_images_push_to_a_refusing_registry_is_one_error(
    tmp_path: Path, keyed_env: dict[str, str]
) -> None:
    with docker_registry(tmp_path / "ro", read_only=True) as ro:
        build_dir, _ = stored_container(tmp_path, target(ro))
        proc = vmbuild(keyed_env, "images", "push", "ctr-test")
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
