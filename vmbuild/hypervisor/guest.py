"""Boot a guest ready for work: overlay + seed + VM + pinned SSH + cloud-init done.

Shared by the builder VM, the test VM and `component run --base`. Every
resource is entered on one ExitStack, so a failure at any point (or Ctrl-C)
unwinds all of it: VM reaped, overlay, seed and keys deleted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from vmbuild.cache import aptproxy
from vmbuild.errors import GuestStopped, SSHError, SSHTimeout, VmbuildError, VMError
from vmbuild.hypervisor import firmware, imds, vmstate
from vmbuild.hypervisor.accel import Accel
from vmbuild.hypervisor.arch import Arch
from vmbuild.hypervisor.base import Ec2Boot, Machine, VMSpec, free_port
from vmbuild.hypervisor.firmware import FIRMWARE_LABEL, Firmware
from vmbuild.hypervisor.seed import SeedConfig, user_data, write_seed
from vmbuild.hypervisor.watchdog import FIRMWARE_REFUSED, Watchdog
from vmbuild.remote.keys import KeyPair, generate_ed25519
from vmbuild.remote.ssh import SSHSession
from vmbuild.run import qemu_img

log = logging.getLogger("vmbuild.guest")

# Timeouts in KVM seconds; Accel.timeout() scales them for TCG.
BOOT_TO_SSH = 45.0
# A resumed guest's sshd is already listening: only the guest's own network
# stack has to notice the new QEMU's port forward.
RESTORED_TO_SSH = 15.0
CLOUD_INIT = 40.0
POWEROFF = 12.0


@dataclass(frozen=True)
class Restore:
    """A builder's saved running state to resume instead of booting (checkpoints).

    The guest comes back as it was saved: its sshd key, the login key its
    authorized_keys holds, its clock at that instant. So those keys come with
    it (pinned and used as at the save), and the clock and the package cache's
    address are set again once it is back (restored_fixups)."""

    state: Path  # the saved state (hypervisor/vmstate.py)
    signature: str  # of the machine that saved it (qemu.state_signature)
    client_key: KeyPair
    host_key: KeyPair


class RestoreFailed(VMError):
    """A saved state could not be resumed here; the VM it started is gone.
    `damaged`: it would fail again anywhere (keep it and the next build tries
    again in vain); else it may load on another host or run."""

    def __init__(self, message: str, *, damaged: bool) -> None:
        super().__init__(message)
        self.damaged = damaged


@dataclass(frozen=True)
class GuestRequest:
    run_id: str
    role: str  # "builder" | "test" | "scratch"
    base: Path  # the disk the overlay is backed by (never written)
    base_format: str
    disk_size: int | None  # bytes; None keeps the base's size
    memory_mib: int
    cpus: int
    accel: Accel
    workdir: Path
    user: str
    backend: str = "qemu"
    keep_on_failure: bool = False
    libvirt_uri: str | None = None  # None: qemu:///system as root, else qemu:///session
    libvirt_network: str | None = None  # a libvirt network instead of user networking
    apt_proxy: str | None = None  # the host package cache as the guest reaches it
    # "builder"/"scratch": cloud-init runs only its init stage (users, keys,
    # files), so the VM is ready at the first login and nothing of cloud-init's
    # races the components. "test": the image's own first boot, in full.
    first_boot: str = "minimal"  # "minimal" | "full"
    # A disposable VM (the test VM) is killed; a builder is stopped in order.
    dispose: str = "shutdown"  # "shutdown" | "kill"
    # Boot as on EC2 (the test VM's `ec2` mode): no NoCloud seed; the key and
    # user-data come from the metadata service at 169.254.169.254. None: NoCloud.
    ec2: imds.Ec2Settings | None = None
    firmware: Firmware = "bios"
    # The guest's architecture; `accel` is already the one for it (accel.for_guest).
    arch: Arch = "x86_64"
    # An offline rebuild: the bundle's mirror on the host's 127.0.0.1, the guest's only
    # way out (apt_proxy then names its guest-side address).
    offline_mirror_port: int | None = None
    # Resume a saved running builder instead of booting `base` (which is then
    # the disk layer saved with it). The direct QEMU backend only.
    restore: Restore | None = None


@dataclass
class Guest:
    machine: Machine
    ssh: SSHSession
    spec: VMSpec
    client_key: KeyPair
    client_key_path: Path
    host_key: KeyPair
    user: str
    imds: imds.MetadataService | None = None  # the ec2 mode's metadata service

    @property
    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.spec.ssh_port} {self.host_key.public_openssh}"

    def ssh_hint(self) -> str:
        kh = self.spec.workdir / f"{self.spec.name}.known_hosts"
        kh.write_text(self.known_hosts_line + "\n")
        return (
            f"ssh -i {shlex.quote(str(self.client_key_path))} -p {self.spec.ssh_port} "
            f"-o UserKnownHostsFile={shlex.quote(str(kh))} {self.user}@127.0.0.1"
        )


def copy_console(spec: VMSpec, logs: Path) -> None:
    """Keep a VM's serial console and QEMU's own log with the run's logs (those written)."""
    for path in (spec.console_log, spec.qemu_log):
        if path.exists():
            shutil.copy(path, logs / path.name)


