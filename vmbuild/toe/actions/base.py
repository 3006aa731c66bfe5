"""What every action module declares, and the helpers they share.

An action module is data (`ActionSpec`): its inputs with types, defaults and
documentation, its outputs, and either a *script builder* (inputs in, bash text
out: pure, unit-tested by reading the script) or a *host runner* (for the modules
that move data through the host: WebDownload, S3Download, S3Upload). The runner
does the rest (references, loops, retries, timeouts, reboots).
"""

from __future__ import annotations

import base64
import math
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal

from vmbuild.remote.base import Remote, RemoteResult
from vmbuild.toe.expressions import has_references
from vmbuild.yamlio import scalar_text

if TYPE_CHECKING:
    from vmbuild.toe.actions.s3 import S3Config

FieldType = Literal["string", "bool", "int", "strings", "pairs"]
Item = dict[str, Any]
Problems = list[tuple[str, str]]


class Shape(StrEnum):
    MAP = "map"  # inputs is one map (ExecuteBash, Reboot, ...)
    LIST = "list"  # inputs is a list of maps, one per file (CreateFile, ...)
    CONDITION = "condition"  # inputs is a condition (Assert)


@dataclass(frozen=True)
class Field:
    """One documented input of an action module."""

    name: str
    type: FieldType
    doc: str
    required: bool = False
    default: Any = None
    choices: tuple[str, ...] = ()  # accepted case-insensitively, normalised to this spelling
    check: Callable[[Any], str | None] | None = None  # extra rule on the final value


class ActionFailed(Exception):
    """A host-side action failed; the message is the step's failure message."""


@dataclass(frozen=True)
class HostContext:
    """What a host runner may use: the guest, the S3 settings, the step's time left."""

    remote: Remote
    s3: S3Config | None
    deadline: float | None
    log: Callable[[str], None]

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ActionFailed("timed out")
        return float(math.ceil(left))  # guest-side timeout(1) takes whole seconds

    def run(self, script: str) -> RemoteResult:
        """Run a helper script in the guest; a non-zero exit becomes ActionFailed."""
        result = self.remote.run(script, timeout=self.remaining())
        if result.timed_out:
            raise ActionFailed("timed out")
        if result.exit_code != 0:
            detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
            raise ActionFailed(detail[-1] if detail else f"exit code {result.exit_code}")
        return result


ScriptBuilder = Callable[[Sequence[Item]], str]
OutputParser = Callable[[RemoteResult, Sequence[Item]], dict[str, str]]
HostRunner = Callable[[Sequence[Item], HostContext], dict[str, str]]
ItemCheck = Callable[[Item], Problems]


@dataclass(frozen=True)
class ActionSpec:
    name: str
    summary: str
    shape: Shape
    fields: tuple[Field, ...] = ()
    outputs: tuple[str, ...] = ()
    script: ScriptBuilder | None = None
    parse_outputs: OutputParser | None = None
    host: HostRunner | None = None
    item_check: ItemCheck | None = None
    inputs_optional: bool = False
    log_stdout: bool = True  # ReadFile's stdout is base64 and stays out of the log
    # Inputs holding a file's content: another tool's `{{ name }}` (Jinja, Go
    # templates) that is not a parameter of the document stays as written.
    templates: tuple[str, ...] = ()

    def field(self, name: str) -> Field | None:
        for f in self.fields:
            if f.name == name:
                return f
        return None


