"""Offline rebuild inputs without a VM: `bundle export --with-inputs` carries the recipe's
files and the signed index state (real Debian InRelease and Packages files from the host's
mirror), import refuses a tampered index file, and the host's own apt -- with Debian's
archive keyring, nothing trusted by hand -- reads the bundle's mirror served on 127.0.0.1
and downloads the bundled package from it. The rebuild's refusals (no inputs, an index
state other than the recorded one, a recipe file missing) name the bundle and the member
and leave nothing behind."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.supply import fake_artifact
from vmbuild.debian import index as apt
from vmbuild.debian.sources import host_debian_mirrors
from vmbuild.plan import BuildOptions
from vmbuild.rebuild import rebuild, unpack_inputs
from vmbuild.supply import signing
from vmbuild.supply.attest import attest
from vmbuild.supply.bundle import BundleError, export, import_bundle, verify_bundle_checked
from vmbuild.supply.inputs import list_name, recorded_files
from vmbuild.supply.mirror import OfflineMirror, mirror_key

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
SUITE = "bookworm-updates"  # small indexes; bookworm and -security are fetched by export


@dataclass(frozen=True)
class Exported:
    bundle: Path
    package: dict[str, str]  # the one real package the "build" installed
    deb_sha256: str
    mirror: str
    config: Path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dependency_free_package(mirror: str) -> tuple[bytes, bytes, dict[str, str]]:
    """InRelease, Packages.xz and the smallest package without dependencies of SUITE."""
    inrelease = apt.fetch_url(f"{mirror}/dists/{SUITE}/InRelease")
    release = apt.parse_release("InRelease", inrelease)
    name = "main/binary-amd64/Packages.xz"
    packages = apt.fetch_url(f"{mirror}/dists/{SUITE}/{name}")
    assert sha256(packages) == release.files[name][0]
    fields = ("Package", "Version", "Architecture", "Filename", "Size", "SHA256")
    free = [
        s
        for s in apt.iter_stanzas(apt._decompress(name, packages))
        if "Depends" not in s and "Pre-Depends" not in s
    ]
    best = min(free, key=lambda s: int(s["Size"]))
    return inrelease, packages, {k: best[k] for k in fields}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    tmp = tmp_path_factory.mktemp("offline")
    mirrors = host_debian_mirrors()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMBUILD_CACHE_DIR", str(tmp / "cache"))
        mp.setenv("VMBUILD_CONFIG_DIR", str(tmp / "config"))
        mp.delenv("VMBUILD_KMS_KEY", raising=False)
        mp.delenv("VMBUILD_OFFLINE", raising=False)
        signing.generate_local_key()
        # The recipe and the files it names.
        src = tmp / "src"
        (src / "tests").mkdir(parents=True)
        (src / "components").mkdir()
        (src / "recipe.yaml").write_text(
            "name: example-nginx\nversion: 1.0.0\nbase: debian-12\n"
            "components:\n  - name: components/hello.yaml\n"
            "tests:\n  - tests/test_image.py\n"
        )
        (src / "components" / "hello.yaml").write_text(
            "name: hello\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n"
            "      - name: hi\n        action: ExecuteBash\n        inputs:\n"
            "          commands: [echo hi]\n"
        )
        (src / "tests" / "test_image.py").write_text("def test_it(host):\n    assert host\n")
        # A cached base built from the host's mirrors.
        base_dir = tmp / "cache" / "bases" / "debian-12-abc"
        base_dir.mkdir(parents=True)
        (base_dir / "disk.qcow2").write_bytes(b"QFI\xfb base image")
        base_sha = sha256(b"QFI\xfb base image")
        (base_dir / "meta.json").write_text(json.dumps({
            "disk": "disk.qcow2", "format": "qcow2", "sha256": base_sha, "virtual_size": 1 << 30,
            "source": "debian-12", "release": "debian-12", "mirror": mirrors.mirror,
            "security_mirror": mirrors.security,
        }))  # fmt: skip
        # The host package cache as the build left it: SUITE's index and one package.
        inrelease, packages, pkg = _dependency_free_package(mirrors.mirror)
        acng = tmp / "cache" / "apt-cacher-ng" / "cache" / mirror_key(mirrors.mirror)
        dists = acng / "dists" / SUITE
        (dists / "main/binary-amd64").mkdir(parents=True)
        (dists / "InRelease").write_bytes(inrelease)
        (dists / "main/binary-amd64/Packages.xz").write_bytes(packages)
        deb = apt.fetch_url(f"{mirrors.mirror}/{pkg['Filename']}")
        assert sha256(deb) == pkg["SHA256"]
        (acng / pkg["Filename"]).parent.mkdir(parents=True)
        (acng / pkg["Filename"]).write_bytes(deb)
        # The build's signed manifest: this package, the recorded InRelease of SUITE.
        package = {"name": pkg["Package"], "version": pkg["Version"], "arch": pkg["Architecture"]}
        build_dir = fake_artifact(tmp / "images", packages=[package])
        manifest = json.loads((build_dir / "manifest.json").read_text())
        manifest["base"].update(sha256=base_sha, id="debian-12-abc")
        manifest["recipe"] = {
            "path": str(src / "recipe.yaml"),
            "sha256": sha256((src / "recipe.yaml").read_bytes()),
        }
        manifest["components"] = [{
            "name": "hello", "path": str(src / "components" / "hello.yaml"),
            "sha256": sha256((src / "components" / "hello.yaml").read_bytes()),
            "parameters": {}, "status": "success",
        }]  # fmt: skip
        manifest["apt_indexes"] = {list_name(mirrors.mirror, SUITE): sha256(inrelease)}
        manifest["recipe_files"] = recorded_files(src / "recipe.yaml")
        assert manifest["recipe_files"] == {
            "tests/test_image.py": sha256((src / "tests" / "test_image.py").read_bytes()),
            "components/hello.yaml": sha256((src / "components" / "hello.yaml").read_bytes()),
        }
        (build_dir / "manifest.json").write_text(json.dumps(manifest))
        attest(build_dir, manifest, signer=signing.local_signer(), signed_by="local")
        bundle = tmp / "full.tar"
        export(build_dir, bundle, with_inputs=True)
        yield Exported(bundle, package, pkg["SHA256"], mirrors.mirror, tmp / "config")


@pytest.fixture
def trust(exported: Exported, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The exporter's key trusted, and a private temp dir to find leftovers in."""
    monkeypatch.setenv("VMBUILD_CONFIG_DIR", str(exported.config))
    monkeypatch.delenv("VMBUILD_KMS_KEY", raising=False)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return scratch


