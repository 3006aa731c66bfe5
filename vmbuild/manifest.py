"""manifest.json: what a stored build is, typed once for every reader and writer.

The build writes it (stages/store.py), `images` lists and shows it, the pipeline
reads its packages and creation time, distribution reads its outputs and adds
its own `distribution` record. Readers tolerate manifests missing optional keys
(older builds, hand-made fixtures); keys this version does not know are kept in
`extra` and written back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from vmbuild.errors import VmbuildError

SCHEMA = 1
FILE = "manifest.json"


@dataclass(frozen=True)
class RecipeRecord:
    path: str
    sha256: str


@dataclass(frozen=True)
class BaseRecord:
    id: str
    sha256: str
    source: str
    format: str


@dataclass(frozen=True)
class OutputRecord:
    format: str
    file: str
    sha256: str | None = None
    size: int = 0
    virtual_size: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": self.format, "file": self.file}
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        out["size"] = self.size
        if self.virtual_size is not None:
            out["virtual_size"] = self.virtual_size
        return out


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str
    # The source package (Debian): what the security tracker and the SBOMs key on.
    source: str = ""
    source_version: str = ""

    def to_json(self) -> dict[str, str]:
        out = {"name": self.name, "version": self.version, "arch": self.arch}
        if self.source:
            out.update(source=self.source, source_version=self.source_version)
        return out


# The order keys are written in (manifest.json stays readable top-down).
_KEYS = (
    "schema", "name", "version", "description", "build", "created", "recipe", "base",
    "components", "outputs", "packages", "tests", "timings", "accelerator", "backend",
    "boot_mode", "architecture", "vmbuild_version", "distribution",
)  # fmt: skip

# What a build writes; `distribution` is added by `vmbuild distribute`.
_BUILD_KEYS = frozenset(_KEYS) - {"distribution"}


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    build: str = ""
    schema: int = SCHEMA
    description: str = ""
    created: str | None = None  # ISO 8601, UTC, "Z"
    recipe: RecipeRecord | None = None
    base: BaseRecord | None = None
    components: tuple[dict[str, Any], ...] = ()  # stages.components.Applied.to_json()
    outputs: tuple[OutputRecord, ...] = ()
    packages: tuple[Package, ...] = ()
    tests: dict[str, Any] | None = None  # stages.image_tests.TestSummary.to_json()
    timings: dict[str, float] = field(default_factory=dict)
    accelerator: dict[str, Any] | None = None
    backend: str | None = None
    # The recipe's EC2 boot mode: what the image was tested under and what
    # `distribute` registers the AMI with unless its config says otherwise.
    boot_mode: str | None = None
    # The recipe's arch, in EC2's names (x86_64, arm64): what the image runs on and
    # what `distribute` registers the AMI as unless its config says otherwise.
    architecture: str | None = None
    vmbuild_version: str | None = None
    distribution: dict[str, Any] | None = None  # written by `vmbuild distribute`
    extra: dict[str, Any] = field(default_factory=dict)
    # The keys the file had (a key absent when read stays absent when written).
    present: frozenset[str] = field(default_factory=lambda: _BUILD_KEYS)

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}/{self.build}"

    @property
    def tests_status(self) -> str:
        status = (self.tests or {}).get("status")
        return str(status) if status is not None else "unknown"

    @property
    def secure_boot_tested(self) -> bool:
        """The image passed its tests under UEFI with Secure Boot enforced."""
        tests = self.tests or {}
        return tests.get("status") == "passed" and any(
            isinstance(b, dict) and b.get("firmware") == "uefi-secure"
            for b in tests.get("boots") or ()
        )

    @property
    def created_at(self) -> datetime | None:
        if not self.created:
            return None
        try:
            when = datetime.fromisoformat(self.created.replace("Z", "+00:00"))
        except ValueError:
            return None
        return when if when.tzinfo else when.replace(tzinfo=UTC)

    def to_json(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "schema": self.schema,
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "build": self.build,
            "created": self.created,
            "recipe": None
            if self.recipe is None
            else {"path": self.recipe.path, "sha256": self.recipe.sha256},
            "base": None
            if self.base is None
            else {
                "id": self.base.id,
                "sha256": self.base.sha256,
                "source": self.base.source,
                "format": self.base.format,
            },
            "components": list(self.components),
            "outputs": [o.to_json() for o in self.outputs],
            "packages": [p.to_json() for p in self.packages],
            "tests": self.tests,
            "timings": dict(self.timings),
            "accelerator": self.accelerator,
            "backend": self.backend,
            "boot_mode": self.boot_mode,
            "architecture": self.architecture,
            "vmbuild_version": self.vmbuild_version,
            "distribution": self.distribution,
        }
        present = self.present | ({"distribution"} if self.distribution is not None else set())
        out = {k: values[k] for k in _KEYS if k in present}
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: object, where: str = FILE) -> Manifest:
        if not isinstance(data, dict):
            raise VmbuildError(f"{where}: not a JSON object")
        try:
            recipe = data.get("recipe")
            base = data.get("base")
            return cls(
                name=str(data["name"]),
                version=str(data["version"]),
                build=str(data.get("build", "")),
                schema=int(data.get("schema", SCHEMA)),
                description=str(data.get("description") or ""),
                created=data.get("created"),
                recipe=RecipeRecord(str(recipe.get("path", "")), str(recipe.get("sha256", "")))
                if isinstance(recipe, dict)
                else None,
                base=BaseRecord(
                    str(base["id"]),
                    str(base.get("sha256", "")),
                    str(base.get("source", "")),
                    str(base.get("format", "")),
                )
                if isinstance(base, dict)
                else None,
                components=tuple(data.get("components") or ()),
                outputs=tuple(
                    OutputRecord(
                        format=str(o["format"]),
                        file=str(o.get("file", "")),
                        sha256=o.get("sha256"),
                        size=int(o.get("size", 0)),
                        virtual_size=None
                        if o.get("virtual_size") is None
                        else int(o["virtual_size"]),
                    )
                    for o in data.get("outputs") or ()
                ),
                packages=tuple(
                    Package(
                        str(p["name"]),
                        str(p["version"]),
                        str(p.get("arch", "")),
                        str(p.get("source") or ""),
                        str(p.get("source_version") or ""),
                    )
                    for p in data.get("packages") or ()
                ),
                tests=data.get("tests"),
                timings={str(k): float(v) for k, v in (data.get("timings") or {}).items()},
                accelerator=data.get("accelerator"),
                backend=data.get("backend"),
                boot_mode=data.get("boot_mode"),
                architecture=data.get("architecture"),
                vmbuild_version=data.get("vmbuild_version"),
                distribution=data.get("distribution"),
                extra={k: v for k, v in data.items() if k not in _KEYS},
                present=frozenset(k for k in _KEYS if k in data),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise VmbuildError(f"{where}: incomplete manifest ({exc!r})") from None
