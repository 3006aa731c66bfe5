"""The metadata service over real HTTP on 127.0.0.1: IMDSv2 tokens and their TTL,
IMDSv1 refused when tokens are required, EC2's listings and 404s, the request log,
and nothing left running after the `with` block."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
from collections.abc import Iterator

import pytest

from vmbuild.hypervisor import imds
from vmbuild.hypervisor.imds import Instance, MetadataService, Request

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTheTest vmbuild-test@run"
MAC = "0e:12:34:56:78:9a"


def instance(**kw: object) -> Instance:
    settings: dict[str, object] = {
        "instance_id": "i-0123456789abcdef0", "ami_id": "ami-0fedcba9876543210", "mac": MAC,
        "public_keys": [("vmbuild-test", KEY)], "http_tokens": "required",
    }  # fmt: skip
    settings.update(kw)
    return Instance(**settings)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def call(
    port: int, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, str, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), dict(resp.getheaders())
    finally:
        conn.close()


def token(port: int, ttl: int = 21600) -> str:
    status, body, headers = call(port, "PUT", "/latest/api/token", {imds.TTL_HEADER: str(ttl)})
    assert status == 200 and headers[imds.TTL_HEADER] == str(ttl)
    return body


@pytest.fixture
def required() -> Iterator[MetadataService]:
    with MetadataService(instance()) as svc:
        yield svc


def get(svc: MetadataService, path: str, tok: str | None = None) -> tuple[int, str]:
    status, body, _ = call(svc.port, "GET", path, {imds.TOKEN_HEADER: tok} if tok else None)
    return status, body


def test_token_flow_reads_metadata_as_v2(required: MetadataService) -> None:
    tok = token(required.port)
    assert get(required, "/latest/meta-data/instance-id", tok) == (200, "i-0123456789abcdef0")
    assert get(required, "/2021-03-23/meta-data/mac", tok) == (200, MAC)
    assert required.requests == [
        Request("PUT", "/latest/api/token", 200, "v2"),
        Request("GET", "/latest/meta-data/instance-id", 200, "v2"),
        Request("GET", "/2021-03-23/meta-data/mac", 200, "v2"),
    ]


@pytest.mark.parametrize("ttl", ["0", "21601", "-5", "sixty", ""])
def test_token_ttl_out_of_range_is_400(required: MetadataService, ttl: str) -> None:
    status, _, _ = call(required.port, "PUT", "/latest/api/token", {imds.TTL_HEADER: ttl})
    assert status == 400


def test_token_ttl_bounds_and_missing_header(required: MetadataService) -> None:
    assert token(required.port, 1) and token(required.port, 21600)
    assert call(required.port, "PUT", "/latest/api/token")[0] == 400
    # Through a proxy: refused, as EC2 does.
    headers = {imds.TTL_HEADER: "60", "X-Forwarded-For": "10.1.2.3"}
    assert call(required.port, "PUT", "/latest/api/token", headers)[0] == 403
    assert call(required.port, "GET", "/latest/api/token")[0] == 405
    assert call(required.port, "PUT", "/latest/meta-data/", {imds.TTL_HEADER: "60"})[0] == 405


def test_v1_refused_when_tokens_required(required: MetadataService) -> None:
    assert get(required, "/latest/meta-data/instance-id")[0] == 401
    assert get(required, "/latest/meta-data/instance-id", "not-a-token")[0] == 401
    assert [r.status for r in required.requests] == [401, 401]
    assert {r.version for r in required.requests} == {"-"}


def test_v1_allowed_when_optional_but_a_bad_token_is_still_401() -> None:
    with MetadataService(instance(http_tokens="optional")) as svc:
        assert get(svc, "/latest/meta-data/ami-id") == (200, "ami-0fedcba9876543210")
        assert get(svc, "/latest/meta-data/ami-id", "forged")[0] == 401
        assert svc.requests[0] == Request("GET", "/latest/meta-data/ami-id", 200, "v1")


def test_token_expires_after_its_ttl() -> None:
    clock = Clock()
    with MetadataService(instance(), clock=clock) as svc:
        tok = token(svc.port, ttl=10)
        clock.now += 9.5
        assert get(svc, "/latest/meta-data/instance-id", tok)[0] == 200
        clock.now += 0.5
        assert get(svc, "/latest/meta-data/instance-id", tok)[0] == 401
        assert get(svc, "/latest/meta-data/instance-id", token(svc.port, 10))[0] == 200


def test_listings_as_ec2_gives_them(required: MetadataService) -> None:
    tok = token(required.port)
    status, body = get(required, "/latest/meta-data/", tok)
    assert status == 200
    assert body.splitlines() == [
        "ami-id", "ami-launch-index", "ami-manifest-path", "block-device-mapping/", "hostname",
        "instance-action", "instance-id", "instance-life-cycle", "instance-type",
        "local-hostname", "local-ipv4", "mac", "network/", "placement/", "profile",
        "public-keys/", "reservation-id", "security-groups", "services/",
    ]  # fmt: skip
    assert get(required, "/latest/meta-data", tok) == (200, body)  # no slash: the same listing
    assert get(required, "/latest/", tok) == (200, "dynamic\nmeta-data")  # no user-data
    assert get(required, "/", tok)[1].splitlines()[-1] == "latest"
    assert get(required, "/latest/meta-data/public-keys/", tok) == (200, "0=vmbuild-test")
    assert get(required, "/latest/meta-data/public-keys/0/", tok) == (200, "openssh-key")
    assert get(required, "/latest/meta-data/public-keys/0/openssh-key", tok) == (200, KEY)
    assert get(required, "/latest/meta-data/network/interfaces/macs/", tok) == (200, MAC + "/")
    nic = get(required, f"/latest/meta-data/network/interfaces/macs/{MAC}/", tok)[1]
    assert "device-number" in nic.splitlines() and "local-ipv4s" in nic.splitlines()
    assert get(required, f"/latest/meta-data/network/interfaces/macs/{MAC}/mac", tok) == (200, MAC)
    assert get(required, "/latest/meta-data/placement/region", tok) == (200, "us-east-1")
    assert get(required, "/latest/meta-data/placement/availability-zone", tok) == (
        200, "us-east-1a",
    )  # fmt: skip
    assert get(required, "/latest/meta-data/local-ipv4", tok) == (200, imds.GUEST_IP)
    assert get(required, "/latest/meta-data/local-hostname", tok) == (
        200, "ip-169-254-0-15.ec2.internal",
    )  # fmt: skip
    assert get(required, "/latest/dynamic/instance-identity/", tok) == (200, "document")


def test_404s(required: MetadataService) -> None:
    tok = token(required.port)
    for path in (
        "/latest/user-data",  # no user-data: 404, as on EC2
        "/latest/meta-data/iam/info",  # no instance profile
        "/latest/meta-data/nope",
        "/latest/meta-data/instance-id/deeper",
        "/1999-01-01/meta-data/",
    ):
        status, body = get(required, path, tok)
        assert (status, "<title>404 - Not Found</title>" in body) == (404, True), path


def test_user_data_and_identity_document() -> None:
    user_data = b"#cloud-config\nhostname: from-imds\n"
    inst = instance(user_data=user_data, region="eu-west-1", availability_zone="eu-west-1b")
    with MetadataService(inst) as svc:
        tok = token(svc.port)
        assert get(svc, "/latest/", tok)[1] == "dynamic\nmeta-data\nuser-data"
        assert get(svc, "/latest/user-data", tok) == (200, user_data.decode())
        status, doc = get(svc, "/latest/dynamic/instance-identity/document", tok)
        assert status == 200
        parsed = json.loads(doc)
        assert (parsed["instanceId"], parsed["imageId"], parsed["region"]) == (
            "i-0123456789abcdef0", "ami-0fedcba9876543210", "eu-west-1",
        )  # fmt: skip
        assert parsed["availabilityZone"] == "eu-west-1b"
        assert parsed["privateIp"] == imds.GUEST_IP
        assert get(svc, "/latest/meta-data/hostname", tok)[1].endswith(
            ".eu-west-1.compute.internal"
        )


def test_instance_profile_serves_fake_credentials_and_logs_no_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="vmbuild.imds")
    user_data = b"#cloud-config\n# user-data-marker\n"
    with MetadataService(instance(instance_profile="web-role", user_data=user_data)) as svc:
        tok = token(svc.port)
        assert get(svc, "/latest/meta-data/iam/", tok) == (200, "info\nsecurity-credentials/")
        info = json.loads(get(svc, "/latest/meta-data/iam/info", tok)[1])
        assert info["InstanceProfileArn"] == "arn:aws:iam::123456789012:instance-profile/web-role"
        assert get(svc, "/latest/meta-data/iam/security-credentials/", tok) == (200, "web-role")
        creds = json.loads(get(svc, "/latest/meta-data/iam/security-credentials/web-role", tok)[1])
        assert creds["AccessKeyId"] == imds.FAKE_ACCESS_KEY_ID
        assert creds["SecretAccessKey"] == imds.FAKE_SECRET_ACCESS_KEY
        assert get(svc, "/latest/user-data", tok)[0] == 200
    logged = caplog.text
    assert "GET /latest/meta-data/iam/security-credentials/web-role 200 v2" in logged
    for secret in (tok, imds.FAKE_SECRET_ACCESS_KEY, imds.FAKE_SESSION_TOKEN, "user-data-marker"):
        assert secret not in logged


def test_one_stream_carries_many_requests(required: MetadataService) -> None:
    """QEMU's guest forward is one connection for every guest connection: requests
    follow each other on it, and a client's `Connection: close` does not end it."""
    with socket.create_connection(("127.0.0.1", required.port), timeout=10) as s:
        reader = s.makefile("rb")

        def exchange(raw: str) -> tuple[int, bytes]:
            s.sendall(raw.encode())
            status = int(reader.readline().split()[1])
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            return status, reader.read(length)

        put = f"PUT /latest/api/token HTTP/1.1\r\nHost: {imds.ADDRESS}\r\n{imds.TTL_HEADER}: 60\r\n"
        status, tok = exchange(put + "Connection: close\r\n\r\n")
        assert status == 200
        get_id = (
            f"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: {imds.ADDRESS}\r\n"
            f"{imds.TOKEN_HEADER}: {tok.decode()}\r\nConnection: close\r\n\r\n"
        )
        assert exchange(get_id) == (200, b"i-0123456789abcdef0")
        assert exchange(get_id) == (200, b"i-0123456789abcdef0")
        reader.close()


def test_leaves_nothing_behind() -> None:
    before = set(threading.enumerate())
    svc = MetadataService(instance())
    with svc:
        port = svc.port
        # A connection left open, as QEMU's is for the VM's whole life.
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert get(svc, "/latest/meta-data/instance-id")[0] == 401
    try:
        assert set(threading.enumerate()) == before
        assert held.recv(1) == b""  # closed by the service
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
    finally:
        held.close()
