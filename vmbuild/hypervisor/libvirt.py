"""The libvirt backend: the same VMs as the direct QEMU backend, as libvirt domains.

Users who manage VMs with virsh or virt-manager see vmbuild's VMs there. The
domain XML is generated from the same `VMSpec` as `qemu_argv()`, and each VM is
a *transient* domain (`createXML`): libvirt forgets it as soon as it stops, so
destroying it is all the cleanup there is, on success, failure and Ctrl-C.

Two facts of libvirt 9.0 shape the XML (see shared/reference/environment.md):
`<portForward>` on a user-mode interface is silently ignored (and passt is not
built in Debian), so the SSH forward is a `<qemu:commandline>` user netdev with
`hostfwd` on 127.0.0.1; and `<graphics type='none'>` is rejected, so there is
no `<graphics>` element at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shlex
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Literal
from urllib.parse import urlparse

from vmbuild.errors import VmbuildError, VMError
from vmbuild.hypervisor import arch, firmware
from vmbuild.hypervisor.base import MachineContext, VMSpec, read_tail
from vmbuild.run import qemu_img

log = logging.getLogger("vmbuild.libvirt")

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
ET.register_namespace("qemu", QEMU_NS)

UriKind = Literal["system", "session"]

# Our own netdev/device ids in <qemu:commandline>: libvirt names its devices
# "net0", "hostnet0", ... so a distinct prefix can never collide with them.
NETDEV_ID = "vmbuildnet0"
# QEMU realizes this extra NIC before libvirt's own (JSON) devices, so left to
# auto-assignment it takes slot 2, which libvirt has already promised to
# another device, and QEMU refuses to start. libvirt fills slots upwards from
# 2; the last slot of the i440FX bus stays free for the handful we define.
# On q35 (Secure Boot) 0x1f is the ICH9 LPC bridge: the slot below it, which
# libvirt fills only with a DMI-to-PCI bridge for conventional PCI devices
# (vmbuild defines none; its virtio devices go behind PCIe root ports from slot 2).
NIC_PCI_SLOT = {"pc": "0x1f", "q35": "0x1e", "virt": "0x1f"}
GUEST_AGENT = "org.qemu.guest_agent.0"
POLL_SECONDS = 0.2


def _libvirt() -> ModuleType:
    """Import libvirt-python lazily (the direct backend must not need it) and
    silence its default error handler, which would print every error, even
    those we handle, to stderr."""
    try:
        import libvirt
    except ImportError as exc:
        raise VmbuildError(
            f"the libvirt backend needs libvirt-python: {exc}",
            hint="pip install libvirt-python (it builds against libvirt-dev and pkg-config), "
            "or use --backend qemu",
        ) from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    module: ModuleType = libvirt
    return module


def default_uri() -> str:
    """`qemu:///system` as root, `qemu:///session` otherwise (it needs no daemon setup)."""
    return "qemu:///system" if os.geteuid() == 0 else "qemu:///session"


def resolve_uri(uri: str | None = None) -> str:
    """An explicit URI wins, then libvirt's own `LIBVIRT_DEFAULT_URI`, then the default."""
    return uri or os.environ.get("LIBVIRT_DEFAULT_URI") or default_uri()


def uri_kind(uri: str) -> UriKind:
    """`system` or `session`; remote URIs are refused, as the disks, the console
    log and the SSH forward are all local paths and ports."""
    parsed = urlparse(uri)
    driver = parsed.scheme.split("+", 1)[0]
    transport = parsed.scheme.partition("+")[2]
    if driver != "qemu":
        raise VmbuildError(f"libvirt URI {uri}: only the qemu driver is supported")
    if parsed.hostname or transport not in ("", "unix"):
        raise VmbuildError(
            f"libvirt URI {uri}: a remote libvirt cannot reach this host's disks and ports",
            hint="use qemu:///system or qemu:///session",
        )
    path = parsed.path.strip("/")
    if path not in ("system", "session"):
        raise VmbuildError(f"libvirt URI {uri}: expected qemu:///system or qemu:///session")
    return "system" if path == "system" else "session"


