"""Property: no input makes a loader crash or hang. Every recipe, pipeline,
distribution config, component document and image reference either loads or
raises a VmbuildError (one line naming the file): never another exception, never
a traceback, and always within the example deadline.

Inputs come three ways: random YAML values written out (infinities, NaN, huge
numbers, deep lists, odd keys), valid files with one field replaced by such a
value, and hostile documents (deep nesting, aliases of aliases, long numbers,
non-UTF-8, NUL bytes). Example counts are bounded so the unit tier stays fast.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.disks import qcow2_header
from vmbuild.config.distribution import load_distribution
from vmbuild.config.pipeline import load_pipeline
from vmbuild.config.recipe import load_recipe
from vmbuild.errors import VmbuildError
from vmbuild.toe import load_document

FUZZ = settings(
    max_examples=40,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([math.inf, -math.inf, math.nan, 1e308, -0.0, 0.5]),
    st.text(max_size=40),
    st.sampled_from(
        ["", "infG", ".inf", ".nan", "-1", "0", "2048", "4G", "1e400", "a|b", "../../etc/passwd",
         "/dev/zero", "/dev/null", "x" * 300, "99999999999999999999T", "1h30m", "-5m", "0s"]
    ),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=12), inner, max_size=4),
    ),
    max_leaves=12,
)

HOSTILE = [
    "[" * 5000 + "]" * 5000,
    "a: " + "{b: " * 3000 + "1" + "}" * 3000,
    # Billion laughs.
    "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]\n"
        for i in range(8)
    ),
    "n: " + "9" * 6000,
    "n: 0x" + "f" * 6000,
    "\x00\x01\x02",
    "name: [unclosed",
    "- a\n- b\n",
    "just a string",
    "? [a, b]\n: c\n",
    "a: !!python/object:os.system {}\n",
    "a: 1\na: 2\n",
]


def dump(value: Any) -> str:
    return yaml.safe_dump(value, allow_unicode=True)


def loads_or_clean_error(call: Any) -> None:
    try:
        call()
    except VmbuildError as exc:
        assert str(exc).strip(), "an error must say something"


COMPONENT = """\
name: hello
schemaVersion: 1.0
parameters:
  - greeting: {type: string, default: hi, description: what to say}
phases:
  - name: build
    steps:
      - name: Say
        action: ExecuteBash
        inputs:
          commands: ["echo {{ greeting }}"]
