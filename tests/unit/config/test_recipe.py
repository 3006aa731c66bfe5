"""Recipe validation: good and bad recipes, errors naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.disks import qcow2_header
from vmbuild.config.loader import parse_size
from vmbuild.config.recipe import load_recipe
from vmbuild.errors import ConfigError


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    """Write the recipe and return it as a user names it: relative to the cwd."""
    (tmp_path / name).write_text(text)
    return Path(name)


COMPONENT = """\
name: hello
schemaVersion: 1.0
parameters:
  - greeting:
      type: string
      default: hi
      description: what to say
  - target:
      type: string
      description: required, no default
phases:
  - name: build
    steps:
      - name: Say
        action: ExecuteBash
        inputs:
          commands: ["echo {{ greeting }} {{ target }}"]
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hello.yaml").write_text(COMPONENT)
    (tmp_path / "test_it.py").write_text("def test_x(host):\n    assert host\n")
    return tmp_path


def good(extra: str = "") -> str:
    return (
        "name: demo\nversion: 1.2.3\nbase: debian-12\n"
        "components:\n  - name: ./hello.yaml\n    parameters: {target: world}\n"
        "tests: [test_it.py]\noutputs: [qcow2, raw, vmdk, vhd]\ndisk_size: 6G\n" + extra
    )


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    return str(info.value)


def test_good_recipe_loads(project: Path) -> None:
    loaded = load_recipe(write(project, good()))
    r = loaded.recipe
    assert (r.name, r.version, r.disk_size) == ("demo", "1.2.3", 6 << 30)
    assert r.outputs == ["qcow2", "raw", "vmdk", "vhd"]
    assert loaded.component_paths == ((project / "hello.yaml").resolve(),)
    assert loaded.test_paths == ((project / "test_it.py").resolve(),)
    assert r.components[0].parameters == {"target": "world"}
    assert len(loaded.sha256) == 64


def test_numbers_are_stringified_parameters(project: Path) -> None:
    text = good().replace("{target: world}", "{target: 8080, greeting: true}")
    params = load_recipe(write(project, text)).recipe.components[0].parameters
    assert params == {"target": "8080", "greeting": "true"}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("version: 1.2.3", "version: one"), "recipe.yaml: version: 'one' is not a semantic version"),
        (("base: debian-12", "base: nowhere.qcow2"), "recipe.yaml: base: not a built-in base and no such file"),
        (("disk_size: 6G", "disk_size: 6 potatoes"), "recipe.yaml: disk_size: invalid size"),
        (("outputs: [qcow2, raw, vmdk, vhd]", "outputs: [qcow2, iso]"), "recipe.yaml: outputs[1]: Input should be"),
        (("tests: [test_it.py]", "tests: [missing.py]"), "recipe.yaml: tests[0]: file not found: missing.py"),
        (("name: demo", "name: Demo Image"), "recipe.yaml: name: String should match pattern"),
        (("{target: world}", "{}"), "recipe.yaml: components[0].parameters: missing required parameter 'target'"),
        (("{target: world}", "{target: {a: b}}"), "recipe.yaml: components[0].parameters.target: parameter values must be strings"),
        (("./hello.yaml", "./nope.yaml"), "recipe.yaml: components[0].name:"),
    ],
)  # fmt: skip
def test_bad_recipes_name_file_and_field(
    project: Path, change: tuple[str, str], expected: str
) -> None:
    text = good().replace(*change)
    assert text != good()
    assert error_of(write(project, text)).startswith(expected)


def test_unknown_top_level_field(project: Path) -> None:
    assert error_of(write(project, good("colour: blue\n"))) == "recipe.yaml: colour: unknown field"


def test_missing_required_field(project: Path) -> None:
    text = good().replace("base: debian-12\n", "")
    assert error_of(write(project, text)) == "recipe.yaml: base: required field is missing"


def test_malformed_yaml_names_the_line(project: Path) -> None:
    msg = error_of(write(project, "name: demo\nversion: [1.0\n"))
    assert msg.startswith("recipe.yaml: line ")
    assert "invalid YAML" in msg


def test_not_a_mapping(project: Path) -> None:
    assert "expected a mapping" in error_of(write(project, "- just\n- a list\n"))


def test_missing_file(project: Path) -> None:
    assert error_of(Path("absent.yaml")) == "absent.yaml: file not found"


def test_url_base_needs_one_checksum(project: Path) -> None:
    text = good().replace("base: debian-12", "base: {url: 'https://example.org/x.qcow2'}")
    assert "give exactly one of sha256, sha512 or checksum_url" in error_of(write(project, text))
    ok = text.replace("x.qcow2'}", "x.qcow2', sha256: '" + "a" * 64 + "'}")
    assert load_recipe(write(project, ok)).recipe.base.url.endswith("x.qcow2")  # type: ignore[union-attr]


