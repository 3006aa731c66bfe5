"""The action modules' generated scripts, run for real with the host's bash in a
temporary directory: quick proof that the scripts do what the unit tests say
they contain, before the same documents run in a VM.

These spawn bash, so they cannot live in tests/unit (which forbids processes);
they need no VM and take a few seconds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from vmbuild import run as run_mod
from vmbuild.errors import CommandTimeout
from vmbuild.remote.base import OutputCallback, RemoteResult
from vmbuild.toe.actions import ACTIONS
from vmbuild.toe.actions.base import typed_items


class LocalRemote:
    """A `Remote` on this machine: scripts run with bash in `cwd`."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.reboots = 0

    def run(
        self,
        script: str,
        *,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        env: dict[str, str] | None = None,
    ) -> RemoteResult:
        err = self.cwd / ".stderr"
        start = time.monotonic()
        try:
            done = run_mod.run(
                ["bash", "-c", f'bash -c "$0" 2>{err}', script],
                cwd=self.cwd, timeout=timeout, check=False, env=env,
            )  # fmt: skip
        except CommandTimeout:
            return RemoteResult(124, "", "", time.monotonic() - start, timed_out=True)
        stderr = err.read_text() if err.exists() else ""
        for line in done.stdout.splitlines():
            if on_output:
                on_output("stdout", line)
        return RemoteResult(done.returncode, done.stdout, stderr, time.monotonic() - start)

    def put(self, data: bytes, path: str, *, mode: int = 0o644) -> None:
        target = self.cwd / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(mode)

    def get(self, path: str) -> bytes:
        return (self.cwd / path).read_bytes()

    def reboot(self) -> None:
        self.reboots += 1


def run_action(remote: LocalRemote, action: str, inputs: Any) -> RemoteResult:
    spec = ACTIONS[action]
    items, problems = typed_items(spec, inputs, final=True)
    assert not problems, problems
    assert spec.script is not None
    return remote.run(spec.script(items))


def ok(remote: LocalRemote, action: str, inputs: Any) -> RemoteResult:
    result = run_action(remote, action, inputs)
    assert result.exit_code == 0, result.stderr
    return result


def failed(remote: LocalRemote, action: str, inputs: Any) -> str:
    result = run_action(remote, action, inputs)
    assert result.exit_code != 0, f"{action} should have failed"
    return result.stderr


@pytest.fixture
def local(tmp_path: Path) -> LocalRemote:
    return LocalRemote(tmp_path)


def tree(root: Path) -> list[str]:
    return sorted(
        str(p.relative_to(root)) + ("/" if p.is_dir() and not p.is_symlink() else "")
        for p in root.rglob("*")
        if p.name != ".stderr"
    )


def test_create_append_and_read_files_with_awkward_names(local: LocalRemote) -> None:
    path = str(local.cwd / "dir with space" / "it's a file.txt")
    ok(
        local,
        "CreateFile",
        [{"path": path, "content": "line 1\n$HOME `x` \\n", "permissions": "0640"}],
    )
    assert Path(path).read_text() == "line 1\n$HOME `x` \\n"
    assert oct(Path(path).stat().st_mode & 0o777) == "0o640"
    ok(local, "AppendFile", [{"path": path, "content": "more"}])
    assert Path(path).read_text() == "line 1\n$HOME `x` \\nmore"
    assert "already exists" in failed(local, "CreateFile", [{"path": path, "overwrite": False}])
    assert "does not exist" in failed(local, "AppendFile", [{"path": path + ".nope"}])
    result = ok(local, "ReadFile", [{"path": path}])
    outputs = ACTIONS["ReadFile"].parse_outputs(result, [{"encoding": "utf8"}])  # type: ignore[misc]
    assert outputs == {"content": Path(path).read_text()}


def test_encodings_round_trip(local: LocalRemote) -> None:
    path = str(local.cwd / "u16.txt")
    ok(local, "CreateFile", [{"path": path, "content": "héllo", "encoding": "UTF-16"}])
    assert Path(path).read_bytes() == "héllo".encode("utf-16-le")
    result = ok(local, "ReadFile", [{"path": path, "encoding": "utf16"}])
    items, _ = typed_items(ACTIONS["ReadFile"], [{"path": path, "encoding": "utf16"}], final=True)
    assert ACTIONS["ReadFile"].parse_outputs(result, items) == {"content": "héllo"}  # type: ignore[misc]
    plain = str(local.cwd / "plain.txt")
    Path(plain).write_text("é")
    ok(local, "SetFileEncoding", [{"path": plain, "encoding": "utf-32-BE"}])
    assert Path(plain).read_bytes() == "é".encode("utf-32-be")


