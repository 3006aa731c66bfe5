"""The pipeline: a recipe plus how, when and where it is built (EC2 Image Builder's image
pipeline). Parsed and validated entirely, the recipe it names included, before anything
runs; errors name the file and the field: `nightly.yaml: schedule.timezone: ...`.

```yaml
name: web-golden                  # default: the file name without .yaml
recipe: ../recipes/web.yaml       # relative to this file
store: /srv/images                # default: --store, $VMBUILD_STORE, ./images
infrastructure:
  backend: qemu                   # qemu | libvirt
  cpus: 2                         # default: the recipe's vm.cpus
  memory: 2G                      # default: the recipe's vm.memory
  accelerator: auto               # auto | kvm | tcg
  timeout: 3h                     # the whole run; the build is cancelled cleanly after it
  keep_on_failure: false          # a failed VM stays up; the log says how to SSH into it
  mirror: http://deb.debian.org/debian   # for a debian-12 base (default: the host's)
  refresh_base: true              # rebuild a debian-12 base the mirror has moved past
tests:
  enabled: true
  timeout: 1h
distribution: {...}               # the recipe's format (default: the recipe's own)
schedule:
  cron: "0 3 * * 1"               # 5 fields, or 6 as EC2 Image Builder (with a year)
  timezone: Europe/Paris          # IANA name (default UTC)
  start_condition: always         # always | if-dependencies-updated
dependencies:
  apt_sources:                    # the package indexes newer packages are looked up in
    - deb http://deb.debian.org/debian bookworm main   # (default for debian-12: the base's)
lifecycle:
  keep_last: 5                    # per version
  max_age: 30d                    # never the newest passing build
scan:                             # the recipe's scan: format; each key given here wins
  fail_on: high                   # fail the run at or above (null: report only)
  data: tracker.json              # relative to this file (default: the recipe's, else cache)
```
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from vmbuild.config.loader import load_model, load_yaml, parse_size
from vmbuild.config.recipe import NAME, LoadedRecipe, Memory, ScanSettings, load_recipe
from vmbuild.config.settings import field as setting
from vmbuild.config.variables import Given, reject_undeclared
from vmbuild.errors import ConfigError, VmbuildError

if TYPE_CHECKING:
    from vmbuild.config.distribution import DistributionConfig
from vmbuild.config.cron import CronSchedule, check_timezone, parse_cron

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([wdhms])")
MAX_DURATION = 366 * 86400.0
_UNIT_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
PIPELINE_SUFFIXES = (".yaml", ".yml")


def parse_duration(value: object) -> float:
    """'90m', '1h30m', '30d', '45s' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90m or 2h")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if len(text) > 64:
            raise ValueError("invalid duration (too long)")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        elif text and _DURATION_PART.sub("", text) == "":
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
        else:
            raise ValueError(f"invalid duration {value!r} (use e.g. 45s, 90m, 2h, 30d, 1h30m)")
    else:
        raise ValueError("expected a duration such as 90m or 2h")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("a duration must be positive and finite")
    if seconds > MAX_DURATION:
        raise ValueError(f"{value!r} is longer than a year")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Infrastructure(_Model):
    """The pipeline's `infrastructure:`: defaults, help and bounds come from
    config/settings.py; None means "the recipe's"."""

    backend: Literal["qemu", "libvirt"] | None = setting("backend", "pipeline")
    uri: str | None = setting("uri", "pipeline")
    network: str | None = setting("network", "pipeline")
    cpus: int | None = setting("cpus", "pipeline")
    memory: Memory | None = setting("memory", "pipeline")
    accelerator: Literal["auto", "kvm", "tcg"] = setting("accelerator", "pipeline")
    timeout: Duration = setting("timeout", "pipeline")
    keep_on_failure: bool = setting("keep_on_failure", "pipeline")  # was keep_vm_on_failure
    mirror: str | None = setting("mirror", "pipeline")
    refresh_base: bool = setting("refresh_base", "pipeline")


