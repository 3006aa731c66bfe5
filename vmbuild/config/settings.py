"""Every build setting, declared once: name, type, default, help, and where it may appear.

A setting may be given on the command line (`vmbuild build --cpus 4`), in a pipeline's
`infrastructure:` or in a recipe's `vm:`; the first of those that gives it wins, else
its default (vmbuild.plan merges them). From this table come:

- the `vmbuild build` flags (`add_flags`): `--name-with-dashes`, plus old spellings;
- the pydantic fields of the recipe's `vm:` and the pipeline's `infrastructure:`
  (`field`): same name, default, help and bounds; old spellings accepted as aliases.

A layer's default is "not given" (None) when a layer below it may give the setting,
so a pipeline that says nothing about CPUs leaves the recipe's value in place.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import AliasChoices, Field

from vmbuild.config.loader import parse_size

Layer = Literal["cli", "pipeline", "recipe"]
LAYERS: tuple[Layer, ...] = ("cli", "pipeline", "recipe")  # highest precedence first


@dataclass(frozen=True)
class Setting:
    name: str  # the one name: a YAML key, and --name-with-dashes on the command line
    default: Any
    help: str
    where: frozenset[Layer]
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] | None = None  # CLI text -> value (None: text, or a switch)
    switch: bool = False  # a CLI flag without a value
    flag: str | None = None  # the CLI spelling, when the flat CLI namespace needs a prefix
    old_flags: tuple[str, ...] = ()  # earlier CLI spellings, still accepted
    old_keys: tuple[str, ...] = ()  # earlier YAML spellings, still accepted
    bounds: tuple[tuple[str, Any], ...] = ()  # pydantic constraints: ("ge", 1), ("pattern", ...)
    metavar: str | None = None  # how --help shows the value

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def default_in(self, layer: Layer) -> Any:
        """The table default in the lowest layer holding the setting; "not given" above it."""
        below = LAYERS[LAYERS.index(layer) + 1 :]
        if any(lower in self.where for lower in below):
            return False if (layer == "cli" and self.switch) else None
        return self.default


_MIRROR = r"^(https?|file)://"
MIN_MEMORY = 256 << 20
MAX_MEMORY = 1 << 40


def parse_memory(value: object) -> int:
    """Guest memory in bytes. A bare number means MiB (as Packer and EC2 read it):
    `memory: 2048` is 2 GiB, never 2048 bytes."""
    size = parse_size(value, bare_unit=1 << 20, maximum=MAX_MEMORY)
    if size < MIN_MEMORY:
        raise ValueError(f"{value!r} is less than 256 MiB (a bare number means MiB)")
    return size


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting(
            "backend",
            "qemu",
            "qemu (direct, the default) or libvirt",
            frozenset({"cli", "pipeline", "recipe"}),
            choices=("qemu", "libvirt"),
        ),
        Setting(
            "uri",
            None,
            "libvirt URI (default qemu:///system as root, else qemu:///session)",
            frozenset({"cli", "pipeline", "recipe"}),
            flag="--libvirt-uri",
        ),
        Setting(
            "network",
            None,
            "a libvirt network to attach instead of user networking",
            frozenset({"cli", "pipeline", "recipe"}),
            flag="--libvirt-network",
        ),
        Setting(
            "cpus",
            2,
            "guest CPUs",
            frozenset({"cli", "pipeline", "recipe"}),
            parse=int,
            bounds=(("ge", 1), ("le", 64)),
        ),
        Setting(
            "memory",
            2 << 30,
            "guest memory, e.g. 2G; a bare number means MiB (2048)",
            frozenset({"cli", "pipeline", "recipe"}),
            parse=parse_memory,
        ),
        Setting(
            "accelerator",
            "auto",
            "auto (KVM when a guest kernel is proved to run), kvm or tcg",
            frozenset({"cli", "pipeline"}),
            choices=("auto", "kvm", "tcg"),
            old_flags=("--accel",),
        ),
        Setting(
            "keep_on_failure",
            False,
            "leave a failed VM running for SSH (the log says how)",
            frozenset({"cli", "pipeline"}),
            switch=True,
            old_keys=("keep_vm_on_failure",),
        ),
        Setting(
            "mirror",
            None,
            "Debian mirror for a debian-12 base (default: the host's)",
            frozenset({"cli", "pipeline"}),
            bounds=(("pattern", _MIRROR),),
        ),
        Setting(
            "skip_tests",
            False,
            "do not boot the test VM (a pipeline says `tests: enabled: false`)",
            frozenset({"cli"}),
            switch=True,
        ),
        Setting(
            "apt_proxy",
            None,
            "host package cache for the guests: auto (default; $VMBUILD_APT_PROXY) starts "
            "apt-cacher-ng, off goes direct, http://127.0.0.1:PORT names a running one",
            frozenset({"cli"}),
            metavar="auto|off|URL",
        ),
        Setting(
            "no_cache",
            False,
            "neither resume from nor save build checkpoints (the package cache still works)",
            frozenset({"cli"}),
            switch=True,
        ),
        Setting(
            "on_error",
            "abort",
            "when a component fails: abort, keep the VM running for SSH, or ask "
            "(retry the component, open a shell in the builder, or abort)",
            frozenset({"cli"}),
            choices=("abort", "keep", "ask"),
        ),
        Setting("timeout", 3 * 3600.0, "the whole run, build included", frozenset({"pipeline"})),
        Setting(
            "refresh_base",
            True,
            "rebuild a debian-12 base the mirror has moved past",
            frozenset({"pipeline"}),
        ),
    )
}


def field(name: str, layer: Layer) -> Any:
    """The pydantic field of setting `name` in a file layer (`vm:` or `infrastructure:`)."""
    s = SETTINGS[name]
    if layer not in s.where:
        raise KeyError(f"setting {name} is not allowed in the {layer} layer")
    alias = AliasChoices(s.name, *s.old_keys) if s.old_keys else None
    return Field(
        default=s.default_in(layer), description=s.help, validation_alias=alias, **dict(s.bounds)
    )


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The command-line flags of every setting the CLI may give."""
    for s in SETTINGS.values():
        if "cli" in s.where:
            add_flag(parser, s.name)


def add_flag(parser: argparse.ArgumentParser, name: str, *, default: Any = None) -> None:
    """One setting's flag (other verbs reuse single settings: `doctor --accelerator`)."""
    s = SETTINGS[name]
    names = [s.cli_flag, *s.old_flags]
    if s.switch:
        parser.add_argument(*names, dest=s.name, action="store_true", help=s.help)
    else:
        parse = _cli_type(s)
        extra: dict[str, Any] = {"type": parse} if parse is not None else {}
        if s.metavar:
            extra["metavar"] = s.metavar
        parser.add_argument(
            *names, dest=s.name, default=default, choices=s.choices, help=s.help, **extra
        )


def cli_values(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (None: not given)."""
    return {name: getattr(args, name) for name, s in SETTINGS.items() if "cli" in s.where}


def _cli_type(s: Setting) -> Callable[[str], Any] | None:
    if s.parse is None:
        return None
    parse = s.parse

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        for kind, bound in s.bounds:
            if (kind == "ge" and value < bound) or (kind == "le" and value > bound):
                raise argparse.ArgumentTypeError(f"{value} is out of range")
        return value

    convert.__name__ = s.name  # argparse names the type in "invalid <name> value"
    return convert
