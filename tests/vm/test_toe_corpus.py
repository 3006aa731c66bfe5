"""The compatibility corpus run unchanged in a real guest: documents written as
AWS's guide shows them, S3 through a local S3 server and WebDownload through a
local HTTP server (both reached by the host, never by the guest)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmbuild.remote.ssh import SSHSession
from vmbuild.toe import DocumentResult, S3Config, Status, load_document, run_document

pytestmark = pytest.mark.vm

CORPUS = Path(__file__).resolve().parents[1] / "data" / "toe" / "corpus" / "valid"


def run(
    guest: SSHSession, name: str, s3: S3Config | None = None, **parameters: str
) -> tuple[DocumentResult, str]:
    lines: list[str] = []
    doc = load_document(CORPUS / name, parameters)
    result = run_document(doc, guest, phases=list(doc.phases), on_output=lines.append, s3=s3)
    return result, "\n".join(lines)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("main.yaml", Status.SUCCESS),
        ("nested-loop.yaml", Status.SUCCESS),
        ("conditions-and-loops.yaml", Status.SUCCESS),
        # CopyingFilesWithoutOverwriteLinux fails by design (onFailure: Ignore).
        ("file-system.yaml", Status.SUCCESS_WITH_IGNORED_FAILURE),
    ],
)
def test_guide_documents_run_unchanged(guest: SSHSession, name: str, expected: Status) -> None:
    result, log = run(guest, name)
    assert result.status is expected, log
    if name == "main.yaml":
        assert "[build/ExecuteBashStep] Hello World!" in log
    if name == "file-system.yaml":
        assert "file system modules behaved as documented" in log
        assert "[build/ReadingFileToConsole] ABCD\\nRandom\\tvaluesThe string" in log


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[S3Config, Any]]:
    from moto.server import ThreadedMotoServer

    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    config = S3Config(endpoint_url=f"http://{host}:{port}", region="us-east-1")
    try:
        yield config, config.client()
    finally:
        server.stop()


@pytest.mark.aws
def test_s3_documents_run_through_the_host(guest: SSHSession, s3: tuple[S3Config, Any]) -> None:
    config, client = s3
    client.create_bucket(Bucket="mybucket")
    client.put_object(
        Bucket="mybucket",
        Key="myapplication",
        Body=b'#!/bin/sh\necho "installed with $*" > /tmp/myapplication-installed\n',
    )
    result, log = run(guest, "linux-bin.yaml", config)
    assert result.status is Status.SUCCESS, log
    check = guest.run("cat /tmp/myapplication-installed; test ! -e /tmp/myapplication")
    assert check.stdout == "installed with --install\n"

    client.create_bucket(Bucket="sample-bucket")
    client.put_object(Bucket="sample-bucket", Key="sample1.sh", Body=b"echo report from sample1\n")
    client.put_object(Bucket="sample-bucket", Key="sample2.sh", Body=b"echo two\n")
    result, log = run(guest, "s3-chaining.yaml", config)
    assert result.status is Status.SUCCESS, log
    assert "second script came from s3://sample-bucket/sample2.sh" in log
    uploaded = client.get_object(Bucket="sample-bucket", Key="path/to/report.txt")["Body"].read()
    assert uploaded == b"report from sample1\n"
    assert guest.get("/tmp/report.txt") == uploaded  # the prefix download brought it back


class Handler(http.server.BaseHTTPRequestHandler):
    body = b"PK\x03\x04 not really a zip, but bytes all the same\n"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


def test_web_download_runs_through_the_host(guest: SSHSession) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/path/to/java14.zip"
        md5 = hashlib.md5(Handler.body).hexdigest()
        result, log = run(guest, "web-download.yaml", Source=url, Md5=md5)
    finally:
        server.shutdown()
        server.server_close()
    assert result.status is Status.SUCCESS, log
    step = result.phases[0].steps[0]
    assert step.outputs["destination"] == (
        "/tmp/java14_renamed.zip\n/tmp/create_new_folder_and_add_java14_as_zip/java14.zip"
    )
    assert log.count(md5) == 2  # md5sum in the guest agrees with the host
