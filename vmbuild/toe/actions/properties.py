"""File modules that read or change properties: list, read, encoding, owner, mode."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence

from vmbuild.remote.base import RemoteResult
from vmbuild.toe.actions.base import (
    ENCODINGS,
    PRELUDE,
    ActionSpec,
    Field,
    Item,
    Shape,
    check_account,
    check_mode,
    encoding_field,
    fail_unless,
    path_field,
    q,
    strip_slashes,
)

RECURSIVE = Field(
    "recursive", "bool", "Apply to everything inside too (default true).", default=True
)


def list_files_script(items: Sequence[Item]) -> str:
    out = [PRELUDE]
    for item in items:
        path = strip_slashes(item["path"])
        out.append(fail_unless(f"[ -d {q(path)} ]", f"ListFiles: folder {path} does not exist"))
        depth = "" if item["recursive"] else " -maxdepth 1"
        name = f" -name {q(item['fileNamePattern'])}" if item["fileNamePattern"] else ""
        out.append(f"find -H {q(path)}{depth} -type f{name} -print | LC_ALL=C sort\n")
    return "".join(out)


def list_files_output(result: RemoteResult, items: Sequence[Item]) -> dict[str, str]:
    # AWSTOE's documented output is one comma-separated string.
    return {"files": ",".join(line for line in result.stdout.splitlines() if line)}


def read_file_script(items: Sequence[Item]) -> str:
    out = [PRELUDE]
    for item in items:
        path = item["path"]
        out.append(fail_unless(f"[ -f {q(path)} ]", f"ReadFile: {path} does not exist"))
        # base64 on one line per file: any byte survives the trip through SSH.
        out.append(f"base64 -w0 -- {q(path)}; echo\n")
    return "".join(out)


def read_file_output(result: RemoteResult, items: Sequence[Item]) -> dict[str, str]:
    lines = result.stdout.splitlines()
    contents = []
    for item, line in zip(items, lines, strict=False):
        try:
            raw = base64.b64decode(line, validate=True)
        except binascii.Error:
            raw = b""
        text = raw.decode(ENCODINGS[item["encoding"]][0], errors="replace")
        contents.append(text.removeprefix("\ufeff"))
    return {"content": "\n".join(contents)}


def set_file_encoding_script(items: Sequence[Item]) -> str:
    out = [PRELUDE]
    for item in items:
        path = item["path"]
        target = ENCODINGS[item["encoding"]][1]
        out.append(fail_unless(f"[ -f {q(path)} ]", f"SetFileEncoding: {path} does not exist"))
        # Rewrite in place (cat >) so that owner, mode and links are kept.
        out.append(
            "converted=$(mktemp)\n"
            f'iconv -f UTF-8 -t {target} < {q(path)} > "$converted"\n'
            f'cat "$converted" > {q(path)}\n'
            'rm -f -- "$converted"\n'
        )
    return "".join(out)


def _each_path(
    action: str, kind: str, items: Sequence[Item], command: Callable[[Item], str]
) -> str:
    """For each item: fail unless its file (or folder) exists, then `command(item) PATH`."""
    test = "-e" if kind == "file" else "-d"
    out = [PRELUDE]
    for item in items:
        path = item["path"] if kind == "file" else strip_slashes(item["path"])
        out.append(fail_unless(f"[ {test} {q(path)} ]", f"{action}: {kind} {path} does not exist"))
        out.append(f"{command(item)} {q(path)}\n")
    return "".join(out)


def _chown(item: Item) -> str:
    # Without a group, `owner:` gives the owner's login group, as AWSTOE documents.
    flag = "-R " if item.get("recursive") else ""
    return f"chown {flag}-- {q(item['owner'] + ':' + (item['group'] or ''))}"


def _chmod(item: Item) -> str:
    flag = "-R " if item.get("recursive") else ""
    return f"chmod {flag}-- {q(item['permissions'])}"


LIST_FILES = ActionSpec(
    name="ListFiles",
    summary="List the files in a folder.",
    shape=Shape.LIST,
    fields=(
        path_field("Folder to list."),
        Field("fileNamePattern", "string", "Only names matching this pattern (* wildcard)."),
        Field("recursive", "bool", "Also list subfolders (default false).", default=False),
    ),
    outputs=("files",),
    script=list_files_script,
    parse_outputs=list_files_output,
)

READ_FILE = ActionSpec(
    name="ReadFile",
    summary="Read text files (for chaining).",
    shape=Shape.LIST,
    fields=(
        path_field("File to read."),
        encoding_field(),
        Field(
            "printFileContent",
            "bool",
            "Also write the content to the run log (default false).",
            default=False,
        ),
    ),
    outputs=("content",),
    script=read_file_script,
    parse_outputs=read_file_output,
    log_stdout=False,
)

SET_FILE_ENCODING = ActionSpec(
    name="SetFileEncoding",
    summary="Convert UTF-8 files to another encoding.",
    shape=Shape.LIST,
    fields=(path_field("File to convert (from UTF-8)."), encoding_field("Target encoding.")),
    script=set_file_encoding_script,
)

_OWNER_FIELDS = (
    Field("owner", "string", "User name or id.", required=True, check=check_account),
    Field("group", "string", "Group (default: the owner's group).", check=check_account),
)

SET_FILE_OWNER = ActionSpec(
    name="SetFileOwner",
    summary="Change the owner of files.",
    shape=Shape.LIST,
    fields=(path_field("File to change."), *_OWNER_FIELDS),
    script=lambda items: _each_path("SetFileOwner", "file", items, _chown),
)

SET_FOLDER_OWNER = ActionSpec(
    name="SetFolderOwner",
    summary="Change the owner of folders.",
    shape=Shape.LIST,
    fields=(path_field("Folder to change."), *_OWNER_FIELDS, RECURSIVE),
    script=lambda items: _each_path("SetFolderOwner", "folder", items, _chown),
)

_MODE_FIELD = Field(
    "permissions", "string", "Mode such as 0644, 755 or u+x.", required=True, check=check_mode
)

SET_FILE_PERMISSIONS = ActionSpec(
    name="SetFilePermissions",
    summary="Change the mode of files.",
    shape=Shape.LIST,
    fields=(path_field("File to change."), _MODE_FIELD),
    script=lambda items: _each_path("SetFilePermissions", "file", items, _chmod),
)

SET_FOLDER_PERMISSIONS = ActionSpec(
    name="SetFolderPermissions",
    summary="Change the mode of folders.",
    shape=Shape.LIST,
    fields=(path_field("Folder to change."), _MODE_FIELD, RECURSIVE),
    script=lambda items: _each_path("SetFolderPermissions", "folder", items, _chmod),
)
