"""Bootability checks on an in-memory guest tree (the same checks debugfs feeds on real disks)."""

from __future__ import annotations

import struct

import pytest

from vmbuild.diskfs.lint import Finding, check_root
from vmbuild.diskfs.rootfs import FsInfo, Kind, exists, read_file, resolve

UUID = "5e1f7c2a-9b1d-4c33-8f0e-2a6d1b7c9e01"
KERNEL = "6.1.0-28-cloud-amd64"
ROOT = FsInfo("ext4", UUID, "root")


class FakeFS:
    """A FilesystemView over dicts: files (path -> bytes) and symlinks (path -> target)."""

    def __init__(self, files: dict[str, bytes], links: dict[str, str]) -> None:
        self.files, self.links = files, links
        self.dirs: set[str] = {"/"}
        for path in [*files, *links]:
            parts = path.strip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):
                self.dirs.add("/" + "/".join(parts[:i]))

    def listdir(self, path: str) -> dict[str, Kind] | None:
        path = path.rstrip("/") or "/"
        if path not in self.dirs:
            return None
        prefix = "" if path == "/" else path
        out: dict[str, Kind] = {}
        for entry, kind in [
            *((f, "file") for f in self.files),
            *((link, "symlink") for link in self.links),
            *((d, "dir") for d in self.dirs),
        ]:
            parent, _, name = entry.rpartition("/")
            if name and (parent or "/") == (prefix or "/"):
                out[name] = kind  # type: ignore[assignment]
        return out

    def read(self, path: str) -> bytes | None:
        return self.files.get(path)

    def readlink(self, path: str) -> str | None:
        return self.links.get(path)


def elf(bits: int = 64, machine: int = 0x3E) -> bytes:
    head = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1, 1, 0]) + bytes(8)
    return head + struct.pack("<HHI", 2, machine, 1) + bytes(40)


def good_tree() -> tuple[dict[str, bytes], dict[str, str]]:
    """A clean Debian 12 cloud guest (merged /usr)."""
    files = {
        "/etc/fstab": f"UUID={UUID} / ext4 rw,discard,errors=remount-ro 0 1\n",
        f"/boot/vmlinuz-{KERNEL}": "kernel",
        f"/boot/initrd.img-{KERNEL}": "initrd",
        "/boot/grub/grub.cfg": f"menuentry 'Debian' {{\n  linux /boot/vmlinuz-{KERNEL} "
        f"root=UUID={UUID} ro console=tty0 console=ttyS0,115200n8\n}}\n",
        f"/usr/lib/modules/{KERNEL}/modules.dep": "kernel/drivers/nvme/host/nvme.ko: x\n"
        "kernel/drivers/net/ethernet/amazon/ena/ena.ko:\n",
        f"/usr/lib/modules/{KERNEL}/modules.builtin": "kernel/fs/ext4/ext4.ko\n",
        "/usr/lib/systemd/systemd": elf(),
        "/usr/lib/systemd/systemd-networkd": elf(),
        "/usr/bin/cloud-init": "#!/usr/bin/python3\n",
        "/etc/cloud/cloud.cfg": "users: [default]\n",
        "/etc/cloud/cloud.cfg.d/90-vmbuild.cfg": "datasource_list: [NoCloud, Ec2, None]\n",
        "/usr/lib/systemd/system/cloud-init.service": "",
        "/usr/lib/systemd/system/ssh.service": "",
        "/usr/lib/systemd/system/systemd-networkd.service": "",
        "/usr/sbin/sshd": elf(),
        "/etc/systemd/network/10-dhcp.network": "[Match]\nName=en* eth*\n[Network]\nDHCP=yes\n",
    }
    links = {
        "/lib": "usr/lib",
        "/bin": "usr/bin",
        "/sbin": "usr/sbin",
        "/usr/sbin/init": "../lib/systemd/systemd",
        "/etc/systemd/system/cloud-init.target.wants/cloud-init.service": "/lib/systemd/system/cloud-init.service",
        "/etc/systemd/system/multi-user.target.wants/ssh.service": "/lib/systemd/system/ssh.service",
        "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service": "/lib/systemd/system/systemd-networkd.service",
    }
    return {k: v.encode() if isinstance(v, str) else v for k, v in files.items()}, links


