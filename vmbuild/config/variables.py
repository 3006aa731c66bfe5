"""Recipe and pipeline variables: declared at the top of the file, given on the command
line, in files or in the environment, substituted where `{{ var.KEY }}` is written.

    variables:
      port: {type: int, default: 8080, description: the port nginx listens on}
      greeting: {description: the page's text}        # no default: a value is required
    components:
      - name: nginx-app
        parameters: {Port: "{{ var.port }}", Content: "<h1>{{ var.greeting }}</h1>"}

A value comes from, first match wins: `--var KEY=VALUE`, `--var-file FILE` (a YAML
mapping; later files win), the environment `VMBUILD_VAR_KEY`, the declared default.
Substitution happens on the parsed YAML, before the typed model sees it (so every
later check applies to the substituted value); a value that is exactly one reference
keeps its type (`disk_size: "{{ var.size }}"` gets the int). A reference to an
undeclared variable, a declared one without a value, a value of the wrong type and
a `--var` the file does not declare are errors naming the file and the field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vmbuild.errors import ConfigError

ENV_PREFIX = "VMBUILD_VAR_"
REFERENCE = re.compile(r"\{\{\s*var\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
VarType = Literal["string", "int", "number", "bool"]
TYPES: tuple[VarType, ...] = ("string", "int", "number", "bool")


@dataclass(frozen=True)
class Given:
    """The values given from outside the file: CLI, var files, environment."""

    cli: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, Any] = field(default_factory=dict)
    file_names: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    strict: bool = True  # a --var or var-file key the file does not declare is an error
    # False for an exported schedule: the timer or cron job that runs it later does not
    # have this shell's VMBUILD_VAR_*, so they must not make the check pass now.
    environment: bool = True

    @classmethod
    def from_environment(cls) -> Given:
        return cls(env=dict(os.environ))

    def lookup(self, name: str) -> tuple[Any, str] | None:
        """(value, where it came from) or None."""
        if name in self.cli:
            return self.cli[name], f"--var {name}"
        if name in self.files:
            return self.files[name], "--var-file"
        if self.environment and ENV_PREFIX + name in self.env:
            return self.env[ENV_PREFIX + name], f"${ENV_PREFIX}{name}"
        return None


def as_environment(given: Given) -> dict[str, str]:
    """The given --var and var-file values as VMBUILD_VAR_* entries, for a child process
    (the scheduler's runs), keeping the order of precedence: a --var wins over the
    environment, which wins over a var file."""
    out: dict[str, str] = {}
    for key, value in given.files.items():
        if ENV_PREFIX + key not in given.env:
            out[ENV_PREFIX + key] = str(value).lower() if isinstance(value, bool) else str(value)
    out.update({ENV_PREFIX + key: value for key, value in given.cli.items()})
    return out


def as_arguments(given: Given) -> list[str]:
    """The given --var and --var-file values as `pipeline run` arguments, for a command
    that runs later (an exported systemd unit or crontab line). Var files by absolute
    path, read when the run starts; the environment is not carried (a timer has none)."""
    out: list[str] = []
    for key, value in given.cli.items():
        out += ["--var", f"{key}={value}"]
    for name in given.file_names:
        out += ["--var-file", str(Path(name).resolve())]
    return out


def parse_cli(pairs: Sequence[str], var_files: Sequence[str]) -> Given:
    """`--var KEY=VALUE` pairs and `--var-file FILE`s, plus the environment."""
    from vmbuild.yamlio import load_file

    cli: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not NAME.match(key):
            raise ConfigError("--var", None, f"expected KEY=VALUE, got {pair!r}")
        cli[key] = value
    files: dict[str, Any] = {}
    for name in var_files:
        data, _ = load_file(Path(name), name)
        if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
            raise ConfigError(name, None, "a var file is a mapping of KEY: value")
        files.update(data)
    return Given(cli=cli, files=files, file_names=tuple(var_files), env=dict(os.environ))


@dataclass(frozen=True)
class Declared:
    name: str
    type: VarType
    default: Any
    required: bool
    description: str


def _declarations(raw: object, display: str) -> dict[str, Declared]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        expected = "expected a mapping of NAME: {type, default, description}"
        raise ConfigError(display, "variables", expected)
    out = {}
    for name, spec in raw.items():
        where = f"variables.{name}"
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(display, where, "a variable name is letters, digits and _")
        spec = {} if spec is None else spec
        if not isinstance(spec, dict):
            raise ConfigError(display, where, "expected {type, default, description}")
        unknown = set(spec) - {"type", "default", "description"}
        if unknown:
            field_name = f"{where}.{sorted(unknown)[0]}"
            raise ConfigError(
                display, field_name, "unknown field (known: type, default, description)"
            )
        kind = spec.get("type", "string")
        if kind not in TYPES:
            choices = ", ".join(TYPES)
            raise ConfigError(display, f"{where}.type", f"{kind!r} is not one of {choices}")
        description = str(spec.get("description", ""))
        default = None
        if "default" in spec:
            default = _convert(spec["default"], kind, display, f"{where}.default", "the default")
        out[name] = Declared(name, kind, default, "default" not in spec, description)
    return out


def reject_undeclared(given: Given, declared: set[str], display: str, whose: str) -> None:
    """A --var/--var-file key that nothing declares is a typo: one error naming it."""
    for source, keys in (("--var", given.cli), ("--var-file", given.files)):
        for key in keys:
            if key not in declared:
                known = ", ".join(sorted(declared)) or "none"
                raise ConfigError(
                    display, "variables",
                    f"{source} gives {key!r}, which {whose} (declared: {known})",
                )  # fmt: skip


def _convert(value: Any, kind: VarType, display: str, where: str, source: str) -> Any:
    try:
        if kind == "string":
            if isinstance(value, dict | list):
                raise ValueError
            return str(value) if not isinstance(value, bool) else str(value).lower()
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "1", "on"):
                return True
            if text in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if isinstance(value, bool):
            raise ValueError
        if kind == "int":
            return int(str(value).strip(), 10)
        return float(str(value).strip())
    except ValueError:
        article = "an" if kind == "int" else "a"
        raise ConfigError(display, where, f"{source} {value!r} is not {article} {kind}") from None


def resolve(data: dict[str, Any], display: str, given: Given) -> dict[str, Any]:
    """`data` (a parsed recipe or pipeline) without its `variables:` section, with every
    `{{ var.KEY }}` replaced by its value."""
    declared = _declarations(data.get("variables"), display)
    if given.strict:
        reject_undeclared(given, set(declared), display, "this file does not declare")
    values: dict[str, Any] = {}

    def value_of(name: str, where: str) -> Any:
        if name in values:
            return values[name]
        decl = declared.get(name)
        if decl is None:
            known = ", ".join(sorted(declared)) or "none"
            raise ConfigError(
                display, where, f"undeclared variable {name!r} (declared: {known})",
                hint=f"declare it at the top of the file: variables: {{{name}: {{type: string}}}}",
            )  # fmt: skip
        found = given.lookup(name)
        if found is not None:
            value = _convert(found[0], decl.type, display, f"variables.{name}", found[1])
        elif not decl.required:
            value = decl.default
        else:
            hint = f"pass --var {name}=VALUE, a --var-file with {name}:, "
            hint += (
                f"or set {ENV_PREFIX}{name}" if given.environment
                else f"not {ENV_PREFIX}{name} (an exported schedule does not run in this shell)"
            )  # fmt: skip
            raise ConfigError(display, f"variables.{name}", "no value given", hint=hint)
        values[name] = value
        return value

    def substitute(node: Any, where: str) -> Any:
        if isinstance(node, dict):
            return {k: substitute(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [substitute(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, str):
            whole = REFERENCE.fullmatch(node.strip())
            if whole:
                return value_of(whole.group(1), where)
            return REFERENCE.sub(lambda m: _text(value_of(m.group(1), where)), node)
        return node

    body = {k: v for k, v in data.items() if k != "variables"}
    result: dict[str, Any] = substitute(body, "")
    # Required variables with no reference still need a value: a typo'd reference
    # name is caught above, an unused required variable here.
    for name in declared:
        value_of(name, f"variables.{name}")
    return result


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def declared_names(data: object) -> set[str]:
    if isinstance(data, dict) and isinstance(data.get("variables"), dict):
        return {str(k) for k in data["variables"]}
    return set()
