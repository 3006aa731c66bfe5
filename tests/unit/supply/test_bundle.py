"""Bundles: export, verify, import into a second store; every bad bundle is one clear error
and leaves the store untouched."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.supply import fake_artifact
from vmbuild.errors import VmbuildError
from vmbuild.supply import PROVENANCE, signing
from vmbuild.supply.bundle import BundleError, export, import_bundle, verify_bundle
from vmbuild.supply.signing import KeyPaths, VerificationFailed
from vmbuild.supply.verify import verify_build


@pytest.fixture
def bundle(local_key: KeyPaths, store: Path, tmp_path: Path) -> Path:
    out = tmp_path / "example.tar"
    export(fake_artifact(store), out)
    return out


@pytest.fixture
def other_store(tmp_path: Path) -> Path:
    return tmp_path / "other" / "images"


def members(path: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(path) as tar:
        return [
            (m, tar.extractfile(m).read() if m.isreg() else None)  # type: ignore[union-attr]
            for m in tar.getmembers()
        ]


def rewrite(
    src: Path, dst: Path, edit: Callable[[list[tuple[tarfile.TarInfo, bytes | None]]], None]
) -> Path:
    entries = members(src)
    edit(entries)
    with tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return dst


def add(entries: list[tuple[tarfile.TarInfo, bytes | None]], name: str, **kw: object) -> None:
    info = tarfile.TarInfo(name)
    data = kw.pop("data", None)
    for key, value in kw.items():
        setattr(info, key, value)
    entries.append((info, data))  # type: ignore[arg-type]


def assert_untouched(store: Path) -> None:
    assert not store.exists() or list(store.rglob("*")) == []


def test_round_trip_into_a_second_store(bundle: Path, other_store: Path, store: Path) -> None:
    names = [m.name for m, _ in members(bundle)]
    assert names[0] == "bundle.json"
    assert set(names[1:]) == {
        "artifact/manifest.json", "artifact/provenance.intoto.jsonl",
        "artifact/sbom.spdx.json", "artifact/sbom.cdx.json", "artifact/disk.qcow2",
    }  # fmt: skip
    report = verify_bundle(bundle, None)
    assert report["signed"] and report["ref"] == "example-nginx/1.0.0/20261130T120000Z-abc123"
    build_dir = import_bundle(bundle, other_store, None)
    assert build_dir == other_store / "example-nginx" / "1.0.0" / "20261130T120000Z-abc123"
    original = store / "example-nginx" / "1.0.0" / "20261130T120000Z-abc123"
    for name in ("disk.qcow2", "manifest.json", PROVENANCE):
        assert (build_dir / name).read_bytes() == (original / name).read_bytes()
    assert verify_build(build_dir, None).signed
    assert [p.name for p in other_store.rglob(".staging-*")] == []
    with pytest.raises(BundleError, match="already in"):
        import_bundle(bundle, other_store, None)


def tamper_disk(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    for i, (info, data) in enumerate(entries):
        if info.name == "artifact/disk.qcow2" and data is not None:
            entries[i] = (info, data[:500] + bytes([data[500] ^ 1]) + data[501:])


def resign_index(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    """The attacker also fixes bundle.json's checksums: only the signature can catch it."""
    import hashlib

    index = json.loads(entries[0][1] or b"")
    data = dict((i.name, d) for i, d in entries)
    for f in index["files"]:
        f["sha256"] = hashlib.sha256(data[f["path"]] or b"").hexdigest()
    entries[0] = (entries[0][0], json.dumps(index).encode())


