"""Container recipes end to end in the shared guest (no VM of their own): the
offline Debian rootfs with two components is built into one layer per
component under chroot, its tests (component test phases, then the recipe's
testinfra file in the image's root over SSH: vmbuild.testing.chroot_ssh) pass,
it is stored, pushed to Debian's docker-registry on 127.0.0.1 and pulled back
by digest, and its layers, labels and files are checked. A failing test phase,
or a failing testinfra file, stores and pushes nothing and leaves nothing in
the guest. Later builds reuse the parent the first unpacked in the guest (the
upload and unpacking are ~150 s of the first under TCG): the registry parent's
test builds on a two-layer parent whose first layer is that same blob."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import REPO
from tests.support.registry import Registry, docker_registry
from tests.support.schemas import validator
from vmbuild import paths
from vmbuild.config.container import load_container_recipe
from vmbuild.container_build import build_container
from vmbuild.errors import StepFailed, TestsFailed
from vmbuild.oci import layout, registry
from vmbuild.plan import BuildOptions
from vmbuild.progress import NullReporter
from vmbuild.remote.ssh import SSHSession
from vmbuild.stages import rootfs
from vmbuild.stages.container import GUEST_DIR
from vmbuild.stages.store import builds
from vmbuild.supply.verify import verify_build

pytestmark = pytest.mark.vm

DATA = REPO / "tests" / "data" / "container"
REPOSITORY = "vmbuild/ctr-hello"


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory, guest: SSHSession) -> Iterator[Registry]:
    with docker_registry(tmp_path_factory.mktemp("registry")) as r:
        yield r
    # The unpacked parent is kept for the next build in a builder; not in the shared guest.
    guest.run(f"rm -rf {GUEST_DIR}")


def recipe(tmp_path: Path, reg: Registry, components: tuple[str, ...]) -> Path:
    for name in ("hello.yaml", "harden.yaml", "fails-test.yaml", "image_checks.py"):
        shutil.copy(DATA / name, tmp_path / name)
    text = (DATA / "recipe.yaml").read_text().replace("127.0.0.1:5000", reg.address)
    text = text.replace("  - name: harden.yaml\n", "".join(f"  - name: {c}\n" for c in components))
    (tmp_path / "recipe.yaml").write_text(text)
    return tmp_path / "recipe.yaml"


def guest_workspaces(guest: SSHSession) -> str:
    """Build directories and mounts left in the guest (the unpacked parent stays)."""
    return guest.run(f"ls -A {GUEST_DIR}/builds; grep -c {GUEST_DIR} /proc/mounts").stdout


def test_two_components_build_test_push_and_pull_back(
    tmp_path: Path, reg: Registry, guest: SSHSession
) -> None:
    loaded = load_container_recipe(recipe(tmp_path, reg, ("harden.yaml",)))
    store = tmp_path / "store"
    result = build_container(loaded, BuildOptions(store=store), NullReporter(), builder=guest)
    m = result.manifest
    assert [result.build_dir] == builds(store)
    assert m["kind"] == "container" and m["tests"]["status"] == "passed"
    assert list(validator("manifest.schema.json").iter_errors(m)) == []
    # The testinfra file ran in the image's root (cloud-init is the builder's, not the image's).
    assert m["tests"]["testinfra"] == {
        "tests": 3, "failures": 0, "errors": 0, "skipped": 0, "junit": "logs/junit.xml"
    }  # fmt: skip
    assert m["tests"]["components"] == [
        {"name": "hello", "status": "Success"}, {"name": "harden", "status": "Success"},
    ]  # fmt: skip
    image = result.image
    assert image.tags == ("1.0.0", "latest")
    created_by = [x.created_by for x in image.layers]
    assert len(created_by) == 3 and created_by[0].startswith("vmbuild parent debian-12 rootfs")
    docs = loaded.documents
    assert created_by[1:] == [f"vmbuild component hello ({docs[0].sha256[:12]})",
                              f"vmbuild component harden ({docs[1].sha256[:12]})"]  # fmt: skip
    assert image.labels["io.vmbuild.components"] == (
        f"hello@sha256:{docs[0].sha256},harden@sha256:{docs[1].sha256}"
    )
    assert image.labels["io.vmbuild.recipe"] == "ctr-hello"
    assert [(p.reference, p.skipped) for p in result.pushed] == [
        (reg.ref(REPOSITORY, "1.0.0"), False), (reg.ref(REPOSITORY, "latest"), False),
    ]  # fmt: skip
    assert m["distribution"]["digest"] == image.digest
    # The supply chain, as for VM images: SBOM packages from the image's own dpkg database,
    # the provenance names the OCI digest, and it verifies (the push verified it first).
    names = {p["name"] for p in m["packages"]}
    assert {"base-files", "dpkg", "bash"} <= names
    assert (
        json.loads((result.build_dir / "sbom.cdx.json").read_text())["metadata"]["component"][
            "purl"
        ]
        == f"pkg:oci/ctr-hello@{image.digest}"
    )
    report = verify_build(result.build_dir, None)
    assert report.signed is True
    assert report.subjects[f"oci-image:{reg.address}/{REPOSITORY}"] == image.digest[7:]

    pulled = tmp_path / "pulled"
    registry.pull(reg.ref(REPOSITORY, image.digest), pulled, "back", tls_verify=False)
    back = layout.describe(pulled, "back")
    assert (back.digest, back.labels) == (image.digest, image.labels)
    assert [x.digest for x in back.layers] == [x.digest for x in image.layers]
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{pulled}:back", str(bundle)], check=True
    )
    root = bundle / "rootfs"
    assert (root / "etc" / "vmbuild-hello").read_text() == "hi from vmbuild"
    assert not (root / "etc" / "motd").exists()  # a whiteout in harden's layer
    assert "\nsvc:" in (root / "etc" / "passwd").read_text()
    assert not (root / "etc" / "written-by-test").exists()  # tests write to a scratch layer
    listed = json.loads(
        subprocess.run(
            [str(REPO / ".venv" / "bin" / "vmbuild"), "images", "list", "--json",
             "--store", str(store)],
            check=True, capture_output=True, text=True,
        ).stdout
    )  # fmt: skip
    assert [(r["ref"], r["kind"], r["formats"]) for r in listed] == [
        (f"ctr-hello/1.0.0/{m['build']}", "container", ["oci", "docker-archive"])
    ]
    assert guest_workspaces(guest) == "0\n"


PROBE = """name: probe
description: records what the build sees of the parent (its whiteout and opaque directory)
schemaVersion: 1.0
phases:
  - name: build
    steps:
      - name: Record
        action: ExecuteBash
        inputs:
          commands:
            - (test -e /etc/issue && echo issue kept || echo issue gone; ls /usr/share/doc;
              cat /etc/vmbuild-parent) > /etc/vmbuild-probe
