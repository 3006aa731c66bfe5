"""YAML loading for component documents.

AWSTOE documents are YAML 1.1 (what the AWS examples are written in), so PyYAML's
safe loader reads them as AWS does, with two additions that matter for a faithful
runner:

* numbers keep the text they were written with: `permissions: 0777` is octal 511
  to YAML but must reach chmod as "0777", and a parameter default `1.10` must stay
  "1.10", not become "1.1";
* a key written twice in one mapping is an error instead of silently keeping the
  last value (a classic copy-paste bug in long documents).
"""

from __future__ import annotations

import datetime
from typing import Any

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, ScalarNode


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