def _qemu(req: GuestRequest, spec: VMSpec) -> Machine:
    from vmbuild.hypervisor.qemu import QemuMachine

    return QemuMachine(spec)


def _libvirt(req: GuestRequest, spec: VMSpec) -> Machine:
    # Imported only when asked for: libvirt-python is an optional extra.
    from vmbuild.hypervisor.libvirt import LibvirtMachine

    # autodestroy: libvirtd removes the domain even if vmbuild is killed,
    # except when the user asked to keep a failed VM for debugging.
    return LibvirtMachine(
        spec, uri=req.libvirt_uri, network=req.libvirt_network,
        autodestroy=not req.keep_on_failure,
    )  # fmt: skip


# The backends, by the name recipes, pipelines and --backend use.
BACKENDS: dict[str, Callable[[GuestRequest, VMSpec], Machine]] = {
    "qemu": _qemu,  # direct QEMU: the embedded default
    "libvirt": _libvirt,
}


def make_machine(req: GuestRequest, spec: VMSpec) -> Machine:
    """The backend registered under `req.backend`, for `spec` (not launched yet)."""
    try:
        factory = BACKENDS[req.backend]
    except KeyError:
        known = " or ".join(BACKENDS)
        raise VmbuildError(f"unknown backend {req.backend!r}", hint=f"use {known}") from None
    return factory(req, spec)


def overlay_argv(base: Path, base_format: str, overlay: Path, size: int | None) -> list[str]:
    args = ["create", "-q", "-f", "qcow2", "-b", str(base.resolve()), "-F", base_format]
    args.append(str(overlay))
    if size is not None:
        args.append(str(size))
    return args


def pin_base(base: Path, pinned: Path) -> Path:
    """A name for `base` that nothing else can swap: a hard link (a copy across filesystems).

    A cached base may be rebuilt and replaced while a build runs; the overlay
    and the final flatten must keep reading the very bytes the VM booted from.
    """
    pinned.unlink(missing_ok=True)
    try:
        os.link(base, pinned)
    except OSError:
        shutil.copyfile(base, pinned)
    return pinned


def create_overlay(base: Path, base_format: str, overlay: Path, size: int | None) -> None:
    if size is not None:
        import json

        info = json.loads(qemu_img("info", "--output=json", "-f", base_format, base))
        if size < int(info["virtual-size"]):
            raise VmbuildError(
                f"disk_size {size >> 20} MiB is smaller than the base image "
                f"({int(info['virtual-size']) >> 20} MiB)"
            )
    qemu_img(*overlay_argv(base, base_format, overlay, size))


