"""Lint checks of the guest's services: cloud-init with the Ec2 datasource, sshd, DHCP.

Split from `lint.py` (the disk, kernel and boot loader checks); same FilesystemView input.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import yaml

from vmbuild.diskfs.lint_report import Finding
from vmbuild.diskfs.rootfs import FilesystemView, exists, read_file, resolve

FIRST_NIC_NAMES = ("ens5", "eth0", "enX0")  # Nitro predictable name, Xen, net.ifnames=0


def _text(fs: FilesystemView, path: str) -> str | None:
    data = read_file(fs, path)
    return None if data is None else data.decode("utf-8", "replace")


def _cloud_config(fs: FilesystemView) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    names = sorted(
        n
        for n in (fs.listdir(resolve(fs, "/etc/cloud/cloud.cfg.d") or "/-") or {})
        if n.endswith(".cfg")
    )
    for path in ["/etc/cloud/cloud.cfg", *(f"/etc/cloud/cloud.cfg.d/{n}" for n in names)]:
        text = _text(fs, path)
        if not text:
            continue
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            continue
        if isinstance(data, dict):
            merged.update(data)  # later files win, key by key, as cloud-init merges top level
    return merged


def check_cloud_init(fs: FilesystemView) -> list[Finding]:
    """cloud-init installed, enabled, and allowed to use the Ec2 datasource."""
    if not exists(fs, "/usr/bin/cloud-init") and not exists(fs, "/etc/cloud/cloud.cfg"):
        return [
            Finding(
                "error",
                "cloud-init",
                "cloud-init is not installed: instances get no SSH key, user or user-data",
                "install cloud-init",
            )
        ]
    out: list[Finding] = []
    if exists(fs, "/etc/cloud/cloud-init.disabled"):
        out.append(Finding("error", "cloud-init", "/etc/cloud/cloud-init.disabled exists"))
    wants = [
        "/etc/systemd/system/cloud-init.target.wants/cloud-init.service",
        "/etc/systemd/system/multi-user.target.wants/cloud-init.service",
        "/etc/systemd/system/cloud-init.target.wants/cloud-init-local.service",
    ]
    if not any(exists(fs, w) or resolve(fs, w, follow_last=False) for w in wants):
        out.append(Finding("warning", "cloud-init", "cloud-init's systemd units are not enabled"))
    datasources = _cloud_config(fs).get("datasource_list")
    if isinstance(datasources, list) and "Ec2" not in datasources:
        out.append(
            Finding(
                "error",
                "cloud-init",
                f"datasource_list is {datasources}: without Ec2 cloud-init ignores "
                "EC2's metadata (no SSH key, no user-data)",
                "add Ec2 to datasource_list",
            )
        )
    return out


def check_sshd(fs: FilesystemView) -> list[Finding]:
    """An SSH server that starts at boot."""
    if not exists(fs, "/usr/sbin/sshd"):
        return [
            Finding("error", "sshd", "no SSH server (/usr/sbin/sshd)", "install openssh-server")
        ]
    wants = [
        "/etc/systemd/system/multi-user.target.wants/ssh.service",
        "/etc/systemd/system/multi-user.target.wants/sshd.service",
        "/etc/systemd/system/sockets.target.wants/ssh.socket",
    ]
    if not any(resolve(fs, w, follow_last=False) for w in wants):
        return [
            Finding(
                "error", "sshd", "sshd is installed but not enabled at boot", "systemctl enable ssh"
            )
        ]
    return []


def _networkd_dhcp(fs: FilesystemView) -> bool:
    for directory in ("/etc/systemd/network", "/usr/lib/systemd/network", "/run/systemd/network"):
        real = resolve(fs, directory)
        for name in sorted((fs.listdir(real) or {}) if real else {}):
            if not name.endswith(".network"):
                continue
            text = _text(fs, f"{real}/{name}") or ""
            patterns = re.findall(r"^\s*Name\s*=\s*(.+)$", text, re.M)
            names = [p for line in patterns for p in line.split()]
            matches = not patterns or any(
                fnmatch.fnmatch(nic, pat) for pat in names for nic in FIRST_NIC_NAMES
            )
            dhcp = re.search(r"^\s*DHCP\s*=\s*(yes|true|ipv4|both)\s*$", text, re.M | re.I)
            if matches and dhcp:
                return True
    return False


def _other_dhcp(fs: FilesystemView) -> str | None:
    interfaces = _text(fs, "/etc/network/interfaces") or ""
    for name in sorted(fs.listdir(resolve(fs, "/etc/network/interfaces.d") or "/-") or {}):
        interfaces += _text(fs, f"/etc/network/interfaces.d/{name}") or ""
    if re.search(
        r"^\s*iface\s+(" + "|".join(FIRST_NIC_NAMES) + r")\s+inet\s+dhcp", interfaces, re.M
    ):
        return "ifupdown"
    for name in sorted(fs.listdir(resolve(fs, "/etc/netplan") or "/-") or {}):
        if re.search(r"dhcp4:\s*(true|yes)", _text(fs, f"/etc/netplan/{name}") or ""):
            return "netplan"
    if exists(fs, "/usr/sbin/NetworkManager"):
        return "NetworkManager"
    return None


def check_network(fs: FilesystemView) -> list[Finding]:
    """DHCP on the first NIC, by a network stack that starts at boot."""
    if _networkd_dhcp(fs):
        enabled = any(
            resolve(fs, f"/etc/systemd/system/{t}/systemd-networkd.{u}", follow_last=False)
            for t, u in (
                ("multi-user.target.wants", "service"),
                ("sockets.target.wants", "socket"),
                ("network-online.target.wants", "service"),
            )
        )
        if enabled:
            return []
        return [
            Finding(
                "error",
                "network",
                "systemd-networkd has a DHCP configuration but is not enabled",
                "systemctl enable systemd-networkd",
            )
        ]
    if _other_dhcp(fs):
        return []
    config = _cloud_config(fs)
    network = config.get("network")
    disabled = isinstance(network, dict) and network.get("config") == "disabled"
    renderer = any(
        exists(fs, p) for p in ("/lib/systemd/systemd-networkd", "/sbin/ifup", "/usr/sbin/netplan")
    )
    if exists(fs, "/usr/bin/cloud-init") and not disabled and renderer:
        return [
            Finding(
                "info",
                "network",
                "no static DHCP configuration; cloud-init renders "
                "one from EC2's metadata at first boot",
            )
        ]
    return [
        Finding(
            "error",
            "network",
            "no DHCP configuration for the first NIC "
            f"({'/'.join(FIRST_NIC_NAMES)}): the instance would have no network",
            "add a systemd-networkd .network file with DHCP=yes",
        )
    ]
