"""The libvirt backend without a daemon: the domain XML element by element, URI
handling, error mapping, and the Machine lifecycle against a fake connection."""

from __future__ import annotations

import socket
import threading
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from vmbuild.errors import VmbuildError, VMError
from vmbuild.hypervisor import libvirt as lv
from vmbuild.hypervisor.accel import Accel, tcg
from vmbuild.hypervisor.base import VMSpec

Q = "{http://libvirt.org/schemas/domain/qemu/1.0}"


def spec(accel: Accel | None = None, workdir: Path = Path("/w")) -> VMSpec:
    w = workdir
    return VMSpec(
        name="vmbuild-abc123-builder", disk=w / "builder.qcow2", seed=w / "seed.iso",
        memory_mib=2048, cpus=2, accel=accel or tcg("test"), ssh_port=40022,
        console_log=w / "builder-console.log", workdir=w,
    )  # fmt: skip


def parse(xml: str) -> ET.Element:
    return ET.fromstring(xml)


def qemu_args(dom: ET.Element) -> list[str]:
    return [a.get("value", "") for a in dom.iterfind(f"{Q}commandline/{Q}arg")]


# --- the domain XML ----------------------------------------------------------


def test_tcg_domain_is_type_qemu_with_the_measured_cpu() -> None:
    dom = parse(lv.domain_xml(spec(), uri_kind="system"))
    assert dom.tag == "domain" and dom.get("type") == "qemu"
    assert dom.findtext("name") == "vmbuild-abc123-builder"
    mem = dom.find("memory")
    assert mem is not None and (mem.get("unit"), mem.text) == ("MiB", "2048")
    assert dom.findtext("vcpu") == "2"
    ostype = dom.find("os/type")
    assert ostype is not None and ostype.text == "hvm"
    assert (ostype.get("arch"), ostype.get("machine")) == ("x86_64", "pc")
    cpu = dom.find("cpu")
    assert cpu is not None and (cpu.get("mode"), cpu.get("check")) == ("custom", "none")
    assert dom.findtext("cpu/model") == "qemu64"
    # ACPI is what makes shutdown() a clean powerdown rather than a destroy.
    assert dom.find("features/acpi") is not None
    assert dom.findtext("on_poweroff") == "destroy"


def test_kvm_domain_is_type_kvm_with_host_cpu() -> None:
    dom = parse(lv.domain_xml(spec(Accel("kvm", "probed", 1.0)), uri_kind="system"))
    assert dom.get("type") == "kvm"
    cpu = dom.find("cpu")
    assert cpu is not None and cpu.get("mode") == "host-passthrough"
    assert cpu.find("model") is None


def test_disks_overlay_discards_and_seed_is_readonly() -> None:
    disks = parse(lv.domain_xml(spec(), uri_kind="system")).findall("devices/disk")
    assert len(disks) == 2
    overlay, seed = disks
    for disk in disks:
        assert (disk.get("type"), disk.get("device")) == ("file", "disk")
        target = disk.find("target")
        assert target is not None and target.get("bus") == "virtio"
    ov_driver = overlay.find("driver")
    assert ov_driver is not None and ov_driver.attrib == {
        "name": "qemu", "type": "qcow2", "discard": "unmap", "detect_zeroes": "unmap",
    }  # fmt: skip
    assert overlay.find("source").get("file") == "/w/builder.qcow2"  # type: ignore[union-attr]
    assert overlay.find("readonly") is None
    assert seed.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    assert seed.find("source").get("file") == "/w/seed.iso"  # type: ignore[union-attr]
    assert seed.find("readonly") is not None
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb"]  # type: ignore[union-attr]


def test_serial_console_goes_to_the_log_file() -> None:
    dom = parse(lv.domain_xml(spec(), uri_kind="system"))
    serial = dom.find("devices/serial")
    assert serial is not None and serial.get("type") == "file"
    assert serial.find("source").get("path") == "/w/builder-console.log"  # type: ignore[union-attr]


