"""The NoCloud seed: an ISO 9660 volume labelled `cidata` with user-data and meta-data.

Built in pure Python (pycdlib): no xorriso/genisoimage on the host, and the
seed is a context-managed file that is removed with the VM's work dir.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import pycdlib
import yaml

from vmbuild.cache import aptproxy
from vmbuild.remote.keys import KeyPair


@dataclass(frozen=True)
class SeedConfig:
    instance_id: str
    hostname: str
    user: str
    client_key: KeyPair  # the authorized key for `user`
    host_key: KeyPair  # installed as the guest's only SSH host key, pinned by vmbuild
    grow_root: bool = True
    # The host package cache as the guest reaches it (http://10.0.2.2:PORT), or None.
    apt_proxy: str | None = None
    # Only cloud-init's init stage (write_files, growpart, users, ssh): no
    # config/final modules racing the build's own apt/debconf runs, and
    # cloud-init is done at the first login.
    minimal_cloud_init: bool = False
    # apt_proxy is an offline rebuild's bundle mirror (vmbuild.supply.mirror).
    apt_offline: bool = False
    # A builder or scratch VM: apt skips the translation indexes while it works
    # (aptproxy.guest_apt_conf says why); generalize removes the setting.
    builder_apt: bool = False
    # The ec2 boot mode: the login key is the instance's public key from IMDS
    # (cloud-init gives it to the default user, as on EC2), so the user-data
    # only makes `user` that default user, and carries no key of its own.
    key_from_metadata: bool = False


def user_data(cfg: SeedConfig) -> str:
    user: dict[str, object] = {
        "name": cfg.user,
        "gecos": "vmbuild",
        "sudo": "ALL=(ALL) NOPASSWD:ALL",
        "shell": "/bin/bash",
        "lock_passwd": True,
    }
    doc: dict[str, object] = {}
    if cfg.key_from_metadata:
        # The image's `users: [default]` creates it; cc_ssh gives it the key.
        doc["system_info"] = {"default_user": user}
    else:
        doc["users"] = [{**user, "ssh_authorized_keys": [cfg.client_key.public_openssh]}]
    doc |= {
        # No `ssh_pwauth`: any value makes cloud-init's set_passwords module
        # restart sshd during modules:config, resetting a login in progress.
        "disable_root": True,
        # Our host key replaces any baked into the image. No other type is
        # generated (RSA would cost ~9 s under TCG and be unpinned anyway):
        # cc_ssh generates keys only when `ssh_keys` is absent. An empty
        # `ssh_genkeytypes` would say the same but breaks the schema (minItems
        # 1), and cloud-init then logs "Invalid cloud-config provided" at
        # every boot, hiding a real mistake behind a routine warning.
        "ssh_deletekeys": True,
        "ssh_keys": {
            "ed25519_private": cfg.host_key.private_openssh,
            "ed25519_public": cfg.host_key.public_openssh,
        },
        "growpart": {"mode": "auto" if cfg.grow_root else "off", "devices": ["/"]},
        "resize_rootfs": cfg.grow_root,
        "locale": "C.UTF-8",
    }
    if cfg.minimal_cloud_init:
        doc["cloud_config_modules"] = []
        doc["cloud_final_modules"] = []
    apt_conf = aptproxy.guest_apt_conf(
        cfg.apt_proxy, builder=cfg.builder_apt, offline=cfg.apt_offline
    )
    if apt_conf is not None:
        # write_files runs in the init stage, before the first SSH login works.
        doc["write_files"] = [
            {"path": aptproxy.GUEST_CONF, "permissions": "0644", "content": apt_conf}
        ]
    return "#cloud-config\n" + yaml.safe_dump(doc, sort_keys=False)


def meta_data(cfg: SeedConfig) -> str:
    return yaml.safe_dump({"instance-id": cfg.instance_id, "local-hostname": cfg.hostname})


def write_seed(cfg: SeedConfig, path: Path) -> Path:
    files = {"user-data": user_data(cfg), "meta-data": meta_data(cfg)}
    iso = pycdlib.PyCdlib()
    # Joliet and Rock Ridge keep the lower-case, dashed names cloud-init looks for.
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, text in files.items():
        data = text.encode()
        iso_name = "/" + name.replace("-", "_").upper() + ".;1"
        iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path="/" + name)
    tmp = path.with_name(path.name + ".tmp")
    # The seed carries the guest's SSH host private key: 0600 from the first byte.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    os.chmod(tmp, 0o600)
    try:
        iso.write(str(tmp))
    finally:
        iso.close()
    tmp.replace(path)
    return path
