"""`vmbuild build RECIPE`: build, test and store an image."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table
from rich.text import Text

from vmbuild import console, paths
from vmbuild.cli.common import SubParsers, json_flag, out, store_flag, verb


def add_parser(sub: SubParsers) -> None:
    b = verb(sub, "build", cmd_build, "build (and test) an image from a recipe")
    b.add_argument("recipe", help="recipe YAML file")
    b.add_argument("--skip-tests", action="store_true", help="do not boot the test VM")
    b.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    b.add_argument(
        "--backend", choices=["qemu", "libvirt"], help="default: the recipe's vm.backend, or qemu"
    )
    b.add_argument("--libvirt-uri", help="default: qemu:///system as root, else qemu:///session")
    b.add_argument("--libvirt-network", help="attach to this libvirt network (address from DHCP)")
    b.add_argument(
        "--keep-on-failure", action="store_true", help="leave the failed VM running for SSH"
    )
    b.add_argument("--mirror", help="Debian mirror for a debian-12 base (default: the host's)")
    b.add_argument(
        "--apt-proxy",
        metavar="auto|off|URL",
        help="host package cache for the guests: auto (default; $VMBUILD_APT_PROXY) starts "
        "apt-cacher-ng, off goes direct, http://127.0.0.1:PORT names a running one",
    )
    store_flag(b)
    json_flag(b)


def cmd_build(args: argparse.Namespace) -> int:
    from vmbuild.build import BuildOptions, build
    from vmbuild.config.recipe import load_recipe
    from vmbuild.log import Progress

    loaded = load_recipe(Path(args.recipe))  # validated before any side effect
    opts = BuildOptions(
        store=paths.store_dir(args.store),
        accel=args.accel,
        skip_tests=args.skip_tests,
        keep_on_failure=args.keep_on_failure,
        backend=args.backend,
        mirror=args.mirror,
        libvirt_uri=args.libvirt_uri,
        libvirt_network=args.libvirt_network,
        apt_proxy=args.apt_proxy,
    )
    progress = Progress(quiet=args.json)
    result = build(loaded, opts, progress)
    m = result.manifest

    def human() -> None:
        con = console.stdout()
        table = Table(title=Text(f"{m.name} {m.version} ({m.build})"), show_edge=False)
        table.add_column("stage")
        table.add_column("seconds", justify="right")
        for name, secs in m.timings.items():
            table.add_row(name, f"{secs:.1f}")
        con.print(table)
        for o in m.outputs:
            con.print(f"{o.format:6} {result.build_dir / o.file}  sha256:{o.sha256}")
        con.print(f"tests: {m.tests_status}")
        con.print(console.styled("artifact:", "bold green", f" {result.build_dir}"))

    return out(args, {"path": str(result.build_dir), "manifest": m.to_json()}, human)