class Tests(_Model):
    enabled: bool = True
    timeout: Duration | None = None


class ScheduleSpec(_Model):
    cron: str
    timezone: str = "UTC"
    start_condition: Literal["always", "if-dependencies-updated"] = "always"

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        check_timezone(value)
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        parse_cron(value)  # the time zone is checked on its own field
        return value


def _apt_line(value: object) -> object:
    if isinstance(value, str):
        words = re.sub(r"\[[^\]]*\]", " ", value).split()
        if len(words) < 4 or words[0] != "deb" or not re.match(r"^(https?|file)://", words[1]):
            raise ValueError(f"expected 'deb URI SUITE COMPONENT...', got {value!r}")
    return value


class Dependencies(_Model):
    apt_sources: list[Annotated[str, BeforeValidator(_apt_line)]] | None = None


class Lifecycle(_Model):
    keep_last: int | None = Field(default=None, ge=1, description="builds kept per version")
    max_age: Duration | None = None


class Pipeline(_Model):
    name: str | None = Field(default=None, pattern=NAME.pattern)
    description: str = ""
    recipe: str = Field(min_length=1)
    store: str | None = None
    infrastructure: Infrastructure = Infrastructure()
    tests: Tests = Tests()
    distribution: dict[str, Any] | None = None
    schedule: ScheduleSpec | None = None
    dependencies: Dependencies = Dependencies()
    lifecycle: Lifecycle = Lifecycle()
    scan: ScanSettings | None = None


@dataclass(frozen=True)
class LoadedPipeline:
    """A validated pipeline with its recipe loaded and its schedule compiled."""

    pipeline: Pipeline
    name: str
    path: Path
    display: str  # the name errors use: the path as the user gave it
    sha256: str
    recipe: LoadedRecipe
    distribution: DistributionConfig | None
    schedule: CronSchedule | None
    store: Path | None  # the pipeline's own store, resolved; None: the CLI's default
    # The CVE scan the run's build does: the recipe's `scan:` with the pipeline's keys over
    # it, `data` made absolute (None: no scan).
    scan: ScanSettings | None = None

    @property
    def dir(self) -> Path:
        return self.path.parent


def load_pipeline(
    path: Path, *, now: datetime | None = None, variables: Given | None = None
) -> LoadedPipeline:
    """Parse and validate a pipeline and the recipe it names; no side effects.

    Variables (`{{ var.KEY }}`) resolve in both files from the same given values
    (default: VMBUILD_VAR_* in the environment); each file declares its own.
    """
    display = str(path)
    given = replace(variables, strict=False) if variables else None
    pipeline = load_model(path, Pipeline, "recipe, schedule, ...", given)
    name = pipeline.name or path.stem
    if not NAME.match(name):
        raise ConfigError(
            display, "name", f"{name!r} (from the file name) is not a valid pipeline name",
            hint="set name: with lowercase letters, digits, '.', '_' or '-'",
        )  # fmt: skip
    base_dir = path.resolve().parent
    recipe_path = Path(pipeline.recipe).expanduser()
    recipe_path = recipe_path if recipe_path.is_absolute() else base_dir / recipe_path
    if not recipe_path.is_file():
        raise ConfigError(display, "recipe", f"recipe not found: {recipe_path}")
    try:
        recipe = load_recipe(recipe_path, variables=given)
    except VmbuildError as exc:
        raise ConfigError(display, "recipe", f"invalid recipe: {exc}", hint=exc.hint) from None
    if variables is not None and variables.strict:
        _check_given(variables, display, path, recipe_path)

    schedule = None
    if pipeline.schedule is not None:
        spec = pipeline.schedule
        schedule = parse_cron(spec.cron, spec.timezone)
        if schedule.next_after(now or datetime.now(UTC)) is None:
            raise ConfigError(display, "schedule.cron", f"{spec.cron!r} never fires again")

    distribution = recipe.distribution
    if pipeline.distribution is not None:
        distribution = _load_distribution(pipeline.distribution, display)

    store = None
    if pipeline.store is not None:
        store = Path(pipeline.store).expanduser()
        store = store if store.is_absolute() else base_dir / store
    return LoadedPipeline(
        scan=_scan(pipeline.scan, recipe, display, base_dir),
        pipeline=pipeline,
        name=name,
        path=path.resolve(),
        display=display,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        recipe=recipe,
        distribution=distribution,
        schedule=schedule,
        store=store,
    )


