"""The recipe: what to build. Parsed into typed models and validated entirely
(components, parameters, tests, base, distribution) before any disk or VM exists."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, model_validator

from vmbuild.config.loader import load_model, parse_size
from vmbuild.config.settings import field as setting
from vmbuild.config.settings import parse_memory
from vmbuild.errors import ConfigError
from vmbuild.hypervisor.imds import Ec2Settings
from vmbuild.secrets import looks_secret

if TYPE_CHECKING:
    from vmbuild.config.distribution import DistributionConfig
    from vmbuild.config.variables import Given
    from vmbuild.toe.model import Document

OutputFormat = Literal["qcow2", "raw", "vmdk", "vhd"]
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
DEFAULT_DISK = 4 << 30
MIN_DISK = 1 << 30
MAX_DISK = 16 << 40
MAX_TEST_FILE = 4 << 20


def _disk_size(value: object) -> int:
    size = parse_size(value, maximum=MAX_DISK)
    if size < MIN_DISK:
        raise ValueError(
            f"a disk of {size} bytes is too small (at least 1G; a bare number is bytes)"
        )
    return size


Size = Annotated[int, BeforeValidator(_disk_size)]
Memory = Annotated[int, BeforeValidator(parse_memory)]
log = logging.getLogger("vmbuild.recipe")


def _param_value(value: object) -> str:
    # AWSTOE parameters are strings; YAML scalars are accepted and stringified
    # (`port: 80`). Image Builder's API gives values as lists of strings: one
    # item is that string, several are joined with commas (a StringList). A map
    # is a mistake worth reporting.
    if isinstance(value, list):
        return ",".join(_param_value(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise ValueError("parameter values must be strings (or lists of strings)")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ComponentRef(_Model):
    name: str = Field(min_length=1, description="a built-in component name or a path to a document")
    parameters: dict[str, Annotated[str, BeforeValidator(_param_value)]] = {}
    # Recipes name components as Image Builder does too: NAME/VERSION (x.x.x
    # wildcards) from the local library, or a component ARN.
    secret_parameters: list[str] = Field(
        default=[],
        description="parameters whose values are secret: masked in every log, manifest and "
        "result, and searched for in the finished image (names like *password*, *token*, "
        "*secret*, *key* are secret without being listed)",
    )
    public_parameters: list[str] = Field(
        default=[], description="parameters whose names look secret but whose values are not"
    )

    def secret_names(self) -> set[str]:
        """The parameters (given a value) whose values are secret."""
        return {
            k
            for k in self.parameters
            if k in self.secret_parameters or (looks_secret(k) and k not in self.public_parameters)
        }


class UrlBase(_Model):
    url: str = Field(pattern=r"^(https?|file)://")
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    sha512: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{128}$")
    checksum_url: str | None = Field(default=None, pattern=r"^(https?|file)://")

    @model_validator(mode="after")
    def _one_checksum(self) -> UrlBase:
        given = [x for x in (self.sha256, self.sha512, self.checksum_url) if x]
        if len(given) != 1:
            raise ValueError("give exactly one of sha256, sha512 or checksum_url")
        return self


class VMSettings(_Model):
    """The recipe's `vm:`: defaults, help and bounds come from config/settings.py."""

    memory: Memory = setting("memory", "recipe")
    cpus: StrictInt = setting("cpus", "recipe")
    backend: Literal["qemu", "libvirt"] = setting("backend", "recipe")
    uri: str | None = setting("uri", "recipe")
    network: str | None = setting("network", "recipe")


class ImdsSettings(_Model):
    """The instance the `ec2` test boot describes through its metadata service."""

    http_tokens: Literal["required", "optional"] = Field(
        default="required",
        description="required: IMDSv2 only (a token from PUT /latest/api/token), as an AMI "
        "registered with imds_support v2.0 runs; optional: IMDSv1 answered too",
    )
    instance_type: str = Field(default="t3.micro", pattern=r"^[a-z0-9-]+\.[a-z0-9-]+$")
    region: str = Field(default="us-east-1", pattern=r"^[a-z]{2}(-[a-z]+)+-\d+$")
    availability_zone: str | None = Field(
        default=None, pattern=r"^[a-z]{2}(-[a-z]+)+-\d+[a-z]$", description="default: REGION + a"
    )
    instance_profile: str | None = Field(
        default=None,
        pattern=r"^[\w+=,.@-]{1,128}$",
        description="an IAM instance profile name: iam/info and iam/security-credentials/ "
        "appear, with fake credentials",
    )

    def settings(self) -> Ec2Settings:
        return Ec2Settings(
            http_tokens=self.http_tokens, instance_type=self.instance_type, region=self.region,
            availability_zone=self.availability_zone, instance_profile=self.instance_profile,
        )  # fmt: skip


