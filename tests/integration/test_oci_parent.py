"""A container recipe's OCI parent, host side, with real parts: umoci makes a
two-layer parent (a file deleted by a whiteout, an opaque directory), skopeo
pushes it to Debian's docker-registry on 127.0.0.1 and vmbuild fetches it back
(registry reference, OCI layout, docker-archive) into its cache by digest.
Refusals (an unresolvable reference, another architecture, zstd layers) are one
error naming recipe and field, and leave nothing in the cache. The guest side
(the layers stacked in the builder) is in tests/vm/test_container.py."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.registry import Registry, docker_registry
from vmbuild.config.container import load_container_recipe
from vmbuild.container_build import WORK_TAG, Parent, _parent, labels
from vmbuild.errors import ConfigError
from vmbuild.oci import layout, parent
from vmbuild.plan import BuildOptions
from vmbuild.progress import NullReporter
from vmbuild.stages.container import WHITEOUTS

DATA = Path(__file__).parents[1] / "data" / "container"
CONFIG = {"Env": ["PATH=/usr/bin:/bin", "FOO=bar"], "Cmd": ["/bin/true"],
          "Entrypoint": ["/bin/sh", "-c"], "WorkingDir": "/srv", "User": "1000",
          "Labels": {"parent.label": "kept"}}  # fmt: skip


def layer_tar(path: Path, entries: dict[str, bytes | None]) -> Path:
    """A layer tarball: name -> file content, None for a directory."""
    with tarfile.open(path, "w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def make_parent(where: Path, *, arch: str = "amd64") -> Path:
    """Layer 1 /etc/motd, /etc/keep, /srv/old; layer 2 deletes /etc/motd, makes /srv opaque."""
    where.mkdir(parents=True, exist_ok=True)
    oci = where / "oci"
    one = layer_tar(where / "1.tar", {"etc": None, "etc/motd": b"motd\n", "etc/keep": b"k\n",
                                      "srv": None, "srv/old": b"old\n"})  # fmt: skip
    two = layer_tar(where / "2.tar", {"etc": None, "etc/.wh.motd": b"", "srv": None,
                                      "srv/.wh..wh..opq": b"", "srv/new": b"new\n"})  # fmt: skip
    image = f"{oci}:1"
    for argv in (["init", "--layout", str(oci)], ["new", "--image", image],
                 ["raw", "add-layer", "--image", image, str(one)],
                 ["raw", "add-layer", "--image", image, str(two)],
                 ["config", "--image", image, "--architecture", arch, "--config.user", "1000",
                  "--config.env", "PATH=/usr/bin:/bin", "--config.env", "FOO=bar",
                  "--config.cmd", "/bin/true", "--config.entrypoint", "/bin/sh",
                  "--config.entrypoint", "-c", "--config.workingdir", "/srv",
                  "--config.label", "parent.label=kept"]):  # fmt: skip
        subprocess.run(["umoci", *argv], check=True, capture_output=True)
    return oci


def skopeo(*args: str) -> None:
    subprocess.run(["skopeo", "copy", "--quiet", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with docker_registry(tmp_path_factory.mktemp("registry")) as r:
        yield r


@pytest.fixture(scope="module")
def pushed(reg: Registry, tmp_path_factory: pytest.TempPathFactory) -> layout.OciImage:
    oci = make_parent(tmp_path_factory.mktemp("parent"))
    skopeo("--dest-tls-verify=false", f"oci:{oci}:1", reg.ref("base/two", "1"))
    return layout.describe(oci, "1")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMBUILD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def recipe(tmp_path: Path, parent_image: str) -> Path:
    for name in ("hello.yaml", "harden.yaml", "image_checks.py"):
        (tmp_path / name).write_bytes((DATA / name).read_bytes())
    text = (DATA / "recipe.yaml").read_text()
    text = text.replace("parentImage: debian-12", f"parentImage: '{parent_image}'\n"
                        "parentTlsVerify: false")  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(text)
    return tmp_path / "recipe.yaml"


def build_layout(tmp_path: Path, parent_image: str) -> tuple[Path, Parent]:
    tmp_path.mkdir(exist_ok=True)
    loaded = load_container_recipe(recipe(tmp_path, parent_image))
    out = tmp_path / "build-oci"
    return out, _parent(loaded, out, BuildOptions(store=tmp_path / "store"), NullReporter())


def cached(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "parents").iterdir()) if cache.exists() else []


def test_a_registry_parent_is_fetched_once_by_digest_layers_unchanged(
    tmp_path: Path, reg: Registry, pushed: layout.OciImage, cache: Path
) -> None:
    ref = f"{reg.address}/base/two:1"
    out, got = build_layout(tmp_path, ref)
    image = layout.describe(out, WORK_TAG)
    assert [x.digest for x in image.layers] == [x.digest for x in pushed.layers]
    assert (got.id, got.sha256, got.source, got.format) == (
        ref,
        pushed.digest[7:],
        f"docker://{ref}",
        "oci",
    )
    assert cached(cache) == [f"sha256-{pushed.digest[7:]}"]
    # Blobs are shared with the cache, the index is the build's own.
    blob = pushed.layers[0].digest[7:]
    cache_layout = cache / "parents" / f"sha256-{pushed.digest[7:]}" / "oci"
    assert (out / "blobs/sha256" / blob).stat().st_ino == (
        cache_layout / "blobs/sha256" / blob
    ).stat().st_ino
    assert layout.describe(cache_layout, parent.TAG).digest == pushed.digest

    # A second build finds it cached: the registry is asked for no layer again.
    def layer_gets() -> int:
        log = (reg.storage.parent / "registry.log").read_text()
        return sum(log.count(f'"GET /v2/base/two/blobs/{x.digest} ') for x in pushed.layers)

    assert layer_gets() == 2
    # The image is copied by the digest the tag resolved to, not by the tag again (a
    # tag moved in between must not put another image into this digest's cache dir).
    manifest_get = f'"GET /v2/base/two/manifests/{pushed.digest} '
    assert manifest_get in (reg.storage.parent / "registry.log").read_text()
    build_layout(tmp_path / "again", ref)
    assert layer_gets() == 2

    # The image keeps the parent's config; vmbuild's labels are added to the parent's.
    layer = layer_tar(tmp_path / "c.tar", {"etc": None, "etc/hello": b"hi\n"})
    layout.add_layer(out, WORK_TAG, layer, "vmbuild component hello")
    loaded = load_container_recipe(tmp_path / "recipe.yaml")
    final = layout.finish(out, WORK_TAG, ["1.0.0"], labels(loaded, "b1", got), None)
    assert [x.digest for x in final.layers][:2] == [x.digest for x in pushed.layers]
    assert len(final.layers) == 3
    assert final.labels["parent.label"] == "kept"
    assert final.labels["io.vmbuild.parent"] == f"{ref}@{pushed.digest}"
    config = json.loads((out / "blobs/sha256" / final.config_digest[7:]).read_text())["config"]
    assert {k: config[k] for k in CONFIG if k != "Labels"} == {
        k: v for k, v in CONFIG.items() if k != "Labels"
    }


def test_oci_layout_and_docker_archive_parents(
    tmp_path: Path, pushed: layout.OciImage, cache: Path
) -> None:
    oci = make_parent(tmp_path / "src")
    source = layout.describe(oci, "1")
    out, got = build_layout(tmp_path / "a", f"oci:{oci}:1")
    assert got.sha256 == source.digest[7:]
    assert [x.digest for x in layout.describe(out, WORK_TAG).layers] == [
        x.digest for x in source.layers
    ]
    archive = tmp_path / "saved.tar"
    skopeo(f"oci:{oci}:1", f"docker-archive:{archive}:base/two:1")
    out, got = build_layout(tmp_path / "b", f"docker-archive:{archive}")
    image = layout.describe(out, WORK_TAG)
    assert got.format == "oci" and len(image.layers) == 2
    # The archive's layers are uncompressed: skopeo gzips them; the content is the same.
    diff_ids = json.loads((out / "blobs/sha256" / image.config_digest[7:]).read_text())
    with tarfile.open(archive) as tar:
        saved = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = json.load(tar.extractfile(saved[0]["Config"]))  # type: ignore[arg-type]
    assert diff_ids["rootfs"]["diff_ids"] == config["rootfs"]["diff_ids"]
    assert len(cached(cache)) == 2


def test_refusals_name_the_recipe_field_and_leave_nothing(
    tmp_path: Path, reg: Registry, pushed: layout.OciImage, cache: Path
) -> None:
    def refused(where: str, parent_image: str) -> str:
        with pytest.raises(ConfigError) as info:
            build_layout(tmp_path / where, parent_image)
        assert not (tmp_path / where / "build-oci").exists()
        return str(info.value)

    path = tmp_path / "a" / "recipe.yaml"
    assert refused("a", f"{reg.address}/base/missing:1") == (
        f"{path}: parentImage: {reg.address}/base/missing:1: resolving failed: reading manifest "
        f"1 in {reg.address}/base/missing: manifest unknown: manifest unknown"
    )
    arm = make_parent(tmp_path / "arm", arch="arm64")
    assert refused("b", f"oci:{arm}:1") == (
        f"{tmp_path}/b/recipe.yaml: parentImage: oci:{arm}:1: the image is linux/arm64; "
        "vmbuild builds linux/amd64 containers"
    )
    zstd = tmp_path / "zstd"
    skopeo("--dest-compress-format=zstd", f"oci:{make_parent(tmp_path / 'z')}:1", f"oci:{zstd}:1")
    message = refused("c", f"oci:{zstd}:1")
    assert message.startswith(f"{tmp_path}/c/recipe.yaml: parentImage: oci:{zstd}:1: layer 0 (")
    assert message.endswith(
        "has media type 'application/vnd.oci.image.layer.v1.tar+zstd'; vmbuild unpacks "
        "application/vnd.oci.image.layer.v1.tar and application/vnd.oci.image.layer.v1.tar+gzip"
    )
    assert cached(cache) == []  # nothing fetched is kept, not even a temp dir


def test_the_guest_whiteout_script_makes_overlayfs_whiteouts(tmp_path: Path) -> None:
    """What the builder runs after unpacking a parent layer (as root, as here)."""
    root = tmp_path / "layer"
    (root / "etc").mkdir(parents=True)
    (root / "srv").mkdir()
    for name in ("etc/.wh.motd", "srv/.wh..wh..opq", "srv/new", "etc/.wh.again", "etc/again"):
        (root / name).write_text("")
    found = subprocess.run(["find", str(root), "-name", ".wh.*", "-print0"],
                           check=True, capture_output=True).stdout  # fmt: skip
    subprocess.run(["python3", "-c", WHITEOUTS], input=found, check=True)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == [
        "etc", "etc/again", "etc/motd", "srv", "srv/new"
    ]  # fmt: skip
    motd = os.lstat(root / "etc" / "motd")
    assert stat.S_ISCHR(motd.st_mode) and motd.st_rdev == 0
    assert stat.S_ISREG(os.lstat(root / "etc" / "again").st_mode)
    assert os.getxattr(root / "srv", "trusted.overlay.opaque") == b"y"


def test_the_guest_whiteout_script_removes_aufs_metadata(tmp_path: Path) -> None:
    """Older Docker Hub layers carry aufs metadata: .wh..wh.plnk/ and .wh..wh.orph/
    (directories, possibly not empty) and .wh..wh.aufs (a file). They go, and make
    neither a whiteout nor an error; real whiteouts beside them still work."""
    root = tmp_path / "layer"
    (root / ".wh..wh.plnk" / "sub").mkdir(parents=True)
    (root / ".wh..wh.plnk" / "sub" / ".wh.x").write_text("")
    (root / ".wh..wh.plnk" / "1234.5678").write_text("hard link store")
    (root / ".wh..wh.orph").mkdir()
    (root / "etc").mkdir()
    for name in (".wh..wh.aufs", "etc/.wh.motd", "etc/keep"):
        (root / name).write_text("")
    found = subprocess.run(["find", str(root), "-name", ".wh.*", "-print0"],
                           check=True, capture_output=True).stdout  # fmt: skip
    subprocess.run(["python3", "-c", WHITEOUTS], input=found, check=True)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == [
        "etc", "etc/keep", "etc/motd"
    ]  # fmt: skip
    assert stat.S_ISCHR(os.lstat(root / "etc" / "motd").st_mode)
