"""Turn Image Builder resources into vmbuild files, with a report of every field.

Each field of each resource is either mapped (same meaning), converted (same
meaning, other form: a name slugged, a single-value list unwrapped, a cron
expression), or dropped (no meaning on a local builder: instance profiles,
subnets, SNS topics, workflows...) with why. Nothing is dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vmbuild.imports.parents import parent_base
from vmbuild.imports.sources import Resource, ResourceRef, encoded_literal

# vCPUs and memory of common instance types, for the builder VM's size.
_SIZES = {"nano": (2, "512M"), "micro": (2, "1G"), "small": (2, "2G"), "medium": (2, "4G"),
          "large": (2, "8G"), "xlarge": (4, "16G"), "2xlarge": (8, "32G")}  # fmt: skip
_DROPPED_WHY = {
    "instance_profile_name": "the builder VM needs no IAM role (S3 actions run on the host)",
    "subnet_id": "the builder VM uses QEMU user networking",
    "security_group_ids": "the builder VM uses QEMU user networking",
    "key_pair": "vmbuild makes a key per build",
    "sns_topic_arn": "no SNS notifications: vmbuild runs list/show report outcomes",
    "logging": "logs are kept locally (run log and components' detailed output)",
    "resource_tags": "no EC2 instance to tag",
    "tags": "tags of the Image Builder resource itself",
    "instance_metadata_options": "no IMDS on the builder VM",
    "placement": "no EC2 placement",
    "workflows": "Image Builder workflows are not run; vmbuild's stages are fixed",
    "execution_role": "no IAM role is assumed",
    "image_scanning_configuration": "no Inspector scan (see vmbuild's offline CVE scan)",
    "enhanced_image_metadata_enabled": "vmbuild always records the package list (SBOM)",
    "additional_instance_configuration": "no EC2 user data or SSM agent settings on the builder",
    "launch_template_configurations": "no launch templates are updated",
    "target_account_ids": "AMIs are not copied to other accounts (share them instead)",
    "license_configuration_arns": "no License Manager",
    "fast_launch_configurations": "Windows fast launch",
    "s3_export_configuration": "no S3 export of the image",
    "container_distribution_configuration": "container images are not built",
    "kms_key_id": "the component document is read in clear",
    "supported_os_versions": "informational",
    "change_description": "informational",
    "platform": "Linux components only",
    "client_token": "an API idempotency token",
    "status": "pipelines are run by vmbuild's scheduler",
    "dry_run": "",
}


_PERMISSIONS = ("user_ids", "user_groups", "organization_arns", "organizational_unit_arns")
_DISTRIBUTION_KEYS = (
    "region",
    "ami_distribution_configuration",
    "ssm_parameter_configurations",
    "ssm_parameter_configuration",
)


@dataclass
class Report:
    lines: list[tuple[str, str, str, str]] = field(default_factory=list)

    def mapped(self, where: str, what: str, to: str) -> None:
        self.lines.append(("mapped", where, what, to))

    def converted(self, where: str, what: str, how: str) -> None:
        self.lines.append(("converted", where, what, how))

    def dropped(self, where: str, what: str, why: str) -> None:
        self.lines.append(("dropped", where, what, why))

    def text(self) -> str:
        out = []
        for kind in ("mapped", "converted", "dropped"):
            rows = [line for line in self.lines if line[0] == kind]
            if rows:
                out.append(f"{kind}:")
                out += [f"  {where}: {what} -> {detail}" for _, where, what, detail in rows]
        return "\n".join(out) + "\n"


class NeedsBase(Exception):
    """The parent image maps to no vendor image: the user must say --base."""


def slug(name: str) -> str:
    text = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return text[:63] or "imported"


def _one(value: Any) -> dict[str, Any]:
    """A nested settings map: Terraform writes a block as a one-item list."""
    if isinstance(value, list) and value:
        value = value[0]
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        return str(value[0])
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass
class Converted:
    recipe: dict[str, Any] | None = None
    pipeline: dict[str, Any] | None = None
    distribution: dict[str, Any] | None = None
    components: dict[str, str] = field(default_factory=dict)  # file name → document text
    report: Report = field(default_factory=Report)


@dataclass
class Converter:
    resources: list[Resource]
    source_dir: Path
    base: str | None = None
    region: str | None = None
    out: Converted = field(default_factory=Converted)
    component_files: dict[str, str] = field(default_factory=dict)  # logical/API name → ./path

    def by_kind(self, kind: str) -> list[Resource]:
        return [r for r in self.resources if r.kind == kind]

    def find(self, ref: Any, kind: str) -> Resource | None:
        """The resource a ResourceRef, a name or an ARN of this import points to."""
        candidates = self.by_kind(kind)
        if isinstance(ref, ResourceRef):
            return next((r for r in candidates if r.name == ref.target), None)
        if isinstance(ref, str):
            name = ref.rsplit("/", 2)[-2] if ref.startswith("arn:") and ref.count("/") >= 2 else ref
            return next(
                (r for r in candidates if r.name == name or r.props.get("name") == name), None
            )
        return None

    def run(self) -> Converted:
        for resource in self.resources:
            if resource.kind not in {
                "component", "image_recipe", "infrastructure_configuration",
                "distribution_configuration", "image_pipeline", "lifecycle_policy",
            }:  # fmt: skip
                self.out.report.dropped(resource.origin, resource.kind, _kind_why(resource.kind))
        for component in self.by_kind("component"):
            self.component(component)
        pipelines = self.by_kind("image_pipeline")
        recipes = self.by_kind("image_recipe")
        pipeline = pipelines[0] if pipelines else None
        recipe = (
            self.find(pipeline.props.get("image_recipe_arn"), "image_recipe") if pipeline else None
        )
        recipe = recipe or (recipes[0] if recipes else None)
        for extra in [r for r in recipes if r is not recipe]:
            self.out.report.dropped(extra.origin, "image recipe", "one recipe per import")
        for extra in pipelines[1:]:
            self.out.report.dropped(extra.origin, "image pipeline", "one pipeline per import")
        if recipe is not None:
            self.image_recipe(recipe)
        distribution = None
        if pipeline is not None:
            distribution = self.find(
                pipeline.props.get("distribution_configuration_arn"), "distribution_configuration"
            )
        dists = self.by_kind("distribution_configuration")
        distribution = distribution or (dists[0] if dists else None)
        if distribution is not None:
            self.distribution(distribution)
        if pipeline is not None:
            self.pipeline(pipeline)
        return self.out

    # --- components -------------------------------------------------------------

    def component(self, res: Resource) -> None:
        p, where = res.props, res.origin
        name = slug(str(p.get("name") or res.name))
        if str(p.get("platform", "Linux")).lower() == "windows":
            self.out.report.dropped(where, "component", "Windows guests are not supported yet")
            return
        text = p.get("data")
        file_call = re.fullmatch(r'\$\{file\("(?:\$\{path\.module\}/)?([^"$]+)"\)\}', str(text))
        if file_call:  # Terraform's data = file("${path.module}/x.yaml")
            text = self._read_uri(file_call[1], where)
            if text is None:
                return
            self.out.report.converted(where, "data", f"components/{name}.yaml (file() read)")
        elif isinstance(text, str) and (encoded := encoded_literal(text)) is not None:
            document, why = encoded
            if why is not None:
                self.out.report.dropped(
                    where, "data", f"{why}; import `terraform show -json` instead"
                )
                return
            # Terraform's yamlencode writes the same mapping: keys in source order.
            text = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
            self.out.report.converted(where, "data", f"components/{name}.yaml (yamlencode read)")
        elif isinstance(text, str) and text.startswith("${"):
            self.out.report.dropped(
                where, "data", "a Terraform expression; import `terraform show -json` instead"
            )
            return
        elif isinstance(text, str):
            self.out.report.converted(where, "data", f"components/{name}.yaml")
        elif isinstance(p.get("uri"), str):
            text = self._read_uri(p["uri"], where)
            if text is None:
                return
            self.out.report.converted(where, "uri", f"components/{name}.yaml (copied)")
        else:
            self.out.report.dropped(where, "component", "neither data nor uri")
            return
        self.out.components[f"{name}.yaml"] = text
        path = f"./components/{name}.yaml"
        for key in {res.name, str(p.get("name") or "")} - {""}:
            self.component_files[key] = path
        for key in p:
            if key in ("name", "data", "uri"):
                continue
            if key in ("version", "semantic_version", "description"):
                self.out.report.mapped(where, key, "kept in the report; the document is the file")
            else:
                self.out.report.dropped(where, key, _DROPPED_WHY.get(key, "no local meaning"))

    def _read_uri(self, uri: str, where: str) -> str | None:
        if uri.startswith("s3://"):
            try:
                from vmbuild.toe.actions.s3 import S3Config, parse_s3_uri

                bucket, key = parse_s3_uri(uri)
                body = S3Config().client().get_object(Bucket=bucket, Key=key)["Body"].read()
                return str(body.decode("utf-8"))
            except Exception as exc:  # no credentials, no bucket: say so in the report
                self.out.report.dropped(where, "uri", f"cannot read {uri}: {exc}")
                return None
        path = Path(uri.removeprefix("file://"))
        path = path if path.is_absolute() else self.source_dir / path
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            self.out.report.dropped(where, "uri", f"cannot read {path}: {exc.strerror}")
            return None

    # --- recipe -----------------------------------------------------------------

    def image_recipe(self, res: Resource) -> None:
        p, where, report = res.props, res.origin, self.out.report
        name = str(p.get("name") or res.name)
        recipe: dict[str, Any] = {"name": slug(name)}
        if slug(name) != name:
            report.converted(where, "name", f"slugged to {slug(name)}")
        else:
            report.mapped(where, "name", "name")
        version = p.get("semantic_version") or p.get("version") or "1.0.0"
        recipe["version"] = re.sub(r"\.x", ".0", str(version))
        report.mapped(where, "version", "version")
        if p.get("description"):
            recipe["description"] = str(p["description"])
            report.mapped(where, "description", "description")
        if self.base:
            recipe["base"] = self.base
            report.converted(where, "parent_image", f"--base {self.base}")
        else:
            recipe["base"] = parent_base(str(p.get("parent_image")))
            report.converted(where, "parent_image", f"base {recipe['base']} (parent image table)")
        components = []
        for i, entry in enumerate(p.get("components") or p.get("component") or []):
            ref = self._component_ref(entry.get("component_arn"), f"{where}: components[{i}]")
            if ref is None:
                continue
            item: dict[str, Any] = {"name": ref}
            params = entry.get("parameters") or entry.get("parameter") or []
            if params:
                item["parameters"] = {str(x["name"]): _text(x.get("value")) for x in params}
                report.converted(
                    f"{where}: components[{i}]", "parameters", "values as strings (lists unwrapped)"
                )
            components.append(item)
        recipe["components"] = components
        for bdm in p.get("block_device_mappings") or p.get("block_device_mapping") or []:
            ebs = _one(bdm.get("ebs"))
            if ebs.get("volume_size"):
                recipe["disk_size"] = f"{int(ebs['volume_size'])}G"
                report.converted(where, "block_device_mappings", f"disk_size {recipe['disk_size']}")
                break
        if p.get("working_directory"):
            recipe["working_directory"] = str(p["working_directory"])
            report.mapped(where, "working_directory", "working_directory")
        for key in p:
            if key in ("name", "version", "semantic_version", "description", "parent_image",
                       "components", "component", "block_device_mappings",
                       "block_device_mapping", "working_directory"):  # fmt: skip
                continue
            report.dropped(where, key, _DROPPED_WHY.get(key, "no local meaning"))
        self.out.recipe = recipe

    def _component_ref(self, arn: Any, where: str) -> str | None:
        from vmbuild.toe.library import ComponentNotFound, find_component, parse_arn

        if isinstance(arn, ResourceRef) or (
            isinstance(arn, str) and self.find(arn, "component") is not None
        ):
            target = self.find(arn, "component")
            if target is not None:
                key = (
                    target.name
                    if target.name in self.component_files
                    else str(target.props.get("name"))
                )
                if key in self.component_files:
                    self.out.report.converted(where, "component_arn", self.component_files[key])
                    return self.component_files[key]
            self.out.report.dropped(where, "component_arn", f"{arn} was not imported")
            return None
        text = str(arn)
        parsed = parse_arn(text)
        try:
            find_component(text, self.source_dir)
        except ComponentNotFound as exc:
            self.out.report.dropped(where, "component_arn", f"{text}: {exc}")
            return None
        if parsed is not None and parsed.aws_managed:
            self.out.report.converted(
                where, "component_arn", f"{parsed.name} (built-in equivalent)"
            )
            return parsed.name
        self.out.report.mapped(where, "component_arn", f"{text} (local component library)")
        return text

    # --- distribution -------------------------------------------------------------

    def distribution(self, res: Resource) -> None:
        p, where, report = res.props, res.origin, self.out.report
        regions = []
        for i, entry in enumerate(p.get("distributions") or p.get("distribution") or []):
            at = f"{where}: distributions[{i}]"
            region: dict[str, Any] = {"region": str(entry.get("region"))}
            ami = _one(entry.get("ami_distribution_configuration"))
            if ami.get("name"):
                name = str(ami["name"])
                converted = name.replace("{{ imagebuilder:buildDate }}", "{{ build_date }}")
                converted = converted.replace("{{imagebuilder:buildDate}}", "{{ build_date }}")
                converted = re.sub(
                    r"\{\{\s*imagebuilder:buildVersion\s*\}\}", "{{ build }}", converted
                )
                region["name"] = converted
                if converted != name:
                    report.converted(
                        at,
                        "ami_distribution_configuration.name",
                        "Image Builder variables to vmbuild's",
                    )
                else:
                    report.mapped(at, "ami_distribution_configuration.name", "name")
            for key in ("description", "ami_tags", "kms_key_id"):
                if ami.get(key):
                    region[key] = ami[key]
                    report.mapped(at, f"ami_distribution_configuration.{key}", key)
            if ami.get("kms_key_id"):
                region["encrypted"] = True
                report.converted(at, "ami_distribution_configuration.kms_key_id", "encrypted: true")
            perms = _one(ami.get("launch_permission_configuration") or ami.get("launch_permission"))
            if perms:
                region["launch_permission"] = {
                    k: list(v) for k, v in perms.items() if k in _PERMISSIONS and v
                }
                report.mapped(at, "launch_permission_configuration", "launch_permission")
            if ami.get("target_account_ids"):
                report.dropped(at, "target_account_ids", _DROPPED_WHY["target_account_ids"])
            ssm = (
                entry.get("ssm_parameter_configurations")
                or entry.get("ssm_parameter_configuration")
                or []
            )
            if ssm:
                region["ssm_parameter_configurations"] = [
                    {
                        "parameter_name": s["parameter_name"],
                        "data_type": s.get("data_type", "aws:ec2:image"),
                    }
                    for s in ssm
                ]
                report.mapped(at, "ssm_parameter_configurations", "ssm_parameter_configurations")
            for key in entry:
                if key not in _DISTRIBUTION_KEYS:
                    report.dropped(at, key, _DROPPED_WHY.get(key, "no local meaning"))
            regions.append(region)
        if self.region and any(r["region"] == self.region for r in regions):
            regions.sort(key=lambda r: r["region"] != self.region)
            report.converted(where, "distributions", f"build region {self.region} first")
        if regions:
            self.out.distribution = {"regions": regions}

    # --- pipeline -----------------------------------------------------------------

    def pipeline(self, res: Resource) -> None:
        p, where, report = res.props, res.origin, self.out.report
        pipeline: dict[str, Any] = {
            "name": slug(str(p.get("name") or res.name)),
            "recipe": "recipe.yaml",
        }
        report.converted(where, "name", f"slugged to {pipeline['name']}")
        if p.get("description"):
            pipeline["description"] = str(p["description"])
        schedule = _one(p.get("schedule"))
        if schedule.get("schedule_expression"):
            cron = aws_cron(str(schedule["schedule_expression"]))
            if cron is None:
                report.dropped(
                    where, "schedule", f"{schedule['schedule_expression']}: not expressible as cron"
                )
            else:
                spec: dict[str, Any] = {"cron": cron}
                if schedule.get("timezone"):
                    spec["timezone"] = str(schedule["timezone"])
                condition = str(schedule.get("pipeline_execution_start_condition") or "")
                if condition == "EXPRESSION_MATCH_AND_DEPENDENCY_UPDATES_AVAILABLE":
                    spec["start_condition"] = "if-dependencies-updated"
                pipeline["schedule"] = spec
                report.converted(where, "schedule", f"cron '{cron}'")
        tests = _one(p.get("image_tests_configuration"))
        if tests:
            pipeline["tests"] = {"enabled": bool(tests.get("image_tests_enabled", True))}
            if tests.get("timeout_minutes"):
                pipeline["tests"]["timeout"] = f"{int(tests['timeout_minutes'])}m"
            report.mapped(where, "image_tests_configuration", "tests")
        infra = self.find(p.get("infrastructure_configuration_arn"), "infrastructure_configuration")
        if infra is not None:
            pipeline["infrastructure"] = self.infrastructure(infra)
        lifecycles = self.by_kind("lifecycle_policy")
        if lifecycles:
            pipeline["lifecycle"] = self.lifecycle(lifecycles[0])
        if self.out.distribution is not None:
            pipeline["distribution"] = self.out.distribution
            report.converted(
                where, "distribution_configuration_arn", "distribution (also distribution.yaml)"
            )
        for key in p:
            if key in ("name", "description", "schedule", "image_tests_configuration",
                       "infrastructure_configuration_arn", "image_recipe_arn",
                       "distribution_configuration_arn"):  # fmt: skip
                continue
            report.dropped(where, key, _DROPPED_WHY.get(key, "no local meaning"))
        self.out.pipeline = pipeline

    def infrastructure(self, res: Resource) -> dict[str, Any]:
        p, where, report = res.props, res.origin, self.out.report
        infra: dict[str, Any] = {}
        types = p.get("instance_types") or []
        if types:
            size = _SIZES.get(str(types[0]).rsplit(".", 1)[-1])
            if size is not None:
                infra["cpus"], infra["memory"] = size
                report.converted(
                    where, "instance_types", f"{types[0]}: {size[0]} CPUs, {size[1]} memory"
                )
            else:
                report.dropped(
                    where, "instance_types", f"{types[0]}: size unknown, VM defaults kept"
                )
        if p.get("terminate_instance_on_failure") is False:
            infra["keep_on_failure"] = True
            report.converted(where, "terminate_instance_on_failure", "keep_on_failure: true")
        for key in p:
            if key not in ("instance_types", "terminate_instance_on_failure", "name"):
                report.dropped(where, key, _DROPPED_WHY.get(key, "no local meaning"))
        return infra

    def lifecycle(self, res: Resource) -> dict[str, Any]:
        p, where, report = res.props, res.origin, self.out.report
        rules: dict[str, Any] = {}
        for detail in p.get("policy_details") or p.get("policy_detail") or []:
            filt = _one(detail.get("filter"))
            kind = str(filt.get("type", "")).upper()
            if kind == "COUNT":
                rules["keep_last"] = int(filt["value"])
                report.converted(
                    where, "policy_details.filter COUNT", f"keep_last {rules['keep_last']}"
                )
            elif kind == "AGE":
                days = {"DAYS": 1, "WEEKS": 7, "MONTHS": 30, "YEARS": 365}.get(
                    str(filt.get("unit", "DAYS")).upper(), 1
                )
                rules["max_age"] = f"{int(filt['value']) * days}d"
                report.converted(where, "policy_details.filter AGE", f"max_age {rules['max_age']}")
        for key in p:
            if key not in ("policy_details", "policy_detail", "name"):
                report.dropped(where, key, _DROPPED_WHY.get(key, "no local meaning"))
        return rules


def aws_cron(expression: str) -> str | None:
    """`cron(0 3 ? * MON *)` (EventBridge: minutes hours day month weekday year) →
    `0 3 * * MON`; None when it has no 5-field equivalent (L, W, #, a year)."""
    m = re.fullmatch(r"\s*cron\((.*)\)\s*", expression)
    fields = (m[1] if m else expression).split()
    if len(fields) == 6:
        if fields[5] not in ("*", "?"):
            return None
        fields = fields[:5]
    if len(fields) != 5 or any(c in f for f in fields for c in "LW#"):
        return None
    fields = ["*" if f == "?" else f for f in fields]
    if re.fullmatch(r"[1-7](-[1-7])?(,[1-7])*", fields[4]):  # EventBridge: 1 = Sunday
        fields[4] = re.sub(r"[1-7]", lambda d: str(int(d[0]) - 1), fields[4])
    return " ".join(fields)


def _kind_why(kind: str) -> str:
    return {
        "workflow": "Image Builder workflows are not run; vmbuild's stages are fixed",
        "image": "an image build request: run vmbuild build on the recipe instead",
        "container_recipe": "container images are not built",
    }.get(kind, "not an Image Builder resource vmbuild imports")