def domain_xml(
    spec: VMSpec,
    *,
    uri_kind: str,
    network: str | None = None,
    run_as: tuple[int, int] | None = None,
) -> str:
    """The domain XML for a VM (pure: unit-tested element by element).

    `network` names a libvirt network to attach instead of the user-mode
    forward. `run_as` (uid, gid) is who QEMU runs as under qemu:///system;
    it defaults to the calling user.
    """
    kvm = spec.accel.kind == "kvm"
    # type='qemu' is TCG. libvirt has no way to say `thread=multi` and passes
    # plain `-accel tcg`, but none is needed: measured with QEMU 7.2, an x86
    # guest on an x86 host gets one TCG thread per vCPU ("CPU 0/TCG",
    # "CPU 1/TCG") by default, i.e. the multi-threaded TCG the direct backend asks for.
    dom = ET.Element("domain", type="kvm" if kvm else "qemu")
    ET.SubElement(dom, "name").text = spec.name
    if spec.ec2 is not None:
        # libvirt refuses a sysinfo UUID that differs from the domain's own.
        ET.SubElement(dom, "uuid").text = spec.ec2.uuid
    ET.SubElement(dom, "description").text = "vmbuild VM (transient: destroyed when it stops)"
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(spec.cpus)
    os_el = ET.SubElement(dom, "os")
    machine = firmware.machine(spec.firmware, spec.arch).split(",")[0]
    # libvirt picks the emulator (qemu-system-aarch64 for aarch64) from the arch.
    ET.SubElement(os_el, "type", arch=arch.UNAME[spec.arch], machine=machine).text = "hvm"
    if spec.firmware != "bios":
        # The same OVMF (AAVMF) code and per-VM vars copy the direct backend uses
        # (firmware.py); libvirt adds the pflash lock for a secure loader.
        files = firmware.uefi_files(spec.firmware, spec.arch)
        loader = ET.SubElement(os_el, "loader", readonly="yes", type="pflash")
        loader.set("secure", "yes" if files.secure else "no")
        loader.text = str(files.code)
        ET.SubElement(os_el, "nvram").text = str(spec.uefi_vars)
    ET.SubElement(os_el, "boot", dev="hd")
    if spec.ec2 is not None:
        _ec2_sysinfo(dom, os_el, spec)
    features = ET.SubElement(dom, "features")
    # Without <acpi/> libvirt starts QEMU with ACPI off and shutdown() could
    # only ever end in destroy.
    ET.SubElement(features, "acpi")
    # An x86 APIC only: arm64's virt machine has a GIC, which libvirt sets up itself.
    if spec.arch == "x86_64":
        ET.SubElement(features, "apic")
    if spec.firmware == "uefi-secure":
        ET.SubElement(features, "smm", state="on")
    if kvm:
        ET.SubElement(dom, "cpu", mode="host-passthrough", check="none")
    else:
        # The measured-fastest TCG model, as the direct backend's `-cpu qemu64`;
        # check='none' keeps libvirt from adding or verifying feature flags.
        cpu = ET.SubElement(dom, "cpu", mode="custom", match="exact", check="none")
        ET.SubElement(cpu, "model", fallback="forbid").text = arch.TCG_CPU[spec.arch]
    ET.SubElement(dom, "clock", offset="utc")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"

    devices = ET.SubElement(dom, "devices")
    _disk(devices, spec.disk, "qcow2", "vda", readonly=False)
    if spec.seed is not None:
        _disk(devices, spec.seed, "raw", "vdb", readonly=True)
    if network is not None:
        iface = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(iface, "source", network=network)
        ET.SubElement(iface, "model", type="virtio")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(spec.console_log))
    ET.SubElement(serial, "target", port="0")
    # The guest agent is how a named network's address is found when the
    # network's DHCP leases do not list the guest; virt-manager shows it too.
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name=GUEST_AGENT)
    # Early boot (sshd host keys, cloud-init) must never wait for entropy.
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    # Nothing the direct backend does not have either (it runs -nodefaults).
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")

    if uri_kind == "system":
        # qemu:///system runs QEMU as libvirt-qemu by default, which can neither
        # traverse a private home or cache dir nor should have the user's files
        # chowned to it. Run QEMU as the calling user instead (root as root):
        # exactly the access the direct backend's QEMU has, and no relabelling.
        uid, gid = run_as if run_as is not None else (os.getuid(), os.getgid())
        seclabel = ET.SubElement(dom, "seclabel", type="static", model="dac", relabel="no")
        ET.SubElement(seclabel, "label").text = f"+{uid}:+{gid}"

    if network is None:
        root_bus = "pcie.0" if machine in ("q35", "virt") else "pci.0"
        cmdline = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
        for arg in (
            "-netdev", spec.user_netdev(NETDEV_ID),
            "-device",
            f"virtio-net-pci,netdev={NETDEV_ID},bus={root_bus},addr={NIC_PCI_SLOT[machine]}"
            f"{spec.nic_options()}",
        ):  # fmt: skip
            ET.SubElement(cmdline, f"{{{QEMU_NS}}}arg", value=arg)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode") + "\n"


