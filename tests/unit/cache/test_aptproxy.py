"""The host package cache's pure parts: the setting, its config, the transfer log."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmbuild.cache import aptproxy


def test_setting_defaults_to_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(aptproxy.ENV, raising=False)
    assert aptproxy.parse_setting(None) == "auto"
    assert aptproxy.parse_setting("off") is None
    assert aptproxy.parse_setting("http://127.0.0.1:3142") == 3142
    assert aptproxy.parse_setting("http://localhost:3142/") == 3142


def test_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(aptproxy.ENV, "http://127.0.0.1:25000")
    assert aptproxy.parse_setting(None) == 25000
    assert aptproxy.parse_setting("off") is None  # the flag wins


@pytest.mark.parametrize(
    "value", ["http://192.0.2.1:3142", "https://127.0.0.1:3142", "http://127.0.0.1", "yes"]
)
def test_setting_rejects_what_a_guest_cannot_reach(value: str) -> None:
    with pytest.raises(aptproxy.AptProxyError) as err:
        aptproxy.parse_setting(value)
    assert str(err.value) == (f"apt proxy {value!r}: expected auto, off or http://127.0.0.1:PORT")


def test_config_binds_loopback_and_keeps_everything_in_the_state_dir(tmp_path: Path) -> None:
    lines = aptproxy.config_text(tmp_path, 31000).splitlines()
    assert f"CacheDir: {tmp_path / 'cache'}" in lines
    assert f"LogDir: {tmp_path / 'log'}" in lines
    assert f"PidFile: {tmp_path / 'run' / 'pid'}" in lines
    assert "Port: 31000" in lines
    assert "BindAddress: 127.0.0.1" in lines
    assert "ForeGround: 1" in lines
    assert "AllowUserPorts: 0" in lines  # mirrors on any port
    assert aptproxy.argv(tmp_path) == ["apt-cacher-ng", "-c", str(tmp_path / "conf")]


def test_guest_url_goes_through_the_user_network_gateway() -> None:
    proxy = aptproxy.AptProxy(port=31000, owned=False)
    assert proxy.host_url == "http://127.0.0.1:31000"
    assert proxy.guest_url == "http://10.0.2.2:31000"
    assert proxy.transfer_log is None


def test_fetched_bytes_counts_only_what_came_from_outside(tmp_path: Path) -> None:
    log = tmp_path / "apt-cacher.log"
    log.write_text(
        "1|I|151287|127.0.0.1|deb.debian.org/debian/dists/bookworm/InRelease\n"
        "1|O|151312|127.0.0.1|deb.debian.org/debian/dists/bookworm/InRelease\n"
        "2|I|53326|127.0.0.1|deb.debian.org/debian/pool/main/h/hello/hello.deb\n"
        "2|O|53332|127.0.0.1|deb.debian.org/debian/pool/main/h/hello/hello.deb\n"
        "garbage\n"
    )
    assert aptproxy.fetched_bytes(log) == 151287 + 53326
    second = len(log.read_bytes())
    with log.open("a") as f:
        f.write("3|O|53332|127.0.0.1|deb.debian.org/debian/pool/main/h/hello/hello.deb\n")
    assert aptproxy.fetched_bytes(log, since=second) == 0
    assert aptproxy.fetched_bytes(tmp_path / "absent.log") == 0
