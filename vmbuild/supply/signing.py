"""Keys the user controls, and DSSE envelopes signed and verified with them.

Two kinds of key: a local ed25519 key pair (`vmbuild key generate`, private half 0600 under
the config dir) or an AWS KMS asymmetric key, signed through the KMS API so the private key
never leaves KMS. The envelope format and the signers come from securesystemslib; nothing
here builds a signature by hand.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.dsse import Envelope
from securesystemslib.exceptions import VerificationError as SslibVerificationError
from securesystemslib.signer import CryptoSigner, Key, Signer, SSlibKey

from vmbuild import paths
from vmbuild.errors import VmbuildError

PAYLOAD_TYPE = "application/vnd.in-toto+json"
PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"
KMS_ENV = "VMBUILD_KMS_KEY"


class SigningError(VmbuildError):
    """A key could not be made, loaded or used."""


class VerificationFailed(VmbuildError):
    """An artifact or bundle does not match its signed provenance; names the file."""


@dataclass(frozen=True)
class KeyPaths:
    private: Path
    public: Path


def local_key_paths() -> KeyPaths:
    base = paths.config_dir()
    return KeyPaths(base / PRIVATE_NAME, base / PUBLIC_NAME)


def generate_local_key(*, force: bool = False) -> KeyPaths:
    """A new ed25519 key pair under the config dir; the private key is 0600 from birth."""
    where = local_key_paths()
    if where.private.exists() and not force:
        raise SigningError(
            f"{where.private}: a signing key already exists",
            hint="pass --force to replace it (artifacts signed with the old key then need "
            "its public key to verify)",
        )
    where.private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Written under a temporary name with 0600 from open(), then renamed: the private key is
    # never readable by others, not even for an instant, and a crash leaves no half key.
    tmp = where.private.with_name(f".{PRIVATE_NAME}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        os.replace(tmp, where.private)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    where.public.write_bytes(pub)
    return where


def load_public_key(path: Path) -> SSlibKey:
    """A PEM public key file (ed25519, ECDSA or RSA) as a verification key."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"{path}: cannot read the public key: {exc.strerror}") from None
    try:
        crypto_key = serialization.load_pem_public_key(data)
        return SSlibKey.from_crypto(crypto_key)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path}: not a PEM public key ({exc})") from None


