"""A local AWS endpoint for the distribution tests: moto's server plus a test-side front.

`MotoServer` runs moto's real HTTP server (`moto_server`) as a subprocess. `FrontServer`
listens on its own port, is what vmbuild is pointed at (AWS_ENDPOINT_URL), and:

- records every request vmbuild sends (service, region, action, parameters, headers), so tests
  assert what was *sent* where moto ignores a field (RegisterImage block device mappings and
  boot mode, CopyImage Encrypted/KmsKeyId, EBS direct checksums);
- injects faults: throttling (`RequestLimitExceeded`, `ThrottlingException`, `SlowDown`) or any
  error, N times, per service/action/region;
- implements what moto lacks, as an extension of it: **ImportSnapshot, ImportImage,
  DescribeImportSnapshotTasks, DescribeImportImageTasks, CancelImportTask** (see
  `fake_import.py`: tasks progress, validate the S3 object with `qemu-img info`, and produce
  real snapshots and AMIs inside moto);
- corrects one moto answer that would mislead a client: StartSnapshot's BlockSize (moto
  says 512, EBS uses and reports 524288);
- models what moto's EBS direct backend ignores (see `ebsmodel.py`): ParentSnapshotId
  lineage (a child reads through to its parent), the encryption rules of StartSnapshot, the
  pending state until CompleteSnapshot, and deleted snapshots refusing every EBS direct call;
- forwards everything else to moto unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
_SCOPE = re.compile(r"Credential=[^/]+/\d{8}/([^/]+)/([^/]+)/aws4_request")
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "expect",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """moto's HTTP server in a subprocess on 127.0.0.1 (always stopped by `stop`)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, log: Path) -> None:
        binary = Path(sys.executable).with_name("moto_server")
        self.log = log.open("wb")
        # No public catalogue AMIs: moto loads thousands per region on first use (seconds),
        # and the tests only look at the account's own images.
        amis = log.with_name("moto-amis.json")
        amis.write_text("[]")
        self.proc = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "MOTO_AMIS_PATH": str(amis)},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1).read()
                return
            time.sleep(0.1)
        raise RuntimeError("moto_server did not start in 30s")

    def reset(self) -> None:
        req = urllib.request.Request(f"{self.url}/moto-api/reset", method="POST", data=b"")
        urllib.request.urlopen(req, timeout=10).read()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(AttributeError):
            self.log.close()


@dataclass
class Request:
    """One request vmbuild sent, as the front server understood it."""

    service: str
    region: str
    action: str
    params: dict[str, Any]
    headers: dict[str, str]
    body_size: int
    body_sha256: str
    method: str
    path: str
    status: int = 0


@dataclass
class Fault:
    """Answer `count` matching requests with an error instead of forwarding them.

    The first `skip` matching requests pass through (fail in the middle of an upload).
    """

    service: str
    action: str
    count: int
    code: str = "RequestLimitExceeded"
    status: int = 503
    message: str = "Request limit exceeded."
    region: str | None = None
    skip: int = 0
    hits: int = 0


@dataclass
class Recorder:
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, req: Request) -> None:
        with self.lock:
            self.requests.append(req)

    def find(
        self, action: str, service: str | None = None, region: str | None = None
    ) -> list[Request]:
        with self.lock:
            return [
                r
                for r in self.requests
                if r.action == action
                and (service is None or r.service == service)
                and (region is None or r.region == region)
            ]

    def clear(self) -> None:
        with self.lock:
            self.requests.clear()


def _flat_params(body: bytes, query: str) -> dict[str, Any]:
    params = {k: v[-1] for k, v in urllib.parse.parse_qs(query, keep_blank_values=True).items()}
    with contextlib.suppress(UnicodeDecodeError):
        params.update(
            {
                k: v[-1]
                for k, v in urllib.parse.parse_qs(body.decode(), keep_blank_values=True).items()
            }
        )
    return params