def test_no_graphics_and_a_virtio_rng() -> None:
    dom = parse(lv.domain_xml(spec(), uri_kind="system"))
    # libvirt 9.0 rejects <graphics type='none'>: absence is the only way.
    assert dom.find("devices/graphics") is None
    assert dom.find("devices/video") is None
    rng = dom.find("devices/rng")
    assert rng is not None and rng.get("model") == "virtio"
    assert rng.findtext("backend") == "/dev/urandom"


def test_ssh_forward_is_a_qemu_commandline_hostfwd_on_loopback() -> None:
    dom = parse(lv.domain_xml(spec(), uri_kind="system"))
    # <portForward> on a user interface is silently ignored by libvirt 9.0.
    assert dom.find("devices/interface") is None
    assert qemu_args(dom) == [
        "-netdev", "user,id=vmbuildnet0,hostfwd=tcp:127.0.0.1:40022-:22",
        "-device", "virtio-net-pci,netdev=vmbuildnet0,bus=pci.0,addr=0x1f",
    ]  # fmt: skip
    assert "0.0.0.0" not in lv.domain_xml(spec(), uri_kind="system")


def test_named_network_replaces_the_forward() -> None:
    dom = parse(lv.domain_xml(spec(), uri_kind="system", network="default"))
    iface = dom.find("devices/interface")
    assert iface is not None and iface.get("type") == "network"
    assert iface.find("source").get("network") == "default"  # type: ignore[union-attr]
    assert iface.find("model").get("type") == "virtio"  # type: ignore[union-attr]
    assert dom.find(f"{Q}commandline") is None
    agent = dom.find("devices/channel/target")
    assert agent is not None and agent.get("name") == "org.qemu.guest_agent.0"


def test_system_uri_runs_qemu_as_the_caller_without_relabelling() -> None:
    dom = parse(lv.domain_xml(spec(), uri_kind="system", run_as=(1000, 1001)))
    seclabel = dom.find("seclabel")
    assert seclabel is not None
    assert seclabel.attrib == {"type": "static", "model": "dac", "relabel": "no"}
    assert seclabel.findtext("label") == "+1000:+1001"


def test_session_uri_has_no_seclabel() -> None:
    dom = parse(lv.domain_xml(spec(), uri_kind="session"))
    assert dom.find("seclabel") is None


def test_paths_with_xml_metacharacters_are_escaped(tmp_path: Path) -> None:
    odd = tmp_path / "a&b <c>"
    dom = parse(lv.domain_xml(spec(workdir=odd), uri_kind="session"))
    assert dom.find("devices/disk/source").get("file") == f"{odd}/builder.qcow2"  # type: ignore[union-attr]


# --- URIs ----------------------------------------------------------------------


def test_default_uri_depends_on_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIBVIRT_DEFAULT_URI", raising=False)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert lv.resolve_uri() == "qemu:///system"
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert lv.resolve_uri() == "qemu:///session"
    monkeypatch.setenv("LIBVIRT_DEFAULT_URI", "qemu:///system")
    assert lv.resolve_uri() == "qemu:///system"
    assert lv.resolve_uri("qemu:///session") == "qemu:///session"


@pytest.mark.parametrize(
    ("uri", "kind"),
    [("qemu:///system", "system"), ("qemu:///session", "session"),
     ("qemu+unix:///system", "system")],
)  # fmt: skip
def test_uri_kind(uri: str, kind: str) -> None:
    assert lv.uri_kind(uri) == kind


@pytest.mark.parametrize(
    "uri", ["qemu+ssh://host/system", "qemu://host/system", "xen:///system", "qemu:///embed"]
)
def test_unsupported_uris_are_refused(uri: str) -> None:
    with pytest.raises(VmbuildError, match=uri.replace("+", r"\+")):
        lv.uri_kind(uri)


# --- a fake libvirt ------------------------------------------------------------


class FakeError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code

    def get_error_code(self) -> int:
        return self.code

    def get_error_message(self) -> str:
        return str(self)


