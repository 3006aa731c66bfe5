"""Where components come from: the built-ins, the local versioned library, files.

A recipe (or an ExecuteDocument step, or `vmbuild toe run --documents`) names a
component in one of the ways Image Builder users write them:

* `update-linux`: a built-in (vmbuild/components/*.yaml, package data), else the newest version in
  the local library, else a file next to the recipe;
* `my-app/1.2.0`, `my-app/1.x.x`, `my-app/x.x.x`: a version in the local
  library, with Image Builder's `x` wildcards (the highest matching version);
* `arn:aws:imagebuilder:us-east-1:aws:component/update-linux/x.x.x` (an
  AWS-managed component): the built-in of that name;
* `arn:aws:imagebuilder:REGION:ACCOUNT:component/my-app/1.2.0[/BUILD]`: the
  local library, as `my-app/1.2.0`;
* anything else with a slash or a .yaml/.yml suffix: a document file.

The local library is a folder (`$VMBUILD_COMPONENT_LIBRARY`, else
`$XDG_DATA_HOME/vmbuild/components`, else `~/.local/share/vmbuild/components`)
holding `NAME/VERSION/component.yaml`; `vmbuild component add` writes it and a
version, once added, is never replaced (as in Image Builder).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import vmbuild
from vmbuild.errors import VmbuildError
from vmbuild.toe.document import parse
from vmbuild.toe.model import ParameterSpec


class ComponentNotFound(VmbuildError):
    """Neither a built-in component, a library version nor an existing file."""


@dataclass(frozen=True)
class ComponentInfo:
    name: str
    description: str
    path: Path
    parameters: tuple[ParameterSpec, ...]
    phases: tuple[str, ...]
    version: str = ""  # empty for built-ins


_ARN = re.compile(
    r"^arn:aws[a-z-]*:imagebuilder:(?P<region>[a-z0-9-]*):(?P<account>aws|\d{12}|\*?):"
    r"component/(?P<name>[A-Za-z0-9._-]+)/(?P<version>[0-9x]+\.[0-9x]+\.[0-9x]+)"
    r"(?:/(?P<build>\d+))?$"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,125}$")
_VERSION = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")
_VERSION_FILTER = re.compile(r"^(\d+|x)\.(\d+|x)\.(\d+|x)$")
_NAME_VERSION = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)/(?P<version>[0-9x.]+)$")


@dataclass(frozen=True)
class ComponentArn:
    name: str
    version: str  # a version or a filter such as 1.x.x
    aws_managed: bool


def parse_arn(text: str) -> ComponentArn | None:
    """An Image Builder component ARN, or None if `text` is not one."""
    m = _ARN.match(text.strip())
    if m is None:
        return None
    return ComponentArn(m["name"], m["version"], m["account"] == "aws")


def is_arn(text: str) -> bool:
    return text.strip().startswith("arn:")


def components_dir() -> Path:
    return Path(vmbuild.__file__).resolve().parent / "components"


def library_dir() -> Path:
    explicit = os.environ.get("VMBUILD_COMPONENT_LIBRARY")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "vmbuild" / "components"


def version_key(version: str) -> tuple[int, int, int]:
    major, minor, patch = (int(p) for p in version.split("."))
    return major, minor, patch


def matches(version: str, wanted: str) -> bool:
    """Does `version` (1.2.3) satisfy Image Builder's filter `wanted` (1.x.x)?"""
    return all(w in ("x", v) for v, w in zip(version.split("."), wanted.split("."), strict=True))


def library_versions(name: str, root: Path | None = None) -> list[str]:
    """The versions of `name` in the local library, oldest first."""
    folder = (root or library_dir()) / name
    if not folder.is_dir():
        return []
    found = [
        p.name
        for p in folder.iterdir()
        if _VERSION.match(p.name) and (p / "component.yaml").is_file()
    ]
    return sorted(found, key=version_key)


def find_in_library(name: str, wanted: str, root: Path | None = None) -> Path | None:
    """The document of the highest version of `name` matching `wanted`."""
    if not _VERSION_FILTER.match(wanted):
        return None
    hits = [v for v in library_versions(name, root) if matches(v, wanted)]
    if not hits:
        return None
    return (root or library_dir()) / name / hits[-1] / "component.yaml"


