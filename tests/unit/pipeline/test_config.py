"""Pipeline YAML: defaults, overrides, and clear load-time errors naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.pipeline import T0, write_pipeline, write_recipe
from vmbuild.config.pipeline import load_pipeline, load_pipelines, parse_duration
from vmbuild.errors import ConfigError, VmbuildError
from vmbuild.pipeline.runner import with_overrides


def test_minimal_pipeline_defaults(tmp_path: Path) -> None:
    write_recipe(tmp_path, "web")
    p = load_pipeline(write_pipeline(tmp_path, {"recipe": "web-recipe.yaml"}, "nightly"))
    assert p.name == "nightly"  # from the file name
    assert p.recipe.recipe.name == "web"
    assert p.schedule is None and p.store is None and p.distribution is None
    infra = p.pipeline.infrastructure
    assert (infra.backend, infra.accelerator, infra.timeout) == (None, "auto", 3 * 3600)
    assert p.pipeline.tests.enabled and p.pipeline.infrastructure.refresh_base


def test_full_pipeline(tmp_path: Path) -> None:
    write_recipe(tmp_path / "recipes", "web", vm={"cpus": 1, "memory": "1G"})
    body = {
        "name": "golden",
        "recipe": "recipes/web-recipe.yaml",
        "store": "artifacts",
        "infrastructure": {"cpus": 4, "memory": "3G", "accelerator": "tcg", "timeout": "1h30m",
                           "keep_vm_on_failure": True, "mirror": "http://mirror.example/debian"},
        "tests": {"enabled": False, "timeout": "20m"},
        "schedule": {"cron": "0 3 ? * 2 *", "timezone": "Europe/Paris",
                     "start_condition": "if-dependencies-updated"},
        "dependencies": {"apt_sources": ["deb http://mirror.example/debian bookworm main contrib"]},
        "lifecycle": {"keep_last": 3, "max_age": "30d"},
    }  # fmt: skip
    p = load_pipeline(write_pipeline(tmp_path, body), now=T0)
    assert p.name == "golden"
    assert p.store == tmp_path.resolve() / "artifacts"
    assert p.pipeline.infrastructure.timeout == 5400
    assert p.pipeline.tests.timeout == 1200
    assert p.pipeline.lifecycle.max_age == 30 * 86400
    assert p.schedule is not None and p.schedule.key == "0 3 ? * 2 * @ Europe/Paris"
    recipe = with_overrides(p).recipe
    assert (recipe.vm.cpus, recipe.vm.memory) == (4, 3 << 30)


def test_overrides_keep_recipe_values_not_given(tmp_path: Path) -> None:
    write_recipe(tmp_path, "web", vm={"cpus": 3, "memory": "1G"})
    p = load_pipeline(write_pipeline(tmp_path, {"recipe": "web-recipe.yaml",
                                                "infrastructure": {"cpus": 1}}))  # fmt: skip
    vm = with_overrides(p).recipe.vm
    assert (vm.cpus, vm.memory) == (1, 1 << 30)


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"recipe": "r.yaml", "schedule": {"cron": "0 25 * * *"}}, "schedule.cron",
         "hour field '25' is invalid"),
        ({"recipe": "r.yaml", "schedule": {"cron": "0 3 * *"}}, "schedule.cron", "has 4 fields"),
        ({"recipe": "r.yaml", "schedule": {"cron": "0 3 * * *", "timezone": "Europe/Pariss"}},
         "schedule.timezone", "unknown time zone 'Europe/Pariss' (did you mean Europe/Paris"),
        ({"recipe": "r.yaml", "schedule": {"cron": "0 3 * * *", "start_condition": "sometimes"}},
         "schedule.start_condition", "'always' or 'if-dependencies-updated'"),
        ({"recipe": "r.yaml", "schedule": {"cron": "0 3 * * ? 2020"}}, "schedule.cron",
         "never fires again"),
        ({"recipe": "missing.yaml"}, "recipe", "recipe not found:"),
        ({"recipe": "r.yaml", "infrastructure": {"timeout": "soon"}}, "infrastructure.timeout",
         "invalid duration 'soon'"),
        ({"recipe": "r.yaml", "infrastructure": {"backend": "xen"}}, "infrastructure.backend",
         "'qemu' or 'libvirt'"),
        ({"recipe": "r.yaml", "lifecycle": {"keep_last": 0}}, "lifecycle.keep_last",
         "greater than or equal to 1"),
        ({"recipe": "r.yaml", "dependencies": {"apt_sources": ["http://x bookworm main"]}},
         "dependencies.apt_sources[0]", "expected 'deb URI SUITE COMPONENT...'"),
        ({"recipe": "r.yaml", "shedule": {}}, "shedule", "unknown field"),
        ({"schedule": {"cron": "0 3 * * *"}}, "recipe", "required field is missing"),
        ({"recipe": "r.yaml", "scan": {"fail_on": "critical"}}, "scan.fail_on",
         "'unimportant', 'low', 'medium' or 'high'"),
        ({"recipe": "r.yaml", "scan": {"data": "nope.json"}}, "scan.data",
         "file not found: nope.json"),
        ({"recipe": "r.yaml", "scan": {"fail_ob": "high"}}, "scan.fail_ob", "unknown field"),
    ],
)  # fmt: skip
def test_load_errors_name_file_and_field(
    tmp_path: Path, body: dict[str, object], field: str, message: str
) -> None:
    (tmp_path / "r.yaml").write_text("name: img\nversion: 1.0.0\nbase: debian-12\n")
    path = write_pipeline(tmp_path, body, "bad")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, now=T0)
    assert info.value.file == str(path)
    assert info.value.field == field
    assert message in str(info.value)


def test_invalid_recipe_is_reported_through_the_pipeline(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("name: img\nversion: one\nbase: debian-12\n")
    path = write_pipeline(tmp_path, {"recipe": "r.yaml"})
    with pytest.raises(ConfigError, match=r"p.yaml: recipe: invalid recipe: .*r.yaml: version"):
        load_pipeline(path)


def test_invalid_name_from_file_name(tmp_path: Path) -> None:
    write_recipe(tmp_path, "web")
    path = write_pipeline(tmp_path, {"recipe": "web-recipe.yaml"}, "My Pipeline")
    with pytest.raises(ConfigError, match="not a valid pipeline name"):
        load_pipeline(path)


def test_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_pipeline(write_pipeline(tmp_path, "- a\n- b\n"))


def test_load_pipelines_lists_every_broken_file_and_duplicate_names(tmp_path: Path) -> None:
    write_recipe(tmp_path / "recipes", "web")
    recipe = "recipes/web-recipe.yaml"
    write_pipeline(tmp_path, {"recipe": recipe}, "good")
    write_pipeline(tmp_path, {"recipe": recipe, "schedule": {"cron": "bad"}}, "a-cron")
    write_pipeline(tmp_path, {"recipe": "nope.yaml"}, "b-recipe")
    write_pipeline(tmp_path, {"recipe": recipe, "name": "good"}, "c-dup")
    with pytest.raises(VmbuildError) as info:
        load_pipelines(tmp_path)
    text = str(info.value)
    assert "3 problems" in text
    assert "a-cron.yaml: schedule.cron:" in text
    assert "b-recipe.yaml: recipe: recipe not found" in text
    assert "good.yaml: name: 'good' is also the name of" in text and "c-dup.yaml" in text
    assert info.value.hint and "nothing runs" in info.value.hint


def test_load_pipelines_ignores_other_files(tmp_path: Path) -> None:
    write_recipe(tmp_path / "recipes", "web")
    write_pipeline(tmp_path, {"recipe": "recipes/web-recipe.yaml"}, "one")
    (tmp_path / "README.md").write_text("not a pipeline")
    assert [p.name for p in load_pipelines(tmp_path)] == ["one"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45s", 45), ("90m", 5400), ("2h", 7200), ("1h30m", 5400), ("30d", 2592000), ("1w", 604800),
     ("120", 120), (300, 300), (1.5, 1.5)],
)  # fmt: skip
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "1y", "h", "-5m", 0, True, "1h 30x", [1]])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_the_example_pipelines_are_valid() -> None:
    data = Path(__file__).resolve().parents[2] / "data" / "pipelines"
    loaded = {p.name: p for p in load_pipelines(data, now=T0)}
    assert set(loaded) == {"minimal", "weekly"}
    assert loaded["weekly"].schedule is not None
    assert loaded["weekly"].schedule.key == "0 3 ? * 2 * @ Europe/Paris"
    assert loaded["minimal"].recipe.recipe.name == "pipeline-minimal"


def test_load_pipelines_skips_recipes_and_distribution_files_beside_them(tmp_path: Path) -> None:
    # examples/nginx: recipe.yaml, distribution.yaml and pipeline.yaml in one directory.
    write_recipe(tmp_path, "web")
    (tmp_path / "distribution.yaml").write_text("regions:\n  - region: us-east-1\n")
    (tmp_path / "component.yaml").write_text("name: c\nschemaVersion: 1.0\nphases: []\n")
    write_pipeline(tmp_path, {"recipe": "web-recipe.yaml"}, "weekly")
    (tmp_path / "broken.yaml").write_text("recipe: [unclosed\n")
    with pytest.raises(VmbuildError) as info:
        load_pipelines(tmp_path)
    assert str(info.value).startswith(f"1 problem in the pipelines of {tmp_path}:\n  ")
    assert "broken.yaml: line 2, column 1: invalid YAML" in str(info.value)
    (tmp_path / "broken.yaml").unlink()
    assert [p.name for p in load_pipelines(tmp_path)] == ["weekly"]


def test_scan_threshold_from_the_pipeline_over_the_recipes(tmp_path: Path) -> None:
    recipes, pipelines = tmp_path / "recipes", tmp_path / "pipelines"
    write_recipe(recipes, "web", scan={"fail_on": "low", "data": "tracker.json"})
    (recipes / "tracker.json").write_text("{}")
    (pipelines / "data").mkdir(parents=True)
    (pipelines / "data" / "newer.json").write_text("{}")

    def effective(scan: object) -> object:
        body = {"recipe": "../recipes/web-recipe.yaml"} | ({"scan": scan} if scan else {})
        loaded = load_pipeline(write_pipeline(pipelines, body))
        recipe_scan = with_overrides(loaded).recipe.scan
        assert recipe_scan == loaded.scan  # what the run's build (its attest stage) is given
        return None if recipe_scan is None else (recipe_scan.fail_on, recipe_scan.data)

    tracker = str(recipes.resolve() / "tracker.json")
    # Not given: the recipe's (its data relative to the recipe, made absolute).
    assert effective(None) == ("low", tracker)
    # Each key given wins; the others stay the recipe's.
    assert effective({"fail_on": "high"}) == ("high", tracker)
    assert effective({"data": "data/newer.json"}) == ("low", str(pipelines / "data/newer.json"))
    # An explicit null turns the threshold off: the scan still runs and reports.
    assert effective({"fail_on": None}) == (None, tracker)
    # A recipe without `scan:` gets the pipeline's.
    write_recipe(recipes, "plain")
    loaded = load_pipeline(write_pipeline(pipelines, {"recipe": "../recipes/plain-recipe.yaml",
                                                      "scan": {"fail_on": "medium"}}))  # fmt: skip
    assert loaded.scan is not None
    assert (loaded.scan.fail_on, loaded.scan.data) == ("medium", None)
    assert (
        load_pipeline(write_pipeline(pipelines, {"recipe": "../recipes/plain-recipe.yaml"})).scan
        is None
    )
