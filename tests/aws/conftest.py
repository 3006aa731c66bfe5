"""Fixtures for the AWS tier: moto's real server on 127.0.0.1, vmbuild pointed at it through
the standard endpoint variables, and real small disks and artifacts."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.support.disks import make_artifact, make_disk
from tests.support.motoext import FrontServer, MotoServer, Recorder, aws_env, local_aws

REGIONS = ("us-east-1", "eu-west-1", "ap-southeast-2")
BUCKET = "vmbuild-imports"


@pytest.fixture(scope="session")
def local_endpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[MotoServer, FrontServer]]:
    with local_aws(tmp_path_factory.mktemp("aws")) as servers:
        yield servers


@dataclass
class LocalAws:
    moto: MotoServer
    front: FrontServer

    @property
    def requests(self) -> Recorder:
        return self.front.recorder

    def client(self, service: str, region: str = "us-east-1") -> Any:
        """An independent client straight to moto (not through vmbuild's endpoint)."""
        return boto3.client(
            service,
            region_name=region,
            endpoint_url=self.moto.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def setup_import(self, region: str = "us-east-1") -> None:
        """The bucket and the vmimport role VM Import needs."""
        s3 = self.client("s3", region)
        s3.create_bucket(Bucket=BUCKET)
        self.client("iam", region).create_role(
            RoleName="vmimport",
            AssumeRolePolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow",'
            '"Principal":{"Service":"vmie.amazonaws.com"},"Action":"sts:AssumeRole"}]}',
        )

    def kms_key(self, region: str) -> str:
        return str(
            self.client("kms", region).create_key(Description="images")["KeyMetadata"]["Arn"]
        )


@pytest.fixture
def aws(
    local_endpoint: tuple[MotoServer, FrontServer], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> LocalAws:
    moto, front = local_endpoint
    moto.reset()
    front.reset()
    for key, value in aws_env(front.url).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("VMBUILD_CACHE_DIR", str(tmp_path / "cache"))
    return LocalAws(moto, front)


@pytest.fixture(autouse=True)
def signing_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A local signing key per test: artifacts are signed and verified as builds are."""
    from vmbuild.supply.signing import generate_local_key

    monkeypatch.setenv("VMBUILD_CONFIG_DIR", str(tmp_path / "config"))
    return generate_local_key().public


@pytest.fixture(scope="session")
def good_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lint-clean 64 MiB disk with ~3 MiB of data (made once per session)."""
    return make_disk(tmp_path_factory.mktemp("disk"))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "images"
    path.mkdir()
    return path


@pytest.fixture
def artifact(store: Path, good_disk: Path) -> Path:
    """A stored, tested build with a qcow2 output."""
    return make_artifact(store, good_disk, formats=("qcow2",))


def copy_disk(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
