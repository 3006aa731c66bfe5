"""The EC2 instance metadata service (IMDS), served by vmbuild on the host for a
test VM booted "as on EC2" (`tests: {boot: ec2}`).

How the guest reaches it
------------------------
The guest asks 169.254.169.254:80, as on EC2. QEMU's user network (libslirp)
forwards that one address and port to this service with
`guestfwd=tcp:169.254.169.254:80-tcp:127.0.0.1:PORT`:

- libslirp accepts a guest forward only for an address *inside* the user
  network (libslirp's check_guestfwd: not the gateway, not the DNS address),
  so an ec2-mode VM's user network is 169.254.0.0/16: gateway 169.254.0.2 (the
  host's loopback, so the package cache stays reachable), DNS 169.254.169.253
  (EC2's resolver address), the guest at 169.254.0.15.
- The `cmd:` form of guestfwd (a process per guest connection) would give one
  host connection per guest connection, but libvirt starts QEMU with
  `-sandbox ...,spawn=deny`, under which QEMU cannot start a process: the
  chardev form works on both backends. Its one limit: QEMU opens ONE TCP
  connection to this service when it starts and carries every guest
  connection over it, one after another. The service therefore reads HTTP/1.1
  requests off that stream in order and never closes it (a `Connection: close`
  from a guest client does not end it); the guest clients' requests are
  sequential (cloud-init's are), concurrent ones to IMDS from one guest would
  mix. Responses always say `Connection: close`, so guest clients never try
  to reuse a connection QEMU has already moved on from.
- There is no IPv6 endpoint (fd00:ec2::254) and no hop limit: slirp does not
  route, so `http_put_response_hop_limit` has nothing to act on.

What it serves
--------------
IMDSv2 (`PUT /latest/api/token` with a TTL of 1..21600 s, tokens that expire)
and IMDSv1 unless `http_tokens: required`, the meta-data tree cloud-init's Ec2
datasource and the usual agents read, `user-data` (404 when there is none, as
on EC2) and `dynamic/instance-identity/document` (unsigned: no pkcs7 or
signature, there is no AWS key to sign with). IAM credentials, when a profile
is set, are fixed, obviously fake values. Every request is logged (method,
path, status, v1/v2) to the run log; bodies, tokens and headers never are.

The server is the standard library's http.server: an HTTP/1.1 keep-alive
handler that reads requests in order off one connection is exactly what the
guest forward needs, and it adds no dependency; the frameworks' servers
(werkzeug, aiohttp) bring more than this small, fixed tree uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Literal, Self

from vmbuild.hypervisor.guest_http import GuestForwardServer

log = logging.getLogger("vmbuild.imds")

# The guest side of the ec2-mode user network (see the module docstring).
ADDRESS = "169.254.169.254"
NETWORK = "169.254.0.0/16"
GATEWAY = "169.254.0.2"
DNS = "169.254.169.253"
GUEST_IP = "169.254.0.15"

TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TTL = 21600
# The API versions EC2 lists at `/`; cloud-init asks for a dated one (2021-03-23,
# else 2018-09-24, 2016-09-02, 2009-04-04). Every one serves the same tree.
VERSIONS = (
    "1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15",
    "2008-02-01", "2008-09-01", "2009-04-04", "2011-01-01", "2011-05-01", "2012-01-12",
    "2014-02-25", "2014-11-05", "2015-10-20", "2016-04-19", "2016-06-30", "2016-09-02",
    "2018-03-28", "2018-08-17", "2018-09-24", "2019-10-01", "2020-10-27", "2021-01-03",
    "2021-03-23", "2021-07-15", "2022-09-24", "2024-04-11", "latest",
)  # fmt: skip
# Obviously fake, never a credential: what iam/security-credentials/ROLE serves.
FAKE_ACCESS_KEY_ID = "ASIAVMBUILDIMDSFAKE0"
FAKE_SECRET_ACCESS_KEY = "vmbuild-imds-fake-secret-not-a-credential"
FAKE_SESSION_TOKEN = "vmbuild-imds-fake-session-token-not-a-credential"

HttpTokens = Literal["required", "optional"]


@dataclass(frozen=True)
class Ec2Settings:
    """How the test VM is dressed as an EC2 instance (the recipe's `tests.imds`)."""

    http_tokens: HttpTokens = "required"
    instance_type: str = "t3.micro"
    region: str = "us-east-1"
    availability_zone: str | None = None  # None: the region's "a" zone
    instance_profile: str | None = None


def ec2_uuid() -> str:
    """An SMBIOS system UUID as EC2's start: with "ec2" (valid hex, as on Nitro)."""
    raw = "ec2" + secrets.token_hex(16)[3:]
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


@dataclass(frozen=True)
class Instance:
    """What IMDS says about the instance: the test VM, dressed as an EC2 instance."""

    instance_id: str  # i- and 17 hex digits
    ami_id: str  # ami- and 17 hex digits
    mac: str  # the guest NIC's MAC: the datasource's network config matches on it
    public_keys: Sequence[tuple[str, str]]  # (key name, OpenSSH public key line)
    user_data: bytes | None = None  # None: 404, as on EC2
    http_tokens: HttpTokens = "required"
    instance_type: str = "t3.micro"
    region: str = "us-east-1"
    availability_zone: str = "us-east-1a"
    instance_profile: str | None = None  # the IAM instance profile (and role) name
    local_ipv4: str = GUEST_IP
    account_id: str = "123456789012"
    launched: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def local_hostname(self) -> str:
        # EC2's IP-based names: ec2.internal in us-east-1, REGION.compute.internal elsewhere.
        domain = "ec2.internal" if self.region == "us-east-1" else f"{self.region}.compute.internal"
        return f"ip-{self.local_ipv4.replace('.', '-')}.{domain}"


def new_instance(
    image: str,
    settings: Ec2Settings,
    *,
    mac: str,
    public_keys: Sequence[tuple[str, str]],
    user_data: bytes | None,
) -> Instance:
    """An instance with fresh EC2-style ids (`image` names the disk: one AMI id per image)."""
    return Instance(
        instance_id="i-" + secrets.token_hex(9)[:17],
        ami_id="ami-" + hashlib.sha256(image.encode()).hexdigest()[:17],
        mac=mac,
        public_keys=public_keys,
        user_data=user_data,
        http_tokens=settings.http_tokens,
        instance_type=settings.instance_type,
        region=settings.region,
        availability_zone=settings.availability_zone or settings.region + "a",
        instance_profile=settings.instance_profile,
    )


def new_mac() -> str:
    """A locally administered unicast MAC, as EC2's are (0e:..)."""
    return "0e:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(5))


class Dir(dict[str, "Node"]):
    """A subtree; `listing` replaces the plain one (public-keys/ lists `0=name`)."""

    listing: str | None = None


Node = str | Dir


def _dir(entries: dict[str, Node], listing: str | None = None) -> Dir:
    d = Dir(entries)
    d.listing = listing
    return d


def _stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def identity_document(inst: Instance) -> str:
    """dynamic/instance-identity/document, as EC2 formats it."""
    doc = {
        "accountId": inst.account_id,
        "architecture": "x86_64",
        "availabilityZone": inst.availability_zone,
        "billingProducts": None,
        "devpayProductCodes": None,
        "marketplaceProductCodes": None,
        "imageId": inst.ami_id,
        "instanceId": inst.instance_id,
        "instanceType": inst.instance_type,
        "kernelId": None,
        "pendingTime": _stamp(inst.launched),
        "privateIp": inst.local_ipv4,
        "ramdiskId": None,
        "region": inst.region,
        "version": "2017-09-30",
    }
    return json.dumps(doc, indent=2)


def tree(inst: Instance) -> Dir:
    """The whole tree of one API version: meta-data, dynamic and (if any) user-data."""
    eni = "eni-" + hashlib.sha256(inst.instance_id.encode()).hexdigest()[:17]
    cidr = NETWORK
    nic = _dir({
        "device-number": "0", "interface-id": eni, "local-hostname": inst.local_hostname,
        "local-ipv4s": inst.local_ipv4, "mac": inst.mac, "owner-id": inst.account_id,
        "security-group-ids": "sg-0123456789abcdef0", "security-groups": "default",
        "subnet-id": "subnet-0123456789abcdef0", "subnet-ipv4-cidr-block": cidr,
        "vpc-id": "vpc-0123456789abcdef0", "vpc-ipv4-cidr-block": cidr,
        "vpc-ipv4-cidr-blocks": cidr,
    })  # fmt: skip
    keys = _dir(
        {str(i): _dir({"openssh-key": key}) for i, (_name, key) in enumerate(inst.public_keys)},
        listing="\n".join(f"{i}={name}" for i, (name, _key) in enumerate(inst.public_keys)),
    )
    placement = _dir({
        "availability-zone": inst.availability_zone, "region": inst.region,
        "availability-zone-id": "use1-az1" if inst.region == "us-east-1" else "az1",
    })  # fmt: skip
    meta: dict[str, Node] = {
        "ami-id": inst.ami_id,
        "ami-launch-index": "0",
        "ami-manifest-path": "(unknown)",
        "block-device-mapping": _dir({"ami": "/dev/xvda", "root": "/dev/xvda"}),
        "hostname": inst.local_hostname,
        "instance-action": "none",
        "instance-id": inst.instance_id,
        "instance-life-cycle": "on-demand",
        "instance-type": inst.instance_type,
        "local-hostname": inst.local_hostname,
        "local-ipv4": inst.local_ipv4,
        "mac": inst.mac,
        "network": _dir({"interfaces": _dir({"macs": _dir({inst.mac: nic})})}),
        "placement": placement,
        "profile": "default-hvm",
        "reservation-id": "r-" + inst.instance_id[2:],
        "security-groups": "default",
        "services": _dir({"domain": "amazonaws.com", "partition": "aws"}),
    }
    if inst.public_keys:
        meta["public-keys"] = keys
    if inst.instance_profile:
        meta["iam"] = _iam(inst, inst.instance_profile)
    top: dict[str, Node] = {
        "meta-data": _dir(meta),
        "dynamic": _dir({"instance-identity": _dir({"document": identity_document(inst)})}),
    }
    if inst.user_data is not None:
        top["user-data"] = inst.user_data.decode("utf-8", "surrogateescape")
    # EC2 lists the version's top level without trailing slashes.
    return _dir(top, listing="\n".join(sorted(top)))


def _iam(inst: Instance, profile: str) -> Dir:
    now = datetime.now(UTC)
    profile_id = "AIPA" + hashlib.sha256(profile.encode()).hexdigest()[:17].upper()
    info = {
        "Code": "Success",
        "LastUpdated": _stamp(now),
        "InstanceProfileArn": f"arn:aws:iam::{inst.account_id}:instance-profile/{profile}",
        "InstanceProfileId": profile_id,
    }
    creds = {
        "Code": "Success",
        "LastUpdated": _stamp(now),
        "Type": "AWS-HMAC",
        "AccessKeyId": FAKE_ACCESS_KEY_ID,
        "SecretAccessKey": FAKE_SECRET_ACCESS_KEY,
        "Token": FAKE_SESSION_TOKEN,
        "Expiration": _stamp(now + timedelta(hours=6)),
    }
    return _dir({
        "info": json.dumps(info, indent=2),
        "security-credentials": _dir({profile: json.dumps(creds, indent=2)}),
    })  # fmt: skip


def listing(d: Dir) -> str:
    """A directory as EC2 lists it: one entry a line, subtrees with a trailing slash."""
    if d.listing is not None:
        return d.listing
    return "\n".join(k + "/" if isinstance(v, Dir) else k for k, v in sorted(d.items()))


def lookup(root: Dir, path: str) -> Node | None:
    """The node at a request path (`/latest/meta-data/mac`), or None."""
    parts = [p for p in path.split("?", 1)[0].split("/") if p]
    if not parts:
        return _dir({v: "" for v in VERSIONS}, listing="\n".join(VERSIONS))
    if parts[0] not in VERSIONS:
        return None
    node: Node = root
    for part in parts[1:]:
        if not isinstance(node, Dir) or part not in node:
            return None
        node = node[part]
    return node


@dataclass(frozen=True)
class Request:
    """One request of the guest's, as the run log records it."""

    method: str
    path: str
    status: int
    version: str  # v2 (with a valid token), v1 (none), or "-" (refused before that counted)

    def __str__(self) -> str:
        return f"{self.method} {self.path} {self.status} {self.version}"


_PAGES = {
    400: "400 - Bad Request",
    401: "401 - Unauthorized",
    403: "403 - Forbidden",
    404: "404 - Not Found",
    405: "405 - Method Not Allowed",
}


def _page(status: int) -> bytes:
    title = _PAGES[status]
    return (
        '<?xml version="1.0" encoding="iso-8859-1"?>\n'
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
        '\t"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
        '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
        f" <head>\n  <title>{title}</title>\n </head>\n <body>\n  <h1>{title}</h1>\n"
        " </body>\n</html>\n"
    ).encode()


class MetadataService:
    """`with MetadataService(instance) as imds:` serves `instance` on 127.0.0.1:`imds.port`.

    Owns its listening socket, its serving thread and the connections it
    accepted: leaving the block closes all of them and joins every thread.
    `clock` (monotonic seconds) decides token expiry; tests pass their own.
    """

    def __init__(self, instance: Instance, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.instance = instance
        self.clock = clock
        self.requests: list[Request] = []
        self._tree = tree(instance)
        self._tokens: dict[str, float] = {}  # token -> expiry on `clock`
        self._lock = threading.Lock()
        self._server: _Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "the service is not running"
        return self._server.port

    def __enter__(self) -> Self:
        self._server = _Server(self)
        self._server.start(f"imds-{self.port}")
        log.info("IMDS for %s on 127.0.0.1:%d (http_tokens %s)",
                 self.instance.instance_id, self.port, self.instance.http_tokens)  # fmt: skip
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is None:
            return
        self._server.stop()
        self._server = None

    def summary(self) -> str:
        """One line for the run log: how many requests, and how they were answered."""
        by = {v: sum(r.version == v for r in self.requests) for v in ("v2", "v1", "-")}
        refused = sum(r.status >= 400 for r in self.requests)
        return (
            f"IMDS: {len(self.requests)} requests ({by['v2']} IMDSv2, {by['v1']} IMDSv1, "
            f"{by['-']} other; {refused} answered with an error)"
        )

    def read_key(self) -> bool:
        """Whether the guest has read its SSH public key (as cloud-init's Ec2 datasource does)."""
        with self._lock:
            return any(
                r.status == 200 and r.path.split("?", 1)[0].endswith("/public-keys/0/openssh-key")
                for r in self.requests
            )

    # -- request handling (called from the connection threads) -----------------
    def new_token(self, ttl: int) -> str:
        token = secrets.token_urlsafe(42)
        with self._lock:
            now = self.clock()
            self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
            self._tokens[token] = now + ttl
        return token

    def token_valid(self, token: str) -> bool:
        with self._lock:
            expiry = self._tokens.get(token)
            return expiry is not None and expiry > self.clock()

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)
        log.info("IMDS %s", request)


class _Server(GuestForwardServer):
    def __init__(self, service: MetadataService) -> None:
        self.service = service
        super().__init__(_Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: QEMU's one stream carries many requests
    server_version = "EC2ws"
    sys_version = ""
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """http.server's own access log is off: requests go to the run log via record()."""

    def handle(self) -> None:
        self.close_connection = False
        while not self.close_connection:
            self.handle_one_request()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        # A guest client's `Connection: close` must not end QEMU's stream; the
        # peer closing it (EOF) still does.
        self.close_connection = False
        return ok

    def send_header(self, keyword: str, value: str) -> None:
        keep = self.close_connection
        super().send_header(keyword, value)
        # Our own `Connection: close` (said to the guest client) must not end
        # the stream either.
        self.close_connection = keep

    def _send(
        self, status: int, body: bytes, version: str, extra: dict[str, str] | None = None
    ) -> None:
        # Recorded before the client can see the answer (tests read the log after it).
        self.server.service.record(Request(self.command, self.path, status, version))
        self.send_response(status)
        self.send_header("Content-Type", "text/plain" if status < 400 else "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _fail(self, status: int, version: str = "-") -> None:
        self._send(status, _page(status), version)

    def _drain_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(min(length, 1 << 20))

    def do_PUT(self) -> None:
        svc = self.server.service
        self._drain_body()
        if self.path.split("?", 1)[0] != TOKEN_PATH:
            return self._fail(405 if lookup(svc._tree, self.path) is not None else 404)
        # EC2 refuses token requests that went through a proxy.
        if self.headers.get("X-Forwarded-For") is not None:
            return self._fail(403)
        raw = self.headers.get(TTL_HEADER)
        try:
            ttl = int(raw) if raw is not None else 0
        except ValueError:
            ttl = 0
        if not 1 <= ttl <= MAX_TTL:
            return self._fail(400)
        token = svc.new_token(ttl)
        self._send(200, token.encode(), "v2", {TTL_HEADER: str(ttl)})

    def do_GET(self) -> None:
        svc = self.server.service
        token = self.headers.get(TOKEN_HEADER)
        if self.path.split("?", 1)[0] == TOKEN_PATH:
            return self._fail(405)
        if token is not None:
            if not svc.token_valid(token):  # expired or never issued: 401, even if optional
                return self._fail(401)
            version = "v2"
        elif svc.instance.http_tokens == "required":
            return self._fail(401)
        else:
            version = "v1"
        node = lookup(svc._tree, self.path)
        if node is None:
            return self._fail(404, version)
        body = listing(node) if isinstance(node, Dir) else node
        self._send(200, body.encode("utf-8", "surrogateescape"), version)

    do_HEAD = do_GET

    def _not_allowed(self) -> None:
        self._drain_body()
        self._fail(405)

    do_POST = do_DELETE = do_PATCH = _not_allowed


@contextlib.contextmanager
def serving(instance: Instance) -> Iterator[MetadataService]:
    """The service for one VM; on leaving, the request summary goes to the run log."""
    with MetadataService(instance) as service:
        try:
            yield service
        finally:
            log.info("%s", service.summary())