class TestSettings(_Model):
    """The recipe's `tests:`: testinfra files, and how the test VM boots. A plain list
    is the files alone (booted with NoCloud)."""

    __test__ = False  # not a pytest class

    files: list[str] = Field(default=[], description="testinfra files, relative to the recipe")
    boot: Literal["nocloud", "ec2"] = Field(
        default="nocloud",
        description="how the test VM gets its instance data: nocloud (a NoCloud seed ISO) or "
        "ec2 (as on EC2: no seed; the SSH key and user-data come from instance metadata at "
        "169.254.169.254 and the VM has EC2's SMBIOS, so cloud-init must use its Ec2 datasource)",
    )
    imds: ImdsSettings = ImdsSettings()

    @model_validator(mode="after")
    def _imds_only_for_ec2(self) -> TestSettings:
        if "imds" in self.model_fields_set and self.boot != "ec2":
            raise ValueError("imds: only the ec2 boot mode has instance metadata (boot: ec2)")
        return self


def _test_settings(value: object) -> object:
    return {"files": value} if isinstance(value, list) else value


class ScanSettings(_Model):
    """The build's CVE scan (vmbuild scan), like Image Builder's Inspector condition."""

    fail_on: Literal["unimportant", "low", "medium", "high"] | None = Field(
        default=None, description="fail the build at or above this severity"
    )
    data: str | None = Field(
        default=None, description="tracker JSON file (relative to the recipe); else the cache"
    )


