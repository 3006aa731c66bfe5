"""Container images pushed to ECR in two regions: the repositories are created and the
authorization tokens fetched through the moto server's ECR API, the image pushed by skopeo
to each region's registry with the token, again idempotent by digest.

moto serves ECR's control plane but no registry API: its proxyEndpoint is a made-up
*.amazonaws.com host with nothing behind it. The recipe's `registryEndpoints` (a real
setting, for VPC interface endpoints and proxies) points each region at its own Debian
docker-registry on 127.0.0.1, which stands in for ECR's registry API. Each registry
requires the user and password moto's token encodes (htpasswd), so a push that did not
send the token would be refused."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.aws.conftest import LocalAws
from tests.support.oci import stored_container
from tests.support.registry import Registry, docker_registry
from vmbuild.container_build import push_stored
from vmbuild.errors import VmbuildError
from vmbuild.oci import ecr, registry
from vmbuild.progress import NullReporter

pytestmark = pytest.mark.aws

REGIONS = ("us-east-1", "eu-west-1")
REPOSITORY = "vmbuild/ctr-ecr"


@pytest.fixture
def token(aws: LocalAws) -> str:
    """The token moto hands out (the same for every call): base64 of AWS:PASSWORD."""
    data = aws.client("ecr").get_authorization_token()["authorizationData"][0]
    return str(data["authorizationToken"])


def login(token: str) -> tuple[str, str]:
    user, _, password = base64.b64decode(token).decode().partition(":")
    return user, password


@pytest.fixture
def registries(tmp_path: Path, token: str) -> Iterator[dict[str, Registry]]:
    with (
        docker_registry(tmp_path / "reg-us", login=login(token)) as us,
        docker_registry(tmp_path / "reg-eu", login=login(token)) as eu,
    ):
        yield {"us-east-1": us, "eu-west-1": eu}


def ecr_target(endpoints: dict[str, str]) -> dict[str, Any]:
    return {"service": "ECR", "registry": None, "repository": REPOSITORY, "tls_verify": False,
            "regions": list(REGIONS), "registry_endpoints": endpoints}  # fmt: skip


def digest_at(reg: Registry, tag: str, token: str) -> str | None:
    with ecr.auth_file(reg.address, token) as path:
        return registry.remote_digest(reg.ref(REPOSITORY, tag), tls_verify=False, authfile=path)


def test_push_to_ecr_in_two_regions_then_again_by_digest(
    tmp_path: Path, aws: LocalAws, registries: dict[str, Registry], token: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.DEBUG, logger="vmbuild")
    endpoints = {region: reg.address for region, reg in registries.items()}
    build_dir, image = stored_container(tmp_path, ecr_target(endpoints))
    caplog.clear()
    pushed = push_stored(build_dir, NullReporter())
    argvs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("$ skopeo")]
    refs = [reg.ref(REPOSITORY, t) for reg in registries.values() for t in ("1.0.0", "latest")]
    assert [(p.reference, p.skipped) for p in pushed] == [(r, False) for r in refs]
    for region, reg in registries.items():
        repos = aws.client("ecr", region).describe_repositories()["repositories"]
        assert [r["repositoryName"] for r in repos] == [REPOSITORY]
        assert len(aws.requests.find("CreateRepository", "ecr", region)) == 1
        assert len(aws.requests.find("GetAuthorizationToken", "ecr", region)) == 1
        for tag in ("1.0.0", "latest"):
            assert digest_at(reg, tag, token) == image.digest
    manifest_text = (build_dir / "manifest.json").read_text()
    recorded = json.loads(manifest_text)["distribution"]
    assert recorded["digest"] == image.digest and recorded["references"] == refs
    assert {r: v["created_repository"] for r, v in recorded["regions"].items()} == {
        "us-east-1": True, "eu-west-1": True,
    }  # fmt: skip
    assert recorded["regions"]["eu-west-1"]["repository_uri"] == (
        f"123456789012.dkr.ecr.eu-west-1.amazonaws.com/{REPOSITORY}"
    )

    # The token is in no log line, no argv (run() logs every argv) and not in the manifest;
    # skopeo got it from an auth file that is gone.
    secret = login(token)[1]
    assert token not in caplog.text and secret not in caplog.text
    assert token not in manifest_text and secret not in manifest_text
    assert len(argvs) == 12  # per reference: inspect, copy, inspect back
    authfiles = set()
    for argv in argvs:
        words = argv.split()
        flag = "--dest-authfile" if words[2] == "copy" else "--authfile"
        authfiles.add(Path(words[words.index(flag) + 1]))
    assert len(authfiles) == 2 and not any(p.exists() or p.parent.exists() for p in authfiles)
    for reg in registries.values():
        assert secret not in (reg.storage.parent / "registry.log").read_text()

    aws.requests.clear()
    again = push_stored(build_dir, NullReporter())
    assert [(p.reference, p.skipped) for p in again] == [(r, True) for r in refs]
    assert aws.requests.find("CreateRepository", "ecr") == []
    assert len(aws.requests.find("DescribeRepositories", "ecr")) == 2


def test_a_registry_that_refuses_the_token_is_one_error_naming_the_reference(
    tmp_path: Path, aws: LocalAws
) -> None:
    with docker_registry(tmp_path / "reg", login=("AWS", "another-password")) as reg:
        target = ecr_target({"us-east-1": reg.address})
        build_dir, _ = stored_container(tmp_path, {**target, "regions": ["us-east-1"]})
        with pytest.raises(VmbuildError) as info:
            push_stored(build_dir, NullReporter())
    ref = reg.ref(REPOSITORY, "1.0.0")
    assert str(info.value).startswith(f"{ref}: ")
    assert "unauthorized" in str(info.value)
    assert "distribution" not in json.loads((build_dir / "manifest.json").read_text())
