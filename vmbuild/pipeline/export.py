"""For users who prefer their init system to a daemon: a systemd `.service` + `.timer`
pair, or a crontab line, that runs `vmbuild pipeline run --trigger schedule`.

The timer's `OnCalendar=` lines are derived from the cron expression field by field
(values expanded, then written as systemd lists and ranges). Cron fires when the
day-of-month *or* the day-of-week matches if both are restricted; systemd wants both,
so that case becomes two `OnCalendar=` lines.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from vmbuild import __version__
from vmbuild.config.cron import CronSchedule
from vmbuild.config.pipeline import LoadedPipeline
from vmbuild.errors import VmbuildError

MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
CRON_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
SYSTEMD_DAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")
# (low, high) per field, as croniter reads them: minute hour dom month dow year.
BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7), (1970, 2099))
STOP_TIMEOUT = 300  # seconds systemd waits for a cancelled build to clean up
START_MARGIN = 900  # beyond the pipeline's own timeout, which fires first


class ExportError(VmbuildError):
    """The schedule has no equivalent in the target (systemd calendar, crontab)."""


def _value(text: str, index: int) -> int:
    upper = text.upper()
    if index == 3 and upper in MONTHS:
        return MONTHS.index(upper) + 1
    if index == 4 and upper in CRON_DAYS:
        return CRON_DAYS.index(upper)
    if not text.isdigit():
        raise ExportError(f"cannot export the {text!r} in this schedule")
    return int(text)


def expand(field: str, index: int) -> set[int]:
    """A plain cron field (lists, ranges, steps, names) as the set of its values."""
    low, high = BOUNDS[index]
    values: set[int] = set()
    for token in field.split(","):
        base, _, step_text = token.partition("/")
        step = int(step_text) if step_text else 1
        if base == "*":
            start, end = low, high
        elif "-" in base:
            a, b = base.split("-", 1)
            start, end = _value(a, index), _value(b, index)
        else:
            start = _value(base, index)
            end = high if step_text else start
        values.update(range(start, end + 1, step))
    if index == 4 and 7 in values:  # 7 is Sunday too
        values = (values - {7}) | {0}
    return values


def _runs(values: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    return runs


def _numbers(values: set[int], index: int, width: int = 2) -> str:
    low, high = BOUNDS[index]
    full = set(range(low, high + 1)) - ({7} if index == 4 else set())
    if values >= full and index != 5:
        return "*"
    parts = []
    for a, b in _runs(sorted(values)):
        if b - a >= 2:
            parts.append(f"{a:0{width}d}..{b:0{width}d}")
        else:
            parts.extend(f"{v:0{width}d}" for v in range(a, b + 1))
    return ",".join(parts)


def _days(values: set[int]) -> str:
    # Monday-first, so Mon..Fri reads as a range and Sunday ends a week.
    order = sorted(values, key=lambda d: (d + 6) % 7)
    parts = []
    for a, b in _runs([(d + 6) % 7 for d in order]):
        names = [SYSTEMD_DAYS[(v + 1) % 7] for v in range(a, b + 1)]
        parts.append(f"{names[0]}..{names[-1]}" if b - a >= 2 else ",".join(names))
    return ",".join(parts)


_NTH = re.compile(r"^(\w+)#([1-5])$")
_SPECIAL_TOKEN = re.compile(r"^(L\w*|\d+W|\w+#\d+)$", re.IGNORECASE)


def has_special(field: str) -> bool:
    """Whether a field uses L, W or # (not to be confused with JUL or WED)."""
    return any(_SPECIAL_TOKEN.match(token.split("/")[0]) for token in field.split(","))


_LAST_DOW = re.compile(r"^L(\w+)$")


def oncalendar(schedule: CronSchedule) -> list[str]:
    """systemd `OnCalendar=` values equivalent to the schedule (time zone appended)."""
    minute, hour, dom, month, dow = schedule.fields
    year = "*" if schedule.year == "*" else _numbers(expand(schedule.year, 5), 5, 4)
    months = _numbers(expand(month, 3), 3)
    clock = f"{_numbers(expand(hour, 1), 1)}:{_numbers(expand(minute, 0), 0)}:00"
    suffix = f" {schedule.timezone}"
    dom_star, dow_star = dom.startswith("*"), dow.startswith("*")

    def by_dom() -> str:
        if dom == "L":
            return f"{year}-{months}~01 {clock}{suffix}"
        if "W" in dom or "L" in dom:
            raise ExportError(f"cannot export day-of-month {dom!r} ({schedule.expression!r})")
        days = "*" if dom_star else _numbers(expand(dom, 2), 2)
        return f"{year}-{months}-{days} {clock}{suffix}"

    def by_dow() -> str:
        if m := _NTH.match(dow):
            day, nth = _value(m[1], 4) % 7, int(m[2])
            days = f"{7 * nth - 6:02d}..{7 * nth:02d}"
            return f"{SYSTEMD_DAYS[day]} {year}-{months}-{days} {clock}{suffix}"
        if m := _LAST_DOW.match(dow):
            day = _value(m[1], 4) % 7
            return f"{SYSTEMD_DAYS[day]} {year}-{months}~07/1 {clock}{suffix}"
        return f"{_days(expand(dow, 4))} {year}-{months}-* {clock}{suffix}"

    if dow_star:
        return [by_dom()]
    if dom_star:
        return [by_dow()]
    return [by_dow(), by_dom()]  # cron's OR of the two day fields