class Recipe(_Model):
    name: str = Field(pattern=NAME.pattern)
    version: str
    description: str = ""
    base: str | UrlBase = Field(description="debian-12, a local qcow2/raw file, or {url, sha256}")
    components: list[ComponentRef] = []
    disk_size: Size = DEFAULT_DISK
    tests: Annotated[TestSettings, BeforeValidator(_test_settings)] = Field(
        default=TestSettings(),
        description="testinfra files (a list), or {files, boot: nocloud|ec2, imds: {...}}",
    )
    outputs: list[OutputFormat] = ["qcow2"]
    vm: VMSettings = VMSettings()
    distribution: dict[str, Any] | None = None
    scan: ScanSettings | None = None
    arch: Literal["x86_64", "arm64"] = Field(
        default="x86_64",
        description="the image's CPU architecture, in EC2's names: the builder and test VMs "
        "run it (arm64 on an x86_64 host under TCG, slower), debian-12 is built for it and "
        "the AMI is registered with it; arm64 boots UEFI only, as on Graviton",
    )
    boot_mode: Literal["legacy-bios", "uefi", "uefi-preferred"] = Field(
        default="legacy-bios",
        description="how the image boots, in EC2's names: the builder and test VMs boot that "
        "way (uefi-preferred: tested under UEFI and legacy BIOS) and the AMI is registered "
        "with it; debian-12 is built as a GPT disk with an EFI system partition: UEFI-only "
        "for uefi, hybrid (a BIOS boot partition too) for uefi-preferred "
        "(default: legacy-bios, uefi for arch arm64)",
    )
    secure_boot: bool = Field(
        default=False,
        description="test under UEFI with Secure Boot enforced (Microsoft's keys, as EC2's "
        "default UEFI store); needs boot_mode uefi or uefi-preferred",
    )
    working_directory: str = Field(
        default="/tmp",
        pattern=r"^/",
        description="guest folder the components' steps run in (Image Builder's "
        "WorkingDirectory; default /tmp, as there)",
    )

    @model_validator(mode="before")
    @classmethod
    def _arm64_boots_uefi(cls, data: Any) -> Any:
        # arm64 has no legacy BIOS: its boot mode defaults to uefi, and an
        # explicit other one is refused below.
        if isinstance(data, dict) and data.get("arch") == "arm64" and "boot_mode" not in data:
            return {**data, "boot_mode": "uefi"}
        return data

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if not SEMVER.match(self.version):
            raise ValueError(f"version: {self.version!r} is not a semantic version (e.g. 1.2.3)")
        if len(set(self.outputs)) != len(self.outputs):
            raise ValueError("outputs: a format is listed twice")
        if not self.outputs:
            raise ValueError("outputs: list at least one format")
        if self.secure_boot and self.boot_mode == "legacy-bios":
            raise ValueError(
                "secure_boot: Secure Boot needs UEFI; set boot_mode: uefi (or uefi-preferred)"
            )
        if self.arch == "arm64" and self.boot_mode != "uefi":
            raise ValueError(
                f"boot_mode: arm64 images boot UEFI only (as EC2's Graviton instances), "
                f"not {self.boot_mode}; set boot_mode: uefi or leave it out"
            )
        if self.arch == "arm64" and self.secure_boot:
            raise ValueError(
                "secure_boot: not supported for arm64 yet (the offline arm64 base has an "
                "unsigned GRUB); leave it out"
            )
        return self


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe plus what was resolved from the files it names."""

    recipe: Recipe
    path: Path
    display: str  # the name errors use: the path as the user gave it
    sha256: str
    component_paths: tuple[Path, ...]
    # Parsed and validated once, with the recipe's parameters; the build runs these.
    documents: tuple[Document, ...]
    test_paths: tuple[Path, ...]
    base_path: Path | None  # for a local-file base
    distribution: DistributionConfig | None

    @property
    def dir(self) -> Path:
        return self.path.parent


def load_recipe(
    path: Path, secrets: dict[str, str] | None = None, variables: Given | None = None
) -> LoadedRecipe:
    """Parse and validate a recipe and everything it references; no side effects.

    `secrets` (from `--secret NAME=...`) give values to the parameter NAME of every
    component that declares it; such a parameter is secret whatever its name.
    """
    display = str(path)
    recipe = load_model(path, Recipe, "name, version, base, ...", variables)
    base_dir = path.resolve().parent
    if secrets:
        recipe = _with_secrets(recipe, secrets, display, base_dir)

    base_path = None
    if isinstance(recipe.base, str) and not _is_builtin_base(recipe.base):
        base_path = (base_dir / recipe.base).resolve()
        if not base_path.is_file():
            raise ConfigError(
                display, "base", f"not a built-in base and no such file: {recipe.base}",
                hint="use debian-12, a path to a qcow2/raw image, or {url: ..., sha256: ...}",
            )  # fmt: skip
        problem = disk_image_problem(base_path)
        if problem:
            raise ConfigError(
                display, "base", f"{recipe.base}: {problem}",
                hint="a base is a qcow2 image or a raw disk with a partition table",
            )  # fmt: skip

    # Errors name tests[N] for the list form, tests.files[N] for the mapping.
    prefix = "tests.files" if isinstance(_raw_tests(path), dict) else "tests"
    tests = [
        _check_test(display, f"{prefix}[{i}]", test, base_dir)
        for i, test in enumerate(recipe.tests.files)
    ]

    documents = tuple(
        _load_component(display, i, ref, base_dir) for i, ref in enumerate(recipe.components)
    )

    scan_data = recipe.scan.data if recipe.scan is not None else None
    if scan_data is not None and not (base_dir / scan_data).is_file():
        raise ConfigError(display, "scan.data", f"file not found: {scan_data}")

    distribution = None
    if recipe.distribution is not None:
        from vmbuild.config.distribution import load_distribution

        distribution = load_distribution(recipe.distribution, display, "distribution")

    return LoadedRecipe(
        recipe=recipe,
        path=path.resolve(),
        display=display,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        component_paths=tuple(doc.path for doc in documents),
        documents=documents,
        test_paths=tuple(tests),
        base_path=base_path,
        distribution=distribution,
    )


def _with_secrets(recipe: Recipe, secrets: dict[str, str], display: str, base_dir: Path) -> Recipe:
    import vmbuild.toe as toe

    used: set[str] = set()
    refs = []
    for i, ref in enumerate(recipe.components):
        try:
            declared = toe.declared_parameters(toe.find_component(ref.name, base_dir))
        except Exception as exc:  # reported with its field by _load_component
            raise ConfigError(display, f"components[{i}].name", str(exc)) from None
        given = {k: v for k, v in secrets.items() if k in declared}
        clash = sorted(set(given) & set(ref.parameters))
        if clash:
            raise ConfigError(
                display, f"components[{i}].parameters.{clash[0]}",
                "given both in the recipe and with --secret; keep the secret out of the file",
            )  # fmt: skip
        used |= set(given)
        refs.append(
            ref.model_copy(
                update={
                    "parameters": {**ref.parameters, **given},
                    "secret_parameters": [*ref.secret_parameters, *sorted(given)],
                }
            )
        )
    unused = sorted(set(secrets) - used)
    if unused:
        raise ConfigError(
            f"--secret {unused[0]}", None, "no component of the recipe declares this parameter"
        )
    return recipe.model_copy(update={"components": refs})


BUILTIN_BASES = ("debian-12",)


def _raw_tests(path: Path) -> object:
    """The recipe's `tests:` as written (already parsed once: this only tells its form)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data.get("tests") if isinstance(data, dict) else None


