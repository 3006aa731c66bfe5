"""YAML loading and pydantic error mapping shared by every config file kind."""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from vmbuild.errors import ConfigError


def load_yaml(path: Path, display: str | None = None) -> Any:
    """Parse a YAML file; errors name the file and the line."""
    name = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(name, None, "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(name, None, f"cannot read: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        raise ConfigError(name, where, f"invalid YAML: {problem}") from None


def field_path(loc: Sequence[int | str], prefix: str = "") -> str:
    """('components', 1, 'parameters') -> 'components[1].parameters'."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _message(err: Any) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "required field is missing"
    msg = str(err["msg"])
    # pydantic prefixes errors raised by our validators with "Value error, ".
    return msg.removeprefix("Value error, ")


# "this member of a union had the wrong type" errors: noise when another member
# of the same union got far enough to say what is really wrong.
_TYPE_MISMATCH = {
    "string_type", "int_type", "float_type", "bool_type", "dict_type", "list_type",
    "model_type", "model_attributes_type", "literal_error", "is_instance_of",
}  # fmt: skip
# Field names are snake_case; pydantic tags union members with their type name.
_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|[A-Z][A-Za-z]*)$")


def _clean_loc(loc: Sequence[int | str]) -> list[int | str]:
    return [
        p for p in loc
        if not (isinstance(p, str) and (p.startswith("function-") or _UNION_TAG.match(p)))
    ]  # fmt: skip


def config_error(exc: ValidationError, file: str, prefix: str = "") -> ConfigError:
    """The first validation error as a ConfigError (a count of the others follows)."""
    errors = list(exc.errors())
    meaningful = [e for e in errors if e["type"] not in _TYPE_MISMATCH]
    if meaningful and len(meaningful) < len(errors):
        errors = meaningful
    first = errors[0]
    loc = _clean_loc(first["loc"])
    message = _message(first)
    if not loc and prefix == "":
        # A model-level check names its own field: "version: not semver".
        field, _, rest = message.partition(": ")
        if rest and " " not in field:
            loc, message = [field], rest
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return ConfigError(file, field_path(loc, prefix) or None, message)


M = TypeVar("M", bound=BaseModel)


def load_model(path: Path, model: type[M], expected: str) -> M:
    """Load a YAML mapping into `model`; every error names the file and the field."""
    display = str(path)
    data = load_yaml(path, display)
    if not isinstance(data, dict):
        raise ConfigError(display, None, f"expected a mapping with {expected}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, display) from None


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^(\d{1,15}(?:\.\d{1,6})?)\s*([KMGT]?)(?:I?B)?$")
MAX_SIZE = 64 << 40  # 64 TiB: the largest EBS volume; anything above is a typo


def parse_size(value: object, *, bare_unit: int = 1, maximum: int = MAX_SIZE) -> int:
    """'4G', '4GiB', '512M' or a plain number -> bytes (binary units, as qemu-img).

    A plain number counts `bare_unit`s (bytes for disks; MiB for memory, as Packer
    and EC2 read it). Only finite, positive values up to `maximum` pass: YAML's
    .inf/.nan and 10**400 are refused here, never overflow later.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size such as 4G")
    if isinstance(value, int):
        size = value * bare_unit
    elif isinstance(value, str):
        match = _SIZE.match(value.strip().upper())
        if match is None:
            raise ValueError(f"invalid size {value!r} (use e.g. 4G, 512M)")
        unit = _UNITS[match[2]] if match[2] else bare_unit
        size = int(Decimal(match[1]) * unit)
    else:
        raise ValueError("expected a size such as 4G")
    if size <= 0:
        raise ValueError("size must be positive")
    if size > maximum:
        raise ValueError(f"size {value!r} is larger than {maximum >> 30} GiB")
    return size