def _scan(
    given: ScanSettings | None, recipe: LoadedRecipe, display: str, base_dir: Path
) -> ScanSettings | None:
    """The effective scan settings; a missing tracker file fails here, before any run."""
    own = recipe.recipe.scan
    if own is not None and own.data is not None:
        own = own.model_copy(update={"data": str(recipe.dir / own.data)})
    if given is None:
        return own
    update = {k: getattr(given, k) for k in given.model_fields_set}
    if given.data is not None:
        data = Path(given.data).expanduser()
        data = data if data.is_absolute() else base_dir / data
        if not data.is_file():
            raise ConfigError(display, "scan.data", f"file not found: {given.data}")
        update["data"] = str(data)
    return (own or ScanSettings()).model_copy(update=update)


def _check_given(given: Given, display: str, path: Path, recipe_path: Path) -> None:
    """A --var/--var-file key neither the pipeline nor its recipe declares is a typo
    (each file alone cannot tell: the other may declare it)."""
    declared: set[str] = set()
    for file in (path, recipe_path):
        data = load_yaml(file)
        section = data.get("variables") if isinstance(data, dict) else None
        declared |= set(section) if isinstance(section, dict) else set()
    reject_undeclared(given, declared, display, "neither this pipeline nor its recipe declares")


def _load_distribution(data: dict[str, Any], display: str) -> Any:
    try:
        from vmbuild.config.distribution import load_distribution
    except ModuleNotFoundError as exc:
        if exc.name and "distribution" not in exc.name:
            raise
        raise ConfigError(
            display, "distribution", "AWS distribution is not available in this vmbuild",
            hint="remove the distribution section, or install a vmbuild with vmbuild.publish",
        ) from None  # fmt: skip
    return load_distribution(data, display, "distribution")


def pipeline_files(directory: Path) -> list[Path]:
    """The pipeline files of a directory (*.yaml, *.yml; not recursive), sorted.

    Recipes, distribution files and components often sit beside their pipeline
    (examples/nginx); files whose content says they are one of those are not
    pipelines and are skipped. A file that cannot be read or parsed is kept, so
    the loader reports it as a broken pipeline.
    """
    from vmbuild.config.detect import detect_kind

    found = []
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.suffix not in PIPELINE_SUFFIXES:
            continue
        try:
            kind = detect_kind(load_yaml(path))
        except VmbuildError:
            kind = None
        if kind in (None, "pipeline"):
            found.append(path)
    return found


def load_pipelines(
    directory: Path, *, now: datetime | None = None, variables: Given | None = None
) -> list[LoadedPipeline]:
    """Every pipeline in `directory`; one error lists every broken file and duplicate name."""
    if not directory.is_dir():
        raise VmbuildError(f"{directory}: not a directory of pipelines")
    loaded, problems = [], []
    for path in pipeline_files(directory):
        try:
            loaded.append(load_pipeline(path, now=now, variables=variables))
        except VmbuildError as exc:
            problems.append(str(exc))
    seen: dict[str, LoadedPipeline] = {}
    for p in loaded:
        if p.name in seen:
            problems.append(
                f"{p.display}: name: {p.name!r} is also the name of {seen[p.name].display}"
            )
        seen[p.name] = p
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise VmbuildError(
            f"{count} in the pipelines of {directory}:\n  " + "\n  ".join(problems),
            hint="fix or move the broken pipelines; nothing runs until every pipeline is valid",
        )
    return loaded