def _ec2_sysinfo(dom: ET.Element, os_el: ET.Element, spec: VMSpec) -> None:
    """EC2's SMBIOS (the direct backend's -smbios) as libvirt's sysinfo."""
    assert spec.ec2 is not None
    e = spec.ec2
    ET.SubElement(os_el, "smbios", mode="sysinfo")
    sysinfo = ET.SubElement(dom, "sysinfo", type="smbios")
    system = ET.SubElement(sysinfo, "system")
    for name, value in (
        ("manufacturer", "Amazon EC2"), ("product", e.instance_type),
        ("serial", e.uuid), ("uuid", e.uuid),
    ):  # fmt: skip
        ET.SubElement(system, "entry", name=name).text = value
    chassis = ET.SubElement(sysinfo, "chassis")
    ET.SubElement(chassis, "entry", name="manufacturer").text = "Amazon EC2"
    ET.SubElement(chassis, "entry", name="asset").text = e.instance_id


def _disk(devices: ET.Element, path: Path, fmt: str, dev: str, *, readonly: bool) -> None:
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    driver = ET.SubElement(disk, "driver", name="qemu", type=fmt)
    if not readonly:
        # As the direct backend: trimmed blocks leave the overlay, so the
        # converted image stays small.
        driver.set("discard", "unmap")
        driver.set("detect_zeroes", "unmap")
    ET.SubElement(disk, "source", file=str(path))
    ET.SubElement(disk, "target", dev=dev, bus="virtio")
    if readonly:
        ET.SubElement(disk, "readonly")


def connect(uri: str | None = None) -> Any:
    """Open a libvirt connection, or raise a VmbuildError naming the URI and what to start."""
    libvirt = _libvirt()
    resolved = resolve_uri(uri)
    uri_kind(resolved)
    try:
        return libvirt.open(resolved)
    except libvirt.libvirtError as exc:
        raise VmbuildError(
            f"cannot connect to libvirt at {resolved}: {_message(exc)}",
            hint=_connect_hint(resolved, _message(exc)),
        ) from None


def _connect_hint(uri: str, message: str) -> str:
    if uri.endswith("/session"):
        return (
            "qemu:///session starts its own daemon: install it with "
            "`apt-get install --no-install-recommends libvirt-daemon "
            "libvirt-daemon-driver-qemu`, or use --backend qemu"
        )
    if "ermission denied" in message:
        return (
            "join the libvirt group (then log in again), use qemu:///session, or use --backend qemu"
        )
    return (
        "start libvirtd (`systemctl start libvirtd`; without systemd, as root: "
        "`virtlogd -d && libvirtd -d`), or use --backend qemu"
    )


def _message(exc: Any) -> str:
    text = exc.get_error_message() if hasattr(exc, "get_error_message") else None
    return str(text or exc)


def libvirt_report(uri: str | None = None) -> dict[str, Any]:
    """What `vmbuild doctor` shows: the URI vmbuild would use, whether it answers,
    libvirt's and the hypervisor's versions, or the error and what to do."""
    resolved = resolve_uri(uri)
    report: dict[str, Any] = {
        "uri": resolved,
        "reachable": False,
        "version": None,
        "hypervisor": None,
        "error": None,
        "hint": None,
    }
    try:
        conn = connect(resolved)
    except VmbuildError as exc:
        report["error"] = str(exc)
        report["hint"] = exc.hint
        return report
    try:
        report["reachable"] = True
        report["version"] = _version(conn.getLibVersion())
        report["hypervisor"] = f"{conn.getType()} {_version(conn.getVersion())}"
    except Exception as exc:  # libvirtError, from a daemon that went away meanwhile
        report["reachable"] = False
        report["error"] = f"libvirt at {resolved} stopped answering: {_message(exc)}"
    finally:
        with contextlib.suppress(Exception):
            conn.close()
    return report


def _version(number: int) -> str:
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"


