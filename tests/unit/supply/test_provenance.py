"""The signed provenance of a stored build, and `verify` catching every kind of change."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from tests.support.supply import PACKAGES, fake_artifact, flip_byte
from vmbuild.publish.artifact import manifest_digest
from vmbuild.supply import CYCLONEDX, PROVENANCE, SPDX, signing
from vmbuild.supply.provenance import packages_digest, subjects
from vmbuild.supply.signing import KeyPaths, VerificationFailed
from vmbuild.supply.verify import verify_build


def statement_of(build_dir: Path) -> dict:
    envelope = json.loads((build_dir / PROVENANCE).read_text())
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    return json.loads(base64.b64decode(envelope["payload"]))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_statement_is_slsa_v1_over_disks_sboms_and_manifest(
    local_key: KeyPaths, store: Path
) -> None:
    build_dir = fake_artifact(store)
    stmt = statement_of(build_dir)
    assert stmt["_type"] == "https://in-toto.io/Statement/v1"
    assert stmt["predicateType"] == "https://slsa.dev/provenance/v1"
    manifest = json.loads((build_dir / "manifest.json").read_text())
    subjects = {s["name"]: s["digest"]["sha256"] for s in stmt["subject"]}
    assert subjects == {
        "disk.qcow2": sha(build_dir / "disk.qcow2"),
        SPDX: sha(build_dir / SPDX),
        CYCLONEDX: sha(build_dir / CYCLONEDX),
        "manifest.json": manifest_digest(manifest),
    }
    definition = stmt["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["recipe"] == {
        "path": "/src/recipe.yaml", "sha256": "ab" * 32
    }  # fmt: skip
    assert definition["externalParameters"]["components"] == [
        {"name": "nginx-app", "sha256": "ef" * 32,
         "parameters": {"Content": "<h1>hi</h1>", "Port": "80"}}
    ]  # fmt: skip
    deps = {d["name"]: d for d in definition["resolvedDependencies"]}
    assert deps["base:debian-12"]["digest"] == {"sha256": "cd" * 32}
    assert deps["component:nginx-app"]["digest"] == {"sha256": "ef" * 32}
    assert deps["packages"]["digest"] == {"sha256": packages_digest(PACKAGES)}
    assert definition["internalParameters"]["accelerator"] == {"kind": "tcg", "reason": "test"}
    run = stmt["predicate"]["runDetails"]
    assert run["builder"]["version"] == {"vmbuild": "0.1.0"}
    assert run["metadata"] == {
        "invocationId": "20261130T120000Z-abc123",
        "startedOn": "2026-11-30T12:00:00Z",
        "finishedOn": "2026-11-30T12:05:21.500Z",
    }


def test_verify_passes_on_an_untouched_artifact(local_key: KeyPaths, store: Path) -> None:
    build_dir = fake_artifact(store)
    report = verify_build(build_dir, None)
    assert report.signed
    assert report.keyids == [signing.load_public_key(local_key.public).keyid]
    assert set(report.subjects) == {"disk.qcow2", SPDX, CYCLONEDX, "manifest.json"}


def test_one_byte_in_the_disk(local_key: KeyPaths, store: Path) -> None:
    build_dir = fake_artifact(store)
    flip_byte(build_dir / "disk.qcow2")
    with pytest.raises(VerificationFailed) as err:
        verify_build(build_dir, None)
    assert str(err.value).startswith(f"{build_dir / 'disk.qcow2'}: differs from the signed")


def test_an_edited_manifest(local_key: KeyPaths, store: Path) -> None:
    build_dir = fake_artifact(store)
    manifest = json.loads((build_dir / "manifest.json").read_text())
    manifest["packages"][0]["version"] = "3.0.99-1"
    (build_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VerificationFailed) as err:
        verify_build(build_dir, None)
    assert str(err.value).startswith(f"{build_dir / 'manifest.json'}: differs from the signed")


def test_keys_written_after_the_build_do_not_break_it(local_key: KeyPaths, store: Path) -> None:
    build_dir = fake_artifact(store)
    manifest = json.loads((build_dir / "manifest.json").read_text())
    manifest["distribution"] = {"aws": {"regions": {}}}
    manifest["scan"] = {"findings": []}
    (build_dir / "manifest.json").write_text(json.dumps(manifest))
    assert verify_build(build_dir, None).signed


def test_a_swapped_sbom(local_key: KeyPaths, store: Path) -> None:
    build_dir = fake_artifact(store)
    cdx = json.loads((build_dir / CYCLONEDX).read_text())
    cdx["components"] = cdx["components"][1:]
    (build_dir / CYCLONEDX).write_text(json.dumps(cdx))
    with pytest.raises(VerificationFailed, match=f"{CYCLONEDX}: differs from the signed"):
        verify_build(build_dir, None)


def test_a_modified_signature(local_key: KeyPaths, store: Path) -> None:
    build_dir = fake_artifact(store)
    envelope = json.loads((build_dir / PROVENANCE).read_text())
    sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
    sig[0] ^= 1
    envelope["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    (build_dir / PROVENANCE).write_text(json.dumps(envelope))
    with pytest.raises(VerificationFailed) as err:
        verify_build(build_dir, None)
    assert str(err.value).startswith(f"{build_dir / PROVENANCE}: the signature does not verify")


def test_a_missing_disk(local_key: KeyPaths, store: Path) -> None:
    build_dir = fake_artifact(store)
    (build_dir / "disk.qcow2").unlink()
    with pytest.raises(VerificationFailed, match=r"disk\.qcow2: missing"):
        verify_build(build_dir, None)


def test_unsigned_is_refused_unless_allowed(config_dir: Path, store: Path) -> None:
    build_dir = fake_artifact(store, sign=False)
    signing.generate_local_key()
    with pytest.raises(VerificationFailed, match="the provenance is not signed"):
        verify_build(build_dir, None)
    assert not verify_build(build_dir, None, allow_unsigned=True).signed
    # Allowed unsigned still checks the digests.
    flip_byte(build_dir / "disk.qcow2")
    with pytest.raises(VerificationFailed, match=r"disk\.qcow2: differs"):
        verify_build(build_dir, None, allow_unsigned=True)


def test_no_provenance_at_all(local_key: KeyPaths, store: Path) -> None:
    build_dir = fake_artifact(store)
    (build_dir / PROVENANCE).unlink()
    with pytest.raises(VerificationFailed, match="no provenance"):
        verify_build(build_dir, None)
    assert not verify_build(build_dir, None, allow_unsigned=True).signed


def test_subjects_take_the_builds_own_digests_of_files_it_just_wrote(
    local_key: KeyPaths, store: Path
) -> None:
    """The build passes the digests its convert stage took as it wrote each disk:
    those are not read again; a file whose size changed since is, and so is
    every file the caller did not hash (SBOMs)."""
    build_dir = fake_artifact(store)
    manifest = json.loads((build_dir / "manifest.json").read_text())
    disk = build_dir / "disk.qcow2"
    size = disk.stat().st_size
    # A digest that is not the file's: it shows the file was not read.
    taken = subjects(build_dir, manifest, {"disk.qcow2": ("0f" * 32, size)})
    assert taken["disk.qcow2"] == "0f" * 32
    assert taken[SPDX] == sha(build_dir / SPDX)
    with disk.open("ab") as fh:
        fh.write(b"more")
    grown = subjects(build_dir, manifest, {"disk.qcow2": ("0f" * 32, size)})
    assert grown["disk.qcow2"] == sha(disk)
    assert subjects(build_dir, manifest)["disk.qcow2"] == sha(disk)
