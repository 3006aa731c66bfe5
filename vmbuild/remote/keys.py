"""SSH keys vmbuild generates: a per-VM client key and a guest host key it pins."""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


@dataclass(frozen=True)
class KeyPair:
    private_openssh: str = field(repr=False)  # "-----BEGIN OPENSSH PRIVATE KEY-----..."
    public_openssh: str  # "ssh-ed25519 AAAA... comment"

    @property
    def public_blob(self) -> bytes:
        return base64.b64decode(self.public_openssh.split()[1])

    @property
    def fingerprint(self) -> str:
        """As `ssh-keygen -lf` prints it: SHA256:<base64 without padding>."""
        digest = hashlib.sha256(self.public_blob).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def write_private(self, path: Path) -> Path:
        """Write the private key readable by the owner only (ssh refuses it otherwise)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.private_openssh)
        return path


def generate_ed25519(comment: str) -> KeyPair:
    # ed25519: generating it costs nothing, where cloud-init's RSA-3072 host
    # key costs ~9 s of guest time under TCG.
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )
    return KeyPair(private, f"{public} {comment}")