class LibvirtMachine(MachineContext):
    """A VM as a transient libvirt domain, with the `Machine` semantics of QemuMachine.

    Nothing here destroys the domain implicitly (no `__del__`): a VM kept with
    --keep-on-failure must outlive this object and vmbuild itself. Pass
    `autodestroy=True` to have libvirtd destroy the domain when vmbuild's
    connection closes, even if vmbuild is SIGKILLed.
    """

    def __init__(
        self,
        spec: VMSpec,
        *,
        uri: str | None = None,
        network: str | None = None,
        autodestroy: bool = False,
    ) -> None:
        self.spec = spec
        self.uri = resolve_uri(uri)
        self.network = network
        self.autodestroy = autodestroy
        self.xml = domain_xml(spec, uri_kind=uri_kind(self.uri), network=network)
        self._conn: Any = None
        self._dom: Any = None
        self._relay: _TcpRelay | None = None

    @property
    def xml_path(self) -> Path:
        return self.spec.workdir / f"{self.spec.name}.xml"

    @property
    def destroy_command(self) -> str:
        """How a user removes a domain kept with --keep-on-failure (for the hint)."""
        return f"virsh -c {shlex.quote(self.uri)} destroy {self.spec.name}"

    def launch(self) -> None:
        if self._conn is not None:
            raise VMError(f"{self.spec.name} already launched")
        libvirt = _libvirt()
        self._conn = connect(self.uri)
        self.xml_path.write_text(self.xml)
        log.debug("%s: domain XML (%s):\n%s", self.spec.name, self.xml_path, self.xml)
        flags = libvirt.VIR_DOMAIN_START_AUTODESTROY if self.autodestroy else 0
        try:
            try:
                self._dom = self._conn.createXML(self.xml, flags)
            except libvirt.libvirtError as exc:
                raise VMError(
                    f"{self.spec.name}: libvirt could not start the domain on {self.uri}: "
                    f"{_message(exc)}\n    domain XML: {self.xml_path}",
                    console_tail=self.console_tail(),
                ) from None
            log.info(
                "%s: libvirt domain on %s (virsh -c %s dominfo %s)",
                self.spec.name, self.uri, self.uri, self.spec.name,
            )  # fmt: skip
            if self.network is not None:
                self._relay = _TcpRelay(self.spec.ssh_port, self._guest_ssh_address)
                self._relay.start()
        except BaseException:
            # Ctrl-C or a failure right after createXML: never leave a domain behind.
            self.kill()
            raise

    def is_running(self) -> bool:
        if self._dom is None:
            return False
        libvirt = _libvirt()
        try:
            return bool(self._dom.isActive())
        except libvirt.libvirtError as exc:
            # A transient domain is undefined the moment it stops.
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise VMError(f"{self.spec.name}: libvirt at {self.uri}: {_message(exc)}") from None

    def console_tail(self, lines: int = 40) -> str:
        return read_tail(self.spec.console_log, lines)

    @property
    def name(self) -> str:
        return self.spec.name

    def exit_status(self) -> int | None:
        """libvirt does not say how a transient domain ended; a stopped one reads
        as a guest poweroff (0), which is what on_poweroff=destroy makes of it."""
        if self._dom is None or self.is_running():
            return None
        return 0

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
        return True

    def shutdown(self, timeout: float) -> None:
        if self._conn is None:
            return
        if self.is_running():
            log.info("%s: ACPI powerdown", self.spec.name)
            libvirt = _libvirt()
            try:
                self._dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            except libvirt.libvirtError as exc:
                log.debug("%s: ACPI powerdown failed: %s", self.spec.name, _message(exc))
            if not self.wait(timeout):
                log.warning(
                    "%s: no poweroff after %.0fs; destroying the domain", self.spec.name, timeout
                )
        self.kill()

    def kill(self) -> None:
        """Destroy the domain (libvirt: SIGTERM, then SIGKILL) and close the connection."""
        if self._conn is None:
            return
        if self._relay is not None:
            self._relay.stop()
            self._relay = None
        if self._dom is not None:
            libvirt = _libvirt()
            try:
                self._dom.destroy()
            except libvirt.libvirtError as exc:
                # Already gone (poweroff) is the normal case after shutdown().
                if exc.get_error_code() not in (
                    libvirt.VIR_ERR_NO_DOMAIN,
                    libvirt.VIR_ERR_OPERATION_INVALID,
                ):
                    raise VMError(
                        f"{self.spec.name}: could not destroy the domain: {_message(exc)}",
                        hint=f"virsh -c {self.uri} destroy {self.spec.name}",
                    ) from None
        with contextlib.suppress(Exception):
            self._conn.close()
        self._conn = None

    def cut_layer(self, top: Path, new_top: Path) -> None:
        """As QemuMachine.cut_layer: `top` becomes read-only and the disk goes on in
        `new_top`, a fresh qcow2 backed by it (the guest's filesystems frozen).

        libvirt's own way: a disk-only external snapshot without metadata, into
        a file created here (REUSE_EXT), so checkpoints are the same files on
        both backends. libvirt opens the new top with the <disk>'s
        discard=unmap, so a guest's discard writes a zero cluster that hides
        what the layers below hold (an integration test checks it through the
        drive). It leaves detect_zeroes off on the new top (measured with
        libvirt 9.0 and QEMU 7.2): zeros the guest writes take space in that
        layer, which costs cache space but exposes nothing.
        """
        if self._dom is None:
            raise VMError(f"{self.spec.name}: not running")
        libvirt = _libvirt()
        qemu_img("create", "-q", "-f", "qcow2", "-b", top, "-F", "qcow2", new_top, timeout=60)
        snap = ET.Element("domainsnapshot")
        ET.SubElement(snap, "name").text = f"vmbuild-{new_top.stem}"
        disks = ET.SubElement(snap, "disks")
        disk = ET.SubElement(disks, "disk", name="vda", snapshot="external", type="file")
        ET.SubElement(disk, "driver", type="qcow2")
        ET.SubElement(disk, "source", file=str(new_top))
        if self.spec.seed is not None:
            ET.SubElement(disks, "disk", name="vdb", snapshot="no")
        flags = (
            libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
            | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
        )
        try:
            self._dom.snapshotCreateXML(ET.tostring(snap, encoding="unicode"), flags)
        except libvirt.libvirtError as exc:
            new_top.unlink(missing_ok=True)
            raise VMError(
                f"{self.spec.name}: libvirt could not cut a disk layer: {_message(exc)}"
            ) from None

    def guest_addresses(self) -> list[str]:
        """The guest's IPv4 addresses on a named network: DHCP leases, then the agent."""
        if self._dom is None:
            return []
        libvirt = _libvirt()
        found: list[str] = []
        for source in (
            libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
            libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
        ):
            try:
                ifaces = self._dom.interfaceAddresses(source)
            except libvirt.libvirtError:
                continue  # no leases yet, or the agent is not up yet
            found += [
                a["addr"]
                for name, iface in sorted(ifaces.items())
                if name != "lo"
                for a in iface.get("addrs") or []
                if a.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4
                and not a["addr"].startswith("127.")
            ]
            if found:
                break
        return found

    def _guest_ssh_address(self) -> tuple[str, int] | None:
        addresses = self.guest_addresses()
        return (addresses[0], 22) if addresses else None


