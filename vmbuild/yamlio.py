"""The one YAML loader, for every file vmbuild reads: recipes, component documents,
pipelines, distribution files.

They are YAML 1.1 (what the AWSTOE examples are written in), so PyYAML's safe
loader reads them as AWS does, with additions that matter for a faithful runner
and for clear errors:

* numbers keep the text they were written with: `permissions: 0777` is octal 511
  to YAML but must reach chmod as "0777", and a parameter default `1.10` must stay
  "1.10", not become "1.1";
* a key written twice in one mapping is an error instead of silently keeping the
  last value (a classic copy-paste bug in long documents: a recipe with two
  `outputs:` would otherwise build only the second list);
* `load_file` turns unreadable, binary, non-UTF-8 and malformed input into one
  ConfigError naming the file and the line;
* only regular files of bounded size are read, and a document's depth and size
  with aliases expanded are bounded before it is built (vmbuild/yamllimits.py).
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, ScalarNode

from vmbuild import yamllimits as limits
from vmbuild.errors import ConfigError


class SourceInt(int):
    """An int read from YAML that remembers how it was written ("0777", "1_000")."""

    source: str


class SourceFloat(float):
    """A float read from YAML that remembers how it was written ("1.10")."""

    source: str


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: str, line: int) -> None:
        super().__init__(f"line {line}: key '{key}' appears twice in the same mapping")


class _Loader(yaml.SafeLoader):
    pass


def _construct_int(loader: _Loader, node: ScalarNode) -> SourceInt:
    value = SourceInt(SafeConstructor.construct_yaml_int(loader, node))
    value.source = str(node.value)
    return value


def _construct_float(loader: _Loader, node: ScalarNode) -> SourceFloat:
    value = SourceFloat(SafeConstructor.construct_yaml_float(loader, node))
    value.source = str(node.value)
    return value


def _construct_mapping(loader: _Loader, node: MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError as exc:  # an unhashable key such as a list
            raise ConstructorError(
                None, None, "found an unhashable mapping key", key_node.start_mark
            ) from exc
        if duplicate:
            raise DuplicateKeyError(str(key), key_node.start_mark.line + 1)
        seen.add(key)
    return dict(loader.construct_pairs(node, deep=True))


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def load_yaml(text: str) -> Any:
    """Parse one YAML document; raises yaml.YAMLError (with a line) on bad syntax."""
    return yaml.load(text, Loader=_Loader)


def load_file(path: Path, display: str | None = None) -> tuple[Any, bytes]:
    """Parse a YAML file: (its data, its bytes). Errors are one ConfigError naming the
    file (as `display`, default the path) and, for syntax errors, the line."""
    name = display or str(path)
    try:
        data = limits.read_bytes(path)
    except FileNotFoundError:
        raise ConfigError(name, None, "file not found") from None
    except limits.UnsafeInput as exc:
        raise ConfigError(name, None, f"cannot read: {exc}") from None
    except OSError as exc:
        raise ConfigError(name, None, f"cannot read: {exc.strerror or exc}") from None
    return parse_bytes(data, name), data


def parse_bytes(data: bytes, name: str) -> Any:
    """Parse YAML bytes read from `name` (see load_file)."""
    if b"\0" in data:
        raise ConfigError(name, None, "cannot read: a binary file, not YAML text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(name, None, f"cannot read: not UTF-8 text (byte {exc.start})") from None
    try:
        limits.check_yaml(text)  # depth, alias expansion, size: before any object exists
        return load_yaml(text)
    except limits.UnsafeInput as exc:
        raise ConfigError(name, None, str(exc)) from None
    except (ValueError, OverflowError, RecursionError) as exc:
        # Past the limits these should not happen; never a traceback if they do.
        raise ConfigError(name, None, f"invalid YAML: {exc}") from None
    except DuplicateKeyError as exc:
        raise ConfigError(name, None, str(exc)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        raise ConfigError(name, where, f"invalid YAML: {problem}") from None


def scalar_text(value: object) -> str | None:
    """The string AWSTOE would see for a YAML scalar, or None if it is not a scalar.

    Parameters and most inputs are strings in AWSTOE; documents still write
    `default: 17` or `permissions: 755`, which YAML reads as numbers.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, SourceInt | SourceFloat):
        return value.source
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, datetime.date):  # `default: 2024-01-31` is a date to YAML
        return value.isoformat()
    return None
