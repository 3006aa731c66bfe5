"""Variables through the real CLI: declared at the top of a recipe or pipeline, given by
--var, --var-file and VMBUILD_VAR_*, substituted where `{{ var.KEY }}` is written; every
mistake an error naming the file and the field. Nothing is built (inspect/validate)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.cli import isolated_env, vmbuild

RECIPE = """\
variables:
  port: {type: int, default: 8080, description: the port nginx listens on}
  greeting: {description: the page text}
  size: {type: string, default: 6G}
  tests: {type: bool, default: true}
name: web
version: 1.0.0
base: debian-12
disk_size: "{{ var.size }}"
components:
  - name: nginx-app
    parameters: {Port: "{{ var.port }}", Content: "<h1>{{ var.greeting }}</h1>"}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def plan(env: dict[str, str], recipe: Path, *args: str) -> dict[str, object]:
    proc = vmbuild(env, "inspect", str(recipe), "--json", *args)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, object] = json.loads(proc.stdout)
    return data


def params(data: dict[str, object]) -> dict[str, str]:
    [component] = data["components"]  # type: ignore[misc]
    return component["parameters"]  # type: ignore[no-any-return]


def test_precedence_cli_over_file_over_env_over_default(tmp_path: Path) -> None:
    recipe = write(tmp_path, "recipe.yaml", RECIPE)
    varfile = write(tmp_path, "vars.yaml", "greeting: from-file\nport: 9000\n")
    env = isolated_env(tmp_path, VMBUILD_VAR_greeting="from-env", VMBUILD_VAR_port="7000")
    assert params(plan(env, recipe)) == {"Port": "7000", "Content": "<h1>from-env</h1>"}
    assert params(plan(env, recipe, "--var-file", str(varfile))) == {
        "Port": "9000", "Content": "<h1>from-file</h1>",
    }  # fmt: skip
    both = plan(env, recipe, "--var-file", str(varfile), "--var", "greeting=Hi [there]")
    assert params(both) == {"Port": "9000", "Content": "<h1>Hi [there]</h1>"}
    # A whole-value reference keeps its type: disk_size is the string "6G" parsed as a size.
    settings = both["settings"]
    assert settings["disk_size"] == {"value": 6 << 30, "source": "recipe"}  # type: ignore[index]
    defaults = plan(isolated_env(tmp_path), recipe, "--var", "greeting=x")
    assert params(defaults) == {"Port": "8080", "Content": "<h1>x</h1>"}
    assert not (tmp_path / "store").exists() and not (tmp_path / "cache").exists()


