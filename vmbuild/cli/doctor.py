"""`vmbuild doctor`: can this host build images? QEMU, accelerator, libvirt, disk, cache."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from vmbuild import __version__, paths
from vmbuild.cli.common import SubParsers, json_flag, out, verb
from vmbuild.config import settings
from vmbuild.errors import VmbuildError


def add_parser(sub: SubParsers) -> None:
    d = verb(sub, "doctor", cmd_doctor, "check the host: QEMU, accelerator, disk, cache")
    settings.add_flag(d, "accelerator", default="auto")
    d.add_argument("--libvirt-uri", help="the libvirt URI to check")
    json_flag(d)


DOCTOR_TOOLS = ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "sfdisk", "mke2fs", "debugfs")


def doctor_report(accel_mode: str = "auto", libvirt_uri: str | None = None) -> dict[str, Any]:
    import tempfile

    from vmbuild.hypervisor import accel
    from vmbuild.run import run, which

    report: dict[str, Any] = {"vmbuild": __version__}
    for tool in DOCTOR_TOOLS:
        path = which(tool)
        version = None
        if path and tool in ("qemu-system-x86_64", "qemu-img"):
            version = run([tool, "--version"], timeout=30).stdout.splitlines()[0]
        report[tool] = {"path": path, "version": version}
    probe = None
    try:
        from vmbuild.stages import base_image

        bases = base_image.list_bases()
        if bases:
            probe = (bases[0].path, bases[0].format)
    except VmbuildError:
        pass
    with tempfile.TemporaryDirectory(prefix="vmbuild-doctor-") as tmp:
        try:
            chosen = accel.choose(accel_mode, probe, Path(tmp))  # type: ignore[arg-type]
            report["accelerator"] = chosen.to_json()
        except VmbuildError as exc:
            report["accelerator"] = {"kind": None, "reason": str(exc)}
    from vmbuild.hypervisor.libvirt import libvirt_report

    report["libvirt"] = libvirt_report(libvirt_uri)
    cache = paths.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    store_dir = paths.store_dir()
    report["cache_dir"] = {"path": str(cache), "free_bytes": shutil.disk_usage(cache).free}
    existing = store_dir if store_dir.exists() else Path.cwd()
    report["store"] = {"path": str(store_dir), "free_bytes": shutil.disk_usage(existing).free}
    return report


def cmd_doctor(args: argparse.Namespace) -> int:
    report = doctor_report(args.accelerator, args.libvirt_uri)

    def human() -> None:
        for tool in DOCTOR_TOOLS:
            info = report[tool]
            state = info["version"] or info["path"] or "MISSING"
            print(f"{tool:20} {state}")
        a = report["accelerator"]
        print(f"{'accelerator':20} {a['kind']}: {a['reason']}")
        lv = report["libvirt"]
        if lv.get("reachable"):
            print(
                f"{'libvirt':20} {lv['uri']} reachable, libvirt {lv['version']}, {lv['hypervisor']}"
            )
        else:
            print(f"{'libvirt':20} {lv['uri']} not reachable: {lv.get('error')}")
            if lv.get("hint"):
                print(f"{'':20} hint: {lv['hint']}")
        for key in ("cache_dir", "store"):
            free = report[key]["free_bytes"] / (1 << 30)
            print(f"{key:20} {report[key]['path']} ({free:.1f} GiB free)")

    out(args, report, human)
    missing = [t for t in ("qemu-system-x86_64", "qemu-img") if not report[t]["path"]]
    return 1 if missing else 0
