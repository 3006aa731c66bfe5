"""Secret values: which parameters are secret, where their values come from,
and masking them in everything vmbuild writes.

A parameter is secret when a recipe lists it in `secret_parameters`, or when
its name looks like one (password, secret, token, key, credential...) and
the recipe does not list it in `public_parameters`. A value can also come
from the command line, `--secret NAME=@file` or `--secret NAME=env:VAR`, so
it is never written in a file the user keeps.

Masking is process-wide on purpose: a value must vanish from every sink
(terminal, run log, manifest, component results, events, history) including
the ones a future module adds, and the log handlers and JSON writers all
pass through `mask()`. Values reach the guest inside step scripts staged on
its tmpfs (vmbuild/remote/ssh.py), never its disk; the offline scan proves
no copy landed in the image.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from vmbuild.errors import ConfigError

MASK = "***"
SECRET_NAME = re.compile(
    r"pass(word|wd|phrase)?|secret|token|(^|[^a-z])key($|[^a-z])|apikey|credential",
    re.IGNORECASE,
)
# Longer than this is refused: a secret is a password or a key, not a file.
MAX_SECRET_BYTES = 64 * 1024

_lock = threading.Lock()
_values: list[str] = []
_pattern: re.Pattern[str] | None = None


def looks_secret(name: str) -> bool:
    """A parameter name that is secret unless declared public (DbPassword, ApiToken,
    SecretKey, ssh_key; not KeyboardLayout or Monkey)."""
    # Split CamelCase so `SshKey` reads as `Ssh Key` and `Keyboard` stays one word.
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
    return bool(SECRET_NAME.search(words))


def register(value: str) -> None:
    """Mask `value` (and its JSON-escaped form) from now on."""
    if not value:
        return
    forms = {value, json.dumps(value)[1:-1]}
    global _pattern
    with _lock:
        for form in forms:
            if form and form not in _values:
                _values.append(form)
        # Longest first, so a value containing another is masked whole.
        ordered = sorted(_values, key=len, reverse=True)
        _pattern = re.compile("|".join(re.escape(v) for v in ordered))


def clear() -> None:
    """Forget every value (tests; a long-lived worker between builds)."""
    global _pattern
    with _lock:
        _values.clear()
        _pattern = None


def mask(text: str) -> str:
    pattern = _pattern
    return text if pattern is None else pattern.sub(MASK, text)


def mask_json(data: Any) -> Any:
    """`data` with every registered value masked in every string (keys included)."""
    if _pattern is None:
        return data
    if isinstance(data, str):
        return mask(data)
    if isinstance(data, dict):
        return {mask_json(k): mask_json(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [mask_json(v) for v in data]
    return data


class MaskingFilter(logging.Filter):
    """Installed on every vmbuild log handler: records leave with values masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _pattern is not None:
            message = record.getMessage()
            masked = mask(message)
            if masked != message:
                record.msg, record.args = masked, None
            if record.exc_text:
                record.exc_text = mask(record.exc_text)
        return True


def parse_cli_secret(spec: str) -> tuple[str, str]:
    """`NAME=@file` or `NAME=env:VAR` -> (NAME, value). A literal value is refused:
    it would sit in the shell history and the process list."""
    name, sep, source = spec.partition("=")
    where = f"--secret {name or spec}"
    if not sep or not name:
        raise ConfigError(where, None, "expected NAME=@FILE or NAME=env:VAR")
    if source.startswith("@"):
        path = Path(source[1:])
        if not path.is_file():
            raise ConfigError(where, None, f"not a regular file: {path}")
        if path.stat().st_size > MAX_SECRET_BYTES:
            raise ConfigError(where, None, f"{path} is larger than {MAX_SECRET_BYTES} bytes")
        try:
            value = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(where, None, f"cannot read {path}: {exc}") from None
        # A file ends with a newline that is not part of the secret.
        value = value.removesuffix("\n")
    elif source.startswith("env:"):
        var = source[4:]
        if var not in os.environ:
            raise ConfigError(where, None, f"environment variable {var} is not set")
        value = os.environ[var]
    else:
        raise ConfigError(
            where,
            None,
            "the value must come from a file (@FILE) or the environment (env:VAR)",
            hint="a literal value would be visible in the shell history and `ps`",
        )
    if not value:
        raise ConfigError(where, None, "the secret is empty")
    return name, value