def find_component(name_or_path: str, base_dir: Path) -> Path:
    """The document file a component reference names (see the module docstring)."""
    ref = name_or_path.strip()
    if is_arn(ref):
        return _find_arn(ref)
    looks_like_path = ref.endswith((".yaml", ".yml", ".json"))
    versioned = _NAME_VERSION.match(ref)
    if versioned and not looks_like_path and not (base_dir / ref).is_file():
        return _find_versioned(versioned["name"], versioned["version"])
    looks_like_path = looks_like_path or "/" in ref
    if not looks_like_path:
        builtin = components_dir() / f"{ref}.yaml"
        if builtin.is_file():
            return builtin
        newest = find_in_library(ref, "x.x.x")
        if newest is not None:
            return newest
    candidate = Path(ref).expanduser()
    candidate = candidate if candidate.is_absolute() else base_dir / candidate
    if candidate.is_file():
        return candidate
    names = ", ".join(builtin_names()) or "none"
    if looks_like_path:
        message = f"component file {candidate} does not exist"
    else:
        message = (
            f"no built-in component '{ref}' (built-ins: {names}) and none of that name "
            "in the local library"
        )
    raise ComponentNotFound(
        message, hint="vmbuild component list shows the built-in and library components"
    )


def _find_arn(text: str) -> Path:
    arn = parse_arn(text)
    if arn is None:
        raise ComponentNotFound(
            f"not an Image Builder component ARN: {text}",
            hint="expected arn:aws:imagebuilder:REGION:ACCOUNT:component/NAME/VERSION",
        )
    if arn.aws_managed:
        builtin = components_dir() / f"{arn.name}.yaml"
        if builtin.is_file():
            return builtin
        raise ComponentNotFound(
            f"the AWS-managed component '{arn.name}' has no vmbuild equivalent "
            f"(built-ins: {', '.join(builtin_names())})",
            hint="add your own version: vmbuild component add FILE --name "
            f"{arn.name} --version 1.0.0",
        )
    return _find_versioned(arn.name, arn.version)


def _find_versioned(name: str, wanted: str) -> Path:
    found = find_in_library(name, wanted)
    if found is not None:
        return found
    have = library_versions(name)
    detail = f"versions: {', '.join(have)}" if have else "no version of it is in the library"
    raise ComponentNotFound(
        f"component {name}/{wanted} is not in the local library ({detail})",
        hint=f"vmbuild component add FILE --name {name} --version X.Y.Z (library: {library_dir()})",
    )


def builtin_names() -> list[str]:
    return sorted(p.stem for p in components_dir().glob("*.yaml"))


def _info(path: Path, display: str, version: str = "") -> ComponentInfo:
    doc, problems = parse(path, {}, display_name=display, require_values=False)
    if doc is None:
        raise problems[0].error() if problems else VmbuildError(f"{path}: invalid")
    name = path.stem if not version else path.parent.parent.name
    return ComponentInfo(
        name, doc.description, path, doc.parameter_specs, doc.phases, version=version
    )


def list_components() -> list[ComponentInfo]:
    """Every built-in component with its description and documented parameters."""
    return [
        _info(components_dir() / f"{name}.yaml", f"components/{name}.yaml")
        for name in builtin_names()
    ]


def list_library(root: Path | None = None) -> list[ComponentInfo]:
    """Every version of every component in the local library."""
    base = root or library_dir()
    if not base.is_dir():
        return []
    infos = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        for version in library_versions(folder.name, base):
            path = folder / version / "component.yaml"
            infos.append(_info(path, f"{folder.name}/{version}", version))
    return infos


def add_to_library(source: Path, name: str, version: str, root: Path | None = None) -> Path:
    """Validate `source` and store it as `name/version`; an existing version is
    never replaced (Image Builder's versions are immutable)."""
    if not _NAME.match(name):
        raise VmbuildError(
            f"component name {name!r}: letters, digits, '.', '-' and '_' (up to 126)"
        )
    if not _VERSION.match(version):
        raise VmbuildError(f"--version {version!r}: expected MAJOR.MINOR.PATCH such as 1.0.0")
    doc, problems = parse(source, {}, display_name=str(source), require_values=False)
    if doc is None:
        first = problems[0].error() if problems else VmbuildError(f"{source}: invalid")
        raise first
    base = root or library_dir()
    target = base / name / version
    if target.exists():
        raise VmbuildError(
            f"{name}/{version} is already in the library; versions are immutable",
            hint="add it as a new version (e.g. bump the patch number)",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed: a reader never sees half a version.
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
    try:
        shutil.copyfile(source, staging / "component.yaml")
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target / "component.yaml"