def typed_items(spec: ActionSpec, raw: Any, *, final: bool) -> tuple[list[Item], Problems]:
    """Check `inputs` against the spec and fill defaults.

    With `final=False` (validation before the run) values that still hold `{{ }}`
    references are accepted as written; with `final=True` (after rendering) every
    value must have its declared type.
    """
    if raw is None and spec.inputs_optional:
        raw = {} if spec.shape is Shape.MAP else [{}]
    if spec.shape is Shape.LIST:
        if isinstance(raw, dict):
            raw, prefixes = [raw], ["inputs"]  # one item written without the list dash
        elif not isinstance(raw, list) or not raw:
            return [], [("inputs", f"{spec.name} expects a list of input maps")]
        else:
            prefixes = [f"inputs[{i}]" for i in range(len(raw))]
    else:
        if not isinstance(raw, dict):
            return [], [("inputs", f"{spec.name} expects a map of inputs")]
        raw = [raw]
        prefixes = ["inputs"]
    items: list[Item] = []
    problems: Problems = []
    for prefix, entry in zip(prefixes, raw, strict=True):
        if not isinstance(entry, dict):
            problems.append((prefix, "expected a map of inputs"))
            continue
        item, more = _typed_item(spec, entry, prefix, final)
        problems += more
        if not more and spec.item_check and (final or not has_references(item)):
            problems += [(f"{prefix}.{k}" if k else prefix, m) for k, m in spec.item_check(item)]
        items.append(item)
    return items, problems


def _typed_item(
    spec: ActionSpec, entry: dict[Any, Any], prefix: str, final: bool
) -> tuple[Item, Problems]:
    problems: Problems = []
    known = {f.name for f in spec.fields}
    for key in entry:
        if key not in known:
            expected = ", ".join(sorted(known)) or "none"
            problems.append(
                (f"{prefix}.{key}", f"unknown input for {spec.name} (inputs: {expected})")
            )
    item: Item = {}
    for f in spec.fields:
        value = entry.get(f.name)
        if value is None:
            if f.required:
                problems.append((f"{prefix}.{f.name}", "required input is missing"))
            item[f.name] = f.default
            continue
        typed, message = coerce(f, value, final=final)
        if message:
            problems.append((f"{prefix}.{f.name}", message))
        item[f.name] = typed
    return item, problems


def coerce(f: Field, value: Any, *, final: bool) -> tuple[Any, str | None]:
    """(typed value, None) or (value, error message)."""
    if not final and has_references(value):
        return value, None  # checked again once rendered
    if f.type == "pairs":
        return _pairs(value)
    if f.type == "strings":
        if not isinstance(value, list) or any(scalar_text(v) is None for v in value):
            return value, "expected a list of strings"
        return [scalar_text(v) for v in value], None
    if f.type == "bool":
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true", None
        return value, f"expected true or false, got {value!r}"
    if f.type == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value), None
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value.strip()), None
        return value, f"expected a whole number, got {value!r}"
    if isinstance(value, bool):
        return value, f"expected a string, got {str(value).lower()} (quote it)"
    text = scalar_text(value)
    if text is None:
        return value, "expected a string, not a list or map"
    if f.choices:
        for choice in f.choices:
            if text.lower() == choice.lower():
                text = choice
                break
        else:
            return text, f"expected one of {', '.join(f.choices)}, got {text!r}"
    if f.check:
        message = f.check(text)
        if message:
            return text, message
    return text, None


def _pairs(value: Any) -> tuple[Any, str | None]:
    """ExecuteDocument's `parameters`: a list of {name, value} maps."""
    message = "expected a list of {name, value} maps"
    if not isinstance(value, list):
        return value, message
    pairs = []
    for entry in value:
        if not isinstance(entry, dict) or set(entry) != {"name", "value"}:
            return value, message
        name, text = scalar_text(entry["name"]), scalar_text(entry["value"])
        if name is None or text is None:
            return value, message
        pairs.append({"name": name, "value": text})
    return pairs, None


# --- shell helpers --------------------------------------------------------------

HEREDOC_MARK = "VMBUILD_B64_EOF"  # base64 never contains '_', so no line can end the heredoc early
PRELUDE = "set -euo pipefail\n"


def q(text: str) -> str:
    return shlex.quote(text)