"""


def parent_image(tmp_path: Path, reg: Registry) -> layout.OciImage:
    """A two-layer parent pushed to the registry: the cached Debian rootfs (the same blob
    as a debian-12 build's parent, so a guest that unpacked it skips it), then a layer
    that deletes /etc/issue (a whiteout), makes /usr/share/doc opaque and adds a file."""
    top = tmp_path / "top.tar"
    with tarfile.open(top, "w") as tar:
        for name in ("etc", "usr", "usr/share", "usr/share/doc", "usr/share/doc/vmbuild-parent"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in (("etc/.wh.issue", b""), ("etc/vmbuild-parent", b"from parent\n"),
                           ("usr/share/doc/.wh..wh..opq", b""),
                           ("usr/share/doc/vmbuild-parent/README", b"readme\n")):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    oci, image = tmp_path / "parent-oci", f"{tmp_path / 'parent-oci'}:1"
    rootfs_tar = rootfs.debian_rootfs("debian-12").path
    for argv in (["init", "--layout", str(oci)], ["new", "--image", image],
                 ["raw", "add-layer", "--image", image, str(rootfs_tar)],
                 ["raw", "add-layer", "--image", image, str(top)],
                 ["config", "--image", image, "--config.env", "GREETING=parent",
                  "--config.entrypoint", "/bin/sh", "--config.cmd", "-c",
                  "--config.cmd", "echo $GREETING", "--config.workingdir", "/srv",
                  "--config.user", "nobody", "--config.label", "parent.label=kept"]):  # fmt: skip
        subprocess.run(["umoci", *argv], check=True, capture_output=True)
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{image}",
                    reg.ref("vmbuild/parent", "1")], check=True)  # fmt: skip
    return layout.describe(oci, "1")


def config_of(oci: Path, image: layout.OciImage) -> dict[str, object]:
    blob = oci / "blobs" / "sha256" / image.config_digest.removeprefix("sha256:")
    return dict(json.loads(blob.read_text())["config"])


def test_a_registry_parent_with_a_whiteout(
    tmp_path: Path, reg: Registry, guest: SSHSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers applied in order in the builder (whiteout, opaque dir), the parent's layers
    byte for byte under the components' and its config inherited."""
    parent = parent_image(tmp_path, reg)
    path = recipe(tmp_path, reg, ("probe.yaml",))
    (tmp_path / "probe.yaml").write_text(PROBE)
    ref = f"{reg.address}/vmbuild/parent:1"
    text = path.read_text().replace("vmbuild/ctr-hello", "vmbuild/ctr-parent")
    text = text.replace("tests: [image_checks.py]", "")
    path.write_text(
        text.replace("parentImage: debian-12", f"parentImage: {ref}\nparentTlsVerify: false")
    )
    # The fetched parent is cached by its digest (a new one each run): not in the user's cache.
    monkeypatch.setenv("VMBUILD_CACHE_DIR", str(tmp_path / "cache"))
    loaded = load_container_recipe(path)
    result = build_container(loaded, BuildOptions(store=tmp_path / "store"), NullReporter(),
                             builder=guest)  # fmt: skip
    m = result.manifest
    assert m["base"] == {"id": ref, "sha256": parent.digest[7:], "source": f"docker://{ref}",
                         "format": "oci"}  # fmt: skip
    assert list(validator("manifest.schema.json").iter_errors(m)) == []
    pulled = tmp_path / "pulled"
    registry.pull(reg.ref("vmbuild/ctr-parent", result.image.digest), pulled, "back",
                  tls_verify=False)  # fmt: skip
    back = layout.describe(pulled, "back")
    assert [x.digest for x in back.layers[:2]] == [x.digest for x in parent.layers]
    assert [x.created_by for x in back.layers[2:]] == [
        f"vmbuild component {d.name} ({d.sha256[:12]})" for d in loaded.documents
    ]
    # Env, Entrypoint, Cmd, WorkingDir, User and labels are the parent's; vmbuild's are added.
    inherited = config_of(tmp_path / "parent-oci", parent)
    config = config_of(pulled, back)
    assert {k: v for k, v in config.items() if k != "Labels"} == {
        k: v for k, v in inherited.items() if k != "Labels"
    }
    assert parent.labels.items() <= back.labels.items()
    assert back.labels["parent.label"] == "kept"
    assert back.labels["io.vmbuild.parent"] == f"{ref}@{parent.digest}"
    # The build saw the parent with its whiteout and opaque directory applied.
    probe_blob = pulled / "blobs" / "sha256" / back.layers[3].digest[7:]
    with tarfile.open(probe_blob) as tar:
        member = tar.extractfile("etc/vmbuild-probe")
        assert member is not None
        assert member.read() == b"issue gone\nvmbuild-parent\nfrom parent\n"
    assert guest_workspaces(guest) == "0\n"


def test_a_failing_test_phase_stores_and_pushes_nothing(
    tmp_path: Path, reg: Registry, guest: SSHSession
) -> None:
    path = recipe(tmp_path, reg, ("fails-test.yaml",))
    text = path.read_text().replace("vmbuild/ctr-hello", "vmbuild/ctr-fails")
    path.write_text(text.replace("layers: per-component", "layers: squash"))
    store = tmp_path / "store"
    with pytest.raises(StepFailed) as info:
        build_container(
            load_container_recipe(path), BuildOptions(store=store), NullReporter(), builder=guest
        )
    assert str(info.value) == (
        "component fails-test: step test/AlwaysFails failed:\n(stderr) expected failure"
    )
    assert builds(store) == [] and not (store / "ctr-hello").exists()
    assert registry.remote_digest(reg.ref("vmbuild/ctr-fails", "latest"), tls_verify=False) is None
    assert guest_workspaces(guest) == "0\n"


def test_a_failing_testinfra_file_stores_and_pushes_nothing(
    tmp_path: Path, reg: Registry, guest: SSHSession
) -> None:
    path = recipe(tmp_path, reg, ())
    path.write_text(
        path.read_text()
        .replace("vmbuild/ctr-hello", "vmbuild/ctr-testinfra")
        .replace("layers: per-component", "layers: squash")
    )
    (tmp_path / "image_checks.py").write_text(
        "def test_no_bash(host):\n    assert not host.package('bash').is_installed\n"
    )
    store = tmp_path / "store"
    with pytest.raises(TestsFailed) as info:
        build_container(
            load_container_recipe(path), BuildOptions(store=store), NullReporter(), builder=guest
        )
    assert str(info.value) == "image tests failed: 1 of 1 testinfra tests failed"
    assert builds(store) == []
    assert (
        registry.remote_digest(reg.ref("vmbuild/ctr-testinfra", "1.0.0"), tls_verify=False) is None
    )
    assert guest_workspaces(guest) == "0\n"
    # The failed build's logs are kept outside the store, with testinfra's report.
    saved = sorted((paths.state_dir() / "logs").glob("ctr-hello-*/testinfra.log"))
    assert saved and "test_no_bash" in saved[-1].read_text()
