"""`vmbuild images run REF [--ssh]`: try a stored image by hand (mkosi's `vm`/`ssh`).

The stored disk is only ever the read-only backing file of a throwaway qcow2
overlay: the guest's writes land in the overlay, which goes with the command.
A fresh client key, a fresh host key and a NoCloud seed give the login; the
image's own first boot runs in full, as on a new instance. Built on the
scratch VM of `component run --base` (scratch.py, hypervisor.guest), so VM,
overlay, seed and keys are removed on every way out: the SSH session ending
(--ssh), Ctrl-C, SIGTERM; a killed vmbuild's VM dies with it (PDEATHSIG) and
its directory is removed by the next vmbuild command.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from vmbuild import paths
from vmbuild.cli.common import SubParsers, store_flag, verb
from vmbuild.errors import VmbuildError

BOOTABLE = ("qcow2", "raw")  # formats QEMU boots as the overlay's backing file
USER = "vmbuild-try"


@dataclass(frozen=True)
class RunPlan:
    ref: str
    build_dir: Path
    disk: Path  # the stored disk: the overlay's backing file, never written
    format: str


def plan(store_dir: Path, ref: str) -> RunPlan:
    """The stored build and its bootable disk; refused before anything is created."""
    from vmbuild.stages import store

    build_dir = store.resolve(store_dir, ref)
    manifest = store.load_manifest(build_dir)
    for output in manifest.outputs:
        if output.format in BOOTABLE:
            disk = build_dir / output.file
            if not disk.is_file():
                raise VmbuildError(
                    f"{manifest.ref}: its {output.format} disk {disk} is missing",
                    hint="the build is damaged; rebuild it or remove it with `vmbuild images rm`",
                )
            return RunPlan(manifest.ref, build_dir, disk, output.format)
    formats = ", ".join(o.format for o in manifest.outputs) or "none"
    raise VmbuildError(
        f"{manifest.ref} has no qcow2 or raw disk to boot (outputs: {formats})",
        hint="add qcow2 to the recipe's outputs and build it again",
    )


def ssh_argv(key: Path, port: int, known_hosts: Path, user: str) -> list[str]:
    """The login: only this key, only this VM's host key (no prompt, no ~/.ssh changes)."""
    return [
        "ssh", "-i", str(key), "-p", str(port),
        "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={known_hosts}", f"{user}@127.0.0.1",
    ]  # fmt: skip


def cmd_images_run(args: argparse.Namespace) -> int:
    from vmbuild import console
    from vmbuild.run import interactive
    from vmbuild.scratch import scratch_guest

    chosen = plan(paths.store_dir(args.store), args.ref)
    if args.ssh and shutil.which("ssh") is None:
        raise VmbuildError("--ssh needs the ssh client", hint="apt-get install openssh-client")
    err = console.stderr()

    def status(text: str) -> None:
        err.print(f"  {text}")

    with scratch_guest(
        str(chosen.disk), base_dir=chosen.build_dir, accel=args.accelerator,
        memory_mib=args.memory >> 20, cpus=args.cpus, on_status=status, apt_proxy="off",
        user=USER, first_boot="full",
    ) as guest:  # fmt: skip
        known_hosts = guest.spec.workdir / "known_hosts"
        known_hosts.write_text(guest.known_hosts_line + "\n")
        argv = ssh_argv(guest.client_key_path, guest.spec.ssh_port, known_hosts, USER)
        if args.ssh:
            # The session's end is the VM's end; its exit status is ours.
            return interactive(argv)
        print(f"{chosen.ref} is running; log in with:\n  {shlex.join(argv)}", flush=True)
        err.print("Ctrl-C stops the VM and removes everything it wrote")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            err.print("stopping the VM")
    return 0


def add_run_verb(images: SubParsers) -> None:
    from vmbuild.cli.common import REF_HELP
    from vmbuild.config import settings

    p = verb(
        images, "run", cmd_images_run,
        "boot a stored image on a throwaway overlay (the stored disk is never written)",
    )  # fmt: skip
    p.add_argument("ref", help=REF_HELP)
    p.add_argument("--ssh", action="store_true", help="log in now; the VM stops when you log out")
    for name in ("accelerator", "memory", "cpus"):
        settings.add_flag(p, name, default=settings.SETTINGS[name].default)
    store_flag(p)
