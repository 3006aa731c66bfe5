"""Read EC2 Image Builder definitions into one shape: a list of `Resource`.

Three sources, as AWS documents them:

* CloudFormation templates (YAML with the short-form tags `!Ref`, `!GetAtt`,
  `!Sub`, ... or JSON): `AWS::ImageBuilder::*` resources. `Ref`/`GetAtt`/`Sub`
  between the template's own resources resolve to a `ResourceRef`; parameters
  resolve to their Default.
* Terraform: `.tf` files (HCL, read with python-hcl2) and `terraform show -json`
  output: `aws_imagebuilder_*` resources; `aws_imagebuilder_x.name.arn`
  references resolve to a `ResourceRef`.
* `aws imagebuilder create-* --cli-input-json` files: the API's request shapes,
  told apart by their fields.

Property names are turned into snake_case (`ParentImage`, `parentImage` and
`parent_image` are one field), so the conversion reads one vocabulary.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vmbuild.errors import VmbuildError

KINDS = (
    "component",
    "image_recipe",
    "infrastructure_configuration",
    "distribution_configuration",
    "image_pipeline",
    "lifecycle_policy",
    "workflow",
    "image",
    "container_recipe",
)
_CFN_TYPES = {
    "AWS::ImageBuilder::Component": "component",
    "AWS::ImageBuilder::ImageRecipe": "image_recipe",
    "AWS::ImageBuilder::InfrastructureConfiguration": "infrastructure_configuration",
    "AWS::ImageBuilder::DistributionConfiguration": "distribution_configuration",
    "AWS::ImageBuilder::ImagePipeline": "image_pipeline",
    "AWS::ImageBuilder::LifecyclePolicy": "lifecycle_policy",
    "AWS::ImageBuilder::Workflow": "workflow",
    "AWS::ImageBuilder::Image": "image",
    "AWS::ImageBuilder::ContainerRecipe": "container_recipe",
}
_TF_PREFIX = "aws_imagebuilder_"
# Pseudo parameters: only what an ARN needs to be recognised (a managed
# component's ARN is the same in every region).
_PSEUDO = {"AWS::Partition": "aws", "AWS::Region": "us-east-1", "AWS::URLSuffix": "amazonaws.com"}


class ImportError_(VmbuildError):
    """A source that cannot be read as an Image Builder definition."""


@dataclass(frozen=True)
class ResourceRef:
    """A reference to another resource of the same source (by its logical name)."""

    target: str
    attribute: str = "Arn"


@dataclass
class Resource:
    kind: str  # one of KINDS
    name: str  # logical name (CloudFormation/Terraform) or the API name
    props: dict[str, Any]  # snake_case keys
    origin: str  # file and where in it, for the report
    dropped_types: list[str] = field(default_factory=list)


def snake(name: str) -> str:
    """ParentImage / parentImage / parent_image → parent_image."""
    text = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name)
    text = re.sub(r"(?<=[A-Z])([A-Z][a-z])", r"_\1", text)
    return text.replace("-", "_").lower()


def snake_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {snake(str(k)): snake_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [snake_keys(v) for v in value]
    return value


# --- CloudFormation -------------------------------------------------------------


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form intrinsic functions."""


def _tag(name: str):  # type: ignore[no-untyped-def]
    def construct(loader: _CfnLoader, node: yaml.Node) -> dict[str, Any]:
        if isinstance(node, yaml.ScalarNode):
            value: Any = loader.construct_scalar(node)
            if name == "Fn::GetAtt" and isinstance(value, str):
                value = value.split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
        return {name: value}

    return construct


for _short in ("Ref", "Condition"):
    _CfnLoader.add_constructor(f"!{_short}", _tag(_short))
for _fn in (
    "GetAtt", "Sub", "Join", "Select", "Split", "If", "Equals", "And", "Or", "Not",
    "FindInMap", "ImportValue", "Base64", "Cidr", "GetAZs", "Transform", "ToJsonString",
    "Length",
):  # fmt: skip
    _CfnLoader.add_constructor(f"!{_fn}", _tag(f"Fn::{_fn}"))


