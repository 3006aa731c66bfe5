"""Cron schedules with a time zone: parsing (5 and 6 fields), next slots, DST, and
missed slots coalesced into one run."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from vmbuild.config.cron import MISSED_LIMIT, check_timezone, parse_cron


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expression", "tz", "after", "expected"),
    [
        ("0 3 * * 1", "UTC", utc(2026, 1, 1), [utc(2026, 1, 5, 3), utc(2026, 1, 12, 3)]),
        # EC2 Image Builder's 6 fields: day-of-week 2 = MON, `?`, a year.
        ("cron(0 3 ? * 2 *)", "UTC", utc(2026, 1, 1), [utc(2026, 1, 5, 3), utc(2026, 1, 12, 3)]),
        ("0 3 ? * 1 *", "UTC", utc(2026, 1, 1), [utc(2026, 1, 4, 3), utc(2026, 1, 11, 3)]),  # SUN
        ("0 3 * * * 2027", "UTC", utc(2026, 6, 1), [utc(2027, 1, 1, 3), utc(2027, 1, 2, 3)]),
        ("0 3 ? * MON-FRI *", "UTC", utc(2026, 1, 2, 4), [utc(2026, 1, 5, 3), utc(2026, 1, 6, 3)]),
        (
            "0 3 ? * 6#2 *",
            "UTC",
            utc(2026, 1, 1),
            [utc(2026, 1, 9, 3), utc(2026, 2, 13, 3)],
        ),  # 2nd FRI
        (
            "0 3 ? * 6L *",
            "UTC",
            utc(2026, 1, 1),
            [utc(2026, 1, 30, 3), utc(2026, 2, 27, 3)],
        ),  # last FRI
        ("0 3 * * 5L", "UTC", utc(2026, 1, 1), [utc(2026, 1, 30, 3), utc(2026, 2, 27, 3)]),
        ("0 3 L * ?", "UTC", utc(2026, 1, 1), [utc(2026, 1, 31, 3), utc(2026, 2, 28, 3)]),
        ("*/20 * * * *", "UTC", utc(2026, 1, 1), [utc(2026, 1, 1, 0, 20), utc(2026, 1, 1, 0, 40)]),
        ("@daily", "UTC", utc(2026, 1, 1, 5), [utc(2026, 1, 2), utc(2026, 1, 3)]),
        # The time zone: 03:00 in Paris is 02:00 UTC in winter, 01:00 in summer.
        ("0 3 * * *", "Europe/Paris", utc(2026, 1, 1), [utc(2026, 1, 1, 2), utc(2026, 1, 2, 2)]),
        ("0 3 * * *", "Europe/Paris", utc(2026, 7, 1), [utc(2026, 7, 1, 1), utc(2026, 7, 2, 1)]),
        (
            "30 9 * * *",
            "America/New_York",
            utc(2026, 1, 1),
            [utc(2026, 1, 1, 14, 30), utc(2026, 1, 2, 14, 30)],
        ),
    ],
)
def test_upcoming_slots(
    expression: str, tz: str, after: datetime, expected: list[datetime]
) -> None:
    assert parse_cron(expression, tz).upcoming(after, len(expected)) == expected


def test_a_slot_at_exactly_the_start_is_not_next() -> None:
    s = parse_cron("0 3 * * *")
    assert s.next_after(utc(2026, 1, 1, 3)) == utc(2026, 1, 2, 3)
    assert s.next_after(utc(2026, 1, 1, 2, 59, 59, 999999)) == utc(2026, 1, 1, 3)


def test_spring_forward_runs_a_missing_wall_time_right_after_the_gap() -> None:
    # 2026-03-29 02:30 does not exist in Paris: it runs at 03:00 CEST (01:00 UTC).
    s = parse_cron("30 2 * * *", "Europe/Paris")
    assert s.upcoming(utc(2026, 3, 28, 12), 2) == [utc(2026, 3, 29, 1), utc(2026, 3, 30, 0, 30)]


def test_fall_back_runs_a_fixed_hour_once() -> None:
    # 02:30 happens twice on 2026-10-25 in Paris (00:30 and 01:30 UTC): once, the first.
    s = parse_cron("30 2 * * *", "Europe/Paris")
    assert s.upcoming(utc(2026, 10, 24, 12), 2) == [
        utc(2026, 10, 25, 0, 30),
        utc(2026, 10, 26, 1, 30),
    ]


def test_fall_back_keeps_hourly_schedules_hourly() -> None:
    s = parse_cron("0 * * * *", "Europe/Paris")
    got = s.upcoming(utc(2026, 10, 24, 23, 30), 4)
    assert got == [utc(2026, 10, 25, h) for h in range(4)]  # no hour lost or doubled


def test_due_is_none_before_the_next_slot() -> None:
    s = parse_cron("0 3 * * *")
    assert s.due(utc(2026, 1, 1, 3), utc(2026, 1, 2, 2, 59)) is None


def test_due_at_the_slot() -> None:
    s = parse_cron("0 3 * * *")
    due = s.due(utc(2026, 1, 1, 3), utc(2026, 1, 2, 3))
    assert due is not None and (due.slot, due.missed, due.capped) == (utc(2026, 1, 2, 3), 0, False)


def test_missed_slots_become_one_run_for_the_latest() -> None:
    s = parse_cron("0 3 * * *")
    due = s.due(utc(2026, 1, 1, 3), utc(2026, 1, 8, 12))  # down for a week
    assert due is not None
    assert due.slot == utc(2026, 1, 8, 3)
    assert due.missed == 6  # Jan 2..7 are folded into the run for Jan 8
    assert not due.capped


def test_very_many_missed_slots_are_capped_but_still_one_run() -> None:
    s = parse_cron("* * * * *")
    due = s.due(utc(2026, 1, 1), utc(2026, 1, 10, 0, 0, 30))
    assert due is not None
    assert due.slot == utc(2026, 1, 10)
    assert (due.missed, due.capped) == (MISSED_LIMIT, True)


def test_key_identifies_expression_and_zone() -> None:
    assert parse_cron("0 3 * * *", "Europe/Paris").key == "0 3 * * * @ Europe/Paris"
    assert parse_cron("0 3 * * *").key != parse_cron("0 4 * * *").key


def test_a_schedule_that_never_fires_has_no_next_slot() -> None:
    assert parse_cron("0 3 30 2 *").next_after(utc(2026, 1, 1)) is None
    assert parse_cron("0 3 * * ? 2020").next_after(utc(2026, 1, 1)) is None


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("0 3 * *", "has 4 fields; expected 5"),
        ("0 3 * * * * *", "has 7 fields"),
        ("0 25 * * *", "hour field '25' is invalid (values: 0-23)"),
        ("61 3 * * *", "minute field '61' is invalid"),
        ("0 3 32 * *", "day-of-month field '32' is invalid"),
        ("0 3 * 13 *", "month field '13' is invalid (values: 1-12 or JAN-DEC)"),
        ("0 3 * FOO *", "month field 'FOO' is invalid"),
        ("0 3 * * 8", "day-of-week field '8' is invalid (values: 0-7 or SUN-SAT)"),
        ("0 3 ? * 0 *", "6-field expressions number days 1-7 (SUN-SAT)"),
        ("0 3 ? * 8 *", "6-field expressions number days 1-7"),
        ("0 3 * * ? 1800", "year field '1800' is invalid"),
        ("x 3 * * *", "minute field 'x' is invalid"),
        ("0 3 * * $", "day-of-week field '$': unexpected characters"),
    ],
)
def test_invalid_expressions_name_the_field(expression: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_cron(expression)
    assert message in str(info.value)


def test_unknown_time_zone_suggests_close_names() -> None:
    with pytest.raises(
        ValueError, match=r"unknown time zone 'Europe/Pariss' \(did you mean Europe/Paris"
    ):
        check_timezone("Europe/Pariss")
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        parse_cron("0 3 * * *", "Mars/Olympus")


def test_next_slots_are_utc_and_increasing() -> None:
    s = parse_cron("*/7 */5 * * *", "Asia/Kolkata")
    slots = s.upcoming(utc(2026, 5, 1), 50)
    assert all(t.tzinfo is UTC for t in slots)
    assert all(b - a > timedelta(0) for a, b in itertools.pairwise(slots))