def test_copy_and_move_files_and_folders(local: LocalRemote) -> None:
    src = local.cwd / "src"
    (src / "sub").mkdir(parents=True)
    for name in ("a.log", "b.log", "c.txt"):
        (src / name).write_text(name)
    (src / "sub" / "deep.txt").write_text("deep")
    c = str(local.cwd)
    ok(local, "CopyFile", [{"source": f"{c}/src/a.log", "destination": f"{c}/out/renamed.log"}])
    ok(local, "CopyFile", [{"source": f"{c}/src/*.log", "destination": f"{c}/logs/"}])
    ok(local, "CopyFolder", [{"source": f"{c}/src", "destination": f"{c}/copies/"}])
    ok(local, "CopyFolder", [{"source": f"{c}/src/", "destination": f"{c}/copies/src"}])  # merge
    ok(local, "MoveFile", [{"source": f"{c}/out/renamed.log", "destination": f"{c}/moved/"}])
    ok(local, "MoveFolder", [{"source": f"{c}/copies/src", "destination": f"{c}/final"}])
    assert tree(local.cwd) == [
        "copies/",
        "final/",
        "final/a.log",
        "final/b.log",
        "final/c.txt",
        "final/sub/",
        "final/sub/deep.txt",
        "logs/",
        "logs/a.log",
        "logs/b.log",
        "moved/",
        "moved/renamed.log",
        "out/",
        "src/",
        "src/a.log",
        "src/b.log",
        "src/c.txt",
        "src/sub/",
        "src/sub/deep.txt",
    ]
    message = failed(
        local, "CopyFile", [{"source": f"{c}/src/c.txt", "destination": f"{c}/logs/a.log",
                            "overwrite": False}]
    )  # fmt: skip
    assert "already exists and overwrite is false" in message
    assert "does not exist" in failed(
        local, "CopyFile", [{"source": f"{c}/nope.txt", "destination": f"{c}/x"}]
    )
    assert "no file matches" in failed(
        local, "MoveFile", [{"source": f"{c}/src/*.none", "destination": f"{c}/x/"}]
    )
    assert "are the same" in failed(
        local, "MoveFolder", [{"source": f"{c}/final", "destination": f"{c}/"}]
    )
    assert (local.cwd / "final" / "a.log").exists()  # refusing kept it


def test_folders_links_and_deletion(local: LocalRemote) -> None:
    c = str(local.cwd)
    ok(local, "CreateFolder", [{"path": f"{c}/a/b/c/", "permissions": "750"}])
    assert oct((local.cwd / "a/b/c").stat().st_mode & 0o777) == "0o750"
    ok(local, "CreateFolder", [{"path": f"{c}/a/b/c"}])  # exists: fine by default
    assert "already exists" in failed(
        local, "CreateFolder", [{"path": f"{c}/a", "overwrite": False}]
    )
    (local.cwd / "a/file.txt").write_text("x")
    ok(local, "CreateSymlink", [{"path": f"{c}/links/l1", "target": f"{c}/a/file.txt"}])
    assert os.readlink(local.cwd / "links/l1") == f"{c}/a/file.txt"
    assert "already exists" in failed(
        local, "CreateSymlink", [{"path": f"{c}/links/l1", "target": f"{c}/a"}]
    )
    ok(local, "CreateSymlink", [{"path": f"{c}/links/l1", "target": f"{c}/a", "force": True}])
    assert "not a symbolic link" in failed(
        local, "CreateSymlink", [{"path": f"{c}/a/file.txt", "target": f"{c}/a", "force": True}]
    )
    assert "does not exist" in failed(
        local, "CreateSymlink", [{"path": f"{c}/l2", "target": f"{c}/missing"}]
    )
    ok(local, "DeleteFile", [{"path": f"{c}/links/l1"}, {"path": f"{c}/already-gone"}])
    assert (local.cwd / "a").is_dir()  # deleting the link kept the folder
    assert "is a folder" in failed(local, "DeleteFile", [{"path": f"{c}/a"}])
    assert "not empty" in failed(local, "DeleteFolder", [{"path": f"{c}/a"}])
    ok(local, "DeleteFolder", [{"path": f"{c}/a/b/c"}])
    ok(local, "DeleteFolder", [{"path": f"{c}/a", "force": True}, {"path": f"{c}/never"}])
    assert not (local.cwd / "a").exists()


