"""The recipe: what to build. Parsed into typed models and validated entirely
(components, parameters, tests, base, distribution) before any disk or VM exists."""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from vmbuild.config.loader import load_model, parse_size
from vmbuild.errors import ConfigError

OutputFormat = Literal["qcow2", "raw", "vmdk", "vhd"]
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?$"
)
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
DEFAULT_DISK = 4 << 30
Size = Annotated[int, BeforeValidator(parse_size)]
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
    memory: Size = Field(default=2 << 30, description="guest memory, e.g. 2G")
    cpus: int = Field(default=2, ge=1, le=64)
    backend: Literal["qemu", "libvirt"] | None = Field(
        default=None, description="qemu (direct, the default) or libvirt"
    )
    uri: str | None = Field(
        default=None, description="libvirt URI (default qemu:///system as root, else session)"
    )
    network: str | None = Field(
        default=None, description="a libvirt network to attach instead of user networking"
    )


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
    tests: list[str] = []
    outputs: list[OutputFormat] = ["qcow2"]
    vm: VMSettings = VMSettings()
    distribution: dict[str, Any] | None = None
    scan: ScanSettings | None = None
    working_directory: str = Field(
        default="/tmp",
        pattern=r"^/",
        description="guest folder the components' steps run in (Image Builder's "
        "WorkingDirectory; default /tmp, as there)",
    )

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if not SEMVER.match(self.version):
            raise ValueError(f"version: {self.version!r} is not a semantic version (e.g. 1.2.3)")
        if len(set(self.outputs)) != len(self.outputs):
            raise ValueError("outputs: a format is listed twice")
        if not self.outputs:
            raise ValueError("outputs: list at least one format")
        return self


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe plus what was resolved from the files it names."""

    recipe: Recipe
    path: Path
    display: str  # the name errors use: the path as the user gave it
    sha256: str
    component_paths: tuple[Path, ...]
    test_paths: tuple[Path, ...]
    base_path: Path | None  # for a local-file base
    distribution: Any  # vmbuild.config.distribution.DistributionConfig | None

    @property
    def dir(self) -> Path:
        return self.path.parent


def load_recipe(path: Path) -> LoadedRecipe:
    """Parse and validate a recipe and everything it references; no side effects."""
    display = str(path)
    recipe = load_model(path, Recipe, "name, version, base, ...")
    base_dir = path.resolve().parent

    base_path = None
    if isinstance(recipe.base, str) and not _is_builtin_base(recipe.base):
        base_path = (base_dir / recipe.base).resolve()
        if not base_path.is_file():
            raise ConfigError(
                display, "base", f"not a built-in base and no such file: {recipe.base}",
                hint="use debian-12, a path to a qcow2/raw image, or {url: ..., sha256: ...}",
            )  # fmt: skip

    tests = []
    for i, test in enumerate(recipe.tests):
        test_path = (base_dir / test).resolve()
        if not test_path.is_file():
            raise ConfigError(display, f"tests[{i}]", f"file not found: {test}")
        tests.append(test_path)

    components = tuple(
        _check_component(display, i, ref, base_dir) for i, ref in enumerate(recipe.components)
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
        component_paths=components,
        test_paths=tuple(tests),
        base_path=base_path,
        distribution=distribution,
    )


BUILTIN_BASES = ("debian-12",)


def _is_builtin_base(name: str) -> bool:
    return name in BUILTIN_BASES


def _check_component(display: str, index: int, ref: ComponentRef, base_dir: Path) -> Path:
    """Resolve the component and validate its document with the given parameters."""
    import vmbuild.toe as toe

    field = f"components[{index}]"
    try:
        doc_path = toe.find_component(ref.name, base_dir)
    except ConfigError:
        raise
    except Exception as exc:  # a VmbuildError about a missing component
        raise ConfigError(display, f"{field}.name", str(exc)) from None
    declared = toe.declared_parameters(doc_path)
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
    return doc_path
