"""The exported systemd units checked by systemd itself: `systemd-analyze verify`
accepts them, and `systemd-analyze calendar` fires the timer exactly when the
scheduler would (the next 12 slots, for a range of expressions and time zones)."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from vmbuild.config.cron import parse_cron
from vmbuild.config.pipeline import load_pipeline
from vmbuild.pipeline.export import oncalendar, systemd_units

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (the unit text is checked in tests/unit)",
)
BASE = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)  # no DST change within the next slots


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text("name: img\nversion: 1.0.0\nbase: debian-12\n")
    pipeline = tmp_path / "my pipelines" / "golden.yaml"  # a space, to exercise quoting
    pipeline.parent.mkdir()
    pipeline.write_text(yaml.safe_dump({
        "recipe": "../recipes/r.yaml",
        "schedule": {"cron": "0 3 13 * 5", "timezone": "Europe/Paris"},  # two OnCalendar lines
    }))  # fmt: skip
    units = systemd_units(load_pipeline(pipeline), tmp_path / "h 1.sqlite", tmp_path / "store")
    out = tmp_path / "units"
    out.mkdir()
    for name, text in units.items():
        (out / name).write_text(text)
    proc = subprocess.run(
        ["systemd-analyze", "verify", *(str(out / n) for n in sorted(units))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Unknown" not in proc.stderr and "Failed" not in proc.stderr, proc.stderr


def systemd_next(spec: str, count: int) -> list[datetime]:
    proc = subprocess.run(
        ["systemd-analyze", "calendar", f"--iterations={count}",
         f"--base-time={BASE:%Y-%m-%d %H:%M:%S} UTC", spec],
        capture_output=True, text=True, timeout=60, env={"TZ": "UTC", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stamps = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC", proc.stdout)  # fmt: skip
    return [datetime.strptime(s, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC) for s in stamps]


@pytest.mark.parametrize(
    ("expression", "tz"),
    [
        ("0 3 * * *", "UTC"),
        ("*/15 9-17 * * 1-5", "UTC"),
        ("30 2 * * 1", "Europe/Paris"),
        ("0 3 ? * 2 *", "America/New_York"),  # EC2 Image Builder's MON
        ("0 0 1,15 * *", "Asia/Tokyo"),
        ("0 6 13 * 5", "UTC"),  # day-of-month OR day-of-week
        ("0 3 L * ?", "UTC"),
        ("0 3 ? * 6#2 *", "UTC"),
        ("0 3 ? * 6L *", "UTC"),
        ("0 0 1-10/3 JAN,JUL,DEC *", "UTC"),
        ("45 23 * * 0,6", "Australia/Sydney"),
    ],
)
def test_the_timer_fires_when_the_scheduler_would(expression: str, tz: str) -> None:
    schedule = parse_cron(expression, tz)
    count = 12
    expected = schedule.upcoming(BASE, count)
    got = sorted({t for spec in oncalendar(schedule) for t in systemd_next(spec, count)})[:count]
    assert got == expected
