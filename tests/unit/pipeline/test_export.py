"""systemd OnCalendar= and crontab lines derived from cron schedules (pure). The
process-level checks (systemd-analyze verify / calendar) are in
tests/integration/test_scheduler_export.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.pipeline import write_pipeline, write_recipe
from vmbuild.config.cron import parse_cron
from vmbuild.config.pipeline import load_pipeline
from vmbuild.pipeline.export import (
    ExportError,
    crontab_line,
    oncalendar,
    systemd_quote,
    systemd_units,
)  # fmt: skip


@pytest.mark.parametrize(
    ("expression", "tz", "expected"),
    [
        ("0 3 * * *", "UTC", ["*-*-* 03:00:00 UTC"]),
        ("*/15 * * * *", "UTC", ["*-*-* *:00,15,30,45:00 UTC"]),
        ("30 2 * * 1-5", "Europe/Paris", ["Mon..Fri *-*-* 02:30:00 Europe/Paris"]),
        ("0 3 ? * 2 *", "UTC", ["Mon *-*-* 03:00:00 UTC"]),  # EC2 Image Builder MON
        ("0 3 * * 0,6", "UTC", ["Sat,Sun *-*-* 03:00:00 UTC"]),
        ("0 3 * * 7", "UTC", ["Sun *-*-* 03:00:00 UTC"]),
        ("0 0 1,15 * *", "UTC", ["*-*-01,15 00:00:00 UTC"]),
        ("0 0 1-10/3 JAN,JUL *", "UTC", ["*-01,07-01,04,07,10 00:00:00 UTC"]),
        ("0 9-17 * * *", "UTC", ["*-*-* 09..17:00:00 UTC"]),
        # Both day fields restricted: cron fires on either, so two lines.
        ("0 3 13 * 5", "UTC", ["Fri *-*-* 03:00:00 UTC", "*-*-13 03:00:00 UTC"]),
        ("0 3 L * ?", "UTC", ["*-*~01 03:00:00 UTC"]),
        ("0 3 ? * 6#2 *", "UTC", ["Fri *-*-08..14 03:00:00 UTC"]),
        ("0 3 ? * 6L *", "UTC", ["Fri *-*~07/1 03:00:00 UTC"]),
        ("0 3 * * ? 2027-2029", "UTC", ["2027..2029-*-* 03:00:00 UTC"]),
    ],
)
def test_oncalendar(expression: str, tz: str, expected: list[str]) -> None:
    assert oncalendar(parse_cron(expression, tz)) == expected


def test_nearest_weekday_has_no_systemd_equivalent() -> None:
    with pytest.raises(ExportError, match="cannot export day-of-month '15W'"):
        oncalendar(parse_cron("0 3 15W * *"))


@pytest.mark.parametrize(
    ("arg", "quoted"),
    [("/usr/bin/python3", "/usr/bin/python3"), ("/a b/p.yaml", '"/a b/p.yaml"'),
     ("50%", "50%%"), ("$HOME", "$$HOME"), ('say "hi"', '"say \\"hi\\""')],
)  # fmt: skip
def test_systemd_quote(arg: str, quoted: str) -> None:
    assert systemd_quote(arg) == quoted


def _pipeline(tmp_path: Path, cron: str | None, tz: str = "Europe/Paris") -> Path:
    write_recipe(tmp_path / "recipes", "img")
    body: dict[str, object] = {"name": "golden", "recipe": "../recipes/img-recipe.yaml",
                               "infrastructure": {"timeout": "2h"}}  # fmt: skip
    if cron:
        body["schedule"] = {"cron": cron, "timezone": tz}
    return write_pipeline(tmp_path / "my pipelines", body, "golden")


def test_systemd_units(tmp_path: Path) -> None:
    loaded = load_pipeline(_pipeline(tmp_path, "0 3 * * 1"))
    units = systemd_units(loaded, tmp_path / "h.sqlite", tmp_path / "store", "/venv/bin/python")
    service = units["vmbuild-pipeline-golden.service"]
    timer = units["vmbuild-pipeline-golden.timer"]
    assert (
        f'ExecStart=/venv/bin/python -m vmbuild pipeline run "{loaded.path}" --trigger schedule '
        f"--quiet --history {tmp_path}/h.sqlite --store {tmp_path}/store"
    ) in service
    assert "Type=oneshot" in service and "KillMode=mixed" in service
    assert "SuccessExitStatus=75" in service
    assert "TimeoutStartSec=8100" in service  # 2h + the margin: the pipeline's timeout fires first
    assert "OnCalendar=Mon *-*-* 03:00:00 Europe/Paris" in timer
    assert "Persistent=true" in timer and "Unit=vmbuild-pipeline-golden.service" in timer
    assert "WantedBy=timers.target" in timer


def test_crontab_line(tmp_path: Path) -> None:
    loaded = load_pipeline(_pipeline(tmp_path, "0 3 ? * 2 *"))
    text = crontab_line(loaded, tmp_path / "h.sqlite", tmp_path / "store", "/venv/bin/python")
    lines = text.splitlines()
    assert "CRON_TZ=Europe/Paris" in lines
    assert lines[-1].startswith(f"0 3 * * 1 cd '{loaded.dir}' && /venv/bin/python -m vmbuild pipeline run ")  # fmt: skip
    assert "--trigger schedule --quiet" in lines[-1]


@pytest.mark.parametrize(("cron", "message"), [("0 3 * * ? 2030", "cron has no year field"),
                                               ("0 3 L * *", "crontab has no L, W or #")])  # fmt: skip
def test_crontab_refuses_what_cron_cannot_do(tmp_path: Path, cron: str, message: str) -> None:
    loaded = load_pipeline(_pipeline(tmp_path, cron))
    with pytest.raises(ExportError, match=message):
        crontab_line(loaded, tmp_path / "h", tmp_path / "s")


def test_no_schedule_no_export(tmp_path: Path) -> None:
    loaded = load_pipeline(_pipeline(tmp_path, None))
    with pytest.raises(ExportError, match="no schedule to export"):
        systemd_units(loaded, tmp_path / "h", tmp_path / "s")


def test_month_and_day_names_are_not_mistaken_for_specials(tmp_path: Path) -> None:
    loaded = load_pipeline(_pipeline(tmp_path, "0 3 * JUL WED"))
    line = crontab_line(loaded, tmp_path / "h", tmp_path / "s").splitlines()[-1]
    assert line.startswith("0 3 * JUL WED cd ")
    assert oncalendar(parse_cron("0 3 * JUL WED")) == ["Wed *-07-* 03:00:00 UTC"]
