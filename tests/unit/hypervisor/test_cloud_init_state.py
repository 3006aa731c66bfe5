"""Reading cloud-init's own record of a boot (status.json, result.json)."""

from __future__ import annotations

import json

import pytest

from vmbuild.hypervisor.guest import cloud_init_errors

# As cloud-init 22.4 (Debian 12) writes them for a clean NoCloud boot.
STATUS = {
    "v1": {
        "datasource": "DataSourceNoCloud [seed=/dev/vdb][dsmode=net]",
        "init": {"errors": [], "finished": 1764556128.6, "start": 1764556123.0},
        "init-local": {"errors": [], "finished": 1764556116.2, "start": 1764556115.8},
        "modules-config": {"errors": [], "finished": 1764556136.0, "start": 1764556132.2},
        "modules-final": {"errors": [], "finished": 1764556139.9, "start": 1764556135.7},
        "stage": None,
    }
}
RESULT = {"v1": {"datasource": "DataSourceNoCloud [seed=/dev/vdb][dsmode=net]", "errors": []}}


def test_a_clean_boot_has_no_errors() -> None:
    assert cloud_init_errors(json.dumps(STATUS), json.dumps(RESULT)) == []


def test_every_stage_error_is_named_once() -> None:
    status = json.loads(json.dumps(STATUS))
    status["v1"]["modules-final"]["errors"] = ["('scripts_user', RuntimeError('boom'))"]
    status["v1"]["init"]["errors"] = ["bad seed"]
    result = {"v1": {"errors": ["('scripts_user', RuntimeError('boom'))", "bad seed", "other"]}}
    assert cloud_init_errors(json.dumps(status), json.dumps(result)) == [
        "init: bad seed",
        "modules-final: ('scripts_user', RuntimeError('boom'))",
        "other",
    ]


def test_no_result_file_is_not_a_finished_run() -> None:
    with pytest.raises(ValueError):
        cloud_init_errors(json.dumps(STATUS), "cat: /run/cloud-init/result.json: No such file")
