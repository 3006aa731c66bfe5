"""The direct QEMU backend (the embedded default), modelled on QEMU's QEMUMachine.

A launch failure raises with the argv, exit code and console tail; shutdown
escalates (ACPI powerdown over QMP -> wait -> quit -> SIGKILL) and always reaps
the process, so no QEMU outlives vmbuild.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import IO

from vmbuild import runs
from vmbuild.errors import VMError, quote_argv
from vmbuild.hypervisor import arch, firmware, vmstate
from vmbuild.hypervisor.base import MachineContext, VMSpec, read_tail
from vmbuild.hypervisor.qmp import QMPClient
from vmbuild.run import qemu_img, reaped, run, spawn

log = logging.getLogger("vmbuild.qemu")

DISK_ID = "disk0"  # the system disk's block device name, for QMP


def qemu_argv(spec: VMSpec) -> list[str]:
    """The complete command line for a VM (pure: unit-tested for the exact argv).

    The same devices for every guest architecture: virtio on PCI (the arm64
    virt machine has a PCIe root as q35 does), the serial port being each
    machine's own UART (the PC's 16550, virt's PL011).
    """
    machine = firmware.machine(spec.firmware, spec.arch)
    return [
        arch.QEMU_BINARY[spec.arch],
        "-name", spec.name,
        *spec.accel.qemu_args(spec.cpus, machine, arch.TCG_CPU[spec.arch]),
        "-m", str(spec.memory_mib),
        *firmware.qemu_args(spec.firmware, spec.uefi_vars, spec.arch),
        # No default devices (VGA, floppy, default NIC, monitor on stdio):
        # everything the guest sees is listed below.
        "-nodefaults",
        "-display", "none",
        "-drive",
        f"file={spec.disk},format=qcow2,if=virtio,id={DISK_ID},discard=unmap,detect-zeroes=unmap",
        *(["-drive", f"file={spec.seed},format=raw,if=virtio,readonly=on"] if spec.seed else []),
        "-netdev", spec.user_netdev("net0"),
        "-device", "virtio-net-pci,netdev=net0" + spec.nic_options(),
        *smbios_args(spec),
        # Early boot (sshd host keys, cloud-init) must never wait for entropy.
        "-device", "virtio-rng-pci",
        # A VM generation ID (a fresh one each QEMU start): a guest resumed
        # from a saved state learns it was cloned and reseeds its RNG at once,
        # so two builds resumed from one checkpoint never share random numbers.
        *(["-device", "vmgenid"] if spec.arch == "x86_64" else []),
        "-chardev", f"file,id=serial0,path={spec.console_log}",
        "-serial", "chardev:serial0",
        "-qmp", f"unix:{qmp_path(spec)},server=on,wait=off",
        # The state comes over QMP once QEMU is up (vmstate.load).
        *(["-incoming", "defer"] if spec.restore_from is not None else []),
    ]  # fmt: skip


@functools.cache
def qemu_version(binary: str) -> str:
    return run([binary, "--version"], timeout=30).stdout.splitlines()[0].strip()


def state_signature(spec: VMSpec) -> str:
    """What a saved state can be loaded into: QEMU's version and the VM's command
    line, leaving out what differs between any two runs of the same machine (its
    name, file paths, the SSH port's host side). A state is loaded only where this
    is equal; the accelerator, machine type, CPU model, memory and every device
    are in it."""
    same = replace(
        spec, name="vm", disk=Path("disk.qcow2"), seed=Path("seed.iso") if spec.seed else None,
        ssh_port=22, console_log=Path("console.log"), workdir=Path("."),
        uefi_vars=Path("vars.fd") if spec.uefi_vars else None, restore_from=None,
    )  # fmt: skip
    argv = qemu_argv(same)
    data = json.dumps([qemu_version(argv[0]), argv, *_loaded_code(spec)])
    return hashlib.sha256(data.encode()).hexdigest()


# SeaBIOS, which QEMU loads by name from its data dir for the PC machine.
SEABIOS = Path("/usr/share/seabios/bios-256k.bin")


def _loaded_code(spec: VMSpec) -> list[str]:
    """What a resumed guest runs that the argv only names: the firmware's code
    (a restored OVMF's runtime services must be the same build; an updated
    package keeps its path), and under KVM the host CPU (`-cpu host` is
    whatever this CPU is) and the kernel that exposes it."""
    if spec.firmware == "bios":
        code = SEABIOS
    else:
        code = firmware.uefi_files(spec.firmware, spec.arch).code
    out = [_file_id(code)]
    if spec.accel.kind == "kvm":
        out += [_host_cpu(), Path("/proc/sys/kernel/osrelease").read_text().strip()]
    return out


@functools.cache
def _file_id(path: Path) -> str:
    """A file's sha256 (cached: firmware does not change under a running vmbuild)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return f"{path}: unreadable"


@functools.cache
def _host_cpu() -> str:
    """The first CPU's model and flags from /proc/cpuinfo (x86 and arm64 fields)."""
    wanted = ("vendor_id", "model name", "flags", "CPU implementer", "CPU part", "Features")
    seen: dict[str, str] = {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name in wanted and name not in seen:
            seen[name] = value.strip()
    return json.dumps(seen, sort_keys=True)


def smbios_args(spec: VMSpec) -> list[str]:
    """EC2's SMBIOS in the ec2 boot mode (what ds-identify and the Ec2 datasource read)."""
    if spec.ec2 is None:
        return []
    e = spec.ec2
    return [
        "-smbios",
        f"type=1,manufacturer=Amazon EC2,product={e.instance_type},serial={e.uuid},uuid={e.uuid}",
        "-smbios", f"type=3,manufacturer=Amazon EC2,asset={e.instance_id}",
    ]  # fmt: skip


UNCAPPED = 1 << 40  # bytes a second: a migration's max-bandwidth with no cap in effect


def _cancel_migration(qmp: QMPClient) -> None:
    """Stop a migration still running, so `cont` resumes a VM that migrates nowhere."""
    try:
        if (qmp.execute("query-migrate") or {}).get("status") in ("active", "setup", "device"):
            qmp.execute("migrate_cancel")
            qmp.wait_migration(30)
    except (VMError, OSError) as exc:
        log.warning("could not cancel the state save: %s", exc)


def qmp_path(spec: VMSpec) -> Path:
    # UNIX socket paths are limited to 108 bytes and the work dir may sit deep
    # in a store: the socket lives in a short per-VM dir under the temp dir.
    return Path(tempfile.gettempdir()) / f"{spec.name}.qmp"


class QemuMachine(MachineContext):
    def __init__(self, spec: VMSpec) -> None:
        self.spec = spec
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.argv = qemu_argv(spec)

    def launch(self) -> None:
        if self._proc is not None:
            raise VMError(f"{self.spec.name} already launched")
        # Removed by a later vmbuild command if this one is killed.
        runs.own(qmp_path(self.spec))
        self._log = self.spec.qemu_log.open("ab")
        self._proc = spawn(self.argv, stdout=self._log)
        # QEMU fails fast on bad arguments or a busy port: give it a moment so
        # the error surfaces here, with its message, rather than as a boot timeout.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._raise_exited("failed to start")
            if qmp_path(self.spec).exists():
                break
            time.sleep(0.05)
        if self.spec.restore_from is not None:
            self._load_state(self.spec.restore_from)

    def _load_state(self, state: Path) -> None:
        assert self._log is not None and self._proc is not None
        try:
            deadline = time.monotonic() + self.spec.accel.timeout(3)
            while not qmp_path(self.spec).exists():  # QEMU creates it at start-up
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise VMError(f"{self.spec.name}: QEMU never opened its QMP socket")
                time.sleep(0.05)
            with QMPClient(qmp_path(self.spec), timeout=30) as qmp:
                vmstate.load(qmp, state, log=self._log, timeout=self.spec.accel.timeout(60))
        except BaseException as exc:
            # launch() raising means no `with` block to stop the VM: do it here.
            exited = self._proc.poll() is not None
            self.kill()
            if exited and isinstance(exc, VMError):
                # QEMU refusing a stream exits, saying why in its log.
                raise vmstate.StateNotLoaded(
                    f"{exc}: {read_tail(self.spec.qemu_log, 5).strip()}",
                    console_tail=self.console_tail(),
                ) from None
            raise

    def _raise_exited(self, what: str) -> None:
        assert self._proc is not None
        rc = self._proc.wait()
        out = read_tail(self.spec.qemu_log, 20)
        raise VMError(
            f"{self.spec.name}: QEMU {what} (exit {rc}): {out.strip()}\n"
            f"    argv: {quote_argv(self.argv)}",
            console_tail=self.console_tail(),
        )

    def check_alive(self) -> None:
        """Raise a VMError with QEMU's output if the process has exited."""
        if self._proc is not None and self._proc.poll() is not None:
            self._raise_exited("exited unexpectedly")

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def name(self) -> str:
        return self.spec.name

    def exit_status(self) -> int | None:
        """QEMU's exit status once it ended (0: the guest powered off; negative:
        the signal that killed it); None while it runs or before launch."""
        return None if self._proc is None else self._proc.poll()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def console_tail(self, lines: int = 40) -> str:
        return read_tail(self.spec.console_log, lines)

    def wait(self, timeout: float) -> bool:
        if self._proc is None:
            return True
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _qmp(self, command: str) -> None:
        try:
            with QMPClient(qmp_path(self.spec)) as qmp:
                qmp.execute(command)
        except (VMError, OSError) as exc:
            log.debug("%s: QMP %s failed: %s", self.spec.name, command, exc)

    def cut_layer(self, top: Path, new_top: Path) -> None:
        """Make the disk's current top file `top` read-only and continue on `new_top`,
        a fresh qcow2 backed by it. The guest's filesystems must be frozen for
        the old top to be consistent.

        The new top is created here and added with blockdev-add, stating
        the drive's discard=unmap and detect-zeroes=unmap itself (a discard in
        a qcow2 with a backing file writes a zero cluster, hiding what the
        layers below hold: what generalize deletes stays deleted), then made
        the top with `blockdev-snapshot`. `blockdev-snapshot-sync` would keep
        the discard flag but leave detect-zeroes off on the new node (measured
        with QEMU 7.2), so zero writes would allocate space in every layer.
        """
        with QMPClient(qmp_path(self.spec), timeout=60) as qmp:
            self._cut(qmp, top, new_top)

    def _cut(self, qmp: QMPClient, top: Path, new_top: Path) -> None:
        qemu_img("create", "-q", "-f", "qcow2", "-b", top, "-F", "qcow2", new_top, timeout=60)
        node = f"layer-{new_top.stem}"
        qmp.execute(
            "blockdev-add", driver="qcow2", **{"node-name": node}, discard="unmap",
            **{"detect-zeroes": "unmap"},
            file={"driver": "file", "filename": str(new_top), "discard": "unmap"},
            # The backing is attached by blockdev-snapshot (it refuses an
            # overlay that already has one); the file's header names it.
            backing=None,
        )  # fmt: skip
        qmp.execute("blockdev-snapshot", node=DISK_ID, overlay=node)

    def state_signature(self) -> str:
        return state_signature(self.spec)

    def save_running(self, top: Path, new_top: Path, state: Path) -> None:
        """Cut the disk as cut_layer does and keep the VM's running state in `state`,
        both of one instant: the VM is paused for the two and then runs on.

        The guest's filesystems are not frozen across this (a guest restored
        frozen could not even log in to thaw them): the caller flushes them
        just before, so the layer is the disk a moment after a flush, as a
        power cut would leave it, which ext4's journal replays on a boot from
        that layer alone; restored with its state, it is exact. Raises
        StateNotSaved when only the state failed (the layer is good).
        """
        assert self._log is not None
        # Written at disk speed: zstd, not a bandwidth cap, sets the pace.
        timeout = self.spec.accel.timeout(30) + self.spec.memory_mib / 50
        with QMPClient(qmp_path(self.spec), timeout=60) as qmp:
            qmp.execute("stop")
            try:
                self._cut(qmp, top, new_top)
                try:
                    # QEMU caps a migration at 128 MiB/s by default, even a paused
                    # VM's, which would stretch the pause for no reason.
                    qmp.execute("migrate-set-parameters", **{"max-bandwidth": UNCAPPED})
                    vmstate.save(qmp, state, log=self._log, timeout=timeout)
                except (VMError, OSError) as exc:
                    _cancel_migration(qmp)
                    raise vmstate.StateNotSaved(f"{self.spec.name}: {exc}") from None
            finally:
                qmp.execute("cont")

    def shutdown(self, timeout: float) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            log.info("%s: ACPI powerdown", self.spec.name)
            self._qmp("system_powerdown")
            if not self.wait(timeout):
                log.warning("%s: no poweroff after %.0fs; quitting QEMU", self.spec.name, timeout)
                self._qmp("quit")
                if not self.wait(5):
                    self.kill()
        self._reap()

    def kill(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._reap()

    def _reap(self) -> None:
        assert self._proc is not None
        self._proc.wait()
        reaped(self._proc)
        if self._log is not None:
            self._log.close()
        qmp_path(self.spec).unlink(missing_ok=True)
        runs.disown(qmp_path(self.spec))
