"""pytest plugin (`-p vmbuild.testing.chroot_ssh`): testinfra hosts inside a chroot on an
SSH host, for a container recipe's testinfra files.

A container image is tested where it was built: its layers mounted (overlayfs) in the
builder VM. testinfra has a local `chroot` backend and an SSH one, not both at once, so
this registers `vmbuild-chroot://USER@HOST:PORT?sudo=true`: testinfra's paramiko backend
whose every command runs as `chroot $VMBUILD_TESTINFRA_CHROOT /bin/sh -c COMMAND` (inside
sudo when asked). Modules (`host.file`, `host.package`, `host.user`...) then see the
image's files and package database, not the builder's.
"""

from __future__ import annotations

import os
from typing import Any

import testinfra.backend
from testinfra.backend.paramiko import ParamikoBackend

NAME = "vmbuild-chroot"
ROOT_ENV = "VMBUILD_TESTINFRA_CHROOT"


class ChrootOverSsh(ParamikoBackend):  # type: ignore[misc]  # testinfra is untyped here
    NAME = NAME

    def get_command(self, command: str, *args: str) -> str:
        root = os.environ[ROOT_ENV]
        inner = self.quote(command, *args)
        # chroot inside sudo: only root may chroot.
        return str(super().get_command(self.quote("chroot %s /bin/sh -c %s", root, inner)))


def pytest_configure(config: Any) -> None:
    testinfra.backend.BACKENDS[NAME] = f"{__name__}.ChrootOverSsh"
