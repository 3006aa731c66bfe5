"""Distribution settings: defaults, and errors that name the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vmbuild.config.distribution import (
    ami_name_problem,
    load_distribution,
    render_template,
)
from vmbuild.errors import ConfigError

KEY_US = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"


def error_of(data: Any, prefix: str = "distribution") -> str:
    with pytest.raises(ConfigError) as info:
        load_distribution(data, "recipe.yaml", prefix)
    return str(info.value)


def test_defaults_are_ebs_direct_legacy_bios_and_the_first_region_uploads() -> None:
    cfg = load_distribution(
        {"regions": [{"region": "us-east-1"}, {"region": "eu-west-1"}]}, "recipe.yaml"
    )
    assert cfg.import_.method == "ebs-direct"
    assert cfg.image.boot_mode is None  # the image's own, from its manifest
    assert cfg.image.mode == "legacy-bios"
    assert cfg.image.architecture is None  # the image's own, from its manifest
    assert cfg.image.arch == "x86_64"
    assert cfg.image.root_device_name == "/dev/xvda"
    assert cfg.source.region == "us-east-1"
    assert cfg.regions[1].name == "{{ name }}-{{ version }}-{{ build }}"
    assert not cfg.regions[0].is_encrypted
    assert cfg.regions[0].launch_permission.empty


def test_a_kms_key_implies_encryption() -> None:
    cfg = load_distribution({"regions": [{"region": "us-east-1", "kms_key_id": KEY_US}]}, "d")
    assert cfg.regions[0].is_encrypted


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"regions": [{"region": "us-east-1"}, {"region": "eu-west-1", "kms_key_id": KEY_US}]},
            "recipe.yaml: distribution.regions[1].kms_key_id: key is in us-east-1 but the AMI "
            "goes to eu-west-1",
        ),
        (
            {"regions": [{"region": "us-east-1", "kms_key": "x"}]},
            "recipe.yaml: distribution.regions[0].kms_key: unknown field (did you mean kms_key_id?)",
        ),
        (
            {"import": {"method": "import-image"}, "regions": [{"region": "us-east-1"}]},
            "recipe.yaml: distribution.import.s3_bucket: required by method import-image",
        ),
        (
            {"regions": [{"region": "us-east-1", "name": "{{ nam }}"}]},
            "recipe.yaml: distribution.regions[0].name: unknown variable {{ nam }}",
        ),
        (
            {"regions": [{"region": "us-east-1", "launch_permission": {"user_ids": [1234]}}]},
            "distribution.regions[0].launch_permission.user_ids[0]: expected a 12-digit AWS "
            "account id",
        ),
        (
            {
                "regions": [
                    {
                        "region": "us-east-1",
                        "encrypted": True,
                        "launch_permission": {"user_groups": ["all"]},
                    }
                ]
            },
            "distribution.regions[0].launch_permission.user_groups: AWS cannot make an encrypted "
            "AMI public",
        ),
        (
            {"regions": [{"region": "us-east-1"}, {"region": "us-east-1"}]},
            "distribution.regions[1].region: us-east-1 is listed twice",
        ),
        (
            {"image": {"boot_mode": "efi"}, "regions": [{"region": "us-east-1"}]},
            "distribution.image.boot_mode: got 'efi'; expected 'legacy-bios', 'uefi' or 'uefi-preferred'",
        ),
        ({"regions": []}, "distribution.regions: at least one region is required"),
        (
            {"regions": [{"region": "Virginia"}]},
            "distribution.regions[0].region: not an AWS region name",
        ),
        (
            {"regions": [{"region": "us-east-1", "kms_key_id": "my-key"}]},
            "distribution.regions[0].kms_key_id: expected a KMS key id",
        ),
        (
            {
                "regions": [
                    {
                        "region": "us-east-1",
                        "ssm_parameter_configurations": [{"parameter_name": "/aws/service/x"}],
                    }
                ]
            },
            "distribution.regions[0].ssm_parameter_configurations[0].parameter_name",
        ),
        (
            {"regions": [{"region": "us-east-1", "ami_tags": {"vmbuild:build": "x"}}]},
            "distribution.regions[0].ami_tags: tag key 'vmbuild:build': the vmbuild: prefix is "
            "reserved",
        ),
        (
            {
                "regions": [
                    {"region": "us-east-1", "launch_permission": {"organization_arns": ["o-123"]}}
                ]
            },
            "launch_permission.organization_arns: not an organization ARN",
        ),
        (
            {"import": {"workers": 0}, "regions": [{"region": "us-east-1"}]},
            "distribution.import.workers:",
        ),
        ("just a string", "recipe.yaml: distribution: expected a mapping"),
    ],
)
def test_errors_name_the_file_and_the_field(data: Any, expected: str) -> None:
    assert expected in error_of(data)


def test_a_file_of_its_own_has_no_prefix_or_wraps_in_distribution() -> None:
    assert error_of({"regions": [{"region": "x"}]}, "").startswith(
        "recipe.yaml: regions[0].region:"
    )
    assert error_of({"distribution": {"regions": [{"region": "x"}]}}, "").startswith(
        "recipe.yaml: distribution.regions[0].region:"
    )


def test_every_problem_is_listed() -> None:
    message = error_of({"regions": [{"region": "x", "kms_key_id": "nope"}]})
    assert "regions[0].region" in message and "regions[0].kms_key_id" in message


def test_an_unquoted_12_digit_account_id_is_accepted() -> None:
    cfg = load_distribution(
        {"regions": [{"region": "us-east-1", "launch_permission": {"user_ids": [123456789012]}}]},
        "d",
    )
    assert cfg.regions[0].launch_permission.user_ids == ["123456789012"]


def test_templates_render_and_ami_names_are_checked() -> None:
    variables = {"name": "web", "version": "1.2.0", "build": "b1", "build_date": "20261122"}
    assert render_template("{{name}}-{{ version }}-{{  build_date }}", variables) == (
        "web-1.2.0-20261122"
    )
    assert ami_name_problem("web-1.2.0 (test) [x] a/b @c 'd'_e") is None
    assert "3-128 characters" in str(ami_name_problem("ab"))
    assert "3-128 characters" in str(ami_name_problem("a" * 129))
    assert "'+'" in str(ami_name_problem("web-1.2.0+git"))


def test_cli_reads_its_own_file_a_wrapped_one_or_a_recipe(tmp_path: Path) -> None:
    from vmbuild.cli.distribute import read_config

    own = tmp_path / "dist.yaml"
    own.write_text("regions:\n  - region: us-east-1\n")
    assert read_config(own).source.region == "us-east-1"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: web\nversion: 1.0.0\ndistribution:\n  regions:\n"
        "    - region: eu-west-1\n      kms_key_id: nope\n"
    )
    with pytest.raises(ConfigError) as info:
        read_config(recipe)
    assert str(info.value).startswith(f"{recipe}: distribution.regions[0].kms_key_id:")
    broken = tmp_path / "broken.yaml"
    broken.write_text("regions: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        read_config(broken)


def test_a_recipe_without_distribution_says_so_in_one_line(tmp_path: Path) -> None:
    from vmbuild.cli.distribute import read_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: web\nversion: 1.0.0\nbase: debian-12\ncomponents:\n  - name: update-linux\n"
        "outputs: [qcow2]\nvm: {memory: 2G}\n"
    )
    with pytest.raises(ConfigError) as info:
        read_config(recipe)
    assert str(info.value) == f"{recipe}: has no distribution section (it looks like a recipe)"
    assert "distribution:" in str(info.value.hint)
    empty = tmp_path / "empty-section.yaml"
    empty.write_text("name: web\ndistribution:\n")
    with pytest.raises(ConfigError, match="distribution: the distribution section is empty"):
        read_config(empty)
    # A distribution file with a typo still gets the field-level message.
    typo = tmp_path / "dist.yaml"
    typo.write_text("regoins: [{region: us-east-1}]\n")
    with pytest.raises(ConfigError, match="regoins: unknown field"):
        read_config(typo)


def test_upload_blocks_and_incremental_are_validated() -> None:
    cfg = load_distribution({"regions": [{"region": "us-east-1"}]}, "d.yaml", "")
    assert (cfg.import_.upload_blocks, cfg.import_.incremental) == ("used", True)
    data = {"import": {"upload_blocks": "nonzero"}, "regions": [{"region": "us-east-1"}]}
    assert error_of(data, "") == (
        "recipe.yaml: import.upload_blocks: got 'nonzero'; expected 'used' or 'all'"
    )


def test_boot_mode_comes_from_the_image_unless_the_config_sets_it() -> None:
    from vmbuild.config.distribution import ImageSettings

    assert ImageSettings().for_image("uefi-preferred").mode == "uefi-preferred"
    assert ImageSettings().for_image(None).mode == "legacy-bios"
    assert ImageSettings(boot_mode="uefi").for_image("legacy-bios").mode == "uefi"


def test_architecture_defaults_to_the_images() -> None:
    cfg = load_distribution({"regions": [{"region": "us-east-1"}]}, "recipe.yaml")
    arm = cfg.image.for_image("uefi", architecture="arm64")
    assert (arm.architecture, arm.arch, arm.mode) == ("arm64", "arm64", "uefi")
    old = cfg.image.for_image(None, architecture=None)  # a manifest from before arch
    assert (old.arch, old.mode) == ("x86_64", "legacy-bios")
    given = load_distribution(
        {"image": {"architecture": "x86_64"}, "regions": [{"region": "us-east-1"}]}, "r.yaml"
    )
    assert given.image.for_image("uefi", architecture="arm64").arch == "x86_64"  # config wins
    assert error_of(
        {"image": {"architecture": "arm64", "boot_mode": "legacy-bios"},
         "regions": [{"region": "us-east-1"}]}
    ) == "recipe.yaml: distribution.image.boot_mode: arm64 AMIs boot UEFI only (Graviton); use uefi"  # fmt: skip