def lint(files: dict[str, bytes], links: dict[str, str], **kwargs: object) -> list[Finding]:
    return check_root(FakeFS(files, links), ROOT, **kwargs)  # type: ignore[arg-type]


def messages(findings: list[Finding], severity: str = "error") -> list[str]:
    return [f"{f.check}: {f.message}" for f in findings if f.severity == severity]


def test_a_clean_guest_has_no_findings() -> None:
    assert lint(*good_tree()) == []


def test_symlinks_resolve_like_the_guest_kernel() -> None:
    fs = FakeFS(*good_tree())
    assert resolve(fs, "/sbin/init") == "/usr/lib/systemd/systemd"
    assert resolve(fs, "/lib/modules") == "/usr/lib/modules"
    assert resolve(fs, "/sbin/init", follow_last=False) == "/usr/sbin/init"
    assert read_file(fs, "/bin/cloud-init") == b"#!/usr/bin/python3\n"
    assert not exists(fs, "/nope")
    loop = FakeFS({}, {"/a": "/b", "/b": "/a"})
    assert resolve(loop, "/a") is None


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            {"/etc/fstab": "/dev/sda1 / ext4 defaults 0 1\n"},
            "fstab: root entry: /dev/sda1 is a device name",
        ),
        (
            {"/etc/fstab": "UUID=00000000-0000-0000-0000-000000000000 / ext4 defaults 0 1\n"},
            "root file system's UUID is " + UUID,
        ),
        ({"/etc/fstab": "LABEL=other / ext4 defaults 0 1\n"}, "label is 'root'"),
        (
            {
                f"/usr/lib/modules/{KERNEL}/modules.dep": "kernel/drivers/net/ethernet/amazon/ena/"
                "ena.ko:\n"
            },
            "drivers: kernel 6.1.0-28-cloud-amd64 has no nvme driver",
        ),
        (
            {f"/usr/lib/modules/{KERNEL}/modules.dep": "kernel/drivers/nvme/host/nvme.ko:\n"},
            "has no ena driver",
        ),
        ({"/boot/grub/grub.cfg": "set timeout=1\n"}, "grub: /boot/grub/grub.cfg has no linux"),
        (
            {"/boot/grub/grub.cfg": f"linux /boot/vmlinuz-{KERNEL} root=/dev/vda1 console=ttyS0\n"},
            "grub: root=/dev/vda1",
        ),
        (
            {
                "/boot/grub/grub.cfg": "linux /boot/vmlinuz-9.9 root=UUID="
                + UUID
                + " console=ttyS0\n"
            },
            "boots /boot/vmlinuz-9.9, which does not exist",
        ),
        (
            {"/etc/cloud/cloud.cfg.d/99-local.cfg": "datasource_list: [NoCloud, None]\n"},
            "cloud-init: datasource_list is ['NoCloud', 'None']",
        ),
        ({"/etc/cloud/cloud-init.disabled": ""}, "cloud-init: /etc/cloud/cloud-init.disabled"),
        ({"/usr/lib/systemd/systemd": elf(bits=32)}, "is a 32-bit binary"),
        ({"/usr/lib/systemd/systemd": elf(machine=0xB7)}, "is not an x86_64 binary"),
    ],
)
def test_what_breaks_boot_on_ec2_is_an_error(edit: dict[str, str | bytes], expected: str) -> None:
    files, links = good_tree()
    files.update({k: v.encode() if isinstance(v, str) else v for k, v in edit.items()})
    errors = messages(lint(files, links))
    assert any(expected in e for e in errors), errors