def identify(
    method: str, path: str, headers: dict[str, str], body: bytes
) -> tuple[str, str, str, dict[str, Any]]:
    """(service, region, action, params) of a signed AWS request."""
    scope = _SCOPE.search(headers.get("authorization", ""))
    region, service = (scope.group(1), scope.group(2)) if scope else ("us-east-1", "?")
    url = urllib.parse.urlsplit(path)
    if service == "ebs":
        parts = url.path.strip("/").split("/")
        if method == "POST" and parts == ["snapshots"]:
            return service, region, "StartSnapshot", json.loads(body or b"{}")
        if method == "PUT" and len(parts) == 4 and parts[2] == "blocks":
            return (
                service,
                region,
                "PutSnapshotBlock",
                {
                    "SnapshotId": parts[1],
                    "BlockIndex": int(parts[3]),
                    "DataLength": headers.get("x-amz-data-length"),
                    "Checksum": headers.get("x-amz-checksum"),
                    "ChecksumAlgorithm": headers.get("x-amz-checksum-algorithm"),
                },
            )
        if method == "GET" and len(parts) == 3 and parts[2] == "blocks":
            return service, region, "ListSnapshotBlocks", {"SnapshotId": parts[1]}
        if method == "GET" and len(parts) == 4 and parts[2] == "blocks":
            return (
                service,
                region,
                "GetSnapshotBlock",
                {"SnapshotId": parts[1], "BlockIndex": int(parts[3])},
            )
        if method == "POST" and parts[:2] == ["snapshots", "completion"]:
            return (
                service,
                region,
                "CompleteSnapshot",
                {
                    "SnapshotId": parts[2],
                    "ChangedBlocksCount": headers.get("x-amz-changedblockscount"),
                    "Checksum": headers.get("x-amz-checksum"),
                    "ChecksumAlgorithm": headers.get("x-amz-checksum-algorithm"),
                    "ChecksumAggregationMethod": headers.get("x-amz-checksum-aggregation-method"),
                },
            )
        return service, region, f"{method} {url.path}", {}
    if service == "s3":
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        key = url.path.strip("/")
        action = {
            "PUT": "UploadPart"
            if "partNumber" in query
            else "PutObject"
            if "/" in key
            else "CreateBucket",
            "POST": "CreateMultipartUpload"
            if "uploads" in query
            else "CompleteMultipartUpload"
            if "uploadId" in query
            else "PostObject",
            "DELETE": "AbortMultipartUpload"
            if "uploadId" in query
            else "DeleteObject"
            if "/" in key
            else "DeleteBucket",
            "HEAD": "HeadObject" if "/" in key else "HeadBucket",
            "GET": "GetBucketLocation"
            if "location" in query
            else "GetObject"
            if "/" in key
            else "ListObjects",
        }.get(method, method)
        return service, region, action, {"Key": key, **{k: v[-1] for k, v in query.items()}}
    target = headers.get("x-amz-target")
    if target:
        return service, region, target.split(".")[-1], json.loads(body or b"{}")
    params = _flat_params(body, url.query)
    return service, region, str(params.get("Action", "?")), params


def error_response(service: str, fault: Fault) -> tuple[int, dict[str, str], bytes]:
    """An error body in the protocol the service speaks (so botocore parses the code)."""
    rid = str(uuid.uuid4())
    if service == "ec2":
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
            f"<Code>{fault.code}</Code><Message>{escape(fault.message)}</Message></Error>"
            f"</Errors><RequestID>{rid}</RequestID></Response>"
        )
        return fault.status, {"Content-Type": "text/xml"}, body.encode()
    if service in ("s3",):
        body = f"<Error><Code>{fault.code}</Code><Message>{escape(fault.message)}</Message></Error>"
        return fault.status, {"Content-Type": "application/xml"}, body.encode()
    if service in ("ebs",):
        return (
            fault.status,
            {
                "Content-Type": "application/json",
                "x-amzn-ErrorType": fault.code,
                "x-amzn-RequestId": rid,
            },
            json.dumps({"message": fault.message}).encode(),
        )
    if service in ("sts", "iam"):
        body = (
            f"<ErrorResponse><Error><Type>Sender</Type><Code>{fault.code}</Code>"
            f"<Message>{escape(fault.message)}</Message></Error>"
            f"<RequestId>{rid}</RequestId></ErrorResponse>"
        )
        return fault.status, {"Content-Type": "text/xml"}, body.encode()
    return (
        fault.status,
        {"Content-Type": "application/x-amz-json-1.1"},
        json.dumps({"__type": fault.code, "message": fault.message}).encode(),
    )