BAD = {
    "a tampered disk": (tamper_disk, BundleError, "artifact/disk.qcow2: sha256 differs from bundle.json"),
    "a tampered disk with a fixed-up index": (
        lambda e: (tamper_disk(e), resign_index(e)), VerificationFailed,
        "artifact/disk.qcow2: differs from the signed provenance",
    ),
    "a ../ path": (lambda e: add(e, "artifact/../../evil", data=b"x"), BundleError, "escapes the bundle"),
    "an absolute path": (lambda e: add(e, "/etc/cron.d/evil", data=b"x"), BundleError, "absolute path"),
    "a symlink": (
        lambda e: add(e, "artifact/link", type=tarfile.SYMTYPE, linkname="/etc/shadow"),
        BundleError, "is a link",
    ),
    "a hard link": (
        lambda e: add(e, "artifact/hard", type=tarfile.LNKTYPE, linkname="artifact/disk.qcow2"),
        BundleError, "is a link",
    ),
    "a device file": (
        lambda e: add(e, "artifact/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0),
        BundleError, "device, FIFO or other special file",
    ),
    "a FIFO": (lambda e: add(e, "artifact/fifo", type=tarfile.FIFOTYPE), BundleError, "special file"),
    "an unlisted file": (lambda e: add(e, "artifact/extra", data=b"x"), BundleError, "disagree"),
    "no index first": (lambda e: e.reverse(), BundleError, "not a vmbuild bundle"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bundles_are_refused_before_the_store(
    case: str, bundle: Path, other_store: Path, tmp_path: Path
) -> None:
    edit, error, message = BAD[case]
    bad = rewrite(bundle, tmp_path / "bad.tar", edit)
    with pytest.raises(error) as err:
        import_bundle(bad, other_store, None)
    assert message in str(err.value)
    assert str(err.value).startswith(str(bad))
    assert_untouched(other_store)
    with pytest.raises(error):
        verify_bundle(bad, None)


def test_a_truncated_bundle(bundle: Path, other_store: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.tar"
    cut.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    with pytest.raises(
        BundleError, match=r"cut\.tar: truncated \(member 'artifact/disk\.qcow2' ends past the end"
    ):
        import_bundle(cut, other_store, None)
    assert_untouched(other_store)


def test_not_a_tar_at_all(other_store: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(BundleError, match=r"junk\.tar: not"):
        import_bundle(junk, other_store, None)
    assert_untouched(other_store)


def test_a_wrong_key(bundle: Path, other_store: Path) -> None:
    other = signing.generate_local_key(force=True)
    keys = [signing.load_public_key(other.public)]
    with pytest.raises(VerificationFailed, match="does not verify with the trusted key"):
        import_bundle(bundle, other_store, keys)
    assert_untouched(other_store)


def test_the_size_limit(bundle: Path, other_store: Path) -> None:
    with pytest.raises(BundleError, match="more than the limit of 1000 bytes"):
        import_bundle(bundle, other_store, None, max_bytes=1000)
    assert_untouched(other_store)


def test_an_unsigned_bundle_needs_allow_unsigned(
    config_dir: Path, store: Path, other_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "unsigned.tar"
    export(fake_artifact(store, sign=False), out)
    signing.generate_local_key()
    with pytest.raises(VerificationFailed, match="not signed"):
        import_bundle(out, other_store, None)
    assert_untouched(other_store)
    build_dir = import_bundle(out, other_store, None, allow_unsigned=True)
    assert (build_dir / "disk.qcow2").is_file()


def test_an_index_naming_a_path_outside_the_store(
    bundle: Path, other_store: Path, tmp_path: Path
) -> None:
    def rename(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
        index = json.loads(entries[0][1] or b"")
        index["name"] = ".."
        entries[0] = (entries[0][0], json.dumps(index).encode())

    bad = rewrite(bundle, tmp_path / "bad.tar", rename)
    with pytest.raises(BundleError, match="names an invalid image"):
        import_bundle(bad, other_store, None)
    assert_untouched(other_store)


def test_export_refuses_a_missing_disk(local_key: KeyPaths, store: Path, tmp_path: Path) -> None:
    build_dir = fake_artifact(store)
    (build_dir / "disk.qcow2").unlink()
    with pytest.raises(VmbuildError, match=r"disk\.qcow2: missing"):
        export(build_dir, tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()
    assert not list(tmp_path.glob(".x.tar*"))


def test_with_inputs_carries_base_recipe_and_components(
    local_key: KeyPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, other_store: Path
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("VMBUILD_CACHE_DIR", str(cache))
    src = tmp_path / "src"
    src.mkdir()
    (src / "recipe.yaml").write_text("name: example-nginx\n")
    (src / "nginx-app.yaml").write_text("name: nginx-app\n")
    base_dir = cache / "bases" / "debian-12-abc"
    base_dir.mkdir(parents=True)
    (base_dir / "disk.qcow2").write_bytes(b"QFI\xfb base image")
    import hashlib

    base_sha = hashlib.sha256((base_dir / "disk.qcow2").read_bytes()).hexdigest()
    (base_dir / "meta.json").write_text(json.dumps({
        "disk": "disk.qcow2", "format": "qcow2", "sha256": base_sha, "source": "mmdebstrap",
        "virtual_size": 4 << 30,
    }))  # fmt: skip
    build_dir = fake_artifact(tmp_path / "images")
    manifest = json.loads((build_dir / "manifest.json").read_text())
    manifest["base"]["sha256"] = base_sha
    manifest["recipe"]["path"] = str(src / "recipe.yaml")
    manifest["components"][0]["path"] = str(src / "nginx-app.yaml")
    (build_dir / "manifest.json").write_text(json.dumps(manifest))
    from vmbuild.supply.attest import attest

    attest(build_dir, manifest, signer=signing.local_signer(), signed_by="local")
    out = tmp_path / "full.tar"
    index = export(build_dir, out, with_inputs=True)
    assert sorted(e.path for e in index.entries if e.path.startswith("inputs/")) == [
        "inputs/base/disk.qcow2",
        "inputs/components/nginx-app.yaml",  # not named by the recipe: beside it
        "inputs/recipe/recipe.yaml",
    ]
    # A base without mirrors in its metadata: no index state, no package carried (the
    # mirror, the package cache and the .debs: tests/integration/test_offline_rebuild.py).
    assert index.inputs == {
        "recipe": "inputs/recipe/recipe.yaml", "base": "inputs/base/disk.qcow2",
        "index_state": "unrecorded", "suites": [], "packages": 0, "not_carried": 4,
    }  # fmt: skip
    imported = import_bundle(out, other_store, None)
    assert (imported / "inputs" / "base" / "disk.qcow2").read_bytes() == b"QFI\xfb base image"
    assert verify_build(imported, None).signed


def test_with_inputs_needs_the_base_in_the_cache(
    local_key: KeyPaths, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMBUILD_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(VmbuildError, match="is not in this host's cache"):
        export(fake_artifact(store), tmp_path / "x.tar", with_inputs=True)
    assert not (tmp_path / "x.tar").exists()