def local_signer() -> CryptoSigner | None:
    """The local key's signer, or None when `vmbuild key generate` was never run."""
    where = local_key_paths()
    if not where.private.exists():
        return None
    mode = where.private.stat().st_mode & 0o777
    if mode & 0o077:
        raise SigningError(
            f"{where.private}: the private key is readable by others (mode {mode:o})",
            hint=f"chmod 600 {where.private}",
        )
    try:
        private = serialization.load_pem_private_key(where.private.read_bytes(), None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{where.private}: not a PEM private key ({exc})") from None
    return CryptoSigner(private)


def kms_public_key(key_id: str) -> SSlibKey:
    """The public half of a KMS asymmetric signing key, fetched through the KMS API."""
    import boto3
    from securesystemslib.signer import AWSSigner

    try:
        meta = boto3.client("kms").describe_key(KeyId=key_id)["KeyMetadata"]
        # A disabled key or one pending deletion (an "expired" key) is named as such
        # instead of surfacing as whatever the Sign call would answer.
        if meta.get("KeyState") != "Enabled":
            raise SigningError(f"KMS key {key_id}: the key is {meta.get('KeyState')}")
        if meta.get("KeyUsage") != "SIGN_VERIFY":
            raise SigningError(
                f"KMS key {key_id}: KeyUsage is {meta.get('KeyUsage')}, not SIGN_VERIFY",
                hint="create an asymmetric signing key (e.g. KeySpec ECC_NIST_P256)",
            )
        _uri, key = AWSSigner.import_(key_id)
    except SigningError:
        raise
    except Exception as exc:  # botocore ClientError/EndpointConnectionError, ValueError
        raise SigningError(f"KMS key {key_id}: {_describe(exc)}") from None
    return key


def public_key_pem(kms_key: str | None = None) -> bytes:
    """The verification key as PEM (SubjectPublicKeyInfo): the local public key, or the
    public half of a KMS key (checked as kms_public_key checks it). An air-gapped host
    verifies with it (`verify --key FILE`) without reaching KMS."""
    if kms_key is None:
        where = local_key_paths().public
        if not where.exists():
            raise SigningError(
                f"no signing key in {where.parent}", hint="create one: vmbuild key generate"
            )
        load_public_key(where)  # a PEM public key, or one clear error naming the file
        return where.read_bytes()
    import boto3

    kms_public_key(kms_key)
    try:
        der = boto3.client("kms").get_public_key(KeyId=kms_key)["PublicKey"]
        public = serialization.load_der_public_key(der)
    except Exception as exc:  # botocore ClientError, a malformed answer
        raise SigningError(f"KMS key {kms_key}: {_describe(exc)}") from None
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


KMS_RAW_LIMIT = 4096  # the largest message KMS Sign accepts as RAW


def kms_signer(key_id: str) -> Signer:
    """A signer that asks KMS to sign each payload with `key_id` (the key never leaves KMS)."""
    from securesystemslib.signer import AWSSigner, Signature

    class _KmsSigner(AWSSigner):
        # A payload KMS accepts whole is sent RAW and KMS hashes it; only a larger one is
        # hashed here and sent as DIGEST. Both give the same standard signature (and
        # emulators that do not implement DIGEST, such as moto, still sign correctly).
        def sign(self, payload: bytes) -> Signature:
            if len(payload) > KMS_RAW_LIMIT:
                return super().sign(payload)
            response = self.client.sign(
                KeyId=self.aws_key_id,
                Message=payload,
                MessageType="RAW",
                SigningAlgorithm=self.aws_algo,
            )
            return Signature(self.public_key.keyid, response["Signature"].hex())

    return _KmsSigner(key_id, kms_public_key(key_id))


def _describe(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        err = response["Error"]
        return f"{err.get('Code')}: {err.get('Message')}"
    return str(exc) or type(exc).__name__


def default_signer() -> tuple[Signer | None, str]:
    """The key builds sign with: `$VMBUILD_KMS_KEY`, else the local key; and its label."""
    kms = os.environ.get(KMS_ENV)
    if kms:
        return kms_signer(kms), f"awskms:{kms}"
    signer = local_signer()
    if signer is None:
        return None, "unsigned"
    return signer, f"local:{local_key_paths().private}"


def trusted_keys(public_key: Path | None = None, kms_key: str | None = None) -> list[Key]:
    """Keys a verification accepts: the ones named, else the local key, else `$VMBUILD_KMS_KEY`."""
    if public_key is not None:
        return [load_public_key(public_key)]
    if kms_key:
        return [kms_public_key(kms_key)]
    local = local_key_paths().public
    if local.exists():
        return [load_public_key(local)]
    env_kms = os.environ.get(KMS_ENV)
    if env_kms:
        return [kms_public_key(env_kms)]
    raise SigningError(
        "no key to verify the signature with",
        hint="pass --key PUBLIC.pem or --kms-key ARN (or create a local key: vmbuild key generate)",
    )


def sign(payload: bytes, signer: Signer | None) -> Envelope:
    """A DSSE envelope around `payload`; no signature when `signer` is None (unsigned store)."""
    envelope = Envelope(payload=payload, payload_type=PAYLOAD_TYPE, signatures={})
    if signer is not None:
        try:
            envelope.sign(signer)
        except Exception as exc:  # KMS: disabled/pending-deletion/unknown key, no endpoint
            raise SigningError(f"signing failed: {_describe(exc)}") from None
    return envelope


def verify(envelope: Envelope, keys: list[Key], where: Path) -> None:
    """Raise VerificationFailed unless a signature by one of `keys` covers the payload."""
    if not envelope.signatures:
        raise VerificationFailed(
            f"{where}: the provenance is not signed",
            hint="sign it (vmbuild sign REF) or pass --allow-unsigned",
        )
    try:
        envelope.verify(keys, 1)
    except SslibVerificationError:
        known = ", ".join(sorted(envelope.signatures)) or "none"
        raise VerificationFailed(
            f"{where}: the signature does not verify with the trusted key "
            f"({', '.join(k.keyid[:16] for k in keys)}); signed by {known[:16]}",
            hint="the file was changed after signing, or it was signed with another key",
        ) from None
