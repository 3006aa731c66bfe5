"""`vmbuild doctor`: can this host build images? One ✓/✗ line per check, a verdict, and
a non-zero exit when a build cannot work here. The tool and module checks are the
ones a build runs at its start (vmbuild/preflight.py)."""

from __future__ import annotations

import argparse
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vmbuild import __version__, console, paths, preflight
from vmbuild.cli.common import SubParsers, json_flag, out, verb
from vmbuild.config import settings
from vmbuild.errors import VmbuildError

MIN_FREE = 2 << 30  # below this a build's disks and outputs do not fit
NEED_LABEL = {
    "build": "every build",
    "debian-base": "debian-12 base builds",
    "libvirt": "--backend libvirt",
    "tests": "testinfra tests",
    "aws": "distribution to AWS",
    "arm64": "arch: arm64 recipes",
    "arm64-base": "debian-12 arm64 base builds on an x86_64 host",
    "checkpoints": "resuming the running builder VM (else disk layers only)",
}


def add_parser(sub: SubParsers) -> None:
    d = verb(sub, "doctor", cmd_doctor, "check the host: tools, accelerator, libvirt, disk space")
    settings.add_flag(d, "accelerator", default="auto")
    d.add_argument("--libvirt-uri", help="the libvirt URI to check")
    json_flag(d)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    required: bool  # a failure means no build can work here
    detail: str  # what was found, or what is wrong and how to fix it
    needed_for: str


def _tool_version(path: str) -> str | None:
    from vmbuild.run import run

    try:
        lines = run([path, "--version"], timeout=30).stdout.splitlines()
    except VmbuildError:
        return None
    return lines[0] if lines else None


def checks(accel_mode: str = "auto", libvirt_uri: str | None = None) -> list[Check]:
    import tempfile

    from vmbuild.hypervisor import accel

    found: list[Check] = []
    for req in preflight.REQUIREMENTS:
        where = req.found()
        detail = where or req.problem() or ""
        if where and req.name in ("qemu-system-x86_64", "qemu-img"):
            detail = f"{where} ({_tool_version(where) or 'version unknown'})"
        required = req.need == "build"
        name = req.name if req.kind == "tool" else f"{req.name} (python)"
        found.append(Check(name, where is not None, required, detail, NEED_LABEL[req.need]))

    from vmbuild.stages import base_image

    probe = base_image.probe_disk()
    with tempfile.TemporaryDirectory(prefix="vmbuild-doctor-") as tmp:
        try:
            chosen = accel.choose(accel_mode, probe, Path(tmp))  # type: ignore[arg-type]
            found.append(
                Check("accelerator", True, True, f"{chosen.kind}: {chosen.reason}", "every build")
            )
        except VmbuildError as exc:
            found.append(Check("accelerator", False, True, str(exc), "every build"))

    from vmbuild.hypervisor.libvirt import libvirt_report

    lv = libvirt_report(libvirt_uri)
    if lv.get("reachable"):
        detail = f"{lv['uri']} reachable, libvirt {lv['version']}, {lv['hypervisor']}"
    else:
        detail = f"{lv['uri']} not reachable: {lv.get('error')}"
        if lv.get("hint"):
            detail += f" ({lv['hint']})"
    found.append(Check("libvirtd", bool(lv.get("reachable")), False, detail, "--backend libvirt"))

    for name, directory in (("cache", paths.cache_dir()), ("store", paths.store_dir())):
        existing = directory
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        ok = free >= MIN_FREE
        detail = f"{directory} ({free / (1 << 30):.1f} GiB free)"
        if not ok:
            detail += f": needs at least {MIN_FREE >> 30} GiB"
        found.append(Check(name, ok, True, detail, "every build"))
    return found


def cmd_doctor(args: argparse.Namespace) -> int:
    found = checks(args.accelerator, args.libvirt_uri)
    failed = [c for c in found if c.required and not c.ok]
    ready = not failed
    names = ", ".join(c.name for c in failed)
    verdict = (
        "ready: vmbuild can build images on this host"
        if ready
        else f"not ready: {len(failed)} required check(s) failed ({names})"
    )
    data: dict[str, Any] = {
        "vmbuild": __version__,
        "ready": ready,
        "verdict": verdict,
        "checks": [asdict(c) for c in found],
    }

    def human() -> None:
        con = console.stdout()
        for c in found:
            mark, style = ("✓", "green") if c.ok else ("✗", "red" if c.required else "yellow")
            scope = "" if c.required else f"  [for {c.needed_for}]"
            con.print(console.styled(mark, style, f" {c.name:20} {c.detail}{scope}"))
        con.print(console.styled(verdict, "bold green" if ready else "bold red"))

    out(args, data, human)
    return 0 if ready else 1
