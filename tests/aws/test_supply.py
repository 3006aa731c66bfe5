"""Supply chain against moto's real server: KMS signing through the KMS API, the distribute
guard stopping a tampered artifact before any AWS call, and a bundle carried to a second store
and distributed from there with the AMI tagged by the provenance digest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.aws.conftest import LocalAws
from tests.support.disks import make_artifact, sign_artifact
from tests.support.supply import flip_byte
from vmbuild.cli import main
from vmbuild.config.distribution import DistributionConfig, load_distribution
from vmbuild.publish.distributor import distribute
from vmbuild.supply import PROVENANCE, signing
from vmbuild.supply.bundle import export, import_bundle
from vmbuild.supply.signing import SigningError, VerificationFailed
from vmbuild.supply.verify import verify_build

pytestmark = pytest.mark.aws


def one_region() -> DistributionConfig:
    return load_distribution({"regions": [{"region": "us-east-1"}], "lint": False}, "dist.yaml", "")


def kms_signing_key(aws: LocalAws) -> str:
    kms = aws.client("kms")
    meta = kms.create_key(
        KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256", Description="vmbuild provenance"
    )["KeyMetadata"]
    return str(meta["Arn"])


def test_kms_signs_and_verifies_through_the_kms_api(aws: LocalAws, artifact: Path) -> None:
    arn = kms_signing_key(aws)
    assert main(["sign", str(artifact), "--store", str(artifact.parents[2]), "--kms-key", arn]) == 0
    envelope = json.loads((artifact / PROVENANCE).read_text())
    kms_key = signing.kms_public_key(arn)
    assert [s["keyid"] for s in envelope["signatures"]] == [kms_key.keyid]
    assert kms_key.scheme == "ecdsa-sha2-nistp256"
    # The signature was made by KMS: vmbuild sent the payload's digest, never held a key.
    signs = [r for r in aws.requests.find("Sign", "kms") if r.status == 200]
    assert len(signs) == 1
    assert verify_build(artifact, [kms_key]).signed
    # The local key (which signed make_artifact's provenance) no longer verifies it.
    local = signing.load_public_key(signing.local_key_paths().public)
    with pytest.raises(VerificationFailed, match="does not verify with the trusted key"):
        verify_build(artifact, [local])
    argv = ["verify", str(artifact), "--store", str(artifact.parents[2]), "--kms-key", arn]
    assert main(argv) == 0


def test_a_kms_public_key_exported_as_pem_verifies_without_kms(
    aws: LocalAws, artifact: Path, tmp_path: Path
) -> None:
    arn = kms_signing_key(aws)
    store = str(artifact.parents[2])
    assert main(["sign", str(artifact), "--store", store, "--kms-key", arn]) == 0
    pem = tmp_path / "kms.pem"
    assert main(["key", "export", "--kms-key", arn, "-o", str(pem)]) == 0
    assert pem.read_text().startswith("-----BEGIN PUBLIC KEY-----\n")
    assert signing.load_public_key(pem).keyid == signing.kms_public_key(arn).keyid
    before = len(aws.requests.find("GetPublicKey", "kms"))
    assert main(["verify", str(artifact), "--store", store, "--key", str(pem)]) == 0
    assert len(aws.requests.find("GetPublicKey", "kms")) == before  # KMS not asked


def test_a_disabled_or_deleted_kms_key_is_one_clear_error(
    aws: LocalAws, artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arn = kms_signing_key(aws)
    before = (artifact / PROVENANCE).read_bytes()
    aws.client("kms").disable_key(KeyId=arn.rsplit("/", 1)[1])
    with pytest.raises(SigningError, match=f"KMS key {arn}: the key is Disabled"):
        signing.kms_signer(arn)
    expiring = kms_signing_key(aws)
    aws.client("kms").schedule_key_deletion(KeyId=expiring.rsplit("/", 1)[1], PendingWindowInDays=7)
    with pytest.raises(SigningError, match=f"KMS key {expiring}: the key is PendingDeletion"):
        signing.kms_public_key(expiring)
    symmetric = aws.client("kms").create_key(KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["Arn"]
    with pytest.raises(SigningError, match="KeyUsage is ENCRYPT_DECRYPT, not SIGN_VERIFY"):
        signing.kms_signer(symmetric)
    unknown = arn.rsplit("/", 1)[0] + "/11111111-2222-3333-4444-555555555555"
    with pytest.raises(SigningError, match=f"KMS key {unknown}: NotFoundException"):
        signing.kms_signer(unknown)
    store = str(artifact.parents[2])
    assert main(["sign", str(artifact), "--store", store, "--kms-key", unknown]) == 1
    err_text = capsys.readouterr().err
    assert err_text.startswith(f"error: KMS key {unknown}: NotFoundException")
    assert "Traceback" not in err_text
    assert (artifact / PROVENANCE).read_bytes() == before  # nothing written


def test_distribute_refuses_a_one_byte_disk_change_before_any_aws_call(
    aws: LocalAws, artifact: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    flip_byte(artifact / "disk.qcow2", 70000)
    aws.requests.clear()
    with pytest.raises(VerificationFailed) as err:
        distribute(artifact, one_region())
    assert str(err.value).startswith(f"{artifact / 'disk.qcow2'}: differs from the signed")
    config = tmp_path / "dist.yaml"
    config.write_text("regions: [{region: us-east-1}]\nlint: false\n")
    store = str(artifact.parents[2])
    assert main(["distribute", str(artifact), "--store", store, "--config", str(config)]) == 1
    assert f"error: {artifact / 'disk.qcow2'}: differs from the signed" in capsys.readouterr().err
    assert aws.requests.requests == []  # not even sts:GetCallerIdentity


def test_distribute_refuses_an_edited_manifest_and_a_forged_signature(
    aws: LocalAws, artifact: Path
) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["tests"]["status"] = "passed-honest"
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(VerificationFailed, match=r"manifest\.json: differs from the signed"):
        distribute(artifact, one_region())
    # Re-signed with a key that is not the trusted one: the signature check catches it.
    trusted = signing.load_public_key(signing.local_key_paths().public)
    signing.generate_local_key(force=True)
    sign_artifact(artifact)
    with pytest.raises(VerificationFailed, match="the signature does not verify"):
        distribute(artifact, one_region(), trusted_keys=[trusted])
    assert aws.requests.requests == []


def test_unsigned_artifacts_need_allow_unsigned(
    aws: LocalAws, store: Path, good_disk: Path
) -> None:
    build_dir = make_artifact(store, good_disk, sign=False)
    with pytest.raises(VerificationFailed, match="no provenance"):
        distribute(build_dir, one_region())
    assert aws.requests.requests == []
    result = distribute(build_dir, one_region(), allow_unsigned=True)
    assert result.ok, result.to_json()
    image = aws.client("ec2").describe_images(ImageIds=[result.regions[0].image_id])["Images"][0]
    assert "vmbuild:provenance-sha256" not in {t["Key"] for t in image["Tags"]}


def test_a_bundle_is_imported_into_a_second_store_and_distributed_from_there(
    aws: LocalAws, artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "carry.tar"
    export(artifact, bundle)
    second = tmp_path / "disconnected" / "images"
    imported = import_bundle(bundle, second, None)
    assert imported == second / "example-nginx" / "1.0.0" / artifact.name
    result = distribute(imported, one_region())
    assert result.ok, result.to_json()
    image = aws.client("ec2").describe_images(ImageIds=[result.regions[0].image_id])["Images"][0]
    tags = {t["Key"]: t["Value"] for t in image["Tags"]}
    provenance_sha = hashlib.sha256((imported / PROVENANCE).read_bytes()).hexdigest()
    assert tags["vmbuild:provenance-sha256"] == provenance_sha
    assert provenance_sha == hashlib.sha256((artifact / PROVENANCE).read_bytes()).hexdigest()
    # The distribution is recorded in the imported copy, and it still verifies.
    recorded = json.loads((imported / "manifest.json").read_text())["distribution"]["aws"]
    assert recorded["regions"]["us-east-1"]["image_id"] == result.regions[0].image_id
    assert verify_build(imported, None).signed

    # `distribute BUNDLE` imports into its store, verifies and distributes (the AMI exists).
    config = tmp_path / "dist.yaml"
    config.write_text("regions: [{region: us-east-1}]\nlint: false\n")
    third = tmp_path / "third" / "images"
    argv = ["distribute", str(bundle), "--store", str(third), "--config", str(config), "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["regions"][0]["status"] == "existing"
    assert out["regions"][0]["image_id"] == result.regions[0].image_id
    assert (third / "example-nginx" / "1.0.0" / artifact.name / "disk.qcow2").is_file()
