"""The S3 artifact store against moto's server over HTTP: verified multipart uploads with
the manifest last, a commit per run (a redelivery uploads nothing), listing, showing,
removing and downloading through the CLI with `--store s3://...`, and the pipeline's
dependency check reading a manifest committed to S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.aws.conftest import LocalAws
from tests.support.disks import make_artifact
from vmbuild.errors import VmbuildError
from vmbuild.scaleout import artifacts
from vmbuild.scaleout.artifacts import S3Store, read_manifest_at

BUCKET = "team-images"
STORE = f"s3://{BUCKET}/weekly"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def s3(aws: LocalAws, monkeypatch: pytest.MonkeyPatch) -> LocalAws:
    aws.client("s3").create_bucket(Bucket=BUCKET)
    monkeypatch.setattr(artifacts, "PART_SIZE", 8 << 20)  # S3's minimum is 5 MiB
    return aws


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vmbuild", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=dict(os.environ))  # fmt: skip


def test_commit_uploads_verified_parts_and_the_manifest_last(s3: LocalAws, store: Path, good_disk: Path) -> None:  # fmt: skip
    build = make_artifact(store, good_disk, formats=("qcow2", "raw"))
    s3.requests.clear()
    location = S3Store(STORE).commit(build, "task-1")
    assert location == f"{STORE}/example-nginx/1.0.0/{build.name}"
    puts = [r for r in s3.requests.requests
            if r.action in ("PutObject", "CreateMultipartUpload")]  # fmt: skip
    keys = [r.path.split("?")[0].split(f"/{BUCKET}/", 1)[1] for r in puts]
    prefix = f"weekly/example-nginx/1.0.0/{build.name}"
    # The 64 MiB raw disk went in 8 MiB parts; the manifest after every disk; then the marker.
    assert keys[-2:] == [f"{prefix}/manifest.json", "weekly/.runs/task-1.json"]
    files = {p.relative_to(build).as_posix() for p in build.rglob("*") if p.is_file()}
    assert {"disk.qcow2", "disk.raw"} <= files
    assert set(keys[:-2]) == {f"{prefix}/{f}" for f in files - {"manifest.json"}}
    parts = s3.requests.find("UploadPart", "s3")
    assert len(parts) == 8
    # Every part carried a SHA-256 checksum for the server to verify.
    assert all(r.headers.get("x-amz-checksum-sha256") for r in parts)
    manifest = json.loads((build / "manifest.json").read_text())
    head = s3.client("s3").head_object(Bucket=BUCKET, Key=f"{prefix}/disk.raw")
    raw_out = next(o for o in manifest["outputs"] if o["format"] == "raw")
    assert head["Metadata"]["sha256"] == raw_out["sha256"]
    assert head["ContentLength"] == raw_out["size"]


def test_a_redelivered_commit_uploads_nothing(s3: LocalAws, store: Path, good_disk: Path) -> None:
    build = make_artifact(store, good_disk)
    first = S3Store(STORE).commit(build, "task-2")
    s3.requests.clear()
    assert S3Store(STORE).committed("task-2") == first
    assert S3Store(STORE).commit(build, "task-2") == first
    assert not s3.requests.find("PutObject", "s3") and not s3.requests.find("UploadPart", "s3")
    assert S3Store(STORE).committed("task-3") is None


def test_a_half_uploaded_build_is_never_listed(s3: LocalAws, store: Path, good_disk: Path) -> None:
    build = make_artifact(store, good_disk)
    # Disks up, manifest not (the worker died in between).
    s3.client("s3").put_object(Bucket=BUCKET, Key=f"weekly/example-nginx/1.0.0/{build.name}/disk.qcow2", Body=b"x")  # fmt: skip
    assert S3Store(STORE).images() == []
    proc = cli("images", "list", "--store", STORE, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_images_list_show_rm_on_s3(s3: LocalAws, store: Path, good_disk: Path, tmp_path: Path) -> None:  # fmt: skip
    old = make_artifact(store, good_disk, version="1.0.0", build="20260101T000000Z-aaaaaa")
    new = make_artifact(store, good_disk, version="1.2.0", build="20260201T000000Z-bbbbbb")
    S3Store(STORE).commit(old, "t-old")
    S3Store(STORE).commit(new, "t-new")
    proc = cli("images", "list", "--store", STORE, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["ref"] for r in rows] == ["example-nginx/1.0.0/20260101T000000Z-aaaaaa",
                                        "example-nginx/1.2.0/20260201T000000Z-bbbbbb"]  # fmt: skip
    assert rows[1]["path"] == f"{STORE}/example-nginx/1.2.0/20260201T000000Z-bbbbbb"
    human = cli("images", "list", "--store", STORE)
    assert "example-nginx/1.2.0/20260201T000000Z-bbbbbb" in human.stdout
    show = cli("images", "show", "example-nginx", "--store", STORE)  # latest
    assert show.returncode == 0, show.stderr
    assert show.stdout.startswith("image:    example-nginx/1.2.0/20260201T000000Z-bbbbbb\n")
    missing = cli("images", "show", "other", "--store", STORE)
    assert missing.returncode == 1 and f"no image 'other' in {STORE}" in missing.stderr
    # A verified download for what reads disks (distribute, lint).
    copy = artifacts.local_copy(STORE, "example-nginx/1.0.0", tmp_path / "cache")
    assert (copy / "disk.qcow2").read_bytes() == (old / "disk.qcow2").read_bytes()
    # verify downloads the build (checked against its manifest) and checks its signature.
    verified = cli("verify", "example-nginx/1.0.0", "--store", STORE)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.endswith(
        "/s3-fetch/example-nginx/1.0.0/20260101T000000Z-aaaaaa: OK, signed, 4 subjects verified\n"
    )
    rm = cli("images", "rm", "example-nginx/1.0.0", "--store", STORE, "--yes")
    assert rm.returncode == 0, rm.stderr
    assert rm.stdout.strip() == f"removed {STORE}/example-nginx/1.0.0/20260101T000000Z-aaaaaa"
    left = s3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="weekly/example-nginx/1.0.0/")
    assert left.get("KeyCount") == 0
    assert [r["version"] for r in S3Store(STORE).images()] == ["1.2.0"]


def test_a_corrupted_download_is_refused(s3: LocalAws, store: Path, good_disk: Path, tmp_path: Path) -> None:  # fmt: skip
    build = make_artifact(store, good_disk)
    S3Store(STORE).commit(build, "t")
    s3.client("s3").put_object(Bucket=BUCKET, Key=f"weekly/example-nginx/1.0.0/{build.name}/disk.qcow2", Body=b"tampered")  # fmt: skip
    with pytest.raises(VmbuildError, match=r"disk\.qcow2: sha256 differs from the manifest"):
        artifacts.local_copy(STORE, "example-nginx", tmp_path / "cache")


def test_the_manifest_of_a_committed_run_is_read_from_its_url(s3: LocalAws, store: Path, good_disk: Path) -> None:  # fmt: skip
    """What the pipeline dependency check reads for a run whose artifact is on S3."""
    build = make_artifact(store, good_disk)
    location = S3Store(STORE).commit(build, "t")
    assert read_manifest_at(location)["build"] == build.name
    assert read_manifest_at(str(build))["build"] == build.name


def test_an_unknown_bucket_is_a_clear_error(s3: LocalAws) -> None:
    proc = cli("images", "list", "--store", "s3://no-such-bucket/x")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: s3://no-such-bucket/x: cannot list the store:")
    assert "NoSuchBucket" in proc.stderr and "AWS_ENDPOINT_URL" in proc.stderr
