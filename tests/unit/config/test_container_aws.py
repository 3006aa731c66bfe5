"""Image Builder's own container recipe documents load as they are: the
get-container-recipe output, the CreateContainerRecipe request and CloudFormation
properties. What vmbuild honours is mapped, what it cannot honour is one error
naming the field, and nothing that changes the image is dropped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.cli import REPO
from vmbuild.config.container import load_container_recipe
from vmbuild.config.detect import detect_kind
from vmbuild.errors import ConfigError

DATA = REPO / "tests" / "data" / "container"
TEMPLATE = (
    "FROM {{{ imagebuilder:parentImage }}}\n{{{ imagebuilder:environments }}}\n"
    "{{{ imagebuilder:components }}}\n"
)


def get_container_recipe() -> dict[str, Any]:
    """`aws imagebuilder get-container-recipe` output (the API reference's shape)."""
    return {
        "requestId": "a1b2c3d4-5678-90ab-cdef-EXAMPLE11111",
        "containerRecipe": {
            "arn": "arn:aws:imagebuilder:us-west-2:123456789012:container-recipe/web/1.0.0",
            "containerType": "DOCKER",
            "name": "web",
            "description": "web server image",
            "platform": "Linux",
            "owner": "123456789012",
            "version": "1.0.0",
            "components": [
                {
                    "componentArn": "hello.yaml",
                    "parameters": [{"name": "Greeting", "value": ["hi"]}],
                },
                {"componentArn": "harden.yaml"},
            ],
            "instanceConfiguration": {
                "image": "ami-0123456789abcdef0",
                "blockDeviceMappings": [{"deviceName": "/dev/xvda", "ebs": {"volumeSize": 30}}],
            },
            "dockerfileTemplateData": TEMPLATE,
            "encrypted": True,
            "parentImage": "amazonlinux:latest",
            "dateCreated": "2026-11-30T10:00:00.000Z",
            "tags": {"team": "web"},
            "workingDirectory": "/build",
            "targetRepository": {"service": "ECR", "repositoryName": "web"},
        },
        "latestVersionReferences": {
            "latestVersionArn": "arn:aws:imagebuilder:us-west-2:123456789012:container-recipe/web/1.0.0",
            "latestMajorVersionArn": "arn:aws:imagebuilder:us-west-2:123456789012:container-recipe/web/1.x.x",
        },
    }


def create_request() -> dict[str, Any]:
    """The CreateContainerRecipe request (`--cli-input-json`)."""
    recipe = get_container_recipe()["containerRecipe"]
    for key in ("arn", "platform", "owner", "version", "dateCreated", "encrypted"):
        del recipe[key]
    return {**recipe, "semanticVersion": "1.0.0", "platformOverride": "Linux",
            "clientToken": "token-1", "imageOsVersionOverride": "Amazon Linux 2023"}  # fmt: skip


def cloudformation() -> dict[str, Any]:
    """AWS::ImageBuilder::ContainerRecipe properties."""
    return {
        "Name": "web", "Version": "1.0.0", "ContainerType": "DOCKER",
        "ParentImage": "amazonlinux:latest", "DockerfileTemplateData": TEMPLATE,
        "Components": [{"ComponentArn": "hello.yaml",
                        "Parameters": [{"Name": "Greeting", "Value": ["hi"]}]}],
        "TargetRepository": {"Service": "ECR", "RepositoryName": "web"},
        "Tags": {"Team": "web"}, "WorkingDirectory": "/build",
    }  # fmt: skip


def write(tmp_path: Path, data: dict[str, Any], name: str = "recipe.yaml") -> Path:
    for component in ("hello.yaml", "harden.yaml"):
        shutil.copy(DATA / component, tmp_path / component)
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data))
    return path


def error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_container_recipe(path)
    return str(info.value)


def test_get_container_recipe_output_loads_as_it_is(tmp_path: Path) -> None:
    path = write(tmp_path, get_container_recipe(), "recipe.json")
    assert detect_kind(json.loads(path.read_text())) == "container-recipe"
    loaded = load_container_recipe(path)
    recipe = loaded.recipe
    assert (recipe.name, recipe.version, recipe.description, recipe.working_directory) == (
        "web", "1.0.0", "web server image", "/build"
    )  # fmt: skip
    assert (loaded.parent.kind, loaded.parent.skopeo) == ("docker", "docker://amazonlinux:latest")
    assert [(d.name, d.parameters) for d in loaded.documents] == [
        ("hello", {"Greeting": "hi"}), ("harden", {})
    ]  # fmt: skip
    # Image Builder pushes to ECR in the recipe's region: the ARN's.
    target = recipe.target_repository
    assert target is not None
    assert (target.service, target.repository_name, target.regions) == ("ECR", "web", ["us-west-2"])
    # `tags` are the AWS resource's tags, not image tags: the image is tagged with its version.
    assert recipe.resource_tags == {"team": "web"}
    assert recipe.image_tags == ["1.0.0"]


