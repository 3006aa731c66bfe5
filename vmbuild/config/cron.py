"""Cron schedules with a time zone: when a pipeline is next due, and what it missed.

Two syntaxes, told apart by their number of fields:
- 5 fields, as crontab(5): `minute hour day-of-month month day-of-week`
  (day-of-week 0-7, 0 and 7 = Sunday);
- 6 fields, as EC2 Image Builder (and EventBridge): `minute hour day-of-month month
  day-of-week year`, day-of-week 1-7 = SUN-SAT, `?` = any; `cron(...)` around it is fine.
Both take lists, ranges, steps, names (JAN, MON), `L` (last day of the month), `15W`
(nearest weekday), `FRI#2` (second Friday) and `FRIL` / `5L` (last Friday). The
`@daily`-style shorthands work too.

Time zones are IANA names. Across DST changes: a wall time that does not exist (spring
forward) fires at the first valid time after it; a fixed-hour slot in the repeated hour
(fall back) fires once, the first time, as cron does; `*`-hour schedules keep firing as
the hours pass.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from croniter import CroniterBadDateError, CroniterError, croniter

SHORTHANDS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}  # fmt: skip
FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week", "year")
# Valid values per field, for messages: croniter's own errors name the whole expression.
FIELD_RANGES = ("0-59", "0-23", "1-31", "1-12 or JAN-DEC", "0-7 or SUN-SAT", "1970-2099")
_FIELD_CHARS = re.compile(r"^[0-9A-Za-z*?,/#\-]+$")
# Enough to report "missed 1000+ runs"; iterating further only costs time.
MISSED_LIMIT = 1000


def check_timezone(name: str) -> ZoneInfo:
    """A ZoneInfo for an IANA name; ValueError naming close matches otherwise."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        close = difflib.get_close_matches(name, sorted(available_timezones()), n=3)
        hint = (
            f" (did you mean {', '.join(close)}?)"
            if close
            else " (use an IANA name such as Europe/Paris)"
        )
        raise ValueError(f"unknown time zone {name!r}{hint}") from None


@dataclass(frozen=True)
class Due:
    """A pipeline is due: run once for `slot`; `missed` older slots are folded into it."""

    slot: datetime
    missed: int
    capped: bool  # missed is a lower bound (MISSED_LIMIT reached)


@dataclass(frozen=True)
class CronSchedule:
    expression: str  # as written in the pipeline
    timezone: str
    fields: tuple[str, ...]  # croniter's 5 fields, day-of-week 0-6 = SUN-SAT
    year: str

    @property
    def key(self) -> str:
        """Identifies the schedule in persisted state: a new expression starts afresh."""
        return f"{self.expression} @ {self.timezone}"

    @property
    def aws_style(self) -> bool:
        return len(_split(self.expression)) == 6

    @functools.cached_property
    def _tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def _croniter(self, start: datetime) -> croniter:
        expr = " ".join((*self.fields, "0", self.year))  # croniter: ... second year
        return croniter(expr, start.astimezone(self._tz), ret_type=datetime)

    def _is_repeat(self, local: datetime) -> bool:
        # The second pass through a repeated wall-clock hour (fold=1): a fixed
        # hour already fired in the first pass.
        if local.fold != 1 or self.fields[1].startswith("*"):
            return False
        return local.replace(fold=0).utcoffset() != local.utcoffset()

    def iter_after(self, moment: datetime) -> _Slots:
        """Slots strictly after `moment`, as UTC datetimes."""
        return _Slots(self, moment)

    def next_after(self, moment: datetime) -> datetime | None:
        """The first slot strictly after `moment` (UTC), or None if there is none."""
        return next(iter(self.iter_after(moment)), None)

    def upcoming(self, after: datetime, count: int) -> list[datetime]:
        slots = []
        for slot in self.iter_after(after):
            slots.append(slot)
            if len(slots) == count:
                break
        return slots

    def due(self, last: datetime, now: datetime) -> Due | None:
        """Whether a slot after `last` and at or before `now` exists; if several, the
        latest is the one to run (after downtime, one run rather than one per slot)."""
        latest, count = None, 0
        for slot in self.iter_after(last):
            if slot > now:
                break
            latest, count = slot, count + 1
            if count > MISSED_LIMIT:
                # Dense and long missed: jump to the most recent slot directly.
                prev = self._croniter(now + timedelta(seconds=1)).get_prev(datetime)
                return Due(prev.astimezone(UTC), MISSED_LIMIT, capped=True)
        if latest is None:
            return None
        return Due(latest, count - 1, capped=False)