def test_local_file_base_resolved_relative_to_recipe(project: Path) -> None:
    (project / "my.qcow2").write_bytes(qcow2_header())
    loaded = load_recipe(write(project, good().replace("base: debian-12", "base: my.qcow2")))
    assert loaded.base_path == (project / "my.qcow2").resolve()


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4G", 4 << 30),
        ("4GiB", 4 << 30),
        ("512M", 512 << 20),
        ("1.5G", 3 << 29),
        (1024, 1024),
        ("2T", 2 << 40),
    ],
)
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "-1G", "4X", True, [1]])
def test_parse_size_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_an_unknown_component_parameter_is_a_warning_with_the_close_name(
    project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = good().replace("{target: world}", "{target: world, greting: hey}")
    loaded = load_recipe(write(project, text))
    assert loaded.recipe.components[0].parameters == {"target": "world", "greting": "hey"}
    assert [r.getMessage() for r in caplog.records] == [
        "recipe.yaml: components[0].parameters: unknown parameter 'greting' ignored "
        "(known: greeting, target); did you mean 'greeting'?"
    ]


def test_parameter_values_as_image_builder_lists_and_the_working_directory(
    project: Path,
) -> None:
    text = good("working_directory: /var/tmp/build\n").replace(
        "{target: world}", "{target: [world], greeting: [a, b]}"
    )
    recipe = load_recipe(write(project, text)).recipe
    assert recipe.components[0].parameters == {"target": "world", "greeting": "a,b"}
    assert recipe.working_directory == "/var/tmp/build"
    assert load_recipe(write(project, good())).recipe.working_directory == "/tmp"
    bad = good("working_directory: relative/dir\n")
    assert error_of(write(project, bad)).startswith("recipe.yaml: working_directory:")


def test_tests_as_a_list_boot_with_nocloud(project: Path) -> None:
    tests = load_recipe(write(project, good())).recipe.tests
    assert (tests.files, tests.boot) == (["test_it.py"], "nocloud")


def test_tests_boot_ec2_with_its_metadata_settings(project: Path) -> None:
    text = good().replace(
        "tests: [test_it.py]",
        "tests:\n  files: [test_it.py]\n  boot: ec2\n"
        "  imds: {http_tokens: optional, region: eu-west-1, instance_profile: web-role}",
    )
    loaded = load_recipe(write(project, text))
    assert loaded.test_paths == ((project / "test_it.py").resolve(),)
    settings = loaded.recipe.tests.imds.settings()
    assert (settings.http_tokens, settings.region, settings.instance_profile) == (
        "optional", "eu-west-1", "web-role",
    )  # fmt: skip
    assert settings.instance_type == "t3.micro" and settings.availability_zone is None
    default = load_recipe(write(project, good().replace("[test_it.py]", "{boot: ec2}")))
    assert default.recipe.tests.imds.settings().http_tokens == "required"
    assert default.test_paths == ()


@pytest.mark.parametrize(
    ("tests", "expected"),
    [
        ("{boot: aws}", "recipe.yaml: tests.boot: Input should be 'nocloud' or 'ec2'"),
        ("{files: [missing.py], boot: ec2}", "recipe.yaml: tests.files[0]: file not found: missing.py"),
        ("{boot: ec2, imds: {http_tokens: maybe}}", "recipe.yaml: tests.imds.http_tokens: Input should be 'required' or 'optional'"),
        ("{boot: ec2, imds: {region: Mars}}", "recipe.yaml: tests.imds.region: String should match pattern"),
        ("{imds: {http_tokens: optional}}", "recipe.yaml: tests: imds: only the ec2 boot mode has instance metadata"),
        ("{boot: ec2, tokens: required}", "recipe.yaml: tests.tokens: unknown field"),
    ],
)  # fmt: skip
def test_bad_test_settings_name_file_and_field(project: Path, tests: str, expected: str) -> None:
    text = good().replace("tests: [test_it.py]", f"tests: {tests}")
    assert error_of(write(project, text)).startswith(expected)


def test_boot_mode_and_secure_boot(project: Path) -> None:
    r = load_recipe(write(project, good("boot_mode: uefi-preferred\nsecure_boot: true\n"))).recipe
    assert (r.boot_mode, r.secure_boot) == ("uefi-preferred", True)
    assert load_recipe(write(project, good())).recipe.boot_mode == "legacy-bios"
    assert error_of(write(project, good("secure_boot: true\n"))) == (
        "recipe.yaml: secure_boot: Secure Boot needs UEFI; set boot_mode: uefi (or uefi-preferred)"
    )
    assert error_of(write(project, good("boot_mode: efi\n"))).startswith(
        "recipe.yaml: boot_mode: Input should be 'legacy-bios', 'uefi' or 'uefi-preferred'"
    )


def test_arch_arm64_implies_uefi(project: Path) -> None:
    r = load_recipe(write(project, good())).recipe
    assert r.arch == "x86_64"
    r = load_recipe(write(project, good("arch: arm64\n"))).recipe
    assert (r.arch, r.boot_mode, r.secure_boot) == ("arm64", "uefi", False)
    assert (
        load_recipe(write(project, good("arch: arm64\nboot_mode: uefi\n"))).recipe.arch == "arm64"
    )
    assert error_of(write(project, good("arch: arm64\nboot_mode: legacy-bios\n"))) == (
        "recipe.yaml: boot_mode: arm64 images boot UEFI only (as EC2's Graviton instances), "
        "not legacy-bios; set boot_mode: uefi or leave it out"
    )
    assert error_of(write(project, good("arch: arm64\nboot_mode: uefi-preferred\n"))).startswith(
        "recipe.yaml: boot_mode: arm64 images boot UEFI only"
    )
    assert error_of(write(project, good("arch: arm64\nsecure_boot: true\n"))).startswith(
        "recipe.yaml: secure_boot: not supported for arm64 yet"
    )
    assert error_of(write(project, good("arch: aarch64\n"))).startswith(
        "recipe.yaml: arch: Input should be 'x86_64' or 'arm64'"
    )