def systemd_quote(arg: str) -> str:
    """One ExecStart= argument: `%` and `$` escaped, quoted if it has spaces or quotes."""
    text = arg.replace("%", "%%").replace("$", "$$")
    if re.search(r"[\s\"'\\;]", text) or not text:
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def unit_name(loaded: LoadedPipeline) -> str:
    return f"vmbuild-pipeline-{loaded.name}"


def run_argv(
    loaded: LoadedPipeline, history: Path, store: Path, python: str | None = None,
    variables: Sequence[str] = (),
) -> list[str]:  # fmt: skip
    """The command a timer or cron runs: a scheduled run, recorded in `history`;
    `variables` are its --var/--var-file arguments (config.variables.as_arguments)."""
    return [
        python or sys.executable, "-m", "vmbuild", "pipeline", "run", str(loaded.path),
        "--trigger", "schedule", "--quiet", "--history", str(history.resolve()),
        "--store", str(store.resolve()), *variables,
    ]  # fmt: skip


def systemd_units(
    loaded: LoadedPipeline, history: Path, store: Path, python: str | None = None,
    variables: Sequence[str] = (),
) -> dict[str, str]:  # fmt: skip
    """{file name: content} for the .service and .timer of a scheduled pipeline."""
    if loaded.schedule is None:
        raise ExportError(
            f"{loaded.display}: no schedule to export", hint="add a schedule: section"
        )
    name = unit_name(loaded)
    timeout = int(loaded.pipeline.infrastructure.timeout) + START_MARGIN
    argv = run_argv(loaded, history, store, python, variables)
    exec_start = " ".join(systemd_quote(a) for a in argv)
    header = f"# Generated by vmbuild {__version__} from {loaded.path}\n"
    service = f"""{header}[Unit]
Description=vmbuild pipeline {loaded.name}
Documentation={loaded.path.as_uri().replace("%", "%%")}
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
WorkingDirectory={str(loaded.dir).replace("%", "%%")}
ExecStart={exec_start}
# 75: the pipeline was already running (a manual run); the skipped trigger is recorded.
SuccessExitStatus=75
# vmbuild turns SIGTERM into a clean cancellation (VMs killed, staging removed, run
# recorded): signal the main process only and give it time; then the cgroup is killed.
KillMode=mixed
TimeoutStopSec={STOP_TIMEOUT}
# The pipeline's own timeout ({loaded.pipeline.infrastructure.timeout:g}s) fires first.
TimeoutStartSec={timeout}
Nice=10
"""
    calendar = "\n".join(f"OnCalendar={spec}" for spec in oncalendar(loaded.schedule))
    timer = f"""{header}[Unit]
Description=Schedule of vmbuild pipeline {loaded.name} ({loaded.schedule.key})

[Timer]
{calendar}
# After downtime, run once for the slots missed (not once per slot).
Persistent=true
# A timer does not start its service again while a run is still going.
Unit={name}.service

[Install]
WantedBy=timers.target
"""
    return {f"{name}.service": service, f"{name}.timer": timer}


def crontab_line(
    loaded: LoadedPipeline, history: Path, store: Path, python: str | None = None,
    variables: Sequence[str] = (),
) -> str:  # fmt: skip
    """Comment, CRON_TZ and the crontab(5) line for a scheduled pipeline."""
    schedule = loaded.schedule
    if schedule is None:
        raise ExportError(
            f"{loaded.display}: no schedule to export", hint="add a schedule: section"
        )
    fields = list(schedule.fields)
    if schedule.year != "*":
        raise ExportError(
            f"cron has no year field: cannot export {schedule.expression!r}",
            hint="use export-systemd or the scheduler",
        )
    if any(has_special(f) for f in fields):
        raise ExportError(
            f"crontab has no L, W or #: cannot export {schedule.expression!r}",
            hint="use export-systemd or the scheduler",
        )
    argv = run_argv(loaded, history, store, python, variables)
    command = " ".join(shlex.quote(a) for a in argv)
    # `%` ends a crontab command (the rest is stdin): escape it.
    command = command.replace("%", "\\%")
    return (
        f"# vmbuild pipeline {loaded.name}: {schedule.key}\n"
        "# CRON_TZ is honoured by cronie and systemd-cron; Debian's cron ignores it and uses\n"
        "# the system time zone. cron runs nothing for slots missed while the host was down.\n"
        f"CRON_TZ={schedule.timezone}\n"
        f"{' '.join(fields)} cd {shlex.quote(str(loaded.dir))} && {command}\n"
    )
