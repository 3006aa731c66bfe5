"""The container recipe: EC2 Image Builder's `containerRecipe`, for OCI images.

The same AWSTOE components as a VM recipe, applied to a parent image's root
filesystem instead of a disk. The vocabulary is Image Builder's
(`parentImage`, `components`, `targetRepository: {service, repositoryName}`,
`workingDirectory`), plus what a local build needs to say: the registry a
`service: registry` target lives at, the image's tags and whether each
component becomes its own layer. Everything is validated before any side
effect; errors name the file and the field. Image Builder's own documents
(get-container-recipe output, the CreateContainerRecipe request, CloudFormation
properties) are accepted as they are: vmbuild/config/container_aws.py maps them.

```yaml
name: web
version: 1.0.0
parentImage: debian-12         # the offline Debian root filesystem (mmdebstrap), or an
                               # OCI image: oci:PATH[:TAG], docker-archive:PATH, docker://REF,
                               # a registry reference REG/REPO:TAG (vmbuild/oci/parent.py)
components:
  - name: ./hello.yaml
    parameters: {Greeting: hi}
layers: per-component          # or squash: one layer over the parent's
tags: [latest, 1.0.0]
targetRepository:
  service: registry            # an OCI registry reached with skopeo
  registry: 127.0.0.1:5000
  repositoryName: web
  tlsVerify: false
```

An ECR target names its regions; the repository is created where missing and the
image pushed to each region's registry (vmbuild/oci/ecr.py):

```yaml
targetRepository:
  service: ECR
  repositoryName: web
  regions: [us-east-1, eu-west-1]
  registryEndpoints:           # optional, per region: a VPC interface endpoint or proxy
    eu-west-1: vpce-0abc-xyz.dkr.ecr.eu-west-1.vpce.amazonaws.com
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vmbuild.config.container_aws import to_vmbuild
from vmbuild.config.loader import load_model
from vmbuild.config.parent_ref import ParentError, ParentSource
from vmbuild.config.parent_ref import parse as parse_parent
from vmbuild.config.recipe import (
    NAME,
    SEMVER,
    ComponentRef,
    VMSettings,
    _check_test,
    _load_component,
)  # fmt: skip
from vmbuild.errors import ConfigError

if TYPE_CHECKING:
    from vmbuild.config.variables import Given
    from vmbuild.toe.model import Document

# The release names that mean the offline Debian root filesystem; any other
# parentImage is an OCI image (vmbuild/oci/parent.py says which syntax and why).
PARENT_IMAGES = ("debian-12",)
# distribution's reference grammar, reduced to what vmbuild sends.
REPOSITORY = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
REGISTRY = re.compile(r"^[A-Za-z0-9.-]+(?::[0-9]{1,5})?$")
AWS_REGION = re.compile(r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TargetRepository(_Model):
    """Image Builder's `targetRepository`: where `vmbuild build` pushes the tested image."""

    service: Literal["registry", "ECR"] = Field(
        description="registry: an OCI registry (skopeo); ECR: Amazon ECR in `regions`"
    )
    repository_name: str = Field(alias="repositoryName", pattern=REPOSITORY.pattern)
    registry: str | None = Field(
        default=None, pattern=REGISTRY.pattern, description="HOST[:PORT] of a registry target"
    )
    regions: list[str] = Field(
        default=[], description="ECR: the regions to create the repository in and push to"
    )
    registry_endpoints: dict[str, str] = Field(
        default={}, alias="registryEndpoints",
        description="ECR: region -> HOST[:PORT] to push to instead of the proxyEndpoint "
        "GetAuthorizationToken answers (a VPC interface endpoint, a proxy, a mirror)",
    )  # fmt: skip
    tls_verify: bool = Field(
        default=True, alias="tlsVerify", description="false for a plain-HTTP local registry"
    )

    @model_validator(mode="after")
    def _check(self) -> TargetRepository:
        if self.service == "ECR":
            self._check_ecr()
        elif self.registry is None:
            raise ValueError("registry: a registry target names its HOST[:PORT]")
        elif self.regions or self.registry_endpoints:
            raise ValueError("regions, registryEndpoints: only an ECR target has them")
        return self

    def _check_ecr(self) -> None:
        if self.registry is not None:
            raise ValueError("registry: an ECR target's registry comes from each region")
        if not self.regions:
            raise ValueError("regions: an ECR target names at least one region")
        for i, region in enumerate(self.regions):
            if not AWS_REGION.match(region):
                raise ValueError(f"regions[{i}]: {region!r} is not an AWS region name")
        if len(set(self.regions)) != len(self.regions):
            raise ValueError("regions: a region is listed twice")
        for region, host in self.registry_endpoints.items():
            if region not in self.regions:
                raise ValueError(f"registryEndpoints.{region}: not one of the regions")
            if not REGISTRY.match(host):
                raise ValueError(f"registryEndpoints.{region}: {host!r} is not HOST[:PORT]")

    def reference(self, tag: str) -> str:
        """The skopeo destination for one tag."""
        return f"docker://{self.registry}/{self.repository_name}:{tag}"