def test_missing_pieces_are_errors() -> None:
    files, links = good_tree()
    del files["/usr/bin/cloud-init"], files["/etc/cloud/cloud.cfg"]
    del files["/usr/sbin/sshd"]
    assert any("cloud-init is not installed" in e for e in messages(lint(files, links)))
    assert any("no SSH server" in e for e in messages(lint(files, links)))
    files, links = good_tree()
    del links["/etc/systemd/system/multi-user.target.wants/ssh.service"]
    assert "sshd: sshd is installed but not enabled at boot" in messages(lint(files, links))
    del links["/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"]
    assert any(
        "systemd-networkd has a DHCP configuration but is not enabled" in e
        for e in messages(lint(files, links))
    )
    files, links = good_tree()
    for path in [p for p in files if p.startswith("/boot/vmlinuz")]:
        del files[path]
    assert any("no kernel" in e for e in messages(lint(files, links)))


def test_warnings_do_not_stop_an_upload() -> None:
    files, links = good_tree()
    files["/boot/grub/grub.cfg"] = files["/boot/grub/grub.cfg"].replace(
        b" console=tty0 console=ttyS0,115200n8", b""
    )
    files["/etc/fstab"] += (
        b"/dev/sdb1 /data ext4 defaults 0 2\n/dev/sdc1 /scratch ext4 nofail 0 2\n"
    )
    files["/etc/initramfs-tools/initramfs.conf"] = b"MODULES=dep\n"
    del files[f"/boot/initrd.img-{KERNEL}"]
    findings = lint(files, links)
    assert messages(findings) == []
    warnings = messages(findings, "warning")
    assert any(w.startswith("console: no console=ttyS0") for w in warnings)
    assert any("/data is mounted by device name /dev/sdb1" in w for w in warnings)
    assert not any("/scratch" in w for w in warnings)  # nofail: a missing disk is tolerated
    assert any("MODULES=dep" in w for w in warnings)
    assert any("no initramfs" in w for w in warnings)


def test_ena_missing_is_only_a_warning_without_ena_support() -> None:
    files, links = good_tree()
    files[f"/usr/lib/modules/{KERNEL}/modules.dep"] = b"kernel/drivers/nvme/host/nvme.ko:\n"
    findings = lint(files, links, ena_support=False)
    assert messages(findings) == []
    assert any("no ena driver" in w for w in messages(findings, "warning"))


def test_builtin_nvme_counts() -> None:
    files, links = good_tree()
    files[f"/usr/lib/modules/{KERNEL}/modules.dep"] = (
        b"kernel/drivers/net/ethernet/amazon/ena/ena.ko:\n"
    )
    files[f"/usr/lib/modules/{KERNEL}/modules.builtin"] = b"kernel/drivers/nvme/host/nvme.ko\n"
    assert messages(lint(files, links)) == []


@pytest.mark.parametrize(
    "network",
    [
        {"/etc/network/interfaces": b"auto eth0\niface eth0 inet dhcp\n"},
        {
            "/etc/netplan/50-cloud-init.yaml": b"network:\n  ethernets:\n    ens5:\n      "
            b"dhcp4: true\n"
        },
        {"/usr/sbin/NetworkManager": elf()},
    ],
)
def test_other_network_stacks_with_dhcp_pass(network: dict[str, bytes]) -> None:
    files, links = good_tree()
    del files["/etc/systemd/network/10-dhcp.network"]
    files.update(network)
    assert [f for f in lint(files, links) if f.check == "network"] == []


def test_without_dhcp_config_cloud_init_rendering_is_accepted_unless_disabled() -> None:
    files, links = good_tree()
    del files["/etc/systemd/network/10-dhcp.network"]
    assert messages(lint(files, links), "info") == [
        "network: no static DHCP configuration; cloud-init renders one from EC2's metadata "
        "at first boot"
    ]
    files["/etc/cloud/cloud.cfg.d/99-net.cfg"] = b"network: {config: disabled}\n"
    assert any("no DHCP configuration for the first NIC" in e for e in messages(lint(files, links)))


def test_a_network_file_for_another_nic_does_not_count() -> None:
    files, links = good_tree()
    files["/etc/systemd/network/10-dhcp.network"] = b"[Match]\nName=wlan0\n[Network]\nDHCP=yes\n"
    files["/etc/cloud/cloud.cfg.d/99-net.cfg"] = b"network: {config: disabled}\n"
    assert any("no DHCP configuration" in e for e in messages(lint(files, links)))
