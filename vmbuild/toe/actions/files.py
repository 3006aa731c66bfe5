"""File and folder modules that create, copy, move and delete.

Behaviour follows the AWSTOE module reference. Where it leaves room, vmbuild
chooses the safe and idempotent reading (a step re-runs after a 194 reboot):

* CopyFolder onto an existing folder merges (files of the same name are
  replaced); MoveFolder replaces the existing folder.
* CreateFolder with `overwrite: true` keeps an existing folder and its content
  (AWS's "truncates" would delete it); `overwrite: false` fails if it exists.
* DeleteFile and DeleteFolder succeed when the path is already gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from vmbuild.toe.actions.base import (
    ENCODINGS,
    PRELUDE,
    ActionSpec,
    Field,
    Item,
    Problems,
    Shape,
    check_account,
    check_mode,
    encoding_field,
    fail,
    fail_if,
    fail_unless,
    glob_words,
    has_wildcard,
    path_field,
    q,
    strip_slashes,
    write_bytes,
)

OVERWRITE = Field(
    "overwrite",
    "bool",
    "Replace what already exists at the destination (default true).",
    default=True,
)
OWNER = Field("owner", "string", "User name or id to own the result.", check=check_account)
GROUP = Field("group", "string", "Group name or id.", check=check_account)
PERMISSIONS = Field("permissions", "string", "Mode such as 0644 or u+x.", check=check_mode)


def _parent(path: str) -> str:
    return f'mkdir -p -- "$(dirname -- {q(path)})"\n'


def ownership(path: str, owner: str | None, group: str | None, *, recursive: bool = False) -> str:
    flag = "-R " if recursive else ""
    if owner and group:
        return f"chown {flag}-- {q(owner + ':' + group)} {q(path)}\n"
    if owner:
        return f"chown {flag}-- {q(owner)} {q(path)}\n"
    if group:
        return f"chgrp {flag}-- {q(group)} {q(path)}\n"
    return ""


def _exists_check(action: str, path: str) -> str:
    message = f"{action}: {path} already exists and overwrite is false"
    return fail_if(f"[ -e {q(path)} ] || [ -L {q(path)} ]", message)


# --- CreateFile, AppendFile ----------------------------------------------------


def create_file_script(items: Sequence[Item]) -> str:
    out = [PRELUDE]
    for item in items:
        path = item["path"]
        data = (item["content"] or "").encode(ENCODINGS[item["encoding"]][0])
        if not item["overwrite"]:
            out.append(_exists_check("CreateFile", path))
        out.append(_parent(path))
        out.append(write_bytes(data, f"> {q(path)}"))
        out.append(ownership(path, item["owner"], item["group"]))
        if item["permissions"]:
            out.append(f"chmod -- {q(item['permissions'])} {q(path)}\n")
    return "".join(out)


def append_file_script(items: Sequence[Item]) -> str:
    out = [PRELUDE]
    for item in items:
        path = item["path"]
        data = (item["content"] or "").encode(ENCODINGS[item["encoding"]][0])
        out.append(fail_unless(f"[ -f {q(path)} ]", f"AppendFile: {path} does not exist"))
        out.append(write_bytes(data, f">> {q(path)}"))
    return "".join(out)


# --- CopyFile, MoveFile, CopyFolder, MoveFolder --------------------------------

Kind = Literal["file", "folder"]


def _transfer_script(action: str, kind: Kind, verb: str, items: Sequence[Item]) -> str:
    out = [PRELUDE]
    for item in items:
        source, destination = item["source"], item["destination"]
        if has_wildcard(source):
            out.append(_transfer_many(action, kind, verb, source, destination, item["overwrite"]))
        else:
            out.append(_transfer_one(action, kind, verb, source, destination, item["overwrite"]))
    return "".join(out)


def _transfer_one(
    action: str, kind: Kind, verb: str, source: str, dest: str, overwrite: bool
) -> str:
    source = strip_slashes(source) if kind == "folder" else source
    test = "-f" if kind == "file" else "-d"
    lines = [fail_unless(f"[ {test} {q(source)} ]", f"{action}: {kind} {source} does not exist")]
    if dest.endswith("/"):
        lines.append(f'target={q(dest)}"$(basename -- {q(source)})"\n')
    else:
        lines.append(f"target={q(strip_slashes(dest) if kind == 'folder' else dest)}\n")
    lines.append(_place("target", action, kind, verb, source, overwrite))
    return "".join(lines)


def _transfer_many(
    action: str, kind: Kind, verb: str, source: str, dest: str, overwrite: bool
) -> str:
    test = "-f" if kind == "file" else "-d"
    return (
        "shopt -s nullglob\n"
        "matched=0\n"
        f"for src in {glob_words(source)}; do\n"
        f'  [ {test} "$src" ] || continue\n'
        "  matched=1\n"
        f'  target={q(dest)}"$(basename -- "$src")"\n'
        + _place("target", action, kind, verb, '"$src"', overwrite, quoted=True, indent="  ")
        + "done\n"
        + fail_if('[ "$matched" = 0 ]', f"{action}: no {kind} matches {source}")
    )


def _place(
    var: str,
    action: str,
    kind: Kind,
    verb: str,
    source: str,
    overwrite: bool,
    *,
    quoted: bool = False,
    indent: str = "",
) -> str:
    src = source if quoted else q(source)
    t = f'"${var}"'
    # Replacing a folder by itself would delete it before the move: refuse.
    lines = [
        f'if [ "$(realpath -m -- {src})" = "$(realpath -m -- {t})" ]; then'
        f' echo "{action}: source and destination are the same" >&2; exit 1; fi'
    ]
    if not overwrite:
        lines.append(
            f'if [ -e {t} ] || [ -L {t} ]; then echo "{action}: ${{{var}}} already exists'
            ' and overwrite is false" >&2; exit 1; fi'
        )
    if kind == "file":
        lines.append(f'if [ -d {t} ]; then echo "{action}: ${{{var}}} is a folder" >&2; exit 1; fi')
        lines.append(f'mkdir -p -- "$(dirname -- {t})"')
        lines.append(f"{verb} -f -- {src} {t}")
    elif verb == "cp":
        lines.append(f"mkdir -p -- {t}")
        lines.append(f"cp -a -- {src}/. {t}/")
    else:
        lines.append(f"rm -rf -- {t}")
        lines.append(f'mkdir -p -- "$(dirname -- {t})"')
        lines.append(f"mv -- {src} {t}")
    return "".join(f"{indent}{line}\n" for line in lines)


def _wildcard_check(item: Item) -> Problems:
    if has_wildcard(item["source"]) and not item["destination"].endswith("/"):
        return [("destination", "must end with / when the source has a wildcard")]
    if "*" in item["source"].rsplit("/", 1)[0]:
        return [("source", "a wildcard is allowed only after the last /")]
    return []


def _transfer_spec(name: str, kind: Kind, verb: str, summary: str) -> ActionSpec:
    return ActionSpec(
        name=name,
        summary=summary,
        shape=Shape.LIST,
        fields=(
            Field(
                "source",
                "string",
                f"The {kind} to {name[:4].lower()}; * allowed in the last part.",
                required=True,
            ),
            Field(
                "destination",
                "string",
                "Target path; ending in / means 'into this folder, same name'.",
                required=True,
            ),
            OVERWRITE,
        ),
        script=lambda items: _transfer_script(name, kind, verb, items),
        item_check=_wildcard_check,
    )


# --- CreateFolder, CreateSymlink, DeleteFile, DeleteFolder ----------------------


def create_folder_script(items: Sequence[Item]) -> str:
    out = [PRELUDE]
    for item in items:
        path = strip_slashes(item["path"])
        if not item["overwrite"]:
            out.append(_exists_check("CreateFolder", path))
        out.append(f"mkdir -p -- {q(path)}\n")
        out.append(ownership(path, item["owner"], item["group"]))
        if item["permissions"]:
            out.append(f"chmod -- {q(item['permissions'])} {q(path)}\n")
    return "".join(out)


def create_symlink_script(items: Sequence[Item]) -> str:
    out = [PRELUDE]
    for item in items:
        path, target = strip_slashes(item["path"]), item["target"]
        out.append(
            fail_unless(f"[ -e {q(target)} ]", f"CreateSymlink: target {target} does not exist")
        )
        replace = (
            f"rm -f -- {q(path)}"
            if item["force"]
            else fail(f"CreateSymlink: link {path} already exists (set force: true to replace it)")
        )
        not_link = fail(f"CreateSymlink: {path} exists and is not a symbolic link")
        out.append(
            f"if [ -L {q(path)} ]; then {replace}\nelif [ -e {q(path)} ]; then {not_link}\nfi\n"
        )
        out.append(_parent(path))
        out.append(f"ln -s -- {q(target)} {q(path)}\n")
    return "".join(out)


def delete_file_script(items: Sequence[Item]) -> str:
    out = [PRELUDE]
    for item in items:
        path = item["path"]
        if has_wildcard(path):
            out.append(
                "shopt -s nullglob\n"
                f"for f in {glob_words(path)}; do\n"
                '  if [ -d "$f" ] && [ ! -L "$f" ]; then continue; fi\n'
                '  rm -f -- "$f"\n'
                "done\n"
            )
        else:
            message = f"DeleteFile: {path} is a folder (use DeleteFolder)"
            out.append(fail_if(f"[ -d {q(path)} ] && [ ! -L {q(path)} ]", message))
            out.append(f"rm -f -- {q(path)}\n")
    return "".join(out)


def delete_folder_script(items: Sequence[Item]) -> str:
    out = [PRELUDE]
    for item in items:
        path = strip_slashes(item["path"])
        p = q(path)
        out.append(f"if [ -e {p} ] || [ -L {p} ]; then\n")
        out.append(
            "  " + fail_if(f"[ ! -d {p} ] || [ -L {p} ]", f"DeleteFolder: {path} is not a folder")
        )
        if item["force"]:
            out.append(f"  rm -rf -- {p}\n")
        else:
            message = f"DeleteFolder: {path} is not empty (set force: true to delete its content)"
            out.append("  " + fail_if(f'[ -n "$(ls -A -- {p})" ]', message))
            out.append(f"  rmdir -- {p}\n")
        out.append("fi\n")
    return "".join(out)


def _not_root(item: Item) -> Problems:
    if strip_slashes(item["path"]) == "/":
        return [("path", "refusing to delete /")]
    return []


CREATE_FILE = ActionSpec(
    name="CreateFile",
    summary="Create files with content, owner and permissions.",
    shape=Shape.LIST,
    fields=(
        path_field("File to create; parent folders are created."),
        Field("content", "string", "Content of the file (default empty).", default=""),
        encoding_field(),
        OWNER,
        GROUP,
        PERMISSIONS,
        OVERWRITE,
    ),
    script=create_file_script,
    templates=("content",),
)

APPEND_FILE = ActionSpec(
    name="AppendFile",
    summary="Append content to existing files.",
    shape=Shape.LIST,
    fields=(
        path_field("File to append to; it must exist."),
        Field("content", "string", "Text to append (default empty).", default=""),
        encoding_field(),
    ),
    script=append_file_script,
    templates=("content",),
)

COPY_FILE = _transfer_spec("CopyFile", "file", "cp", "Copy files.")
MOVE_FILE = _transfer_spec("MoveFile", "file", "mv", "Move files.")
COPY_FOLDER = _transfer_spec(
    "CopyFolder", "folder", "cp", "Copy folders (merging into an existing one)."
)
MOVE_FOLDER = _transfer_spec(
    "MoveFolder", "folder", "mv", "Move folders (replacing an existing one)."
)

CREATE_FOLDER = ActionSpec(
    name="CreateFolder",
    summary="Create folders with owner and permissions.",
    shape=Shape.LIST,
    fields=(
        path_field("Folder to create, with its parents."),
        OWNER,
        GROUP,
        PERMISSIONS,
        Field(
            "overwrite", "bool", "false: fail if the folder exists (default true).", default=True
        ),
    ),
    script=create_folder_script,
)

CREATE_SYMLINK = ActionSpec(
    name="CreateSymlink",
    summary="Create symbolic links.",
    shape=Shape.LIST,
    fields=(
        path_field("The link to create."),
        Field("target", "string", "What the link points to; it must exist.", required=True),
        Field("force", "bool", "Replace an existing link (default false).", default=False),
    ),
    script=create_symlink_script,
)

DELETE_FILE = ActionSpec(
    name="DeleteFile",
    summary="Delete files; * allowed in the file name.",
    shape=Shape.LIST,
    fields=(path_field("File to delete; * allowed in the last part."),),
    script=delete_file_script,
)

DELETE_FOLDER = ActionSpec(
    name="DeleteFolder",
    summary="Delete folders.",
    shape=Shape.LIST,
    fields=(
        path_field("Folder to delete."),
        Field("force", "bool", "Delete a folder that is not empty (default false).", default=False),
    ),
    script=delete_folder_script,
    item_check=_not_root,
)
