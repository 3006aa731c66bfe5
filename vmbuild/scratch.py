"""The throwaway VM: `vmbuild component run --base BASE` (iterate on one component
without a full build), a container build's builder, `vmbuild images run`. It lives
with the command; an image build's own VMs are booted by its stages (build.py)
through the same hypervisor.guest.booted_guest.

With `keep_boot`, it comes back as the booted builder a build (or an earlier
scratch VM) kept on this base and these VM settings (stages/resume.py): the same
first boot, user and keys a build's components start from, resumed in seconds
instead of booted; where none is kept yet, it keeps its own once booted."""

from __future__ import annotations

import contextlib
import secrets
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from vmbuild import paths, runs
from vmbuild.cache import aptproxy, checkpoints
from vmbuild.config.recipe import DEFAULT_DISK
from vmbuild.config.settings import SETTINGS
from vmbuild.hypervisor import accel as accel_mod
from vmbuild.hypervisor.guest import Guest, GuestRequest, booted_guest
from vmbuild.plan import BUILDER_USER
from vmbuild.remote.ssh import SSHSession
from vmbuild.stages import base_image, resume

SCRATCH_USER = BUILDER_USER  # the builder's user: a kept booted builder serves both


@contextlib.contextmanager
def scratch_guest(
    base: str,
    *,
    base_dir: Path,
    accel: str = "auto",
    memory_mib: int | None = None,
    cpus: int | None = None,
    on_status: Callable[[str], None] | None = None,
    apt_proxy: str | None = None,
    user: str = SCRATCH_USER,
    first_boot: str = "minimal",
    keep_boot: bool = False,
) -> Iterator[Guest]:
    status = on_status or (lambda _msg: None)
    # debian-12, a cached URL base, or a local qcow2/raw file.
    image = base_image.resolve_base(base, recipe_dir=base_dir)
    cache = paths.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="scratch-", dir=cache))
        work = Path(tmp)
        stack.enter_context(runs.owning(work))  # removed by the next command if this one is killed
        proxy = stack.enter_context(aptproxy.host_package_cache(apt_proxy, on_status=on_status))
        chosen = accel_mod.choose(accel, (image.path, image.format), work)  # type: ignore[arg-type]
        req = request(
            image, work, chosen, memory_mib=memory_mib, cpus=cpus, user=user,
            first_boot=first_boot, apt_proxy=proxy.guest_url if proxy else None,
        )  # fmt: skip
        if keep_boot:
            yield _resumed_or_booted(stack, req, image, base, status)
        else:
            yield stack.enter_context(booted_guest(req, on_status=status))


def request(
    image: base_image.BaseImage,
    work: Path,
    accel: accel_mod.Accel,
    *,
    memory_mib: int | None,
    cpus: int | None,
    user: str,
    first_boot: str,
    apt_proxy: str | None,
) -> GuestRequest:
    """The scratch VM's request. As a builder (its user, a minimal first boot)
    with the default settings, it is a default recipe's builder in all a booted
    builder's key covers (disk size, memory, CPUs, user, firmware, first boot),
    so either resumes the other's."""
    # A builder's disk as a recipe's default gives it (a bigger base keeps its
    # size); `images run` boots a stored image as it is.
    fits = _builder_like(user, first_boot) and image.virtual_size <= DEFAULT_DISK
    return GuestRequest(
        run_id=secrets.token_hex(3), role="scratch", base=image.path, base_format=image.format,
        disk_size=DEFAULT_DISK if fits else None,
        memory_mib=memory_mib or SETTINGS["memory"].default >> 20,
        cpus=cpus or SETTINGS["cpus"].default, accel=accel, workdir=work, user=user,
        first_boot=first_boot, apt_proxy=apt_proxy,
        dispose="kill",  # a throwaway VM: nothing on its disk is kept
    )  # fmt: skip


def _builder_like(user: str, first_boot: str) -> bool:
    """A VM a booted builder can stand in for (not `images run`'s stored image)."""
    return user == BUILDER_USER and first_boot == "minimal"


def _resumed_or_booted(
    stack: contextlib.ExitStack,
    req: GuestRequest,
    image: base_image.BaseImage,
    base: str,
    status: Callable[[str], None],
) -> Guest:
    """The VM up, through the checkpoint cache. Its lock is held only while the
    VM starts from a kept layer or is cut into one: the VM then holds its
    files open (the overlay's base is a hard link), so a prune may go on."""
    with checkpoints.CheckpointStore(warn=status) as store:
        ck = _boot_checkpoint(store, req, image, base)
        guest = _booted(stack, req, ck, status)
    if ck is not None and ck.saved:
        checkpoints.prune_after_build(store.root, status)
    return guest


def _boot_checkpoint(
    store: checkpoints.CheckpointStore, req: GuestRequest, image: base_image.BaseImage, base: str
) -> resume.Checkpointing | None:
    """The checkpoint cache's view for a booted builder on `image` and `req`'s
    settings: keyed as a build's (resume.boot_key), so either kind of run
    resumes what the other kept. None where no running VM can be kept."""
    why_not = resume.no_running_state(req.arch)
    if not _builder_like(req.user, req.first_boot) or why_not is not None:
        return None
    root = resume.root_key(
        base_image.key(image, req.disk_size), req,
        mirror=resume.mirror_state(None, base_image.RELEASES.get(base)),
    )  # fmt: skip
    boot = resume.builder_boot_key(root, req)
    if boot is None:
        return None
    ck = resume.Checkpointing(
        store, base_path=image.path, base_sha256=image.sha256, base_format=image.format,
        root=root, chain=[], names=[], final_key=None, boot_key=boot,
    )  # fmt: skip
    return ck if ck.usable else None


def _booted(
    stack: contextlib.ExitStack,
    req: GuestRequest,
    ck: resume.Checkpointing | None,
    status: Callable[[str], None],
) -> Guest:
    """The VM up: resumed from the kept booted builder, else booted (and then
    kept, where none is yet)."""
    if ck is not None and ck.boot is not None:
        guest, why = resume.resumed(ck, req, stack, status)
        if guest is not None:
            status("checkpoints: the booted builder is back, no boot")
            return guest
        ck.boot_not_resumed()
        status(f"checkpoints: booting from the base ({why})")
    guest = stack.enter_context(booted_guest(req, on_status=status))
    if ck is not None:
        resume.keep_booted(ck, guest, req.workdir / f"{req.role}-0.qcow2", status=status)
    return guest


@contextlib.contextmanager
def scratch_vm(
    base: str,
    *,
    base_dir: Path,
    accel: str = "auto",
    keep_boot: bool = True,
    on_status: Callable[[str], None] | None = None,
) -> Iterator[SSHSession]:
    """Yield a connected `Remote` (an SSHSession) on a throwaway VM; all removed after."""
    with scratch_guest(
        base, base_dir=base_dir, accel=accel, keep_boot=keep_boot, on_status=on_status
    ) as guest:
        yield guest.ssh