def test_mistakes_name_the_file_and_the_field(tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    recipe = write(tmp_path, "recipe.yaml", RECIPE)
    cases = [
        ((), f"error: {recipe}: variables.greeting: no value given\n"
             "hint: pass --var greeting=VALUE, a --var-file with greeting:, or set VMBUILD_VAR_greeting\n"),
        (("--var", "greeting=a", "--var", "port=eighty"),
         f"error: {recipe}: variables.port: --var port 'eighty' is not an int\n"),
        (("--var", "greeting=a", "--var", "colour=red"),
         f"error: {recipe}: variables: --var gives 'colour', which this file does not declare "
         "(declared: greeting, port, size, tests)\n"),
        (("--var", "greeting"), "error: --var: expected KEY=VALUE, got 'greeting'\n"),
    ]  # fmt: skip
    for args, stderr in cases:
        proc = vmbuild(env, "inspect", str(recipe), *args)
        assert (proc.returncode, proc.stderr) == (1, stderr)
    typo = write(tmp_path, "typo.yaml", RECIPE.replace("{{ var.port }}", "{{ var.prot }}"))
    proc = vmbuild(env, "validate", str(typo), "--var", "greeting=a")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == (
        f"error: {typo}: components[0].parameters.Port: undeclared variable 'prot' "
        "(declared: greeting, port, size, tests)"
    )
    bad_default = write(tmp_path, "bad.yaml", RECIPE.replace("default: true", "default: maybe"))
    proc = vmbuild(env, "validate", str(bad_default), "--var", "greeting=a")
    assert proc.stderr.splitlines()[0] == (
        f"error: {bad_default}: variables.tests.default: the default 'maybe' is not a bool"
    )


def test_pipelines_take_variables_from_the_environment(tmp_path: Path) -> None:
    write(tmp_path, "recipe.yaml", RECIPE)
    pipeline = write(
        tmp_path, "pipeline.yaml",
        "variables:\n  timezone: {default: UTC}\nrecipe: recipe.yaml\n"
        "schedule: {cron: '0 3 * * 1', timezone: '{{ var.timezone }}'}\n",
    )  # fmt: skip
    env = isolated_env(tmp_path, VMBUILD_VAR_greeting="hello", VMBUILD_VAR_timezone="Mars/Base")
    proc = vmbuild(env, "validate", str(pipeline))
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == (
        f"error: {pipeline}: schedule.timezone: unknown time zone 'Mars/Base' "
        "(use an IANA name such as Europe/Paris)"
    )
    env["VMBUILD_VAR_timezone"] = "Europe/Paris"
    proc = vmbuild(env, "validate", str(pipeline))
    assert (proc.returncode, proc.stdout) == (0, f"{pipeline}: valid pipeline\n"), proc.stderr


PIPELINE = (
    "variables:\n  timezone: {default: UTC}\nrecipe: recipe.yaml\n"
    "schedule: {cron: '0 3 * * 1', timezone: '{{ var.timezone }}'}\n"
)


def test_pipeline_check_and_run_take_var_and_var_file(tmp_path: Path) -> None:
    write(tmp_path, "recipe.yaml", RECIPE)
    pipeline = write(tmp_path, "pipeline.yaml", PIPELINE)
    env = isolated_env(tmp_path, VMBUILD_VAR_timezone="Europe/Paris")
    # --var wins over the environment, in the pipeline and in the recipe it names.
    proc = vmbuild(env, "pipeline", "check", str(pipeline), "--var", "timezone=Mars/Base",
                   "--var", "greeting=hi")  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == (
        f"error: {pipeline}: schedule.timezone: unknown time zone 'Mars/Base' "
        "(use an IANA name such as Europe/Paris)"
    )
    # The recipe's required `greeting` comes from a var file: no run yet, so "changed".
    var_file = write(tmp_path, "vars.yaml", "greeting: hello\n")
    proc = vmbuild(env, "pipeline", "check", str(pipeline), "--var-file", str(var_file), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["exit_code"] == 0
    # Without it the recipe's variable has no value: the run stops before anything runs.
    proc = vmbuild(env, "pipeline", "run", str(pipeline))
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0].startswith(f"error: {pipeline}: recipe: invalid recipe: ")
    assert "greeting" in proc.stderr.splitlines()[0]
    proc = vmbuild(env, "pipeline", "run", str(pipeline), "--var", "timezone=Mars/Base",
                   "--var", "greeting=hi")  # fmt: skip
    assert proc.returncode == 1
    assert "unknown time zone 'Mars/Base'" in proc.stderr.splitlines()[0]
    # A typo is caught: neither the pipeline nor its recipe declares it.
    proc = vmbuild(env, "pipeline", "check", str(pipeline), "--var", "greeting=hi",
                   "--var", "timezon=UTC")  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == (
        f"error: {pipeline}: variables: --var gives 'timezon', which neither this pipeline "
        "nor its recipe declares (declared: greeting, port, size, tests, timezone)"
    )


def test_the_scheduler_loads_pipelines_with_its_var_values(tmp_path: Path) -> None:
    write(tmp_path, "recipe.yaml", RECIPE)
    pipeline = write(tmp_path, "pipeline.yaml", PIPELINE)
    env = isolated_env(tmp_path)
    # One value may serve several pipelines: an undeclared one is no error for the daemon.
    proc = vmbuild(env, "scheduler", "--pipelines", str(tmp_path), "--var", "greeting=hi",
                   "--var", "other_pipelines_key=1", "--var", "timezone=Mars/Base")  # fmt: skip
    assert proc.returncode == 1
    assert "unknown time zone 'Mars/Base'" in proc.stderr
    assert str(pipeline) in proc.stderr


SCHEDULED = (
    "variables:\n  timezone: {default: UTC}\n  keep: {type: int}\nrecipe: recipe.yaml\n"
    "schedule: {cron: '0 3 * * 1', timezone: '{{ var.timezone }}'}\n"
    "lifecycle: {keep_last: '{{ var.keep }}'}\n"
)


def test_exports_carry_the_variables_into_the_scheduled_command(tmp_path: Path) -> None:
    write(tmp_path, "recipe.yaml", RECIPE)
    pipeline = write(tmp_path, "pipeline.yaml", SCHEDULED)
    var_file = write(tmp_path, "vars.yaml", "greeting: hello\n")
    env = isolated_env(tmp_path)
    given = ("--var", "timezone=Europe/Paris", "--var", "keep=3", "--var-file", "vars.yaml")
    proc = vmbuild(env, "pipeline", "export-cron", str(pipeline), *given, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[3] == "CRON_TZ=Europe/Paris"
    assert lines[4].endswith(f" --var timezone=Europe/Paris --var keep=3 --var-file {var_file}"), (
        lines[4]
    )
    out = tmp_path / "units"
    proc = vmbuild(env, "pipeline", "export-systemd", str(pipeline), *given,
                   "--output-dir", str(out), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    service = (out / "vmbuild-pipeline-pipeline.service").read_text()
    [exec_start] = [x for x in service.splitlines() if x.startswith("ExecStart=")]
    assert exec_start.endswith(
        f" --var timezone=Europe/Paris --var keep=3 --var-file {var_file}"
    ), exec_start
    timer = (out / "vmbuild-pipeline-pipeline.timer").read_text()
    assert "OnCalendar=Mon *-*-* 03:00:00 Europe/Paris" in timer


def test_exports_refuse_what_run_refuses_and_ignore_this_shells_environment(
    tmp_path: Path,
) -> None:
    write(tmp_path, "recipe.yaml", RECIPE)
    pipeline = write(tmp_path, "pipeline.yaml", SCHEDULED)
    env = isolated_env(tmp_path, VMBUILD_VAR_keep="3", VMBUILD_VAR_greeting="hi")
    for verb in ("export-cron", "export-systemd"):
        extra = ("--output-dir", str(tmp_path / "units")) if verb == "export-systemd" else ()
        # An undeclared --var is a typo, refused as `pipeline run` refuses it.
        proc = vmbuild(env, "pipeline", verb, str(pipeline), "--var", "keep=3",
                       "--var", "greeting=hi", "--var", "colour=red", *extra)  # fmt: skip
        assert proc.returncode == 1
        assert proc.stderr.splitlines()[0] == (
            f"error: {pipeline}: variables: --var gives 'colour', which neither this pipeline "
            "nor its recipe declares (declared: greeting, keep, port, size, tests, timezone)"
        ), proc.stderr
        # A value only in this shell's environment would be missing when the timer fires.
        proc = vmbuild(env, "pipeline", verb, str(pipeline), "--var", "greeting=hi", *extra)
        assert (proc.returncode, proc.stderr) == (1, (
            f"error: {pipeline}: variables.keep: no value given\n"
            "hint: pass --var keep=VALUE, a --var-file with keep:, not VMBUILD_VAR_keep "
            "(an exported schedule does not run in this shell)\n"
        ))  # fmt: skip
    assert not (tmp_path / "units").exists()


def test_prune_takes_variables_like_run(tmp_path: Path) -> None:
    write(tmp_path, "recipe.yaml", RECIPE)
    pipeline = write(tmp_path, "pipeline.yaml", SCHEDULED)
    env = isolated_env(tmp_path)
    proc = vmbuild(env, "pipeline", "prune", str(pipeline), "--dry-run", "--json",
                   "--var", "keep=1", "--var", "greeting=hi")  # fmt: skip
    assert (proc.returncode, json.loads(proc.stdout)) == (0, []), proc.stderr
    proc = vmbuild(env, "pipeline", "prune", str(pipeline), "--dry-run",
                   "--var", "keep=one", "--var", "greeting=hi")  # fmt: skip
    assert (proc.returncode, proc.stderr.splitlines()[0]) == (
        1, f"error: {pipeline}: variables.keep: --var keep 'one' is not an int",
    )  # fmt: skip
    proc = vmbuild(env, "pipeline", "prune", str(pipeline), "--var", "keep=1",
                   "--var", "greeting=hi", "--var", "colour=red")  # fmt: skip
    assert proc.returncode == 1 and "--var gives 'colour'" in proc.stderr
