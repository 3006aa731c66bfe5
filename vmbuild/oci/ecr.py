"""Pushing a container image to Amazon ECR in several regions.

The control plane goes through boto3 (publish.aws.Clients: the standard endpoint and
credential chain, bounded retries): DescribeRepositories, CreateRepository where the
repository is missing, GetAuthorizationToken. The image goes through the registry API with
skopeo, as to any registry (oci/registry.py), idempotent by digest: a tag already at the
image's digest is left alone, so a re-run pushes only what is missing.

The token never reaches a command line, a log or the manifest. ECR's authorizationToken is
already base64("AWS:" + password), the form of an `auth` entry in containers-auth.json, so
it is written as such to a 0600 file in a private temporary directory that skopeo reads
(`--authfile`, `--dest-authfile`) and that is removed when the region is done.

`registryEndpoints` sends a region's images to another HOST[:PORT] than the proxyEndpoint
the token names: a VPC interface endpoint (`*.dkr.ecr.REGION.vpce.amazonaws.com`, whose
name differs per endpoint), a proxy or a mirror that accepts ECR's credentials.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vmbuild.errors import VmbuildError
from vmbuild.oci import registry
from vmbuild.oci.registry import Pushed


@dataclass(frozen=True)
class RegionPush:
    """One region's result: where the image went and what was done there."""

    region: str
    registry: str  # HOST[:PORT] the image was pushed to
    repository_uri: str  # what ECR calls the repository (its own registry host)
    created: bool  # the repository was created by this push
    pushed: tuple[Pushed, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "registry": self.registry,
            "repository_uri": self.repository_uri,
            "created_repository": self.created,
            "references": [p.reference for p in self.pushed],
            "skipped": [p.reference for p in self.pushed if p.skipped],
        }


@contextlib.contextmanager
def auth_file(host: str, token: str) -> Iterator[Path]:
    """A containers-auth.json with the credentials for `host`, readable only by this user
    and removed on exit (whatever happens)."""
    with tempfile.TemporaryDirectory(prefix="vmbuild-ecr-auth-") as tmp:  # 0700
        path = Path(tmp) / "auth.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"auths": {host: {"auth": token}}}, fh)
        yield path


def ensure_repository(client: Any, name: str) -> tuple[str, bool]:
    """The repository's URI, and whether it had to be created."""
    try:
        found = client.describe_repositories(repositoryNames=[name])["repositories"]
        return str(found[0]["repositoryUri"]), False
    except client.exceptions.RepositoryNotFoundException:
        pass
    created = client.create_repository(repositoryName=name)["repository"]
    return str(created["repositoryUri"]), True


def authorization(client: Any) -> tuple[str, str]:
    """(the registry token, the HOST[:PORT] of the proxyEndpoint it is for)."""
    data = client.get_authorization_token()["authorizationData"][0]
    host = urlsplit(str(data["proxyEndpoint"])).netloc
    return str(data["authorizationToken"]), host


def push(
    layout: Path,
    tag: str,
    digest: str,
    tags: Sequence[str],
    *,
    repository: str,
    regions: Sequence[str],
    endpoints: Mapping[str, str],
    tls_verify: bool = True,
    profile: str | None = None,
    on_status: Callable[[str], None] = lambda _: None,
) -> list[RegionPush]:
    """Push the image `tag` of `layout` (manifest `digest`) as every tag in `tags` to the
    repository in each region, creating it where missing. Regions go in order; the first
    failure stops with one error naming the region (a re-run finishes what is missing)."""
    import botocore.exceptions

    from vmbuild.publish.aws import Clients, credentials_hint, describe_error

    clients = Clients(profile)
    done = []
    for region in regions:
        client = clients.get("ecr", region)
        try:
            uri, created = ensure_repository(client, repository)
            token, proxy = authorization(client)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise VmbuildError(
                f"ECR {region}: {describe_error(exc)}", hint=credentials_hint()
            ) from None
        if created:
            on_status(f"{region}: created repository {uri}")
        host = endpoints.get(region) or proxy
        refs = [f"docker://{host}/{repository}:{t}" for t in tags]
        with auth_file(host, token) as path:
            pushed = registry.push(
                layout, tag, digest, refs, tls_verify=tls_verify, authfile=path,
                on_status=on_status,
            )  # fmt: skip
        done.append(RegionPush(region, host, uri, created, tuple(pushed)))
    return done