class ContainerRecipe(_Model):
    name: str = Field(pattern=NAME.pattern)
    version: str
    description: str = ""
    parent_image: str = Field(
        alias="parentImage", description="debian-12 (the offline rootfs), oci:PATH[:TAG], "
        "docker-archive:PATH, docker://REF or a registry reference [HOST/]REPO[:TAG][@sha256:…]",
    )  # fmt: skip
    parent_tls_verify: bool = Field(
        default=True, alias="parentTlsVerify",
        description="false to fetch a registry parent over plain HTTP (a local registry)",
    )  # fmt: skip
    container_type: Literal["DOCKER"] = Field(default="DOCKER", alias="containerType")
    components: list[ComponentRef] = Field(min_length=1)
    layers: Literal["per-component", "squash"] = "per-component"
    tags: list[str] = []
    target_repository: TargetRepository | None = Field(default=None, alias="targetRepository")
    working_directory: str = Field(default="/tmp", alias="workingDirectory", pattern=r"^/")
    tests: list[str] = Field(
        default=[], description="testinfra files, relative to the recipe: run against the "
        "built image's root filesystem (all layers) after the components' test phases",
    )  # fmt: skip
    vm: VMSettings = VMSettings()
    resource_tags: dict[str, str] = Field(
        default={}, alias="resourceTags", description="the recipe's AWS resource tags "
        "(Image Builder's `tags` map): recorded, not image tags",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check(self) -> ContainerRecipe:
        if not SEMVER.match(self.version):
            raise ValueError(f"version: {self.version!r} is not a semantic version (e.g. 1.2.3)")
        return self

    @property
    def image_tags(self) -> list[str]:
        """The tags the image gets: the recipe's, else its version ('+' is not allowed)."""
        return self.tags or [self.version.replace("+", "_")]


@dataclass(frozen=True)
class LoadedContainerRecipe:
    """A validated container recipe and the component documents it names."""

    recipe: ContainerRecipe
    path: Path
    display: str
    sha256: str
    documents: tuple[Document, ...]
    parent: ParentSource
    tests: tuple[Path, ...] = ()  # the testinfra files, resolved

    @property
    def dir(self) -> Path:
        return self.path.parent


def load_container_recipe(path: Path, variables: Given | None = None) -> LoadedContainerRecipe:
    """Parse and validate a container recipe and its components; no side effects."""
    display = str(path)
    recipe = load_model(
        path, ContainerRecipe, "name, version, parentImage, ...", variables, prepare=to_vmbuild
    )
    base_dir = path.resolve().parent
    try:
        parent = parse_parent(recipe.parent_image, base_dir, PARENT_IMAGES)
    except ParentError as exc:
        raise ConfigError(display, "parentImage", str(exc)) from None
    for i, tag in enumerate(recipe.tags):
        if not TAG.match(tag):
            raise ConfigError(display, f"tags[{i}]", f"{tag!r} is not a valid image tag")
    if len(set(recipe.tags)) != len(recipe.tags):
        raise ConfigError(display, "tags", "a tag is listed twice")
    documents = []
    for i, ref in enumerate(recipe.components):
        doc = _load_component(display, i, ref, base_dir)
        if any(s.action == "Reboot" for p in doc.phase_defs for s in p.steps):
            raise ConfigError(
                display, f"components[{i}].name",
                f"{ref.name}: a Reboot step cannot run in a container build",
            )  # fmt: skip
        documents.append(dataclasses.replace(doc, display_name=ref.name))
    tests = tuple(
        _check_test(display, f"tests[{i}]", test, base_dir) for i, test in enumerate(recipe.tests)
    )
    return LoadedContainerRecipe(
        recipe=recipe,
        path=path.resolve(),
        display=display,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        documents=tuple(documents),
        parent=parent,
        tests=tests,
    )