def test_the_create_request_and_cloudformation_properties_load(tmp_path: Path) -> None:
    request = create_request()
    request["targetRepository"]["regions"] = ["eu-west-1"]  # no ARN to take the region from
    recipe = load_container_recipe(write(tmp_path, request)).recipe
    assert (recipe.version, recipe.image_tags, recipe.resource_tags) == (
        "1.0.0", ["1.0.0"], {"team": "web"}
    )  # fmt: skip
    cfn = cloudformation()
    cfn["TargetRepository"]["Regions"] = ["eu-west-1"]
    assert detect_kind(cfn) == "container-recipe"
    loaded = load_container_recipe(write(tmp_path, cfn, "cfn.yaml"))
    # Tag keys are the user's words: not re-cased with the property names.
    assert loaded.recipe.resource_tags == {"Team": "web"}
    assert [(d.name, d.parameters) for d in loaded.documents] == [("hello", {"Greeting": "hi"})]
    assert loaded.recipe.working_directory == "/build"


def test_an_ecr_target_without_a_region_asks_for_one(tmp_path: Path) -> None:
    assert error(write(tmp_path, create_request())) == (
        f"{tmp_path}/recipe.yaml: targetRepository: regions: an ECR target names at least "
        "one region"
    )


def inner(change: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    data = get_container_recipe()
    data["containerRecipe"].update(change)
    for key in drop:
        del data["containerRecipe"][key]
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (inner({"dockerfileTemplateData": TEMPLATE + "RUN yum install -y httpd\n"}),
         "dockerfileTemplateData: line 4 'RUN yum install -y httpd': vmbuild builds only the "
         "standard template (FROM {{{ imagebuilder:parentImage }}}, "
         "{{{ imagebuilder:environments }}}, {{{ imagebuilder:components }}})"),
        (inner({"dockerfileTemplateData": "FROM {{{ imagebuilder:parentImage }}}\n"}),
         "dockerfileTemplateData: the template leaves out FROM {{{ imagebuilder:parentImage }}} "
         "or {{{ imagebuilder:components }}}; vmbuild always applies the components to the "
         "parent"),
        (inner({"dockerfileTemplateData": "FROM debian:12\n{{{ imagebuilder:components }}}"}),
         "dockerfileTemplateData: line 1 'FROM debian:12': vmbuild builds only"),
        (inner({"dockerfileTemplateUri": "s3://bucket/Dockerfile"}, ("dockerfileTemplateData",)),
         "dockerfileTemplateUri: vmbuild reads no Dockerfile template from S3; remove it"),
        (inner({"kmsKeyId": "arn:aws:kms:us-west-2:123456789012:key/abcd"}),
         "kmsKeyId: vmbuild cannot encrypt the image with a KMS key"),
        (inner({"platform": "Windows"}), "platform: 'Windows': vmbuild builds Linux images"),
        (inner({"components": [{"componentArn": "hello.yaml", "parameters": [
            {"name": "Greeting", "value": ["a"]}, {"name": "Greeting", "value": ["b"]}]}]}),
         "components[0].parameters[1].name: 'Greeting' given twice"),
        (inner({"components": [{"componentArn": "hello.yaml", "name": "hello.yaml"}]}),
         "components[0]: both name and componentArn"),
        (inner({"parentImage": "arn:aws:imagebuilder:us-west-2:aws:image/amazon-linux-x86-2023/x.x.x"}),
         "parentImage: 'arn:aws:imagebuilder:us-west-2:aws:image/amazon-linux-x86-2023/x.x.x': "
         "an Image Builder image ARN names an image in AWS"),
        ({**get_container_recipe(), "extra": 1}, "extra: unknown field beside containerRecipe"),
    ],
)  # fmt: skip
def test_what_vmbuild_cannot_honour_is_refused_naming_the_field(
    tmp_path: Path, data: dict[str, Any], message: str
) -> None:
    assert error(write(tmp_path, data)).startswith(f"{tmp_path}/recipe.yaml: {message}")


def test_cloudformation_refusals_name_the_property_as_written(tmp_path: Path) -> None:
    # CloudFormation's property is KmsKeyId (AWS::ImageBuilder::ContainerRecipe).
    cfn = {**cloudformation(), "KmsKeyId": "alias/images", "PlatformOverride": "Linux"}
    assert error(write(tmp_path, cfn)).startswith(
        f"{tmp_path}/recipe.yaml: KmsKeyId: vmbuild cannot encrypt the image with a KMS key"
    )
    cfn = {**cloudformation(), "DockerfileTemplateData": "FROM {{{ imagebuilder:parentImage }}}"}
    assert error(write(tmp_path, cfn)).startswith(
        f"{tmp_path}/recipe.yaml: DockerfileTemplateData: the template leaves out"
    )


def test_a_vmbuild_recipe_is_not_touched(tmp_path: Path) -> None:
    shutil.copy(DATA / "recipe.yaml", tmp_path / "recipe.yaml")
    shutil.copy(DATA / "image_checks.py", tmp_path / "image_checks.py")
    write(tmp_path, {}, "unused.yaml")
    recipe = load_container_recipe(tmp_path / "recipe.yaml").recipe
    assert (recipe.image_tags, recipe.resource_tags) == (["latest", "1.0.0"], {})
