"""Each action module's generated remote commands, read without running them,
and the host-side modules (WebDownload, S3) against in-process servers."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.toe import ScriptedRemote
from vmbuild.remote.base import RemoteResult
from vmbuild.toe.actions import ACTIONS, WINDOWS_ONLY
from vmbuild.toe.actions import web as web_mod
from vmbuild.toe.actions.base import (
    ActionFailed,
    HostContext,
    glob_words,
    typed_items,
)
from vmbuild.toe.actions.s3 import S3Config, existing_paths_script, parse_s3_uri

LINUX_MODULES = {
    "ExecuteBash", "ExecuteBinary", "ExecuteDocument", "CreateFile", "AppendFile", "CopyFile",
    "MoveFile", "CopyFolder", "MoveFolder", "CreateFolder", "CreateSymlink", "DeleteFile",
    "DeleteFolder", "ListFiles", "ReadFile", "SetFileEncoding", "SetFileOwner", "SetFolderOwner",
    "SetFilePermissions", "SetFolderPermissions", "Reboot", "UpdateOS", "WebDownload",
    "S3Download", "S3Upload", "Assert",
}  # fmt: skip


def script(action: str, inputs: Any) -> str:
    spec = ACTIONS[action]
    items, problems = typed_items(spec, inputs, final=True)
    assert not problems, problems
    assert spec.script is not None
    return spec.script(items)


def test_every_documented_linux_module_is_there_with_documented_inputs() -> None:
    assert set(ACTIONS) == LINUX_MODULES
    assert not WINDOWS_ONLY & set(ACTIONS)
    for spec in ACTIONS.values():
        assert spec.summary
        for field in spec.fields:
            assert field.doc, f"{spec.name}.{field.name} has no documentation"


def test_defaults_are_filled_and_single_maps_accepted_for_list_modules() -> None:
    items, problems = typed_items(ACTIONS["CreateFile"], {"path": "/a"}, final=True)
    assert not problems
    assert items == [
        {"path": "/a", "content": "", "encoding": "utf8", "owner": None, "group": None,
         "permissions": None, "overwrite": True}
    ]  # fmt: skip


def test_yaml_numbers_reach_inputs_as_written() -> None:
    from vmbuild.yamlio import load_yaml

    raw = load_yaml("[{path: /a, permissions: 0755, owner: 1000}]")
    items, _ = typed_items(ACTIONS["CreateFile"], raw, final=True)
    assert (items[0]["permissions"], items[0]["owner"]) == ("0755", "1000")


def test_execute_bash_is_the_commands() -> None:
    assert script("ExecuteBash", {"commands": ["set -e", "echo 'a b'\necho c"]}) == (
        "set -e\necho 'a b'\necho c\n"
    )


def test_execute_binary_quotes_every_argument() -> None:
    assert script(
        "ExecuteBinary", {"path": "/opt/my app/run", "arguments": ["--x=1 2", "$HOME"]}
    ) == ("'/opt/my app/run' '--x=1 2' '$HOME'\n")


def test_create_file_writes_base64_then_owner_and_mode() -> None:
    text = script(
        "CreateFile",
        [{"path": "/etc/my app.conf", "content": "a'b\n", "owner": "app", "group": "adm",
          "permissions": "0640", "overwrite": False}],
    )  # fmt: skip
    assert text == (
        "set -euo pipefail\n"
        "if [ -e '/etc/my app.conf' ] || [ -L '/etc/my app.conf' ]; then "
        "{ echo 'CreateFile: /etc/my app.conf already exists and overwrite is false' >&2; exit 1; }; fi\n"
        "mkdir -p -- \"$(dirname -- '/etc/my app.conf')\"\n"
        "base64 -d > '/etc/my app.conf' <<'VMBUILD_B64_EOF'\nYSdiCg==\nVMBUILD_B64_EOF\n"
        "chown -- app:adm '/etc/my app.conf'\n"
        "chmod -- 0640 '/etc/my app.conf'\n"
    )


def test_create_file_encodes_content() -> None:
    text = script("CreateFile", [{"path": "/a", "content": "é", "encoding": "UTF-32"}])
    assert "\n6QAAAA==\n" in text  # "é" in UTF-32 little-endian, no BOM


def test_append_file_requires_the_file() -> None:
    text = script("AppendFile", [{"path": "/a"}])
    assert (
        "if ! [ -f /a ]; then { echo 'AppendFile: /a does not exist' >&2; exit 1; }; fi\n" in text
    )
    assert "base64 -d >> /a <<'VMBUILD_B64_EOF'\nVMBUILD_B64_EOF\n" in text


def test_copy_file_into_a_folder_keeps_the_name() -> None:
    text = script("CopyFile", [{"source": "/s/a.txt", "destination": "/d/"}])
    assert 'target=/d/"$(basename -- /s/a.txt)"\n' in text
    assert 'cp -f -- /s/a.txt "$target"\n' in text
    assert "already exists" not in text  # overwrite defaults to true


def test_wildcards_only_expand_the_star() -> None:
    assert glob_words("/my dir/Sample*") == "'/my dir'/Sample*"
    assert glob_words("/a/*.log") == "/a/*.log"
    assert glob_words("/x/a b*c") == "/x/'a b'*c"
    text = script(
        "MoveFile", [{"source": "/my dir/*.log", "destination": "/out/", "overwrite": False}]
    )
    assert "for src in '/my dir'/*.log; do\n" in text
    assert '  mv -f -- "$src" "$target"\n' in text
    assert "already exists and overwrite is false" in text


def test_copy_folder_merges_and_move_folder_replaces() -> None:
    copy = script("CopyFolder", [{"source": "/src/", "destination": "/dst"}])
    assert 'cp -a -- /src/. "$target"/\n' in copy and "rm -rf" not in copy
    move = script("MoveFolder", [{"source": "/src", "destination": "/parent/"}])
    assert 'rm -rf -- "$target"\n' in move and 'mv -- /src "$target"\n' in move
    assert "source and destination are the same" in move


def test_create_folder_and_symlink() -> None:
    folder = script("CreateFolder", [{"path": "/d/", "owner": "www-data", "permissions": "755"}])
    assert "mkdir -p -- /d\nchown -- www-data /d\nchmod -- 755 /d\n" in folder
    link = script("CreateSymlink", [{"path": "/l", "target": "/t", "force": True}])
    assert "if [ -L /l ]; then rm -f -- /l\n" in link and "ln -s -- /t /l\n" in link


def test_delete_modules_are_idempotent() -> None:
    text = script("DeleteFile", [{"path": "/tmp/x"}, {"path": "/tmp/*.log"}])
    assert "rm -f -- /tmp/x\n" in text and "for f in /tmp/*.log; do\n" in text
    folder = script("DeleteFolder", [{"path": "/d/"}, {"path": "/e", "force": True}])
    assert "if [ -e /d ] || [ -L /d ]; then\n" in folder and "rmdir -- /d\n" in folder
    assert "rm -rf -- /e\n" in folder


def test_list_and_read_files() -> None:
    listing = script("ListFiles", [{"path": "/v/", "fileNamePattern": "*.log"}])
    assert "find -H /v -maxdepth 1 -type f -name '*.log' -print | LC_ALL=C sort\n" in listing
    read = script("ReadFile", [{"path": "/etc/os-release"}])
    assert "base64 -w0 -- /etc/os-release; echo\n" in read
    items, _ = typed_items(ACTIONS["ReadFile"], [{"path": "/a"}, {"path": "/b"}], final=True)
    parse = ACTIONS["ReadFile"].parse_outputs
    assert parse is not None
    assert parse(RemoteResult(0, "YQ==\nYgo=\n", "", 0), items) == {"content": "a\nb\n"}
    parse = ACTIONS["ListFiles"].parse_outputs
    assert parse is not None
    assert parse(RemoteResult(0, "/a\n/b\n", "", 0), []) == {"files": "/a,/b"}


def test_encoding_owner_and_permission_modules() -> None:
    assert "iconv -f UTF-8 -t UTF-16BE < /f" in script(
        "SetFileEncoding", [{"path": "/f", "encoding": "utf16-be"}]
    )
    assert "chown -- app: /f\n" in script("SetFileOwner", [{"path": "/f", "owner": "app"}])
    assert "chown -R -- app:grp /d\n" in script(
        "SetFolderOwner", [{"path": "/d/", "owner": "app", "group": "grp"}]
    )
    assert "chown -- app: /d\n" in script(
        "SetFolderOwner", [{"path": "/d", "owner": "app", "recursive": False}]
    )
    assert "chmod -- 0600 /f\n" in script(
        "SetFilePermissions", [{"path": "/f", "permissions": "0600"}]
    )
    assert "chmod -R -- 755 /d\n" in script(
        "SetFolderPermissions", [{"path": "/d", "permissions": "755"}]
    )


def test_update_os_uses_whatever_package_manager_the_guest_has() -> None:
    every = script("UpdateOS", {})
    assert "apt-get -o DPkg::Lock::Timeout=300 update\n" in every
    assert "upgrade --with-new-pkgs\n" in every
    assert "  dnf -y upgrade\n" in every and "  yum -y update\n" in every
    assert "no supported package manager" in every
    some = script("UpdateOS", {"include": ["openssl", "curl", "kernel"], "exclude": ["kernel"]})
    assert "install --only-upgrade -- openssl curl\n" in some  # include minus exclude
    assert 'apt-mark hold "$p"' in some and "apt-mark unhold" in some
    assert "dnf -y upgrade --exclude=kernel openssl curl\n" in some


def test_web_download_names_and_probes() -> None:
    assert web_mod.target_path("https://h/p/java.zip?x=1", "/tmp/") == "/tmp/java.zip"
    assert web_mod.target_path("https://h/p/java.zip", "/opt/j.zip") == "/opt/j.zip"
    with pytest.raises(ActionFailed, match="no file name"):
        web_mod.target_path("https://h/", "/tmp/")
    assert web_mod.probe_script("/t x", "SHA256") == (
        "if [ -d '/t x' ]; then echo folder\n"
        "elif [ -e '/t x' ]; then echo \"file $(sha256sum < '/t x' | cut -d\" \" -f1)\"\n"
        "else echo missing\nfi\n"
    )


def test_s3_helpers() -> None:
    assert parse_s3_uri("s3://bucket/a/b.zip") == ("bucket", "a/b.zip")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError):
        parse_s3_uri("https://bucket/a")
    assert existing_paths_script(["/a b", "/c"]) == (
        "for p in '/a b' /c; do if [ -e \"$p\" ]; then printf '%s\\n' \"$p\"; fi; done\n"
    )


# --- host-side modules -------------------------------------------------------------


class Files(http.server.BaseHTTPRequestHandler):
    content = {"/pkg.tar": b"package-bytes", "/redirect": b""}
    hits: list[str] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/pkg.tar")
            self.end_headers()
            return
        if self.path == "/flaky" and self.hits.count("/flaky") < 3:
            self.send_response(503)
            self.end_headers()
            return
        body = self.content.get(self.path, b"ok" if self.path == "/flaky" else None)
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_url() -> Iterator[str]:
    Files.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def guest_state(state: str) -> ScriptedRemote:
    """A guest whose probe for the download target answers `state`."""
    return ScriptedRemote(lambda s: (0, state + "\n", ""))


def download(remote: ScriptedRemote, inputs: list[dict[str, Any]]) -> dict[str, str]:
    items, problems = typed_items(ACTIONS["WebDownload"], inputs, final=True)
    assert not problems
    context = HostContext(remote, None, None, lambda line: None)
    return web_mod.run_web_download(items, context)


def test_web_download_verifies_and_writes_into_the_guest(http_url: str) -> None:
    remote = guest_state("missing")
    digest = hashlib.sha256(b"package-bytes").hexdigest()
    outputs = download(remote, [
        {"source": f"{http_url}/redirect", "destination": "/opt/a.tar", "checksum": digest.upper(),
         "algorithm": "sha256"},
        {"source": f"{http_url}/pkg.tar", "destination": "/opt/dir/"},
    ])  # fmt: skip
    assert outputs == {"destination": "/opt/a.tar\n/opt/dir/pkg.tar"}
    assert remote.files == {"/opt/a.tar": b"package-bytes", "/opt/dir/pkg.tar": b"package-bytes"}


def test_web_download_refuses_a_wrong_checksum(http_url: str) -> None:
    remote = guest_state("missing")
    with pytest.raises(ActionFailed, match=r"MD5 checksum mismatch .* expected 00, got"):
        download(remote, [{"source": f"{http_url}/pkg.tar", "destination": "/a",
                           "checksum": "00", "algorithm": "MD5"}])  # fmt: skip
    assert remote.files == {}


def test_web_download_keeps_a_file_with_the_right_checksum(http_url: str) -> None:
    digest = hashlib.md5(b"package-bytes").hexdigest()
    remote = guest_state(f"file {digest}")
    download(remote, [{"source": f"{http_url}/pkg.tar", "destination": "/a", "checksum": digest,
                       "algorithm": "MD5"}])  # fmt: skip
    assert Files.hits == [] and remote.files == {}


def test_web_download_overwrite_false(http_url: str) -> None:
    with pytest.raises(ActionFailed, match="already exists and overwrite is false"):
        download(guest_state("file"), [{"source": f"{http_url}/pkg.tar", "destination": "/a",
                                        "overwrite": False}])  # fmt: skip


def test_web_download_retries_server_errors_but_not_404(
    http_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []
    monkeypatch.setattr(web_mod, "sleep", waits.append)
    download(guest_state("missing"), [{"source": f"{http_url}/flaky", "destination": "/f"}])
    assert waits == [1, 2]
    with pytest.raises(ActionFailed, match="HTTP 404"):
        download(guest_state("missing"), [{"source": f"{http_url}/none", "destination": "/n"}])
    assert Files.hits.count("/none") == 1


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for key, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(key, value)
    from moto import mock_aws

    with mock_aws():
        client = S3Config(region="us-east-1").client()
        client.create_bucket(Bucket="bucket")
        yield client


def run_host(action: str, inputs: list[dict[str, Any]], remote: ScriptedRemote) -> None:
    spec = ACTIONS[action]
    items, problems = typed_items(spec, inputs, final=True)
    assert not problems and spec.host is not None
    spec.host(items, HostContext(remote, S3Config(region="us-east-1"), None, lambda line: None))


def test_s3_download_of_a_key_and_a_prefix(s3: Any) -> None:
    for key in ("app/bin/tool", "app/conf/a.yaml", "app/conf/", "other"):
        s3.put_object(Bucket="bucket", Key=key, Body=key.encode())
    remote = ScriptedRemote()
    run_host("S3Download", [
        {"source": "s3://bucket/other", "destination": "/opt/other.bin"},
        {"source": "s3://bucket/app/*", "destination": "/opt/app"},
    ], remote)  # fmt: skip
    assert remote.files == {
        "/opt/other.bin": b"other",
        "/opt/app/bin/tool": b"app/bin/tool",
        "/opt/app/conf/a.yaml": b"app/conf/a.yaml",
    }
    assert "[ -d /opt ]" in remote.scripts[0] and "[ -d /opt/app ]" in remote.scripts[1]


def test_s3_download_errors(s3: Any) -> None:
    s3.put_object(Bucket="bucket", Key="k", Body=b"x")
    exists = ScriptedRemote(lambda s: (0, "/a\n", "") if "printf" in s else (0, "", ""))
    with pytest.raises(ActionFailed, match="/a already exists and overwrite is false"):
        run_host(
            "S3Download",
            [{"source": "s3://bucket/k", "destination": "/a", "overwrite": False}],
            exists,
        )
    with pytest.raises(ActionFailed, match="no object matches s3://bucket/nothing/"):
        run_host(
            "S3Download",
            [{"source": "s3://bucket/nothing/*", "destination": "/d/"}],
            ScriptedRemote(),
        )
    with pytest.raises(ActionFailed, match="NoSuchKey"):
        run_host(
            "S3Download", [{"source": "s3://bucket/missing", "destination": "/m"}], ScriptedRemote()
        )


def test_s3_upload_of_files_chosen_in_the_guest(s3: Any) -> None:
    listing = "/var/log/a.log\ta.log\n/var/log/sub/b.log\tsub/b.log\n"
    remote = ScriptedRemote(lambda s: (0, listing, "") if "emit()" in s else (0, "", ""))
    remote.files = {"/var/log/a.log": b"A", "/var/log/sub/b.log": b"B"}
    run_host(
        "S3Upload",
        [{"source": "/var/log/*", "destination": "s3://bucket/logs/", "recurse": True}],
        remote,
    )
    keys = {o["Key"]: s3.get_object(Bucket="bucket", Key=o["Key"])["Body"].read()
            for o in s3.list_objects_v2(Bucket="bucket")["Contents"]}  # fmt: skip
    assert keys == {"logs/a.log": b"A", "logs/sub/b.log": b"B"}


def test_s3_upload_of_one_file_to_an_exact_key(s3: Any) -> None:
    remote = ScriptedRemote(lambda s: (0, "/r.txt\tr.txt\n", "") if "emit()" in s else (0, "", ""))
    remote.files = {"/r.txt": b"R"}
    run_host(
        "S3Upload", [{"source": "/r.txt", "destination": "s3://bucket/reports/latest.txt"}], remote
    )
    assert s3.get_object(Bucket="bucket", Key="reports/latest.txt")["Body"].read() == b"R"
