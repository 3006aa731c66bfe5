"""The host package cache with a real apt-cacher-ng on 127.0.0.1, an origin
served by a local HTTP server (so the test controls and counts every byte)."""

from __future__ import annotations

import functools
import http.server
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmbuild.cache import aptproxy


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """A tiny Debian-like origin; yields its URL and the paths it served."""
    root = tmp_path / "mirror"
    pool = root / "debian" / "pool" / "main" / "h" / "hello"
    pool.mkdir(parents=True)
    (pool / "hello_1.0_amd64.deb").write_bytes(b"!<arch>\n" + bytes(range(256)) * 64)
    served: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            served.append(self.path)

    # apt-cacher-ng 3.7.4 mishandles ports above 32767 (a signed 16-bit
    # number), the kernel's ephemeral range: take a port below it.
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", aptproxy._free_port()), functools.partial(Handler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    server.server_close()


def fetch(proxy: aptproxy.AptProxy, url: str) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.host_url}))
    with opener.open(url, timeout=30) as response:
        return bytes(response.read())


def test_second_fetch_comes_from_the_cache(tmp_path: Path, origin: tuple[str, list[str]]) -> None:
    base, served = origin
    url = f"{base}/debian/pool/main/h/hello/hello_1.0_amd64.deb"
    expected = b"!<arch>\n" + bytes(range(256)) * 64
    state = tmp_path / "acng"
    with aptproxy.shared_instance(state) as proxy:
        assert proxy.owned and proxy.transfer_log is not None
        assert fetch(proxy, url) == expected
        assert fetch(proxy, url) == expected
        assert served == ["/debian/pool/main/h/hello/hello_1.0_amd64.deb"]
    transfer_log = state / "log" / "apt-cacher.log"
    # What came from outside: the body plus the origin's response headers.
    first_build = aptproxy.fetched_bytes(transfer_log)
    assert len(expected) < first_build < len(expected) + 1024
    offset = transfer_log.stat().st_size
    # A later build's instance (a new process, a new port) keeps the cache.
    with aptproxy.shared_instance(state) as again:
        assert fetch(again, url) == expected
    assert len(served) == 1
    assert aptproxy.fetched_bytes(transfer_log, since=offset) == 0


def test_builds_share_one_instance_and_the_last_one_stops_it(tmp_path: Path) -> None:
    state = tmp_path / "acng"
    with aptproxy.shared_instance(state) as first:
        pid = int((state / "instance.json").read_text().split('"pid": ')[1].split(",")[0])
        with aptproxy.shared_instance(state) as second:
            assert second.port == first.port
        # The first build still uses it: still running after the second left.
        assert Path(f"/proc/{pid}").exists()
        assert aptproxy._answers(first.port)
    assert not aptproxy._answers(first.port)
    assert not (state / "instance.json").exists()


def test_a_stale_instance_record_is_replaced(tmp_path: Path) -> None:
    state = tmp_path / "acng"
    state.mkdir()
    # A pid that is not apt-cacher-ng (this test's own) and a dead port.
    (state / "instance.json").write_text('{"pid": 1, "port": 1}')
    with aptproxy.shared_instance(state) as proxy:
        assert proxy.port != 1
        assert aptproxy._answers(proxy.port)


def test_a_proxy_that_cannot_start_means_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-cacher-ng on it
    monkeypatch.setenv("VMBUILD_CACHE_DIR", str(tmp_path / "cache"))
    said: list[str] = []
    with aptproxy.host_package_cache("auto", on_status=said.append) as proxy:
        assert proxy is None
    assert said == [
        "package cache unavailable (apt-cacher-ng is not installed); guests fetch directly"
    ]


def test_a_named_instance_that_does_not_answer_means_direct(tmp_path: Path) -> None:
    said: list[str] = []
    with aptproxy.host_package_cache("http://127.0.0.1:9", on_status=said.append) as proxy:
        assert proxy is None
    assert said == ["package cache 127.0.0.1:9 does not answer; guests fetch directly"]
