"""Container recipes end to end in the shared guest (no VM of their own): the
offline Debian rootfs with two components is built into one layer per
component under chroot, its tests (component test phases, then the recipe's
testinfra file in the image's root over SSH: vmbuild.testing.chroot_ssh) pass,
it is stored, pushed to Debian's docker-registry on 127.0.0.1 and pulled back
by digest, and its layers, labels and files are checked. A failing test phase,
or a failing testinfra file, stores and pushes nothing and leaves nothing in
the guest. Later builds reuse the parent the first unpacked in the guest (the
upload and unpacking are ~150 s of the first under TCG)."""

from __future__ import annotations

import json
import shutil
import subprocess
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