class _Slots:
    def __init__(self, schedule: CronSchedule, moment: datetime) -> None:
        self.schedule = schedule
        self.moment = moment

    def __iter__(self) -> _Slots:
        # croniter works in whole seconds: start from the whole second so a slot
        # at exactly `moment` is not returned, and one just after it is.
        self._it = self.schedule._croniter(self.moment.replace(microsecond=0))
        return self

    def __next__(self) -> datetime:
        while True:
            try:
                local: datetime = self._it.get_next(datetime)
            except CroniterBadDateError:
                raise StopIteration from None
            if not self.schedule._is_repeat(local):
                slot = local.astimezone(UTC)
                if slot > self.moment:
                    return slot


def _split(expression: str) -> list[str]:
    text = expression.strip()
    if text.startswith("cron(") and text.endswith(")"):
        text = text[5:-1]
    return SHORTHANDS.get(text.lower(), text).split()


_AWS_DOW = re.compile(r"^(?P<a>\d+)(?:-(?P<b>\d+))?(?P<rest>(?:/\d+|#\d+|L)?)$")


def _aws_day_of_week(field: str) -> str:
    """EC2 Image Builder's day-of-week (1-7 = SUN-SAT) in croniter's terms (0-6)."""
    out = []
    for token in field.split(","):
        m = _AWS_DOW.match(token)
        if token in ("?", "*") or m is None:
            out.append("*" if token == "?" else token)
            continue
        nums = [int(n) for n in (m["a"], m["b"]) if n is not None]
        if any(not 1 <= n <= 7 for n in nums):
            raise ValueError(
                f"day-of-week {token!r}: 6-field expressions number days 1-7 (SUN-SAT)"
            )
        out.append("-".join(str(n - 1) for n in nums) + m["rest"])
    return ",".join(out)


def _last_weekday(field: str) -> str:
    # Quartz/EventBridge write the last Friday `5L` (or `FRIL`); croniter wants `L5`.
    return ",".join(
        f"L{t[:-1]}" if len(t) > 1 and t.upper().endswith("L") else t for t in field.split(",")
    )


def parse_cron(expression: str, timezone: str = "UTC") -> CronSchedule:
    """Validate a 5- or 6-field expression and a time zone; ValueError says what is wrong."""
    check_timezone(timezone)
    parts = _split(expression)
    if len(parts) not in (5, 6):
        raise ValueError(
            f"{expression!r} has {len(parts)} fields; expected 5 (minute hour day-of-month "
            "month day-of-week) or 6 (EC2 Image Builder: ... day-of-week year)"
        )
    for name, value in zip(FIELD_NAMES, parts, strict=False):
        if not _FIELD_CHARS.match(value):
            raise ValueError(f"{name} field {value!r}: unexpected characters")
    fields = [p.replace("?", "*") if i != 4 else p for i, p in enumerate(parts[:5])]
    if len(parts) == 6:
        fields[4] = _aws_day_of_week(fields[4])
    else:
        fields[4] = fields[4].replace("?", "*")
    fields[4] = _last_weekday(fields[4])
    year = parts[5] if len(parts) == 6 else "*"
    schedule = CronSchedule(expression.strip(), timezone, tuple(fields), year)
    _check_fields(schedule, parts)
    return schedule


def _check_fields(schedule: CronSchedule, written: list[str]) -> None:
    """Each field on its own, so an error names the field rather than the expression."""
    for index in range(6):
        probe = ["*"] * 5 + ["*"]
        if index < 5:
            probe[index] = schedule.fields[index]
        else:
            probe[5] = schedule.year
        try:
            croniter(" ".join((*probe[:5], "0", probe[5])))
        except (CroniterError, ValueError, KeyError):
            values = FIELD_RANGES[index]
            if index == 4 and len(written) == 6:
                values = "1-7 or SUN-SAT"
            raise ValueError(
                f"{FIELD_NAMES[index]} field {written[index]!r} is invalid (values: {values})"
            ) from None
    try:
        croniter(" ".join((*schedule.fields, "0", schedule.year)))
    except (CroniterError, ValueError, KeyError) as exc:
        raise ValueError(f"invalid cron expression {schedule.expression!r}: {exc}") from None