class _TcpRelay:
    """127.0.0.1:port -> the guest's SSH on a named libvirt network.

    Everything after boot (SSH, testinfra, the keep-on-failure hint) talks to
    127.0.0.1:ssh_port; on a named network the guest has its own address
    instead, found only once it has a DHCP lease. Until then connections are
    closed at once, which the SSH wait treats like a guest that is not up yet.
    """

    def __init__(self, port: int, target: Callable[[], tuple[str, int] | None]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", port))
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"relay-{port}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        # close() alone does not wake a thread blocked in accept() on Linux
        # (the port would keep accepting); shutdown() does.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(client)
            try:
                target = self._target()
                if target is None:
                    return
                upstream = stack.enter_context(socket.create_connection(target, timeout=5))
            except OSError as exc:
                log.debug("relay: guest not reachable yet: %s", exc)
                return
            upstream.settimeout(None)
            _copy_both(client, upstream, self._stopping)


def _copy_both(a: socket.socket, b: socket.socket, stopping: threading.Event) -> None:
    """Copy bytes both ways until either side closes or the relay stops."""
    peers = {a: b, b: a}
    while not stopping.is_set():
        readable, _, _ = select.select(list(peers), [], [], 0.5)
        for sock in readable:
            try:
                data = sock.recv(65536)
                if not data:
                    return
                peers[sock].sendall(data)
            except OSError:
                return