def _check_test(display: str, field: str, test: str, base_dir: Path) -> Path:
    """A testinfra file: a regular, readable, reasonably small file of Python."""
    try:
        test_path = (base_dir / test).resolve()
        regular = test_path.is_file()
    except (OSError, ValueError) as exc:
        raise ConfigError(display, field, f"invalid path {test!r}: {exc}") from None
    if not regular:
        what = "not a regular file" if test_path.exists() else "file not found"
        raise ConfigError(display, field, f"{what}: {test}")
    if test_path.suffix != ".py":
        raise ConfigError(display, field, f"{test}: a testinfra file is a .py file")
    if test_path.stat().st_size > MAX_TEST_FILE:
        raise ConfigError(display, field, f"{test}: larger than {MAX_TEST_FILE >> 20} MiB")
    try:
        ast.parse(test_path.read_bytes(), filename=str(test_path))
    except (SyntaxError, ValueError) as exc:
        raise ConfigError(display, field, f"{test}: not valid Python: {exc}") from None
    except (OSError, RecursionError, MemoryError) as exc:
        raise ConfigError(display, field, f"{test}: cannot read it: {exc}") from None
    return test_path


QCOW2_MAGIC = b"QFI\xfb"


def disk_image_problem(path: Path) -> str | None:
    """Why `path` is not a usable base disk (None: it is one). Read from its
    first sectors, without running anything: a qcow2 header (version 2/3, no
    backing file: a base must stand alone) or a raw disk with an MBR/GPT."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError as exc:
        return f"cannot read it: {exc}"
    if head[:4] == QCOW2_MAGIC:
        if len(head) < 72:
            return "a truncated qcow2 header"
        version = int.from_bytes(head[4:8], "big")
        backing = int.from_bytes(head[8:16], "big")
        virtual = int.from_bytes(head[24:32], "big")
        if version not in (2, 3):
            return f"qcow2 version {version} is not supported"
        if backing:
            return "a qcow2 overlay with a backing file (flatten it: qemu-img convert -O qcow2)"
        if not 0 < virtual <= MAX_DISK:
            return f"a qcow2 image of impossible size {virtual}"
        return None
    if size < 1 << 20 or size % 512:
        return "not a disk image (neither qcow2 nor a raw disk of whole sectors, 1 MiB or more)"
    if head[510:512] != b"\x55\xaa":
        return "not a disk image (no qcow2 header, no MBR/GPT partition table)"
    return None


def _is_builtin_base(name: str) -> bool:
    return name in BUILTIN_BASES


def _load_component(display: str, index: int, ref: ComponentRef, base_dir: Path) -> Document:
    """Resolve the component and load its document with the given parameters."""
    import vmbuild.toe as toe

    field = f"components[{index}]"
    try:
        doc_path = toe.find_component(ref.name, base_dir)
    except ConfigError:
        raise
    except Exception as exc:  # a VmbuildError about a missing component
        raise ConfigError(display, f"{field}.name", str(exc)) from None
    declared = toe.declared_parameters(doc_path)
    for listed, names in (
        ("secret_parameters", ref.secret_parameters),
        ("public_parameters", ref.public_parameters),
    ):
        for j, key in enumerate(names):
            if key not in declared:
                raise ConfigError(
                    display, f"{field}.{listed}[{j}]", f"the component has no parameter {key!r}"
                )
    for key in ref.parameters:
        if key not in declared:
            # AWSTOE ignores a parameter the document does not declare; a typo
            # still deserves a word.
            known = ", ".join(sorted(declared)) or "none"
            close = difflib.get_close_matches(key, list(declared), n=1)
            suggestion = f"; did you mean {close[0]!r}?" if close else ""
            log.warning(
                "%s: %s.parameters: unknown parameter %r ignored (known: %s)%s",
                display, field, key, known, suggestion,
            )  # fmt: skip
    missing = [k for k, required in declared.items() if required and k not in ref.parameters]
    if missing:
        raise ConfigError(
            display, f"{field}.parameters", f"missing required parameter {missing[0]!r}"
        )
    # Validates the whole document (and its ExecuteDocument children) with the
    # parameters substituted; its errors name the document file. Unknown
    # parameters were reported above, once.
    known_only = {k: v for k, v in ref.parameters.items() if k in declared}
    doc = toe.load_document(doc_path, known_only)
    # The builder runs build+validate and the test VM runs test: a phase that
    # chains to outputs of a phase run in the other VM could never resolve.
    from vmbuild.toe.runner import check_phase_selection

    check_phase_selection(doc, [p for p in ("build", "validate") if p in doc.phases])
    check_phase_selection(doc, ["test"])
    # Errors above named the file; at run time the document goes by the recipe's name.
    return dataclasses.replace(doc, display_name=ref.name)