def read_index(bundle: Path) -> dict[str, object]:
    with tarfile.open(bundle) as tar:
        fh = tar.extractfile("bundle.json")
        assert fh is not None
        data: dict[str, object] = json.load(fh)
        return data


def rewrite(src: Path, dst: Path, edit: dict[str, bytes | None], fix_index: bool) -> Path:
    """A copy of `src` with members replaced (bytes) or dropped (None); `fix_index`
    updates bundle.json to match, as an attacker who knows the format would."""
    with tarfile.open(src) as tar:
        entries = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]  # type: ignore[union-attr]
    index = json.loads(entries[0][1])
    out = []
    for info, data in entries[1:]:
        if info.name in edit:
            if edit[info.name] is None:
                continue
            data = edit[info.name]  # type: ignore[assignment]
        out.append((info, data))
    if fix_index:
        index["files"] = [
            {"path": i.name, "size": len(d), "sha256": sha256(d)} for i, d in out
        ]  # fmt: skip
    blob = json.dumps(index).encode()
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("bundle.json")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
        for info, data in out:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dst


def test_export_carries_the_recipe_files_and_the_signed_index_state(exported: Exported) -> None:
    index = read_index(exported.bundle)
    key = mirror_key(exported.mirror)
    files = {f["path"]: f["sha256"] for f in index["files"]}  # type: ignore[index, union-attr]
    inputs = sorted(p for p in files if p.startswith("inputs/"))
    for member in (
        "inputs/base/disk.qcow2",
        "inputs/recipe/recipe.yaml",
        "inputs/recipe/tests/test_image.py",
        "inputs/recipe/components/hello.yaml",
        f"inputs/mirror/{key}/dists/bookworm/InRelease",
        f"inputs/mirror/{key}/dists/bookworm/main/binary-amd64/Packages.xz",
        f"inputs/mirror/{key}/dists/{SUITE}/InRelease",
        f"inputs/mirror/{key}/dists/{SUITE}/main/binary-amd64/Packages.xz",
    ):
        assert member in inputs, member
    debs = [p for p in inputs if p.endswith(".deb")]
    assert len(debs) == 1 and files[debs[0]] == exported.deb_sha256
    assert debs[0].startswith(f"inputs/mirror/{key}/pool/")
    meta = index["inputs"]
    assert isinstance(meta, dict)
    assert meta["recipe"] == "inputs/recipe/recipe.yaml"
    assert meta["index_state"] == "recorded"
    assert meta["packages"] == 1 and meta["not_carried"] == 0
    suites = {s["suite"]: s for s in meta["suites"]}
    security = ["bookworm-security"] if host_debian_mirrors().security else []
    assert sorted(suites) == sorted(["bookworm", SUITE, *security])
    assert suites[SUITE]["from"] == "cache"  # the build's own copy, recorded digest
    assert suites["bookworm"]["from"] == "fetched"  # not in the cache: read from the mirror
    for suite in suites.values():
        assert files[suite["inrelease"]] == suite["inrelease_sha256"]


