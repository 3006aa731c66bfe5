"""Loading config files into typed models, and the one mapper of validation errors.

Every file kind (recipe, pipeline, distribution; component documents through
vmbuild.yamlio) is parsed by the same YAML loader, and every pydantic error
becomes `file: field.path[2]: message`, every problem listed (osbuild style).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_args

from pydantic import BaseModel, ValidationError

from vmbuild.errors import ConfigError

if TYPE_CHECKING:
    from vmbuild.config.variables import Given
from vmbuild.yamlio import load_file


def load_yaml(path: Path, display: str | None = None) -> Any:
    """Parse a YAML file; errors name the file and the line."""
    return load_file(path, display)[0]


class FieldError(ValueError):
    """Raised by a model-level validator about one field: the error names that field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def field_path(loc: Sequence[int | str], prefix: str = "") -> str:
    """('components', 1, 'parameters') -> 'components[1].parameters'."""
    out = prefix
    for part in loc:
        if isinstance(part, int) or part.isdigit():
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


# "this member of a union had the wrong type" errors: noise when another member
# of the same union got far enough to say what is really wrong.
_TYPE_MISMATCH = {
    "string_type", "int_type", "float_type", "bool_type", "dict_type", "list_type",
    "model_type", "model_attributes_type", "literal_error", "is_instance_of",
}  # fmt: skip
# Field names are snake_case; pydantic tags union members with their type name.
_UNION_TAG = re.compile(r"^(str|int|float|bool|list\[.*\]|dict\[.*\]|[A-Z][A-Za-z]*)$")

# A file kind's own wording for an error (None: the common wording).
Rewrite = Callable[[Any, list[int | str]], str | None]


def _clean_loc(loc: Sequence[int | str]) -> list[int | str]:
    return [
        p for p in loc
        if not (isinstance(p, str) and (p.startswith("function-") or _UNION_TAG.match(p)))
    ]  # fmt: skip


def _field_names(model: type[BaseModel]) -> Iterator[str]:
    """Every field name (and alias) in `model` and the models nested in it."""
    seen: set[type[BaseModel]] = set()
    todo = [model]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name, info in current.model_fields.items():
            yield info.alias or name
            stack = [info.annotation]
            while stack:
                tp = stack.pop()
                if isinstance(tp, type) and issubclass(tp, BaseModel):
                    todo.append(tp)
                stack.extend(get_args(tp))


def _describe(
    error: Any, prefix: str, model: type[BaseModel] | None, rewrite: Rewrite | None
) -> tuple[str, str]:
    loc = _clean_loc(error["loc"])
    ctx_error = (error.get("ctx") or {}).get("error")
    message = str(error["msg"]).removeprefix("Value error, ")
    if isinstance(ctx_error, FieldError):
        loc += ctx_error.field.replace("]", "").replace("[", ".").split(".")
        message = ctx_error.message
    elif (own := rewrite(error, loc) if rewrite else None) is not None:
        message = own
    elif error["type"] == "extra_forbidden":
        if error["loc"] and (not loc or loc[-1] != error["loc"][-1]):
            # An unknown key that looks like a union tag ("A", "Str") was cleaned away.
            loc.append(error["loc"][-1])
        known = sorted(set(_field_names(model))) if model is not None else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        message = "unknown field" + (f" (did you mean {close[0]}?)" if close else "")
    elif error["type"] == "missing":
        message = "required field is missing"
    elif not loc and not prefix:
        # A model-level check that names its own field: "version: not semver".
        field, _, rest = message.partition(": ")
        if rest and " " not in field:
            loc, message = [field], rest
    return field_path(loc, prefix), message


def config_error(
    exc: ValidationError,
    file: str,
    prefix: str = "",
    *,
    model: type[BaseModel] | None = None,
    rewrite: Rewrite | None = None,
) -> ConfigError:
    """Every validation problem, the first as the error's field and message and the
    others on lines of their own: `file: field: message`."""
    errors = list(exc.errors())
    meaningful = [e for e in errors if e["type"] not in _TYPE_MISMATCH]
    if meaningful and len(meaningful) < len(errors):
        errors = meaningful
    problems = [_describe(e, prefix, model, rewrite) for e in errors]
    field, message = problems[0]
    message += "".join(f"\n{file}: {f}: {m}" if f else f"\n{file}: {m}" for f, m in problems[1:])
    return ConfigError(file, field or None, message)


M = TypeVar("M", bound=BaseModel)


def load_model(
    path: Path, model: type[M], expected: str, variables: Given | None = None,
    prepare: Callable[[dict[str, Any], str], dict[str, Any]] | None = None,
) -> M:  # fmt: skip
    """Load a YAML mapping into `model`; every error names the file and the field.
    `prepare(data, display)` maps another vocabulary onto the model's first (raising
    ConfigError itself).

    Variables (`variables:` and `{{ var.KEY }}`, config/variables.py) are resolved on
    the parsed data, before the model: `variables` are the values given from outside
    (default: the environment's VMBUILD_VAR_*)."""
    from vmbuild.config.variables import Given, resolve

    display = str(path)
    data = load_yaml(path, display)
    if not isinstance(data, dict):
        raise ConfigError(display, None, f"expected a mapping with {expected}")
    data = resolve(data, display, variables or Given.from_environment())
    if prepare is not None:
        data = prepare(data, display)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, display, model=model) from None


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