@contextlib.contextmanager
def booted_guest(
    req: GuestRequest, *, on_status: Callable[[str], None] | None = None
) -> Iterator[Guest]:
    """Yield a guest with SSH up and cloud-init finished; tear it all down after.

    On an exception with `keep_on_failure`, the VM keeps running and its files
    stay, and the log says how to reach it.
    """
    status = on_status or (lambda _msg: None)
    name = f"vmbuild-{req.run_id}-{req.role}"
    req.workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        overlay = req.workdir / f"{req.role}.qcow2"
        seed = req.workdir / f"{req.role}-seed.iso"
        key_path = req.workdir / f"{req.role}-id_ed25519"
        pinned = req.workdir / f"{req.role}-base.{req.base_format}"
        uefi_vars = req.workdir / f"{req.role}-uefi-vars.fd" if req.firmware != "bios" else None
        for path in (overlay, seed, key_path, pinned, uefi_vars):
            if path is not None:
                stack.callback(path.unlink, missing_ok=True)
        if req.restore is not None:
            client_key, host_key = req.restore.client_key, req.restore.host_key
        else:
            client_key = generate_ed25519(f"vmbuild-{req.role}@{req.run_id}")
            host_key = generate_ed25519(f"vmbuild-host@{req.run_id}")
        client_key.write_private(key_path)
        seed_cfg = SeedConfig(
            instance_id=f"{name}-{int(time.time())}",
            hostname=name[:63],
            user=req.user,
            client_key=client_key,
            host_key=host_key,
            apt_proxy=req.apt_proxy,
            apt_offline=req.offline_mirror_port is not None,
            minimal_cloud_init=req.first_boot == "minimal",
            builder_apt=req.role in ("builder", "scratch"),
            key_from_metadata=req.ec2 is not None,
        )
        service: imds.MetadataService | None = None
        ec2: Ec2Boot | None = None
        if req.ec2 is None:
            write_seed(seed_cfg, seed)
        else:
            service, ec2 = _start_imds(req, seed_cfg, stack)
        create_overlay(pin_base(req.base, pinned), req.base_format, overlay, req.disk_size)
        if uefi_vars is not None:
            firmware.vars_copy(req.firmware, uefi_vars, req.arch)
        spec = _spec(
            req, name=name, disk=overlay, seed=seed if ec2 is None else None,
            ssh_port=free_port(), console_log=req.workdir / f"{req.role}-console.log", ec2=ec2,
            uefi_vars=uefi_vars,
        )  # fmt: skip
        machine = make_machine(req, spec)
        machine.shutdown_timeout = req.accel.timeout(POWEROFF)
        if req.restore is not None:
            _check_restorable(req.restore, machine)
            status(f"resuming the {req.role} VM's saved running state ({req.accel.kind})")
        else:
            status(f"booting the {req.role} VM ({req.accel.kind}, {req.backend})")
        guest: Guest | None = None
        try:
            try:
                # The backend's own context: launched here; on leaving the stack an
                # orderly shutdown, or a kill when an error unwinds it.
                stack.enter_context(machine)
                try:
                    ssh = _connect(req, spec, machine, key_path, host_key, service)
                except VMError as exc:
                    if req.restore is None:
                        raise
                    # Loaded, yet no login: that state does not come back usable.
                    raise RestoreFailed(str(exc), damaged=True) from None
                stack.callback(ssh.close)
                if req.restore is not None:
                    restored_fixups(ssh, req)
            except vmstate.StateNotLoaded as exc:
                if req.restore is None:
                    raise
                raise RestoreFailed(str(exc), damaged=True) from None
            except (VMError, OSError) as exc:
                if req.restore is None:
                    raise
                raise RestoreFailed(str(exc), damaged=False) from None
            guest = Guest(machine, ssh, spec, client_key, key_path, host_key, req.user, service)
            # No cloud-init wait here: sshd starts after cloud-init's init stage
            # (users, keys, write_files), so a login is all the next step needs.
            # Whoever needs cloud-init finished (generalize, the test VM's
            # check of the first boot) waits for it then, overlapped with work.
            yield guest
            if req.dispose == "kill":
                machine.kill()  # its disk is thrown away: nothing to flush
        except BaseException as exc:
            if req.keep_on_failure and guest is not None and not isinstance(exc, KeyboardInterrupt):
                stack.pop_all()  # keep overlay, seed, key: the VM still uses them
                log.error("keeping the %s VM for debugging: %s", req.role, guest.ssh_hint())
                destroy = getattr(machine, "destroy_command", None)
                if destroy:
                    log.error("remove it afterwards with: %s", destroy)
            raise