def test_a_tampered_index_file_is_refused_at_import(
    exported: Exported, trust: Path, tmp_path: Path
) -> None:
    member = f"inputs/mirror/{mirror_key(exported.mirror)}/dists/{SUITE}/InRelease"
    with tarfile.open(exported.bundle) as tar:
        data = tar.extractfile(member).read()  # type: ignore[union-attr]
    bad = rewrite(exported.bundle, tmp_path / "bad.tar", {member: data.replace(b"Date", b"Datf")}, False)  # fmt: skip
    store = tmp_path / "other" / "images"
    with pytest.raises(BundleError, match=f"{bad}: {member}: sha256 differs from bundle.json"):
        import_bundle(bad, store, None)
    assert not store.exists()


def test_hosts_apt_verifies_the_bundled_index_and_downloads_the_bundled_package(
    exported: Exported, trust: Path, tmp_path: Path
) -> None:
    checked = verify_bundle_checked(exported.bundle, None)
    listed = {e.path: e.sha256 for e in checked.index.entries}
    root = tmp_path / "unpacked"
    unpack_inputs(exported.bundle, listed, root)
    apt_root = tmp_path / "apt"
    for sub in ("lists/partial", "archives/partial", "etc/sources.list.d", "etc/preferences.d"):
        (apt_root / sub).mkdir(parents=True)
    (apt_root / "status").write_text("")  # nothing installed: the package is downloaded
    (apt_root / "etc" / "sources.list").write_text(
        f"deb [signed-by={KEYRING}] {exported.mirror} {SUITE} main\n"
    )
    with OfflineMirror(root / "inputs" / "mirror") as mirror:
        options = [
            "-o", f"Dir::Etc={apt_root / 'etc'}", "-o", f"Dir::State={apt_root}",
            "-o", f"Dir::State::status={apt_root / 'status'}", "-o", f"Dir::Cache={apt_root}",
            "-o", "Dir::Etc::trusted=/dev/null", "-o", "Dir::Etc::TrustedParts=/nonexistent",
            "-o", f"Acquire::http::Proxy=http://127.0.0.1:{mirror.port}",
            "-o", "Acquire::Languages=none", "-o", "Acquire::PDiffs=false",
            "-o", "APT::Architecture=amd64", "-o", "Debug::NoLocking=1",
            # The temp dirs are root's: apt's download sandbox user could not write them.
            "-o", "APT::Sandbox::User=root",
        ]  # fmt: skip
        update = subprocess.run(
            ["apt-get", *options, "update"], capture_output=True, text=True, timeout=120
        )
        pkg = exported.package
        install = subprocess.run(
            ["apt-get", *options, "install", "--download-only", "-y", "--no-install-recommends",
             f"{pkg['name']}={pkg['version']}"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        missing = list(mirror.missing)
    assert update.returncode == 0, update.stdout + update.stderr
    # Debian's keyring verified the bundled InRelease: no warning, nothing unauthenticated.
    assert "W:" not in update.stderr and "E:" not in update.stderr, update.stderr
    assert f"Get:1 {exported.mirror} {SUITE} InRelease" in update.stdout, update.stdout
    assert install.returncode == 0, install.stdout + install.stderr
    debs = list((apt_root / "archives").glob("*.deb"))
    assert len(debs) == 1 and sha256(debs[0].read_bytes()) == exported.deb_sha256
    assert missing == []


def test_a_bundle_without_inputs_is_refused(
    exported: Exported, trust: Path, tmp_path: Path
) -> None:
    plain = tmp_path / "plain.tar"
    export(fake_artifact(tmp_path / "images", build="20261130T120000Z-xyz789"), plain)
    with pytest.raises(BundleError, match=f"^{plain}: carries no inputs; nothing to rebuild"):
        rebuild(plain, BuildOptions(store=tmp_path / "out"), None, keys=None)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists() and list(trust.iterdir()) == []


def test_an_index_state_other_than_the_recorded_one_is_refused(
    exported: Exported, trust: Path, tmp_path: Path
) -> None:
    # Consistent with bundle.json (which is not signed): only the recorded digest in the
    # signed manifest tells it from the build's own.
    member = f"inputs/mirror/{mirror_key(exported.mirror)}/dists/{SUITE}/InRelease"
    with tarfile.open(exported.bundle) as tar:
        data = tar.extractfile(member).read()  # type: ignore[union-attr]
    bad = rewrite(exported.bundle, tmp_path / "moved.tar", {member: data + b"\n"}, True)
    with pytest.raises(BundleError, match=f"^{bad}: {member}: not the index state the build"):
        rebuild(bad, BuildOptions(store=tmp_path / "out"), None, keys=None)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists() and list(trust.iterdir()) == []


def test_an_index_its_inrelease_does_not_list_is_refused(
    exported: Exported, trust: Path, tmp_path: Path
) -> None:
    member = (
        f"inputs/mirror/{mirror_key(exported.mirror)}/dists/{SUITE}/main/binary-amd64/Packages.xz"
    )
    with tarfile.open(exported.bundle) as tar:
        data = tar.extractfile(member).read()  # type: ignore[union-attr]
    bad = rewrite(exported.bundle, tmp_path / "idx.tar", {member: data[:-1] + b"\0"}, True)
    with pytest.raises(BundleError, match=f"^{bad}: {member}: not the index its InRelease"):
        rebuild(bad, BuildOptions(store=tmp_path / "out"), None, keys=None)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists() and list(trust.iterdir()) == []


def test_a_recipe_file_other_than_the_signed_one_is_refused(
    exported: Exported, trust: Path, tmp_path: Path
) -> None:
    # bundle.json is not signed: the manifest's recipe_files digests are.
    member = "inputs/recipe/tests/test_image.py"
    evil = b"def test_it(host):\n    pass\n"
    bad = rewrite(exported.bundle, tmp_path / "evil.tar", {member: evil}, True)
    with pytest.raises(
        BundleError, match=f"^{bad}: {member}: missing or not the file the signed manifest"
    ):
        rebuild(bad, BuildOptions(store=tmp_path / "out"), None, keys=None)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists() and list(trust.iterdir()) == []


def test_a_recipe_file_missing_from_the_bundle_is_named(
    exported: Exported, trust: Path, tmp_path: Path
) -> None:
    member = "inputs/recipe/tests/test_image.py"
    bad = rewrite(exported.bundle, tmp_path / "short.tar", {member: None}, True)
    with pytest.raises(
        BundleError, match=f"^{bad}: {member}: missing from the bundle \\(the recipe's tests\\[0\\]"
    ):
        rebuild(bad, BuildOptions(store=tmp_path / "out"), None, keys=None)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists() and list(trust.iterdir()) == []