class FrontServer:
    """The endpoint vmbuild talks to: record, inject faults, import, else forward to moto."""

    def __init__(self, moto: MotoServer, workdir: Path) -> None:
        from tests.support.ebsmodel import EbsLineage
        from tests.support.fake_import import ImportService

        self.moto = moto
        self.ebs = EbsLineage()
        self.block_size = 524288
        self.recorder = Recorder()
        self.faults: list[Fault] = []
        self.imports = ImportService(moto.url, workdir)
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.imports.stop()

    def reset(self) -> None:
        self.recorder.clear()
        with self._lock:
            self.faults.clear()
        self.imports.reset()
        self.ebs.reset()
        self.block_size = 524288

    def inject(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def _fault_for(self, service: str, region: str, action: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if (
                    fault.service == service
                    and fault.action == action
                    and fault.count > 0
                    and fault.region in (None, region)
                ):
                    if fault.skip > 0:
                        fault.skip -= 1
                        return None
                    fault.count -= 1
                    fault.hits += 1
                    return fault
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        front = self
        local = threading.local()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def _send(
                self, status: int, headers: dict[str, str], body: bytes, length: str | None = None
            ) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        self.send_header(k, v)
                self.send_header("Content-Length", length or str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(
                self, body: bytes, method: str | None = None, path: str | None = None
            ) -> tuple[int, dict[str, str], bytes, str | None]:
                method = method or self.command
                path = path or self.path
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"
                }
                headers["Content-Length"] = str(len(body))
                for attempt in range(2):
                    conn = getattr(local, "conn", None)
                    if conn is None:
                        url = urllib.parse.urlsplit(front.moto.url)
                        conn = local.conn = http.client.HTTPConnection(
                            url.hostname, url.port, timeout=120
                        )
                    try:
                        conn.request(method, path, body=body, headers=headers)
                        resp = conn.getresponse()
                        data = resp.read()
                        return (
                            resp.status,
                            dict(resp.getheaders()),
                            data,
                            resp.getheader("Content-Length") if method == "HEAD" else None,
                        )
                    except (http.client.HTTPException, OSError):
                        conn.close()
                        local.conn = None
                        if attempt:
                            raise
                raise AssertionError("unreachable")

            def _handle(self) -> None:
                body = self._body()
                headers = {k.lower(): v for k, v in self.headers.items()}
                service, region, action, params = identify(self.command, self.path, headers, body)
                req = Request(
                    service,
                    region,
                    action,
                    params,
                    headers,
                    len(body),
                    hashlib.sha256(body).hexdigest(),
                    self.command,
                    self.path,
                )
                front.recorder.add(req)
                fault = front._fault_for(service, region, action)
                if fault is not None:
                    status, rheaders, rbody = error_response(service, fault)
                    req.status = status
                    self._send(status, rheaders, rbody)
                    return
                if service == "ec2" and action in front.imports.ACTIONS:
                    status, rbody = front.imports.handle(action, region, params)
                    req.status = status
                    self._send(status, {"Content-Type": "text/xml"}, rbody)
                    return
                if service == "ebs" and action in front.ebs.ACTIONS:

                    def forward(
                        method: str, path: str, fbody: bytes
                    ) -> tuple[int, dict[str, str], bytes]:
                        status, rheaders, rbody, _ = self._forward(fbody, method, path)
                        return status, rheaders, rbody

                    status, rheaders, rbody = front.ebs.handle(
                        region, action, params, self.command, self.path, body, forward
                    )
                    length = None
                else:
                    status, rheaders, rbody, length = self._forward(body)
                if service == "ec2" and action == "DeleteSnapshot" and status < 300:
                    front.ebs.deleted_snapshot(str(params.get("SnapshotId")))
                if service == "ec2" and action == "DescribeSnapshots" and status < 300:
                    rbody = front.ebs.describe(rbody)
                if service == "ebs" and action == "StartSnapshot" and status < 300:
                    # moto answers BlockSize 512; EBS uses 512 KiB blocks (and says so).
                    # `front.block_size` lets a test make the endpoint answer something else.
                    rbody = json.dumps(
                        {**json.loads(rbody), "BlockSize": front.block_size}
                    ).encode()
                req.status = status
                self._send(status, rheaders, rbody, length)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        return Handler


@contextlib.contextmanager
def local_aws(workdir: Path) -> Iterator[tuple[MotoServer, FrontServer]]:
    """moto + front server, stopped whatever happens."""
    moto = MotoServer()
    moto.start(workdir / "moto.log")
    try:
        front = FrontServer(moto, workdir)
        front.start()
        try:
            yield moto, front
        finally:
            front.stop()
    finally:
        moto.stop()


def aws_env(endpoint: str) -> dict[str, str]:
    """Environment for boto3 (and the AWS CLI) to use the local endpoint with fake keys."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