def _spec(
    req: GuestRequest,
    *,
    name: str,
    disk: Path,
    seed: Path | None,
    ssh_port: int,
    console_log: Path,
    ec2: Ec2Boot | None,
    uefi_vars: Path | None,
) -> VMSpec:
    """The VM `req` asks for, with this run's files and port."""
    return VMSpec(
        name=name, disk=disk, seed=seed, memory_mib=req.memory_mib, cpus=req.cpus,
        accel=req.accel, ssh_port=ssh_port, console_log=console_log, workdir=req.workdir,
        ec2=ec2, firmware=req.firmware, uefi_vars=uefi_vars, arch=req.arch,
        offline_mirror_port=req.offline_mirror_port,
        restore_from=req.restore.state if req.restore is not None else None,
    )  # fmt: skip


def state_signature(req: GuestRequest) -> str | None:
    """What a running state saved by the VM `req` starts carries, before it starts
    (qemu.state_signature: QEMU's version, the accelerator, machine, memory and
    every device); None for a VM whose state is never kept (another backend, the
    ec2 boot mode). Checkpoints key the booted builder on it, so a QEMU upgrade
    or a switch between KVM and TCG keeps a state of its own."""
    if req.backend != "qemu" or req.ec2 is not None:
        return None
    from vmbuild.hypervisor import qemu

    placeholder = Path("unused")  # every path is left out of the signature
    return qemu.state_signature(_spec(
        req, name="vm", disk=placeholder, seed=placeholder, ssh_port=22,
        console_log=placeholder, ec2=None,
        uefi_vars=placeholder if req.firmware != "bios" else None,
    ))  # fmt: skip


def _check_restorable(restore: Restore, machine: Machine) -> None:
    signature = getattr(machine, "state_signature", None)
    if signature is None:
        raise RestoreFailed(
            f"the {type(machine).__name__} backend does not resume saved states", damaged=False
        )
    if signature() != restore.signature:
        raise RestoreFailed(
            "it was saved by another QEMU or machine (QEMU version or firmware, accelerator, "
            "host CPU, machine type, memory or devices differ)",
            damaged=False,
        )


def restored_fixups(ssh: SSHSession, req: GuestRequest) -> None:
    """What a resumed guest must be told: the time (its clock stood still while it
    was saved: apt refuses a Release file "not valid yet" on a clock behind the
    mirror's), and the package cache's address this run (another port, or none)."""
    now = time.time()
    res = ssh.run(f"date -u -s @{now:.3f} >/dev/null", timeout=req.accel.timeout(10))
    if res.exit_code != 0:
        raise VMError(f"could not set the resumed guest's clock: {res.stderr.strip()}")
    conf = aptproxy.guest_apt_conf(
        req.apt_proxy, builder=req.role in ("builder", "scratch"),
        offline=req.offline_mirror_port is not None,
    )  # fmt: skip
    if conf is None:
        ssh.run(f"rm -f {aptproxy.GUEST_CONF}", timeout=req.accel.timeout(10))
    else:
        ssh.put(conf.encode(), aptproxy.GUEST_CONF, mode=0o644)


def _start_imds(
    req: GuestRequest, seed_cfg: SeedConfig, stack: contextlib.ExitStack
) -> tuple[imds.MetadataService, Ec2Boot]:
    """The ec2 mode's metadata service (stopped with the stack) and what the VM needs
    to look like the instance it describes."""
    assert req.ec2 is not None
    if req.apt_proxy is not None:
        # The package cache is reached through this network's gateway instead.
        gateway = f"//{aptproxy.GUEST_GATEWAY}:"
        seed_cfg = replace(seed_cfg, apt_proxy=req.apt_proxy.replace(gateway, f"//{imds.GATEWAY}:"))
    mac = imds.new_mac()
    instance = imds.new_instance(
        str(req.base), req.ec2, mac=mac,
        public_keys=[(f"vmbuild-{req.run_id}", seed_cfg.client_key.public_openssh)],
        user_data=user_data(seed_cfg).encode(),
    )  # fmt: skip
    service = stack.enter_context(imds.serving(instance))
    boot = Ec2Boot(
        imds_port=service.port, mac=mac, uuid=imds.ec2_uuid(),
        instance_id=instance.instance_id, instance_type=instance.instance_type,
    )  # fmt: skip
    return service, boot


