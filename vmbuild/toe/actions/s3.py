"""S3Download and S3Upload, done by the host with boto3 against the configured
endpoint (real S3, or a local S3-compatible server), so guests need no AWS
credentials and no AWS CLI. Objects travel between S3 and the guest through the
host (`Remote.put` / `Remote.get`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from vmbuild.toe.actions.base import (
    PRELUDE,
    ActionFailed,
    ActionSpec,
    Field,
    HostContext,
    Item,
    Problems,
    Shape,
    fail,
    fail_if,
    fail_unless,
    glob_words,
    has_wildcard,
    q,
    strip_slashes,
)

MAX_OBJECTS = 1000  # AWSTOE's documented limit for a key-prefix download


@dataclass(frozen=True)
class S3Config:
    """How the host reaches S3: endpoint (None = AWS), region and profile."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None

    def client(self) -> Any:
        import boto3  # imported here: most runs never touch S3

        session = boto3.session.Session(profile_name=self.profile, region_name=self.region)
        return session.client("s3", endpoint_url=self.endpoint_url)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key` → (bucket, key); raises ValueError."""
    if not uri.startswith("s3://"):
        raise ValueError(f"expected an s3://bucket/key URI, got {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, key


def existing_paths_script(paths: Sequence[str]) -> str:
    """Prints each of `paths` that already exists in the guest."""
    words = " ".join(q(p) for p in paths)
    return f'for p in {words}; do if [ -e "$p" ]; then printf \'%s\\n\' "$p"; fi; done\n'


def require_folder_script(folder: str, action: str) -> str:
    return fail_unless(f"[ -d {q(folder)} ]", f"{action}: folder {folder} does not exist")


def run_s3_download(items: Sequence[Item], ctx: HostContext) -> dict[str, str]:
    client = (ctx.s3 or S3Config()).client()
    for item in items:
        bucket, key = parse_s3_uri(item["source"])
        owner = _owner_args(item)
        destination = item["destination"]
        if key.endswith("*"):
            prefix = key[:-1]
            keys = _list_keys(client, bucket, prefix, owner)
            folder = destination if destination.endswith("/") else destination + "/"
            ctx.run(require_folder_script(strip_slashes(folder), "S3Download"))
            pairs = [(k, folder + k[len(prefix) :]) for k in keys]
        else:
            target = (
                destination + PurePosixPath(key).name if destination.endswith("/") else destination
            )
            parent = str(PurePosixPath(target).parent)
            ctx.run(require_folder_script(parent, "S3Download"))
            pairs = [(key, target)]
        if not item["overwrite"]:
            existing = ctx.run(existing_paths_script([t for _, t in pairs])).stdout.split("\n")
            if any(existing):
                raise ActionFailed(
                    f"S3Download: {existing[0]} already exists and overwrite is false"
                )
        for object_key, target in pairs:
            ctx.log(f"s3://{bucket}/{object_key} -> {target}")
            body = _get(client, bucket, object_key, owner)
            ctx.remote.put(body, target)
    return {}


def _list_keys(client: Any, bucket: str, prefix: str, owner: dict[str, str]) -> list[str]:
    keys: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix, **owner
        ):
            keys += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    except Exception as exc:  # botocore's errors are generated classes
        raise ActionFailed(f"S3Download: listing s3://{bucket}/{prefix}*: {_reason(exc)}") from exc
    if not keys:
        raise ActionFailed(f"S3Download: no object matches s3://{bucket}/{prefix}*")
    if len(keys) > MAX_OBJECTS:
        raise ActionFailed(
            f"S3Download: {len(keys)} objects match; at most {MAX_OBJECTS} are allowed"
        )
    return keys


def _get(client: Any, bucket: str, key: str, owner: dict[str, str]) -> bytes:
    try:
        body: bytes = client.get_object(Bucket=bucket, Key=key, **owner)["Body"].read()
    except Exception as exc:
        raise ActionFailed(f"S3Download: s3://{bucket}/{key}: {_reason(exc)}") from exc
    return body


def upload_listing_script(source: str, recurse: bool) -> str:
    """Prints `guest-path<TAB>key-suffix` for every file `source` selects."""
    out = [PRELUDE, 'emit() { printf \'%s\\t%s\\n\' "$1" "$2"; }\n']
    walk = (
        '(cd -- "$1" && find . -type f -print) | while IFS= read -r r; do'
        ' emit "$1/${r#./}" "$2${r#./}"; done'
    )
    out.append(f"walk() {{ {walk}; }}\n")
    if has_wildcard(source):
        directory = (
            'elif [ -d "$f" ]; then matched=1; walk "$f" "$(basename -- "$f")/"\n'
            if recurse
            else ""
        )
        out.append(
            "shopt -s nullglob\nmatched=0\n"
            f"for f in {glob_words(source)}; do\n"
            '  if [ -f "$f" ]; then matched=1; emit "$f" "$(basename -- "$f")"\n'
            f"  {directory}"
            "  fi\n"
            "done\n" + fail_if('[ "$matched" = 0 ]', f"S3Upload: no file matches {source}")
        )
        return "".join(out)
    path = strip_slashes(source)
    folder = (
        f"walk {q(path)} ''"
        if recurse
        else fail(f"S3Upload: {path} is a folder (set recurse: true)")
    )
    out.append(
        f'if [ -f {q(path)} ]; then emit {q(path)} "$(basename -- {q(path)})"\n'
        f"elif [ -d {q(path)} ]; then {folder}\n"
        f"else {fail(f'S3Upload: {path} does not exist')}\n"
        "fi\n"
    )
    return "".join(out)


def run_s3_upload(items: Sequence[Item], ctx: HostContext) -> dict[str, str]:
    client = (ctx.s3 or S3Config()).client()
    for item in items:
        bucket, key = parse_s3_uri(item["destination"])
        owner = _owner_args(item)
        listing = ctx.run(upload_listing_script(item["source"], item["recurse"])).stdout
        files = [line.split("\t", 1) for line in listing.splitlines() if "\t" in line]
        single = len(files) == 1 and not has_wildcard(item["source"]) and not key.endswith("/")
        prefix = key if key.endswith("/") or not key else key + "/"
        for path, suffix in files:
            object_key = key if single else prefix + suffix
            ctx.log(f"{path} -> s3://{bucket}/{object_key}")
            data = ctx.remote.get(path)
            try:
                client.put_object(Bucket=bucket, Key=object_key, Body=data, **owner)
            except Exception as exc:
                raise ActionFailed(f"S3Upload: s3://{bucket}/{object_key}: {_reason(exc)}") from exc
    return {}


def _owner_args(item: Item) -> dict[str, str]:
    owner = item["expectedBucketOwner"]
    return {"ExpectedBucketOwner": owner} if owner else {}


def _reason(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error", {})
        return f"{error.get('Code', 'error')}: {error.get('Message', '')}".rstrip(": ")
    return str(exc)


def _uri_check(field: str) -> Any:
    def check(item: Item) -> Problems:
        try:
            parse_s3_uri(item[field])
        except ValueError as exc:
            return [(field, str(exc))]
        return []

    return check


_OWNER = Field("expectedBucketOwner", "string", "Account id that must own the bucket.")

S3_DOWNLOAD = ActionSpec(
    name="S3Download",
    summary="Download S3 objects (a key, or a prefix ending in /*) into the guest.",
    shape=Shape.LIST,
    fields=(
        Field(
            "source", "string", "s3://bucket/key, or s3://bucket/prefix/* for many.", required=True
        ),
        Field(
            "destination",
            "string",
            "Guest file, or folder for a prefix; parent must exist.",
            required=True,
        ),
        _OWNER,
        Field("overwrite", "bool", "Replace existing files (default true).", default=True),
    ),
    host=run_s3_download,
    item_check=_uri_check("source"),
)

S3_UPLOAD = ActionSpec(
    name="S3Upload",
    summary="Upload guest files (wildcards, folders with recurse) to S3.",
    shape=Shape.LIST,
    fields=(
        Field(
            "source", "string", "Guest file or folder; * allowed in the last part.", required=True
        ),
        Field(
            "destination",
            "string",
            "s3://bucket/key, or s3://bucket/prefix/ for many.",
            required=True,
        ),
        Field(
            "recurse", "bool", "Upload folders with their content (default false).", default=False
        ),
        _OWNER,
    ),
    host=run_s3_upload,
    item_check=_uri_check("destination"),
)