def fail(message: str) -> str:
    """A shell statement that reports `message` on stderr and fails the script."""
    return f"{{ echo {q(message)} >&2; exit 1; }}"


def fail_unless(test: str, message: str) -> str:
    """`if ! TEST; then fail; fi` where TEST is a shell test such as `[ -f /x ]`."""
    return f"if ! {test}; then {fail(message)}; fi\n"


def fail_if(test: str, message: str) -> str:
    return f"if {test}; then {fail(message)}; fi\n"


def write_bytes(data: bytes, redirect: str) -> str:
    """Shell lines writing `data` through `base64 -d REDIRECT` (e.g. `> /etc/x`)."""
    encoded = base64.encodebytes(data).decode("ascii")
    return f"base64 -d {redirect} <<'{HEREDOC_MARK}'\n{encoded}{HEREDOC_MARK}\n"


def has_wildcard(path: str) -> bool:
    return "*" in path.rsplit("/", 1)[-1]


def glob_words(path: str) -> str:
    """`path` as a bash glob where only the `*` of its last component is special."""
    folder, _, pattern = path.rpartition("/")
    if not folder and path.startswith("/"):
        folder = "/"
    pieces = "*".join(q(piece) if piece else "" for piece in pattern.split("*"))
    if not folder:
        return pieces
    return f"{q(folder)}/{pieces}" if folder != "/" else f"/{pieces}"


def strip_slashes(path: str) -> str:
    """`/a/b/` → `/a/b` (but `/` stays `/`): a trailing slash on a symlink follows it."""
    return path.rstrip("/") or "/"


# --- inputs several file modules share ----------------------------------------

# AWSTOE's encodings (case-insensitive); utf-16 and utf-32 mean little-endian.
# Values: (Python codec, iconv name).
ENCODINGS = {
    "utf8": ("utf-8", "UTF-8"),
    "utf-8": ("utf-8", "UTF-8"),
    "utf16": ("utf-16-le", "UTF-16LE"),
    "utf-16": ("utf-16-le", "UTF-16LE"),
    "utf16-LE": ("utf-16-le", "UTF-16LE"),
    "utf-16-LE": ("utf-16-le", "UTF-16LE"),
    "utf16-BE": ("utf-16-be", "UTF-16BE"),
    "utf-16-BE": ("utf-16-be", "UTF-16BE"),
    "utf32": ("utf-32-le", "UTF-32LE"),
    "utf-32": ("utf-32-le", "UTF-32LE"),
    "utf32-LE": ("utf-32-le", "UTF-32LE"),
    "utf-32-LE": ("utf-32-le", "UTF-32LE"),
    "utf32-BE": ("utf-32-be", "UTF-32BE"),
    "utf-32-BE": ("utf-32-be", "UTF-32BE"),
}

_OCTAL_MODE = re.compile(r"^[0-7]{3,4}$")
_SYMBOLIC_MODE = re.compile(
    r"^[ugoa]*(?:[-+=](?:[rwxXst]*|[ugo]))+(?:,[ugoa]*(?:[-+=](?:[rwxXst]*|[ugo]))+)*$"
)
_ACCOUNT = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.@$-]*$")


def check_mode(text: str) -> str | None:
    if _OCTAL_MODE.match(text) or _SYMBOLIC_MODE.match(text):
        return None
    return f"expected permissions such as 0644, 755 or u+x, got {text!r}"


def check_account(text: str) -> str | None:
    if _ACCOUNT.match(text):
        return None
    return f"expected a user or group name or id, got {text!r}"


def encoding_field(
    doc: str = "Text encoding: utf8 (default), utf16, utf32, with -LE/-BE.",
) -> Field:
    return Field("encoding", "string", doc, default="utf8", choices=tuple(ENCODINGS))


def path_field(doc: str) -> Field:
    return Field("path", "string", doc, required=True, check=_not_empty)


def _not_empty(text: str) -> str | None:
    return "must not be empty" if not text.strip() else None
