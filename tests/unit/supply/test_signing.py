from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from vmbuild.supply import signing
from vmbuild.supply.signing import KeyPaths, SigningError, VerificationFailed


def test_generate_writes_a_0600_private_key_under_the_config_dir(config_dir: Path) -> None:
    where = signing.generate_local_key()
    assert where.private == config_dir / "signing.key"
    assert stat.S_IMODE(where.private.stat().st_mode) == 0o600
    assert where.private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert where.public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert signing.load_public_key(where.public).keytype == "ed25519"
    assert {p.name for p in config_dir.iterdir()} == {"signing.key", "signing.pub"}


def test_generate_refuses_to_replace_a_key_unless_forced(local_key: KeyPaths) -> None:
    before = local_key.private.read_bytes()
    with pytest.raises(SigningError, match="a signing key already exists"):
        signing.generate_local_key()
    assert local_key.private.read_bytes() == before
    signing.generate_local_key(force=True)
    assert local_key.private.read_bytes() != before


def test_a_private_key_readable_by_others_is_refused(local_key: KeyPaths) -> None:
    local_key.private.chmod(0o644)
    with pytest.raises(SigningError, match="readable by others"):
        signing.local_signer()


def test_envelope_round_trip_and_tampering(local_key: KeyPaths) -> None:
    signer = signing.local_signer()
    envelope = signing.sign(b'{"hello": 1}', signer)
    assert envelope.payload_type == "application/vnd.in-toto+json"
    keys = [signing.load_public_key(local_key.public)]
    signing.verify(envelope, keys, Path("p.json"))

    data = envelope.to_dict()
    data["payload"] = data["payload"][:-4] + "AAA="
    tampered = type(envelope).from_dict(json.loads(json.dumps(data)))
    with pytest.raises(VerificationFailed, match=r"p\.json: the signature does not verify"):
        signing.verify(tampered, keys, Path("p.json"))


def test_a_wrong_key_does_not_verify(local_key: KeyPaths, tmp_path: Path) -> None:
    envelope = signing.sign(b"{}", signing.local_signer())
    other = signing.generate_local_key(force=True)
    with pytest.raises(VerificationFailed, match="does not verify with the trusted key"):
        signing.verify(envelope, [signing.load_public_key(other.public)], tmp_path / "x")


def test_an_unsigned_envelope_is_refused(config_dir: Path) -> None:
    envelope = signing.sign(b"{}", None)
    assert envelope.signatures == {}
    with pytest.raises(VerificationFailed, match="not signed"):
        signing.verify(envelope, [], Path("x"))


def test_no_trusted_key_is_a_clear_error(config_dir: Path) -> None:
    with pytest.raises(SigningError, match="no key to verify the signature with"):
        signing.trusted_keys()


def test_a_public_key_file_that_is_not_pem(tmp_path: Path) -> None:
    bad = tmp_path / "key.pub"
    bad.write_text("ssh-ed25519 AAAA...\n")
    with pytest.raises(SigningError, match=r"key\.pub: not a PEM public key"):
        signing.load_public_key(bad)
