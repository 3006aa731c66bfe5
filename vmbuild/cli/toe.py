"""`vmbuild toe run|validate`: AWSTOE's command line, for scripts written for `awstoe`.

The flags are AWSTOE's (`--documents a.yaml,b.yaml`, `--config config.json`,
`--phases`, `--parameters k=v,k2=v2`, `--execution-id`, `--log-directory`, ...).
Documents are local paths, s3:// URIs or component ARNs (resolved through the
local component library). AWSTOE runs on the instance; vmbuild runs from the
host, so `run` also needs a target: `--host ssh://user@host --identity KEY` or
`--base BASE` (a throwaway VM). CloudWatch and S3 log settings are accepted and
ignored (said once on stderr). Exit status: 0 when the run (or every document)
succeeded, 1 when a step or a document failed, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmbuild import runs
from vmbuild.errors import VmbuildError
from vmbuild.toe.actions import S3Config
from vmbuild.toe.document import Problem, parse
from vmbuild.toe.library import find_component
from vmbuild.toe.model import Document
from vmbuild.toe.results import DocumentResult, Status
from vmbuild.toe.runner import check_phase_selection, run_document

_IGNORED = (
    "cw_ignore_failures",
    "cw_log_group",
    "cw_log_region",
    "cw_log_stream",
    "log_s3_bucket_name",
    "log_s3_bucket_owner",
    "log_s3_key_prefix",
)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    toe = subparsers.add_parser(
        "toe",
        help="AWSTOE-compatible run/validate (awstoe's flags)",
        description="The awstoe command line: run and validate component documents.",
    )
    actions = toe.add_subparsers(dest="toe_action", required=True, metavar="ACTION")

    validate = actions.add_parser("validate", help="validate component documents")
    validate.add_argument("-d", "--documents", required=True, help="comma-separated documents")
    validate.add_argument("--document-s3-bucket-owner", help="owner of s3:// documents' bucket")
    validate.add_argument("-t", "--trace", action="store_true", help="verbose output")
    _s3_flags(validate)
    validate.set_defaults(handler=cmd_validate)

    run = actions.add_parser("run", help="run component documents")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("-c", "--config", type=Path, help="input configuration JSON file")
    source.add_argument("-d", "--documents", help="comma-separated documents")
    run.add_argument("--parameters", help="name1=value1,name2=value2 for every document")
    run.add_argument("-p", "--phases", help="comma-separated phases (default: all they have)")
    run.add_argument("-i", "--execution-id", help="the run's id (default: a new GUID)")
    run.add_argument("-l", "--log-directory", type=Path, help="where TOE_<time>_<id>/ goes")
    run.add_argument("-s", "--state-directory", type=Path, help="accepted; vmbuild keeps none")
    run.add_argument("--document-s3-bucket-owner", help="owner of s3:// documents' bucket")
    run.add_argument("-t", "--trace", action="store_true", help="print the run log")
    for flag in ("--cw-log-group", "--cw-log-region", "--cw-log-stream"):
        run.add_argument(flag, help="accepted, ignored (no CloudWatch Logs)")
    run.add_argument("--cw-ignore-failures", action="store_true", help="accepted, ignored")
    for flag in ("--log-s3-bucket-name", "--log-s3-bucket-owner"):
        run.add_argument(flag, help="accepted, ignored (logs stay local)")
    run.add_argument("-k", "--log-s3-key-prefix", help="accepted, ignored")
    target = run.add_mutually_exclusive_group(required=True)
    target.add_argument("--host", help="vmbuild: ssh://user@host[:port] to run on")
    target.add_argument("--base", help="vmbuild: boot a throwaway VM from this base")
    run.add_argument("--identity", type=Path, help="vmbuild: SSH private key for --host")
    run.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    run.add_argument("--working-directory", default="/tmp", help="vmbuild: guest folder")
    _s3_flags(run)
    run.set_defaults(handler=cmd_run)


def _s3_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--s3-endpoint-url", help="vmbuild: S3 endpoint (s3:// documents)")
    parser.add_argument("--s3-region", help="vmbuild: S3 region")


@dataclass
class _Request:
    documents: list[tuple[str, dict[str, str]]]  # (location, its own parameters)
    parameters: dict[str, str] = field(default_factory=dict)  # for every document


def _split(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def _pairs(text: str | None) -> dict[str, str]:
    from vmbuild.cli.component import parse_parameters

    return parse_parameters([text]) if text else {}


def _config(path: Path) -> tuple[_Request, dict[str, Any]]:
    """AWSTOE's input configuration file (documents with their parameters, global
    parameters and the other settings by their camelCase names)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VmbuildError(f"{path}: cannot read the configuration: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("documents"), list):
        raise VmbuildError(f"{path}: documents: required, a list of {{path, parameters}}")
    docs = []
    for i, entry in enumerate(data["documents"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise VmbuildError(f"{path}: documents[{i}].path: required, a string")
        docs.append((entry["path"], _name_values(path, f"documents[{i}]", entry)))
    return _Request(docs, _name_values(path, "", data)), data


def _name_values(path: Path, where: str, entry: dict[str, Any]) -> dict[str, str]:
    values = entry.get("parameters") or []
    prefix = f"{where}." if where else ""
    if not isinstance(values, list) or not all(
        isinstance(v, dict) and isinstance(v.get("name"), str) and "value" in v for v in values
    ):
        raise VmbuildError(f"{path}: {prefix}parameters: expected a list of {{name, value}}")
    return {v["name"]: str(v["value"]) for v in values}


def _load(
    location: str,
    parameters: dict[str, str],
    s3: S3Config | None,
    owner: str | None,
    scratch: Path,
    *,
    require_values: bool = True,
) -> tuple[Document | None, list[Problem]]:
    if location.startswith("s3://"):
        from vmbuild.toe.actions.s3 import parse_s3_uri

        bucket, key = parse_s3_uri(location)
        extra = {"ExpectedBucketOwner": owner} if owner else {}
        client = (s3 or S3Config()).client()
        body = client.get_object(Bucket=bucket, Key=key, **extra)["Body"].read()
        path = scratch / f"{len(list(scratch.iterdir())):03d}-{Path(key).name or 'doc.yaml'}"
        path.write_bytes(body)
        return parse(
            path, parameters, display_name=location, identity=location,
            require_values=require_values,
        )  # fmt: skip
    path = find_component(location, Path.cwd())
    return parse(path, parameters, display_name=location, require_values=require_values)


def _s3(args: argparse.Namespace) -> S3Config | None:
    if args.s3_endpoint_url or args.s3_region:
        return S3Config(endpoint_url=args.s3_endpoint_url, region=args.s3_region)
    return None


def cmd_validate(args: argparse.Namespace) -> int:
    import tempfile

    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vmbuild-toe-") as scratch, runs.owning(Path(scratch)):
        for location in _split(args.documents):
            try:
                _, problems = _load(
                    location, {}, _s3(args), args.document_s3_bucket_owner, Path(scratch),
                    require_values=False,  # the document, not one run of it
                )  # fmt: skip
            except VmbuildError as exc:
                failures.append(f"{location}: {exc}")
                continue
            failures += [str(p) for p in problems]
    status = "failed" if failures else "success"
    message = "\n".join(failures) if failures else "Document(s) successfully validated."
    print(json.dumps({"validationStatus": status, "message": message}, indent=4))
    return 1 if failures else 0


def cmd_run(args: argparse.Namespace) -> int:
    import tempfile

    from vmbuild.cli.component import _remote

    settings: dict[str, Any] = {}
    if args.config is not None:
        if args.parameters:
            raise VmbuildError("--parameters cannot be given with --config (AWSTOE's rule)")
        request, settings = _config(args.config)
    else:
        request = _Request([(d, {}) for d in _split(args.documents)], _pairs(args.parameters))
    if not request.documents:
        raise VmbuildError("no documents to run", hint="--documents a.yaml,b.yaml")
    ignored = [name for name in _IGNORED if getattr(args, name, None)]
    if ignored:
        flags = ", ".join("--" + n.replace("_", "-") for n in ignored)
        print(f"vmbuild toe: {flags} accepted and ignored (logs stay local)", file=sys.stderr)
    phases = _split(args.phases or settings.get("phases"))
    execution_id = args.execution_id or settings.get("executionId") or str(uuid.uuid4())
    stamp = datetime.now(UTC).strftime("%Y-%m-%d_%H-%M-%S")
    log_root = args.log_directory or Path(settings.get("logDirectory") or ".")
    log_dir = log_root / f"TOE_{stamp}_{execution_id}"
    owner = args.document_s3_bucket_owner or settings.get("documentS3BucketOwner")
    trace = args.trace or bool(settings.get("trace"))
    with tempfile.TemporaryDirectory(prefix="vmbuild-toe-") as scratch, runs.owning(Path(scratch)):
        docs = []
        for location, own in request.documents:
            doc, problems = _load(
                location, {**request.parameters, **own}, _s3(args), owner, Path(scratch)
            )
            if doc is None:
                raise problems[0].error() if problems else VmbuildError(f"{location}: invalid")
            for warning in doc.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            wanted = [p for p in doc.phases if not phases or p in phases]
            check_phase_selection(doc, wanted)
            docs.append((doc, wanted))
        log_dir.mkdir(parents=True, exist_ok=True)
        results: list[DocumentResult] = []
        with (log_dir / "console.log").open("w") as console, _remote(args) as remote:

            def on_output(line: str) -> None:
                console.write(line + "\n")
                console.flush()
                if trace:
                    print(line, file=sys.stderr, flush=True)

            for doc, wanted in docs:
                result = run_document(
                    doc, remote, phases=wanted, on_output=on_output, s3=_s3(args),
                    working_directory=args.working_directory,
                )  # fmt: skip
                results.append(result)
                if result.status is Status.FAILED:
                    break
    return _report(results, execution_id, log_dir)


def _report(results: list[DocumentResult], execution_id: str, log_dir: Path) -> int:
    steps = [s for r in results for p in r.phases for s in p.steps]
    failed = next((r for r in results if r.status is Status.FAILED), None)
    detailed = {
        "executionId": execution_id,
        "status": "failed" if failed else "success",
        "failureMessage": failed.failure_message if failed else "",
        "documents": [d for r in results for d in r.to_detailed_output()["documents"]],
    }
    (log_dir / "detailedoutput.json").write_text(json.dumps(detailed, indent=2) + "\n")
    summary = {
        "executionId": execution_id,
        "status": detailed["status"],
        "failedStepCount": sum(1 for s in steps if s.status is Status.FAILED),
        "executedStepCount": sum(1 for s in steps if s.status is not Status.SKIPPED),
        "failureMessage": detailed["failureMessage"],
        "logUrl": str(log_dir.resolve()),
    }
    print(json.dumps(summary, indent=4))
    return 1 if failed else 0
