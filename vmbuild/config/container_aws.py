"""Image Builder's own container recipe documents, accepted as they are.

Three shapes of the same recipe reach vmbuild: what `aws imagebuilder
get-container-recipe` prints (`{requestId, containerRecipe: {...}}`), the
CreateContainerRecipe request (`semanticVersion`, `clientToken`) and the properties of
a CloudFormation `AWS::ImageBuilder::ContainerRecipe` (PascalCase, `KmsKeyId`). They
are mapped onto vmbuild's container recipe before validation (`to_vmbuild`), field by
field:

- honoured: name, description, version/semanticVersion, containerType (DOCKER),
  parentImage, workingDirectory, components[{componentArn, parameters[{name,
  value: [...]}]}] (the ARN is looked up as a recipe's component name is), and
  targetRepository {service: ECR, repositoryName}; its region is the recipe ARN's
  when the document has one (get-container-recipe), else `regions` must be added.
- `tags` is a map of the recipe resource's AWS tags, not image tags: kept as
  `resourceTags` (the image is tagged with the version, or vmbuild's `tags` list).
- dockerfileTemplateData: only the standard template (`FROM {{{
  imagebuilder:parentImage }}}`, `{{{ imagebuilder:environments }}}`, `{{{
  imagebuilder:components }}}`), which is what vmbuild builds; any other line
  would change the image and is refused, naming the line.
- refused, naming the field, because vmbuild cannot honour them: dockerfileTemplateUri
  (a template in S3), kmsKeyId/KmsKeyId (a KMS-encrypted image), platform or
  platformOverride other than Linux.
- accepted and not used, because they describe the AWS resource or Image Builder's
  build instance, not the image: arn, owner, dateCreated, requestId, clientToken,
  latestVersionReferences (beside containerRecipe in get-container-recipe's output),
  encrypted (ECR encrypts at rest by repository), instanceConfiguration (the build
  instance's AMI and disks: vmbuild's builder VM takes its place),
  imageOsVersionOverride (the parent's OS for Image Builder's compatibility checks).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from vmbuild.errors import ConfigError

log = logging.getLogger("vmbuild.config.container_aws")

NOT_USED = (
    "arn", "owner", "dateCreated", "requestId", "clientToken", "encrypted",
    "instanceConfiguration", "imageOsVersionOverride",
)  # fmt: skip
_TEMPLATE_LINES = (
    ("FROM", re.compile(r"^FROM\s+\{\{\{\s*imagebuilder:parentImage\s*\}\}\}$")),
    ("environments", re.compile(r"^\{\{\{\s*imagebuilder:environments\s*\}\}\}$")),
    ("components", re.compile(r"^\{\{\{\s*imagebuilder:components\s*\}\}\}$")),
)
_ARN_REGION = re.compile(r"^arn:aws[a-z-]*:imagebuilder:([a-z0-9-]+):")


def is_image_builder(data: dict[str, Any]) -> bool:
    """A document in one of Image Builder's shapes rather than vmbuild's own."""
    if "containerRecipe" in data or "ContainerType" in data or "ParentImage" in data:
        return True
    keys = set(data)
    return bool(keys & {"semanticVersion", "dockerfileTemplateData", "arn", *NOT_USED}) or (
        isinstance(data.get("tags"), dict)
        or any(isinstance(c, dict) and "componentArn" in c for c in data.get("components") or [])
    )


def _camel(value: Any) -> Any:
    """CloudFormation's PascalCase keys, recursively, as the API's camelCase."""
    if isinstance(value, dict):
        # Tags' keys are the user's own words, not property names.
        return {
            k[:1].lower() + k[1:] if isinstance(k, str) else k:
            v if k == "Tags" else _camel(v)
            for k, v in value.items()
        }  # fmt: skip
    if isinstance(value, list):
        return [_camel(v) for v in value]
    return value


def _template(display: str, field: str, text: object) -> None:
    if not isinstance(text, str):
        raise ConfigError(display, field, "expected a string")
    lines = [
        (n, line.strip())
        for n, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#")
    ]
    seen: list[str] = []
    for n, line in lines:
        kind = next((k for k, pattern in _TEMPLATE_LINES if pattern.match(line)), None)
        if kind is None or kind in seen or (kind != "FROM" and not seen):
            raise ConfigError(
                display, field,
                f"line {n} {line!r}: vmbuild builds only the standard template "
                "(FROM {{{ imagebuilder:parentImage }}}, {{{ imagebuilder:environments }}}, "
                "{{{ imagebuilder:components }}})",
                hint="put what the line does in a component",
            )  # fmt: skip
        seen.append(kind)
    if "components" not in seen or "FROM" not in seen:
        raise ConfigError(
            display, field,
            "the template leaves out FROM {{{ imagebuilder:parentImage }}} or "
            "{{{ imagebuilder:components }}}; vmbuild always applies the components to the parent",
        )  # fmt: skip


def _components(display: str, items: object) -> object:
    if not isinstance(items, list):
        return items
    out: list[object] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "componentArn" not in item:
            out.append(item)
            continue
        item = dict(item)
        if "name" in item:
            raise ConfigError(display, f"components[{i}]", "both name and componentArn")
        item["name"] = item.pop("componentArn")
        params = item.get("parameters")
        if isinstance(params, list):
            mapped: dict[str, object] = {}
            for j, param in enumerate(params):
                where = f"components[{i}].parameters[{j}]"
                if not isinstance(param, dict) or set(param) != {"name", "value"}:
                    raise ConfigError(display, where, "expected {name, value: [strings]}")
                if param["name"] in mapped:
                    raise ConfigError(display, f"{where}.name", f"{param['name']!r} given twice")
                mapped[str(param["name"])] = param["value"]
            item["parameters"] = mapped
        out.append(item)
    return out


def to_vmbuild(data: dict[str, Any], display: str) -> dict[str, Any]:
    """An Image Builder container recipe document as vmbuild's container recipe;
    a vmbuild recipe is returned unchanged. Raises ConfigError naming the field."""
    if not is_image_builder(data):
        return data
    cfn = "ParentImage" in data or "ContainerType" in data
    data = _camel(data) if cfn else dict(data)

    def shown(field: str) -> str:
        """The field as the document spells it (errors name what the user wrote)."""
        return field[:1].upper() + field[1:] if cfn else field

    inner = data.get("containerRecipe")
    if isinstance(inner, dict):
        # latestVersionReferences names the recipe's newest versions in AWS: not the image.
        extra = set(data) - {"containerRecipe", "requestId", "latestVersionReferences"}
        if extra:
            raise ConfigError(display, sorted(extra)[0], "unknown field beside containerRecipe")
        data = dict(inner)
    for field in ("dockerfileTemplateUri", "kmsKeyId"):
        if field in data:
            why = {"dockerfileTemplateUri": "vmbuild reads no Dockerfile template from S3",
                   "kmsKeyId": "vmbuild cannot encrypt the image with a KMS key (ECR encrypts "
                   "at rest with the repository's settings)"}[field]  # fmt: skip
            raise ConfigError(display, shown(field), f"{why}; remove it")
    for field in ("platform", "platformOverride"):
        if field in data and str(data[field]).lower() != "linux":
            raise ConfigError(
                display, shown(field), f"{data[field]!r}: vmbuild builds Linux images"
            )
        data.pop(field, None)
    if "dockerfileTemplateData" in data:
        _template(display, shown("dockerfileTemplateData"), data.pop("dockerfileTemplateData"))
    if "semanticVersion" in data:
        if "version" in data:
            raise ConfigError(display, "semanticVersion", "both version and semanticVersion")
        data["version"] = data.pop("semanticVersion")
    if isinstance(data.get("tags"), dict):
        data["resourceTags"] = data.pop("tags")
    if "components" in data:
        data["components"] = _components(display, data["components"])
    # Image Builder pushes to ECR in the recipe's own region: the ARN's, when there is one.
    target = data.get("targetRepository")
    region = _ARN_REGION.match(str(data.get("arn", "")))
    if isinstance(target, dict) and target.get("service") == "ECR" and region:
        data["targetRepository"] = {"regions": [region[1]], **target}
    for field in NOT_USED:
        if field in data:
            log.info("%s: %s describes the AWS resource or build instance: not used",
                     display, field)  # fmt: skip
            data.pop(field)
    return data
