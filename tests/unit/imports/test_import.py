"""Reading Image Builder definitions (CloudFormation short forms, Terraform HCL
and `terraform show -json`, CLI JSON) and converting them (no processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vmbuild.config.distribution import render_template
from vmbuild.errors import VmbuildError
from vmbuild.imports import import_sources
from vmbuild.imports.convert import aws_cron
from vmbuild.imports.parents import parent_base
from vmbuild.imports.sources import ResourceRef, read_source

DATA = Path(__file__).resolve().parents[2] / "data" / "imports"


def test_cloudformation_short_forms_resolve_between_own_resources() -> None:
    found = {r.name: r for r in read_source(DATA / "cloudformation-pipeline.yaml")}
    assert sorted(found) == [
        "Distribution", "HelloComponent", "Infrastructure", "Lifecycle", "Pipeline", "Recipe",
    ]  # fmt: skip
    recipe = found["Recipe"].props
    assert recipe["name"] == "web-server Recipe"  # !Sub with a parameter's default
    assert recipe["parent_image"] == (
        "arn:aws:imagebuilder:us-east-1:aws:image/ubuntu-server-22-lts-x86/x.x.x"
    )
    arns = [c["component_arn"] for c in recipe["components"]]
    assert arns[1:] == [ResourceRef("HelloComponent"), ResourceRef("HelloComponent", "Arn")]
    pipeline = found["Pipeline"].props
    assert pipeline["infrastructure_configuration_arn"] == ResourceRef("Infrastructure", "Arn")


def test_the_full_stack_converts_with_every_field_accounted_for() -> None:
    out = import_sources([DATA / "cloudformation-pipeline.yaml"], region="us-east-1")
    assert out.recipe is not None and out.pipeline is not None and out.distribution is not None
    assert [c["name"] for c in out.recipe["components"]] == [
        "update-linux", "./components/hello-world.yaml", "./components/hello-world.yaml",
    ]  # fmt: skip
    assert out.recipe["components"][1]["parameters"] == {"Greeting": "bonjour"}
    assert out.pipeline["schedule"] == {
        "cron": "0 3 * * 1",
        "timezone": "Europe/Paris",
        "start_condition": "if-dependencies-updated",
    }
    assert out.pipeline["lifecycle"] == {"keep_last": 5}
    assert [r["region"] for r in out.distribution["regions"]] == ["us-east-1", "eu-west-1"]
    assert out.distribution["regions"][1]["name"] == "web-server-{{ build_date }}"
    dropped = {(what, why) for kind, _, what, why in out.report.lines if kind == "dropped"}
    for field in ("instance_profile_name", "subnet_id", "security_group_ids", "sns_topic_arn",
                  "image_scanning_configuration", "target_account_ids"):  # fmt: skip
        assert any(what == field for what, _ in dropped), field


def test_terraform_hcl_and_show_json(tmp_path: Path) -> None:
    kinds = sorted((r.kind, r.name) for r in read_source(DATA / "main.tf"))
    assert kinds == [
        ("component", "app"), ("component", "from_file"), ("image_pipeline", "app"),
        ("image_recipe", "app"), ("infrastructure_configuration", "app"),
    ]  # fmt: skip
    show = {
        "format_version": "1.0",
        "values": {"root_module": {"resources": [{
            "address": "aws_imagebuilder_image_recipe.r", "mode": "managed",
            "type": "aws_imagebuilder_image_recipe", "name": "r",
            "values": {"name": "from-state", "version": "3.0.0",
                       "parent_image": "ssm:/aws/service/debian/release/12/latest/amd64",
                       "component": [{"component_arn": "arn:aws:imagebuilder:eu-west-1:aws:component/reboot-linux/x.x.x",
                                      "parameter": []}],
                       "working_directory": "/tmp"},
        }]}},
    }  # fmt: skip
    state = tmp_path / "show.json"
    state.write_text(json.dumps(show))
    out = import_sources([state])
    assert out.recipe == {
        "name": "from-state",
        "version": "3.0.0",
        "base": "debian-12",
        "components": [{"name": "reboot-linux"}],
        "working_directory": "/tmp",
    }


@pytest.mark.parametrize(
    ("aws", "cron"),
    [
        ("cron(0 0 * * ? *)", "0 0 * * *"),
        ("cron(15 3 ? * 2-6 *)", "15 3 * * 1-5"),
        ("cron(0 8 ? * MON *)", "0 8 * * MON"),
        ("cron(0 0 L * ? *)", None),
        ("cron(0 0 * * ? 2027)", None),
    ],
)
def test_eventbridge_cron_to_five_fields(aws: str, cron: str | None) -> None:
    assert aws_cron(aws) == cron


def test_parent_images_map_through_the_table_or_ask_for_a_base() -> None:
    assert (
        parent_base("arn:aws:imagebuilder:us-east-1:aws:image/debian-12-x86/x.x.x") == "debian-12"
    )
    ubuntu = parent_base(
        "ssm:/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
    )
    assert ubuntu["url"].endswith("noble-server-cloudimg-amd64.img")
    assert ubuntu["checksum_url"].endswith("/SHA256SUMS")
    rocky = parent_base(
        "arn:aws:imagebuilder:us-east-1:aws:image/red-hat-enterprise-linux-9-x86/x.x.x"
    )
    assert "Rocky-9-GenericCloud" in rocky["url"]
    with pytest.raises(VmbuildError, match="ami-0abc: an AMI id names no vendor image"):
        parent_base("ami-0abc")
    with pytest.raises(VmbuildError, match="Amazon Linux KVM images have versioned file names"):
        parent_base("arn:aws:imagebuilder:us-east-1:aws:image/amazon-linux-2023-x86/x.x.x")


def test_distribution_names_accept_image_builder_variables() -> None:
    variables = {"name": "n", "version": "1.0.0", "build": "7", "build_date": "20261130T100000Z"}
    text = "web-{{ imagebuilder:buildDate }}-{{imagebuilder:buildVersion}}"
    assert render_template(text, variables) == "web-20261130T100000Z-7"