def test_wildcard_delete_and_list(local: LocalRemote) -> None:
    c = str(local.cwd)
    for name in ("x.log", "y.log", "keep.txt", "sub/z.log"):
        (local.cwd / name).parent.mkdir(exist_ok=True)
        (local.cwd / name).write_text(name)
    listed = ok(local, "ListFiles", [{"path": c, "fileNamePattern": "*.log"}])
    files = ACTIONS["ListFiles"].parse_outputs(listed, [])["files"]  # type: ignore[misc]
    assert files == f"{c}/x.log,{c}/y.log"
    listed = ok(
        local, "ListFiles", [{"path": c + "/", "recursive": True, "fileNamePattern": "*.log"}]
    )
    assert ACTIONS["ListFiles"].parse_outputs(listed, [])["files"].count(",") == 2  # type: ignore[misc]
    ok(local, "DeleteFile", [{"path": f"{c}/*.log"}])
    assert tree(local.cwd) == ["keep.txt", "sub/", "sub/z.log"]
    assert "does not exist" in failed(local, "ListFiles", [{"path": f"{c}/nope"}])


def test_owner_and_permissions(local: LocalRemote) -> None:
    c = str(local.cwd)
    (local.cwd / "d/e").mkdir(parents=True)
    (local.cwd / "d/e/f.txt").write_text("f")
    ok(local, "SetFolderPermissions", [{"path": f"{c}/d", "permissions": "0700"}])
    assert oct((local.cwd / "d/e/f.txt").stat().st_mode & 0o777) == "0o700"
    ok(local, "SetFilePermissions", [{"path": f"{c}/d/e/f.txt", "permissions": "u=rw,go="}])
    assert oct((local.cwd / "d/e/f.txt").stat().st_mode & 0o777) == "0o600"
    ok(
        local,
        "SetFolderPermissions",
        [{"path": f"{c}/d", "permissions": "755", "recursive": False}],
    )
    assert oct((local.cwd / "d/e/f.txt").stat().st_mode & 0o777) == "0o600"
    ok(local, "SetFolderOwner", [{"path": f"{c}/d", "owner": "nobody", "group": "nogroup"}])
    assert (local.cwd / "d/e/f.txt").stat().st_uid == 65534
    ok(local, "SetFileOwner", [{"path": f"{c}/d/e/f.txt", "owner": "root"}])
    assert (local.cwd / "d/e/f.txt").stat().st_uid == 0
    assert "does not exist" in failed(local, "SetFileOwner", [{"path": f"{c}/no", "owner": "root"}])
    assert "does not exist" in failed(
        local, "SetFolderPermissions", [{"path": f"{c}/d/e/f.txt", "permissions": "755"}]
    )


def test_execute_bash_and_binary(local: LocalRemote) -> None:
    result = ok(local, "ExecuteBash", {"commands": ["x='a b'", 'echo "$x"', "echo done"]})
    assert result.stdout == "a b\ndone\n"
    assert run_action(local, "ExecuteBash", {"commands": ["exit 194"]}).exit_code == 194
    result = ok(local, "ExecuteBinary", {"path": "/bin/echo", "arguments": ["it's", "$HOME"]})
    assert result.stdout == "it's $HOME\n"


def test_s3_upload_listing_selects_files(local: LocalRemote) -> None:
    from vmbuild.toe.actions.s3 import upload_listing_script

    c = str(local.cwd)
    for name in ("f1.txt", "f2.txt", "dir/g.txt", "dir/sub/h.txt"):
        (local.cwd / name).parent.mkdir(parents=True, exist_ok=True)
        (local.cwd / name).write_text(name)

    def listing(source: str, recurse: bool) -> list[list[str]]:
        result = local.run(upload_listing_script(source, recurse))
        assert result.exit_code == 0, result.stderr
        return sorted(line.split("\t") for line in result.stdout.splitlines())

    assert listing(f"{c}/f1.txt", False) == [[f"{c}/f1.txt", "f1.txt"]]
    assert listing(f"{c}/*", False) == [[f"{c}/f1.txt", "f1.txt"], [f"{c}/f2.txt", "f2.txt"]]
    assert [s for _, s in listing(f"{c}/*", True)] == [
        "dir/g.txt", "dir/sub/h.txt", "f1.txt", "f2.txt"
    ]  # fmt: skip
    assert [s for _, s in listing(f"{c}/dir", True)] == ["g.txt", "sub/h.txt"]
    result = local.run(upload_listing_script(f"{c}/dir", False))
    assert result.exit_code != 0 and "set recurse: true" in result.stderr