"""

RECIPE = {
    "name": "demo", "version": "1.2.3", "base": "debian-12",
    "components": [{"name": "./hello.yaml", "parameters": {"greeting": "yo"}}],
    "tests": ["test_it.py"], "outputs": ["qcow2", "raw"], "disk_size": "6G",
    "vm": {"memory": "2G", "cpus": 2},
}  # fmt: skip
RECIPE_PATHS = [
    ("name",), ("version",), ("base",), ("disk_size",), ("outputs",), ("tests",),
    ("vm",), ("vm", "memory"), ("vm", "cpus"), ("components",), ("components", 0, "name"),
    ("components", 0, "parameters"), ("components", 0, "parameters", "greeting"),
    ("components", 0, "secret_parameters"), ("distribution",),
]  # fmt: skip


def replaced(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    import copy

    out = copy.deepcopy(doc)
    target = out
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return out


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "hello.yaml").write_text(COMPONENT)
    (tmp_path / "test_it.py").write_text("def test_x(host):\n    assert host\n")
    (tmp_path / "disk.qcow2").write_bytes(qcow2_header())
    return tmp_path


@FUZZ
@given(path=st.sampled_from(RECIPE_PATHS), value=values)
def test_recipe_fields(project: Path, path: tuple[Any, ...], value: Any) -> None:
    recipe = project / "recipe.yaml"
    recipe.write_text(dump(replaced(RECIPE, path, value)))
    loads_or_clean_error(lambda: load_recipe(recipe))


@FUZZ
@given(value=values)
def test_whole_recipes(project: Path, value: Any) -> None:
    recipe = project / "recipe.yaml"
    recipe.write_text(dump(value))
    loads_or_clean_error(lambda: load_recipe(recipe))


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_recipe_text(project: Path, text: str) -> None:
    recipe = project / "recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(VmbuildError):
        load_recipe(recipe)


@pytest.mark.parametrize(
    "special", ["/dev/zero", "/dev/null", "fifo", "dir", "recipe.yaml/x", "x" * 5000]
)
def test_special_files_are_refused(project: Path, special: str) -> None:
    import os

    if special == "fifo":
        os.mkfifo(project / "fifo")
        path = project / "fifo"
    elif special == "dir":
        (project / "dir").mkdir()
        path = project / "dir"
    elif special.startswith("/"):
        path = Path(special)
    else:
        path = project / special
    with pytest.raises(VmbuildError):
        load_recipe(path)


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("/etc/passwd", "not a disk image"),
        ("empty.img", "not a disk image"),
        ("recipe.yaml", "not a disk image"),
        ("/dev/zero", "no such file"),
        ("overlay.qcow2", "backing file"),
    ],
)
def test_bases_that_are_not_disk_images(project: Path, base: str, message: str) -> None:
    (project / "empty.img").write_bytes(b"")
    header = bytearray(qcow2_header())
    header[8:16] = (72).to_bytes(8, "big")  # a backing file offset
    (project / "overlay.qcow2").write_bytes(bytes(header))
    recipe = project / "recipe.yaml"
    recipe.write_text(dump(replaced(RECIPE, ("base",), base)))
    with pytest.raises(VmbuildError) as info:
        load_recipe(recipe)
    assert str(info.value).startswith(f"{recipe}: base: ")
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("memory", "expected"),
    [(2048, 2 << 30), ("2048", 2 << 30), ("2G", 2 << 30), ("512M", 512 << 20)],
)
def test_a_bare_memory_number_is_mib(project: Path, memory: Any, expected: int) -> None:
    recipe = project / "recipe.yaml"
    recipe.write_text(dump(replaced(RECIPE, ("vm", "memory"), memory)))
    assert load_recipe(recipe).recipe.vm.memory == expected


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("vm", "memory"), "infG", "vm.memory: invalid size 'infG'"),
        (("vm", "memory"), 0, "vm.memory: size must be positive"),
        (("vm", "memory"), 100, "vm.memory: 100 is less than 256 MiB"),
        (("vm", "cpus"), True, "vm.cpus: "),
        (("vm", "cpus"), 1000, "vm.cpus: "),
        (("disk_size",), ".inf", "disk_size: invalid size '.inf'"),
        (("disk_size",), "1e400", "disk_size: invalid size '1e400'"),
        (("disk_size",), "100P", "disk_size: invalid size '100P'"),
        (("tests",), ["hello.yaml"], "tests[0]: hello.yaml: a testinfra file is a .py file"),
    ],
)
def test_bounds_name_the_field(
    project: Path, path: tuple[Any, ...], value: Any, message: str
) -> None:
    recipe = project / "recipe.yaml"
    recipe.write_text(dump(replaced(RECIPE, path, value)))
    with pytest.raises(VmbuildError) as info:
        load_recipe(recipe)
    assert str(info.value).startswith(f"{recipe}: {message}")


PIPELINE = {
    "recipe": "recipe.yaml", "schedule": {"cron": "0 3 * * *", "timezone": "UTC"},
    "tests": {"enabled": True, "timeout": "30m"},
    "infrastructure": {"timeout": "2h", "memory": "2G", "cpus": 2},
}  # fmt: skip
PIPELINE_PATHS = [
    ("recipe",), ("schedule",), ("schedule", "cron"), ("schedule", "timezone"), ("tests",),
    ("tests", "timeout"), ("infrastructure",), ("infrastructure", "timeout"),
    ("infrastructure", "memory"), ("infrastructure", "cpus"),
]  # fmt: skip


@FUZZ
@given(path=st.sampled_from(PIPELINE_PATHS), value=values)
def test_pipeline_fields(project: Path, path: tuple[Any, ...], value: Any) -> None:
    (project / "recipe.yaml").write_text(dump(RECIPE))
    pipeline = project / "p.yaml"
    pipeline.write_text(dump(replaced(PIPELINE, path, value)))
    loads_or_clean_error(lambda: load_pipeline(pipeline))


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_pipeline_text(project: Path, text: str) -> None:
    pipeline = project / "p.yaml"
    pipeline.write_text(text)
    with pytest.raises(VmbuildError):
        load_pipeline(pipeline)


DISTRIBUTION = {
    "regions": [{"region": "us-east-1", "ami_name": "img-{{ version }}", "tags": {"a": "b"}}],
}


@FUZZ
@given(
    path=st.sampled_from(
        [("regions",), ("regions", 0), ("regions", 0, "region"), ("regions", 0, "ami_name"),
         ("regions", 0, "tags"), ("import",)]
    ),
    value=values,
)  # fmt: skip
def test_distribution_fields(path: tuple[Any, ...], value: Any) -> None:
    data = replaced(DISTRIBUTION, path, value)
    loads_or_clean_error(lambda: load_distribution(data, "d.yaml", ""))


@FUZZ
@given(value=values)
def test_whole_distributions(value: Any) -> None:
    loads_or_clean_error(lambda: load_distribution(value, "d.yaml", ""))


def test_an_ami_name_is_judged_at_load() -> None:
    data = replaced(DISTRIBUTION, ("regions", 0, "ami_name"), "a|b")
    with pytest.raises(VmbuildError) as info:
        load_distribution(data, "d.yaml", "")
    assert str(info.value).startswith("d.yaml: regions[0].ami_name: ")


STEP = {"name": "Say", "action": "ExecuteBash", "inputs": {"commands": ["echo hi"]}}
DOCUMENT = {
    "name": "hello", "schemaVersion": 1.0,
    "phases": [{"name": "build", "steps": [STEP]}],
}  # fmt: skip
DOCUMENT_PATHS = [
    ("schemaVersion",), ("phases",), ("phases", 0, "name"), ("phases", 0, "steps"),
    ("phases", 0, "steps", 0, "action"), ("phases", 0, "steps", 0, "inputs"),
    ("phases", 0, "steps", 0, "timeoutSeconds"), ("phases", 0, "steps", 0, "maxAttempts"),
    ("phases", 0, "steps", 0, "loop"), ("phases", 0, "steps", 0, "onFailure"),
    ("phases", 0, "steps", 0, "if"), ("parameters",),
]  # fmt: skip


@FUZZ
@given(path=st.sampled_from(DOCUMENT_PATHS), value=values)
def test_component_fields(tmp_path: Path, path: tuple[Any, ...], value: Any) -> None:
    doc = tmp_path / "c.yaml"
    doc.write_text(dump(replaced(DOCUMENT, path, value)))
    loads_or_clean_error(lambda: load_document(doc))


@pytest.mark.parametrize(
    "loop",
    [
        {"for": {"start": 0, "end": 10**12, "updateBy": 1}},
        {"for": {"start": 0, "end": 10**400, "updateBy": 1}},
        {"forEach": ["x"] * 10_001},
    ],
    ids=["1e12-iterations", "huge-end", "10001-items"],
)
def test_huge_loops_are_refused_at_validate_time(tmp_path: Path, loop: Any) -> None:
    doc = tmp_path / "c.yaml"
    step = {**STEP, "loop": loop}
    doc.write_text(dump(replaced(DOCUMENT, ("phases", 0, "steps"), [step])))
    with pytest.raises(VmbuildError):
        load_document(doc)


@pytest.mark.parametrize(("count", "message"), [(1001, "at most 1000"), (20_000, "more than")])
def test_many_steps_are_refused_in_bounded_time(tmp_path: Path, count: int, message: str) -> None:
    import time

    doc = tmp_path / "c.yaml"
    step = "      - {name: S%d, action: ExecuteBash, inputs: {commands: [echo hi]}}\n"
    doc.write_text(
        "name: hello\nschemaVersion: 1.0\nphases:\n  - name: build\n    steps:\n"
        + "".join(step % i for i in range(count))
    )
    started = time.monotonic()
    with pytest.raises(VmbuildError, match=message):
        load_document(doc)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_component_text(tmp_path: Path, text: str) -> None:
    doc = tmp_path / "c.yaml"
    doc.write_text(text)
    with pytest.raises(VmbuildError):
        load_document(doc)


@FUZZ
@given(ref=st.text(max_size=300))
def test_image_references(tmp_path: Path, ref: str) -> None:
    from vmbuild.stages.store import resolve

    loads_or_clean_error(lambda: resolve(tmp_path / "store", ref))