class FakeDomain:
    def __init__(self, *, powers_off: bool = True) -> None:
        self.active = True
        self.powers_off = powers_off
        self.calls: list[str] = []

    def isActive(self) -> int:  # libvirt's camelCase
        if not self.active:  # transient: undefined once stopped
            raise FakeError("Domain not found", FAKE.VIR_ERR_NO_DOMAIN)
        return 1

    def shutdownFlags(self, flags: int) -> None:
        self.calls.append(f"shutdown:{flags}")
        if self.powers_off:
            self.active = False

    def destroy(self) -> None:
        self.calls.append("destroy")
        if not self.active:
            raise FakeError("Domain not found", FAKE.VIR_ERR_NO_DOMAIN)
        self.active = False


class FakeConn:
    def __init__(self, dom: FakeDomain | None = None, error: str | None = None) -> None:
        self.dom = dom or FakeDomain()
        self.error = error
        self.created: list[tuple[str, int]] = []
        self.closed = False

    def createXML(self, xml: str, flags: int) -> FakeDomain:
        self.created.append((xml, flags))
        if self.error:
            raise FakeError(self.error)
        return self.dom

    def close(self) -> int:
        self.closed = True
        return 0

    def getLibVersion(self) -> int:
        return 9_000_000

    def getVersion(self) -> int:
        return 7_002_022

    def getType(self) -> str:
        return "QEMU"