def _load_cfn_text(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.load(text, Loader=_CfnLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ImportError_(f"{path}: not JSON or YAML: {exc}") from None


@dataclass
class _Cfn:
    path: Path
    template: dict[str, Any]
    resources: dict[str, Any]
    parameters: dict[str, Any]

    def resolve(self, value: Any) -> Any:
        """Intrinsic functions between the template's own resources resolved."""
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((key, arg),) = value.items()
            if key == "Ref":
                return self._ref(str(arg))
            if key == "Fn::GetAtt":
                parts = arg if isinstance(arg, list) else str(arg).split(".", 1)
                if parts and parts[0] in self.resources:
                    return ResourceRef(str(parts[0]), str(parts[1]) if len(parts) > 1 else "Arn")
                return value
            if key == "Fn::Sub":
                return self._sub(arg)
            if key == "Fn::Join" and isinstance(arg, list) and len(arg) == 2:
                parts = self.resolve(arg[1])
                if isinstance(parts, list) and all(isinstance(p, str) for p in parts):
                    return str(arg[0]).join(parts)
        return {k: self.resolve(v) for k, v in value.items()}

    def _ref(self, name: str) -> Any:
        if name in self.resources:
            return ResourceRef(name)
        if name in _PSEUDO:
            return _PSEUDO[name]
        parameter = self.parameters.get(name)
        if isinstance(parameter, dict) and "Default" in parameter:
            return parameter["Default"]
        return {"Ref": name}  # a pseudo parameter or one without a default

    def _sub(self, arg: Any) -> Any:
        text, extra = (arg[0], arg[1]) if isinstance(arg, list) and len(arg) == 2 else (arg, {})
        if not isinstance(text, str):
            return {"Fn::Sub": arg}
        whole = re.fullmatch(r"\$\{([A-Za-z0-9]+)(?:\.(\w+))?\}", text)
        if whole and whole[1] in self.resources:  # `!Sub ${Component.Arn}` is the reference
            return ResourceRef(whole[1], whole[2] or "Arn")

        def substitute(m: re.Match[str]) -> str:
            name = m[1]
            if name in extra and isinstance(extra[name], str):
                return str(extra[name])
            if name in _PSEUDO:
                return _PSEUDO[name]
            parameter = self.parameters.get(name)
            if isinstance(parameter, dict) and isinstance(parameter.get("Default"), str | int):
                return str(parameter["Default"])
            return m[0]  # ${AWS::Region} and the like stay for the report

        return re.sub(r"\$\{([A-Za-z0-9:]+)\}", substitute, text)


def read_cloudformation(path: Path, data: dict[str, Any]) -> list[Resource]:
    resources = data.get("Resources") or {}
    if not isinstance(resources, dict):
        raise ImportError_(f"{path}: Resources: expected a map")
    cfn = _Cfn(path, data, resources, data.get("Parameters") or {})
    found = []
    for logical, body in resources.items():
        if not isinstance(body, dict):
            continue
        kind = _CFN_TYPES.get(str(body.get("Type")))
        if kind is None:
            continue
        props = snake_keys(cfn.resolve(body.get("Properties") or {}))
        found.append(Resource(kind, str(logical), props, f"{path.name}: Resources.{logical}"))
    return found


# --- Terraform ------------------------------------------------------------------

_TF_REF = re.compile(r"^\$\{(aws_imagebuilder_\w+)\.([\w-]+)\.(\w+)\}$")


def _unquote(value: Any) -> Any:
    """python-hcl2 keeps string quotes and marks blocks; take both away."""
    if isinstance(value, dict):
        return {_unquote(k): _unquote(v) for k, v in value.items() if k not in ("__is_block__",)}
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, str):
        heredoc = re.fullmatch(r'"<<(-?)(\w+)\n(.*)\n\s*\2"', value, re.S)
        if heredoc:
            text = heredoc[3] + "\n"
            return textwrap.dedent(text) if heredoc[1] else text
        if len(value) >= 2 and value[0] == value[-1] == '"':
            return value[1:-1].replace('\\"', '"').replace("\\n", "\n")
        ref = _TF_REF.match(value)
        if ref:
            return ResourceRef(ref[2], ref[3])
        if value.startswith("${") and value.endswith("}"):
            inner = value[2:-1]
            if re.fullmatch(r"aws_imagebuilder_\w+\.[\w-]+\.\w+", inner):
                _, name, attribute = inner.split(".")
                return ResourceRef(name, attribute)
    return value


_ENCODE_CALL = re.compile(r"^\$\{(yamlencode|jsonencode)\((.*)\)\}$", re.S)


def encoded_literal(value: str) -> tuple[Any, str | None] | None:
    """A component's `data = yamlencode({...})` (or jsonencode), evaluated when its
    argument is a literal: (the value, None); (None, why) when it refers to
    anything (var., local., a function) only Terraform can evaluate; None when
    `value` is not such a call. The literal is parsed by python-hcl2 itself, as
    the right-hand side of an attribute, so HCL's syntax is never re-implemented."""
    import hcl2

    call = _ENCODE_CALL.match(value)
    if call is None:
        return None
    try:
        parsed = _unquote(hcl2.loads(f"x = {call[2]}\n"))["x"]
    except Exception as exc:  # lark's parse errors have no common base class
        return None, f"{call[1]}(...) is not a literal HCL value: {str(exc).splitlines()[0]}"
    if refs := sorted(set(_expressions(parsed))):
        return None, f"{call[1]}(...) uses {', '.join(refs)}: only Terraform can evaluate it"
    return parsed, None


def _expressions(value: Any) -> list[str]:
    """The `${...}` expressions (references, calls) left in a parsed HCL value."""
    if isinstance(value, dict):
        return [e for v in value.values() for e in _expressions(v)]
    if isinstance(value, list):
        return [e for v in value for e in _expressions(v)]
    if isinstance(value, ResourceRef):
        return [f"{value.target}.{value.attribute}"]
    if isinstance(value, str) and "${" in value:
        return re.findall(r"\$\{([^}]*)\}", value)
    return []


def read_terraform_hcl(path: Path, text: str) -> list[Resource]:
    import hcl2  # the maintained HCL2 parser; only needed for .tf files

    try:
        data = hcl2.loads(text)
    except Exception as exc:  # lark's parse errors have no common base class
        raise ImportError_(f"{path}: not Terraform HCL: {str(exc).splitlines()[0]}") from None
    found = []
    for block in data.get("resource") or []:
        for rtype, named in _unquote(block).items():
            if not str(rtype).startswith(_TF_PREFIX):
                continue
            for name, body in named.items():
                props = _tf_blocks(body)
                kind = str(rtype)[len(_TF_PREFIX) :]
                found.append(Resource(kind, str(name), props, f"{path.name}: {rtype}.{name}"))
    return found


def _tf_blocks(value: Any) -> Any:
    """Nested blocks come as lists of maps; keep lists (repeated blocks) as they are."""
    if isinstance(value, dict):
        return {k: _tf_blocks(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_tf_blocks(v) for v in value]
    return value


def read_terraform_json(path: Path, data: dict[str, Any]) -> list[Resource]:
    """`terraform show -json` (a plan or a state): values.root_module.resources."""
    values = data.get("values") or data.get("planned_values") or {}
    modules = [values.get("root_module") or {}]
    found = []
    while modules:
        module = modules.pop()
        modules.extend(module.get("child_modules") or [])
        for res in module.get("resources") or []:
            rtype = str(res.get("type", ""))
            if not rtype.startswith(_TF_PREFIX) or res.get("mode", "managed") != "managed":
                continue
            kind = rtype[len(_TF_PREFIX) :]
            address = str(res.get("address") or f"{rtype}.{res.get('name')}")
            found.append(
                Resource(
                    kind, str(res.get("name")), res.get("values") or {}, f"{path.name}: {address}"
                )
            )
    return found


# --- aws imagebuilder create-* --cli-input-json --------------------------------

# The request fields that tell the operations apart.
_CLI_SHAPES = (
    ("image_pipeline", ("image_recipe_arn", "infrastructure_configuration_arn")),
    ("image_recipe", ("parent_image", "components")),
    ("component", ("platform",)),
    ("infrastructure_configuration", ("instance_profile_name",)),
    ("distribution_configuration", ("distributions",)),
    ("lifecycle_policy", ("policy_details",)),
)


def read_cli_json(path: Path, data: dict[str, Any]) -> list[Resource]:
    props = snake_keys(data)
    for kind, keys in _CLI_SHAPES:
        if all(k in props for k in keys):
            name = str(props.get("name") or path.stem)
            return [Resource(kind, name, props, f"{path.name} (create-{kind.replace('_', '-')})")]
    raise ImportError_(
        f"{path}: not an Image Builder definition (CloudFormation, Terraform, or an "
        "aws imagebuilder create-* --cli-input-json file)"
    )


def read_source(path: Path) -> list[Resource]:
    """Every Image Builder resource in one file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportError_(f"{path}: cannot read: {exc}") from None
    if path.suffix == ".tf":
        return read_terraform_hcl(path, text)
    data = _load_cfn_text(text, path)
    if not isinstance(data, dict):
        raise ImportError_(f"{path}: expected a map at the top")
    if "Resources" in data or "AWSTemplateFormatVersion" in data:
        return read_cloudformation(path, data)
    if "format_version" in data and ("values" in data or "planned_values" in data):
        return read_terraform_json(path, data)
    return read_cli_json(path, data)
