"""`vmbuild import`: EC2 Image Builder definitions (CloudFormation, Terraform,
`aws imagebuilder create-* --cli-input-json`) into vmbuild's files."""

from __future__ import annotations

from pathlib import Path

import yaml

from vmbuild.imports.convert import Converted, Converter, Report
from vmbuild.imports.sources import Resource, read_source

__all__ = ["Converted", "Report", "Resource", "import_sources", "write_output"]


def import_sources(
    sources: list[Path], *, base: str | None = None, region: str | None = None
) -> Converted:
    """Read every source, then convert them together (references cross files)."""
    resources: list[Resource] = []
    for source in sources:
        resources += read_source(source)
    source_dir = sources[0].resolve().parent if sources else Path.cwd()
    return Converter(resources, source_dir, base=base, region=region).run()


def write_output(converted: Converted, output: Path) -> list[Path]:
    """Write recipe.yaml, pipeline.yaml, distribution.yaml, components/ and
    import-report.txt into `output`; returns the files written."""
    output.mkdir(parents=True, exist_ok=True)
    written = []

    def dump(name: str, data: object) -> None:
        path = output / name
        path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        written.append(path)

    if converted.components:
        (output / "components").mkdir(exist_ok=True)
        for name, text in converted.components.items():
            path = output / "components" / name
            path.write_text(text if text.endswith("\n") else text + "\n")
            written.append(path)
    if converted.recipe is not None:
        dump("recipe.yaml", converted.recipe)
    if converted.distribution is not None:
        dump("distribution.yaml", converted.distribution)
    if converted.pipeline is not None:
        dump("pipeline.yaml", converted.pipeline)
    report = output / "import-report.txt"
    report.write_text(converted.report.text())
    written.append(report)
    return written