FAKE = types.SimpleNamespace(
    libvirtError=FakeError,
    VIR_ERR_NO_DOMAIN=42,
    VIR_ERR_OPERATION_INVALID=55,
    VIR_DOMAIN_START_AUTODESTROY=2,
    VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN=1,
    VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE=0,
    VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT=1,
    VIR_IP_ADDR_TYPE_IPV4=0,
)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`libvirt.open()` answers with the connection in state["conn"] or raises state["error"]."""
    state: dict[str, Any] = {"conn": FakeConn(), "error": None, "opened": []}

    def open_(uri: str) -> FakeConn:
        state["opened"].append(uri)
        if state["error"]:
            raise FakeError(state["error"])
        conn: FakeConn = state["conn"]
        return conn

    module = types.SimpleNamespace(**vars(FAKE), open=open_)
    monkeypatch.setattr(lv, "_libvirt", lambda: module)
    return state


def test_unreachable_libvirt_names_the_uri_and_what_to_start(fake: dict[str, Any]) -> None:
    fake["error"] = "Failed to connect socket to '/run/libvirt/libvirt-sock': No such file"
    with pytest.raises(VmbuildError) as info:
        lv.connect("qemu:///system")
    assert str(info.value).startswith("cannot connect to libvirt at qemu:///system: Failed")
    assert info.value.hint is not None and "libvirtd" in info.value.hint
    fake["error"] = "Failed to connect socket to '/run/libvirt/libvirt-sock': Permission denied"
    with pytest.raises(VmbuildError) as info:
        lv.connect("qemu:///system")
    assert info.value.hint is not None and "libvirt group" in info.value.hint


def test_report_reachable_and_unreachable(fake: dict[str, Any]) -> None:
    report = lv.libvirt_report("qemu:///system")
    assert report == {
        "uri": "qemu:///system", "reachable": True, "version": "9.0.0",
        "hypervisor": "QEMU 7.2.22", "error": None, "hint": None,
    }  # fmt: skip
    assert fake["conn"].closed
    fake["error"] = "Failed to connect socket"
    report = lv.libvirt_report("qemu:///system")
    assert report["reachable"] is False and report["version"] is None
    assert "qemu:///system" in report["error"] and report["hint"]


def test_launch_creates_a_transient_domain(fake: dict[str, Any], tmp_path: Path) -> None:
    m = lv.LibvirtMachine(spec(workdir=tmp_path), uri="qemu:///system")
    m.launch()
    conn: FakeConn = fake["conn"]
    [(xml, flags)] = conn.created
    assert flags == 0  # no autodestroy: --keep-on-failure must outlive vmbuild
    assert parse(xml).findtext("name") == "vmbuild-abc123-builder"
    assert (tmp_path / "vmbuild-abc123-builder.xml").read_text() == xml
    assert m.is_running()
    with pytest.raises(VMError, match="already launched"):
        m.launch()
    m.kill()


def test_autodestroy_is_passed_on(fake: dict[str, Any], tmp_path: Path) -> None:
    m = lv.LibvirtMachine(spec(workdir=tmp_path), uri="qemu:///system", autodestroy=True)
    m.launch()
    assert fake["conn"].created[0][1] == FAKE.VIR_DOMAIN_START_AUTODESTROY
    m.kill()


def test_launch_failure_raises_with_message_and_console(
    fake: dict[str, Any], tmp_path: Path
) -> None:
    fake["conn"] = FakeConn(error="Cannot access backing file '/x.qcow2'")
    s = spec(workdir=tmp_path)
    s.console_log.write_text("SeaBIOS\nbooting...\n")
    with pytest.raises(VMError) as info:
        lv.LibvirtMachine(s, uri="qemu:///system").launch()
    text = str(info.value)
    assert "could not start the domain on qemu:///system" in text
    assert "Cannot access backing file" in text and "domain XML:" in text
    assert info.value.console_tail.endswith("booting...")
    assert fake["conn"].closed


def test_shutdown_is_acpi_then_reaps_and_is_idempotent(
    fake: dict[str, Any], tmp_path: Path
) -> None:
    m = lv.LibvirtMachine(spec(workdir=tmp_path), uri="qemu:///system")
    m.launch()
    dom: FakeDomain = fake["conn"].dom
    m.shutdown(timeout=5)
    assert dom.calls[0] == "shutdown:1" and not m.is_running()
    assert fake["conn"].closed
    m.shutdown(timeout=5)
    m.kill()
    assert dom.calls == ["shutdown:1", "destroy"]


def test_shutdown_escalates_to_destroy(fake: dict[str, Any], tmp_path: Path) -> None:
    fake["conn"] = FakeConn(FakeDomain(powers_off=False))
    m = lv.LibvirtMachine(spec(workdir=tmp_path), uri="qemu:///system")
    m.launch()
    m.shutdown(timeout=0.3)
    assert fake["conn"].dom.calls == ["shutdown:1", "destroy"]
    assert not fake["conn"].dom.active


def test_wait_sees_a_guest_poweroff(fake: dict[str, Any], tmp_path: Path) -> None:
    m = lv.LibvirtMachine(spec(workdir=tmp_path), uri="qemu:///system")
    m.launch()
    assert m.wait(0.3) is False
    fake["conn"].dom.active = False
    assert m.wait(0.3) is True
    m.shutdown(5)  # after a poweroff: nothing left to stop, no error


def test_no_implicit_destroy_when_dropped(fake: dict[str, Any], tmp_path: Path) -> None:
    m = lv.LibvirtMachine(spec(workdir=tmp_path), uri="qemu:///system")
    m.launch()
    dom = fake["conn"].dom
    del m  # --keep-on-failure: the guest module just drops the machine
    import gc

    gc.collect()
    assert dom.active and dom.calls == []


def test_interrupt_right_after_create_destroys(
    fake: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*_a: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lv.log, "info", interrupted)
    m = lv.LibvirtMachine(spec(workdir=tmp_path), uri="qemu:///system")
    with pytest.raises(KeyboardInterrupt):
        m.launch()
    assert fake["conn"].dom.calls == ["destroy"] and fake["conn"].closed


def test_context_manager_kills_on_error(fake: dict[str, Any], tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError),
        lv.LibvirtMachine(spec(workdir=tmp_path), uri="qemu:///system"),
    ):
        raise RuntimeError("boom")
    assert fake["conn"].dom.calls == ["destroy"]


def test_guest_addresses_prefer_leases_then_agent(fake: dict[str, Any], tmp_path: Path) -> None:
    dom = FakeDomain()
    answers = {
        0: {},
        1: {
            "lo": {"addrs": [{"type": 0, "addr": "127.0.0.1", "prefix": 8}]},
            "eth0": {"addrs": [{"type": 1, "addr": "fe80::1", "prefix": 64},
                               {"type": 0, "addr": "192.168.122.50", "prefix": 24}]},
        },
    }  # fmt: skip
    dom.interfaceAddresses = lambda source: answers[source]  # type: ignore[attr-defined]
    fake["conn"] = FakeConn(dom)
    m = lv.LibvirtMachine(spec(workdir=tmp_path), uri="qemu:///system", network="default")
    m._dom = dom
    assert m.guest_addresses() == ["192.168.122.50"]
    answers[0] = {"vnet0": {"addrs": [{"type": 0, "addr": "192.168.122.7", "prefix": 24}]}}
    assert m.guest_addresses() == ["192.168.122.7"]


# --- the relay used on a named network -----------------------------------------


def test_relay_forwards_once_the_guest_has_an_address() -> None:
    upstream = socket.create_server(("127.0.0.1", 0))
    up_port = upstream.getsockname()[1]

    def echo_once() -> None:
        conn, _ = upstream.accept()
        with conn:
            conn.sendall(b"SSH-2.0-fake\r\n")
            conn.sendall(conn.recv(100).upper())

    threading.Thread(target=echo_once, daemon=True).start()
    target: list[tuple[str, int]] = []
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    relay = lv._TcpRelay(port, lambda: target[0] if target else None)
    relay.start()
    try:
        # No address yet: the connection is closed at once, like a guest not up.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            assert c.recv(100) == b""
        target.append(("127.0.0.1", up_port))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            assert c.recv(100) == b"SSH-2.0-fake\r\n"
            c.sendall(b"hello")
            assert c.recv(100) == b"HELLO"
    finally:
        relay.stop()
        upstream.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_destroy_command_for_a_kept_domain(fake: dict[str, Any], tmp_path: Path) -> None:
    m = lv.LibvirtMachine(spec(workdir=tmp_path), uri="qemu:///system")
    assert m.destroy_command == "virsh -c qemu:///system destroy vmbuild-abc123-builder"


def test_ec2_boot_domain_has_ec2_sysinfo_no_seed_and_the_metadata_forward() -> None:
    from dataclasses import replace

    from vmbuild.hypervisor.base import Ec2Boot

    uuid = "ec2a1b2c-0000-4000-8000-000000000001"
    boot = Ec2Boot(
        imds_port=41000, mac="0e:01:02:03:04:05", uuid=uuid,
        instance_id="i-0123456789abcdef0", instance_type="m5.large",
    )  # fmt: skip
    dom = parse(lv.domain_xml(replace(spec(), seed=None, ec2=boot), uri_kind="system"))
    assert dom.findtext("uuid") == uuid
    smbios = dom.find("os/smbios")
    assert smbios is not None and smbios.get("mode") == "sysinfo"
    system = {e.get("name"): e.text for e in dom.iterfind("sysinfo[@type='smbios']/system/entry")}
    assert system == {
        "manufacturer": "Amazon EC2", "product": "m5.large", "serial": uuid, "uuid": uuid,
    }  # fmt: skip
    chassis = {e.get("name"): e.text for e in dom.iterfind("sysinfo/chassis/entry")}
    assert chassis == {"manufacturer": "Amazon EC2", "asset": "i-0123456789abcdef0"}
    assert [d.find("target").get("dev") for d in dom.iterfind("devices/disk")] == ["vda"]  # type: ignore[union-attr]
    args = qemu_args(dom)
    assert args[1].endswith(",guestfwd=tcp:169.254.169.254:80-tcp:127.0.0.1:41000")
    assert ",net=169.254.0.0/16,host=169.254.0.2," in args[1]
    assert args[3].endswith(",mac=0e:01:02:03:04:05")


def test_nocloud_domain_has_no_sysinfo() -> None:
    dom = parse(lv.domain_xml(spec(), uri_kind="system"))
    assert dom.find("sysinfo") is None and dom.find("uuid") is None
