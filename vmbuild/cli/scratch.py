"""The throwaway VM of `vmbuild component run --base BASE`: iterate on one component
without a full build. It lives with the command; the build's own VMs are booted by
the stages (build.py) through the same hypervisor.guest.booted_guest."""

from __future__ import annotations

import contextlib
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from vmbuild import paths, runs
from vmbuild.cache import aptproxy
from vmbuild.hypervisor import accel as accel_mod
from vmbuild.hypervisor.guest import Guest, GuestRequest, booted_guest
from vmbuild.remote.ssh import SSHSession
from vmbuild.stages import base_image

SCRATCH_USER = "vmbuild-builder"


@contextlib.contextmanager
def scratch_guest(
    base: str,
    *,
    base_dir: Path,
    accel: str = "auto",
    memory_mib: int = 2048,
    cpus: int = 2,
    on_status: Callable[[str], None] | None = None,
    apt_proxy: str | None = None,
    user: str = SCRATCH_USER,
    first_boot: str = "minimal",
) -> Iterator[Guest]:
    # debian-12, a cached URL base, or a local qcow2/raw file.
    image = base_image.resolve_base(base, recipe_dir=base_dir)
    cache = paths.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="scratch-", dir=cache) as tmp,
        runs.owning(Path(tmp)),  # removed by the next vmbuild command if this one is killed
        aptproxy.host_package_cache(apt_proxy, on_status=on_status) as proxy,
    ):
        work = Path(tmp)
        chosen = accel_mod.choose(accel, (image.path, image.format), work)  # type: ignore[arg-type]
        req = GuestRequest(
            run_id=secrets.token_hex(3), role="scratch", base=image.path,
            base_format=image.format, disk_size=None, memory_mib=memory_mib, cpus=cpus,
            accel=chosen, workdir=work, user=user, first_boot=first_boot,
            apt_proxy=proxy.guest_url if proxy else None,
            dispose="kill",  # a throwaway VM: nothing on its disk is kept
        )  # fmt: skip
        with booted_guest(req, on_status=on_status) as guest:
            yield guest


@contextlib.contextmanager
def scratch_vm(base: str, *, base_dir: Path, accel: str = "auto") -> Iterator[SSHSession]:
    """Yield a connected `Remote` (an SSHSession) on a fresh VM; all removed after."""
    with scratch_guest(base, base_dir=base_dir, accel=accel) as guest:
        yield guest.ssh
