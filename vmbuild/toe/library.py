"""The built-in component library (components/*.yaml at the repository root)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import vmbuild
from vmbuild.errors import VmbuildError
from vmbuild.toe.document import parse
from vmbuild.toe.model import ParameterSpec


class ComponentNotFound(VmbuildError):
    """Neither a built-in component nor an existing file."""


@dataclass(frozen=True)
class ComponentInfo:
    name: str
    description: str
    path: Path
    parameters: tuple[ParameterSpec, ...]
    phases: tuple[str, ...]


def components_dir() -> Path:
    return Path(vmbuild.__file__).resolve().parent.parent / "components"


def find_component(name_or_path: str, base_dir: Path) -> Path:
    """A built-in component by name (`java`), or a document path relative to `base_dir`.

    Anything with a slash or a .yaml/.yml suffix is a path; a bare name is looked
    up in the library first, then as a file.
    """
    looks_like_path = "/" in name_or_path or name_or_path.endswith((".yaml", ".yml"))
    if not looks_like_path:
        builtin = components_dir() / f"{name_or_path}.yaml"
        if builtin.is_file():
            return builtin
    candidate = Path(name_or_path).expanduser()
    candidate = candidate if candidate.is_absolute() else base_dir / candidate
    if candidate.is_file():
        return candidate
    names = ", ".join(builtin_names()) or "none"
    if looks_like_path:
        message = f"component file {candidate} does not exist"
    else:
        message = f"no built-in component '{name_or_path}' (built-ins: {names})"
    raise ComponentNotFound(message, hint="vmbuild component list shows the built-in components")


def builtin_names() -> list[str]:
    return sorted(p.stem for p in components_dir().glob("*.yaml"))


def list_components() -> list[ComponentInfo]:
    """Every built-in component with its description and documented parameters."""
    infos = []
    for name in builtin_names():
        path = components_dir() / f"{name}.yaml"
        display = f"components/{name}.yaml"
        doc, problems = parse(path, {}, display_name=display, require_values=False)
        if doc is None:
            raise problems[0].error() if problems else VmbuildError(f"{path}: invalid")
        infos.append(ComponentInfo(name, doc.description, path, doc.parameter_specs, doc.phases))
    return infos