def _connect(
    req: GuestRequest,
    spec: VMSpec,
    machine: Machine,
    key_path: Path,
    host_key: KeyPair,
    service: imds.MetadataService | None = None,
) -> SSHSession:
    """Log in once the guest has booted; a boot that never gets there raises with the
    serial console's tail, which shows how far it got."""
    try:
        return SSHSession.connect(
            "127.0.0.1", spec.ssh_port, req.user, key_path, host_key.public_openssh,
            timeout=req.accel.timeout(BOOT_TO_SSH if req.restore is None else RESTORED_TO_SSH),
            alive=Watchdog(machine, spec.console_log, from_start=True).check,
        )  # fmt: skip
    except GuestStopped as exc:
        if not exc.cause.startswith(FIRMWARE_REFUSED):
            raise
        secure = spec.firmware == "uefi-secure"
        raise VMError(
            f"{spec.name} did not boot under {FIRMWARE_LABEL[spec.firmware]}: {exc.cause}",
            console_tail=exc.console_tail,
            hint="Secure Boot starts only boot loaders signed by a key in the firmware's db "
            "(Microsoft's, for Debian's signed shim): sign it, or drop secure_boot"
            if secure
            else "the firmware names the boot entry it could not load",
        ) from None
    except SSHError as exc:
        if service is not None and not service.read_key():
            # sshd answered (with a key of its own, or refusing ours) but the
            # guest never asked IMDS for its key: cloud-init did not run the Ec2
            # datasource. What an image with only NoCloud enabled does on EC2.
            raise VMError(
                f"{spec.name}: cloud-init did not find the Ec2 datasource: the guest never "
                f"read its SSH key from the instance metadata ({service.summary()})",
                console_tail=machine.console_tail(),
                hint="the image must let cloud-init use Ec2 (datasource_list in "
                "/etc/cloud/cloud.cfg and cloud.cfg.d/ must include Ec2; the cloud-ready "
                "component sets it)",
            ) from None
        if isinstance(exc, SSHTimeout):
            raise VMError(
                f"{spec.name} did not boot to SSH: {exc}"
                + (f" ({service.summary()})" if service is not None else ""),
                console_tail=machine.console_tail(),
                hint=f"the whole console is kept as {spec.console_log.name} in the run log",
            ) from None
        raise


# cloud-init's own record of this boot (/run is a tmpfs: never an earlier boot's).
# When result.json is there cloud-init is done, and reading it costs nothing;
# `cloud-init status` would cost ~3 s of Python start-up under TCG. Only if it
# is not done yet does cloud-init's own `status --wait` do the waiting.
_STATE_SEPARATOR = "--- vmbuild: result.json ---"
_CLOUD_INIT_STATE = (
    "test -e /run/cloud-init/result.json || cloud-init status --wait >/dev/null; "
    f"cat /run/cloud-init/status.json; echo; echo '{_STATE_SEPARATOR}'; "
    "cat /run/cloud-init/result.json"
)


def cloud_init_errors(status_json: str, result_json: str) -> list[str]:
    """The errors cloud-init recorded for this boot (pure: unit-tested).

    The same reading as `cloud-init status`: every stage's `errors` in
    status.json, and result.json's. Raises ValueError if either is not JSON
    (cloud-init did not finish).
    """
    status, result = json.loads(status_json), json.loads(result_json)
    errors: list[str] = []
    stages = status.get("v1", {}) if isinstance(status, dict) else {}
    for stage, state in sorted(stages.items()):
        if isinstance(state, dict):
            errors += [f"{stage}: {e}" for e in state.get("errors") or []]
    found = result.get("v1", {}).get("errors") or [] if isinstance(result, dict) else []
    errors += [str(e) for e in found if not any(str(e) in seen for seen in errors)]
    return errors


def wait_cloud_init(ssh: SSHSession, timeout: float, machine: Machine) -> None:
    result = ssh.run(_CLOUD_INIT_STATE, timeout=timeout)
    if result.timed_out:
        raise VMError(
            f"cloud-init did not finish within {timeout:.0f}s", console_tail=machine.console_tail()
        )
    status, _, outcome = result.stdout.partition(_STATE_SEPARATOR)
    try:
        errors = cloud_init_errors(status, outcome)
    except ValueError:
        errors = [f"no record of a finished run ({result.stderr.strip() or 'no output'})"]
    if errors:
        listed = "\n".join(f"  {e}" for e in errors)
        raise VMError(
            f"cloud-init failed in {machine.spec.name}:\n{listed}",
            console_tail=machine.console_tail(),
            hint="see the serial console log in the build's logs/",
        )
