"""Which kind of vmbuild file a parsed YAML document is, told by its content.

`vmbuild validate` checks files of any kind, and the scheduler skips the recipes and
distribution files that share a directory with pipelines; both ask this one function.
A document is classified by keys only its kind has (a pipeline names a `recipe:`, a
recipe a `base:`, a container recipe a `parentImage:`, a component has `phases:`, a
distribution file `regions:`).
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["recipe", "container-recipe", "pipeline", "distribution", "component"]
KINDS: tuple[Kind, ...] = ("recipe", "container-recipe", "pipeline", "distribution", "component")


def detect_kind(data: object) -> Kind | None:
    """The kind of a parsed document, or None when nothing identifies it."""
    if not isinstance(data, dict):
        return None
    keys = set(data)
    if keys & {"phases", "schemaVersion"}:
        return "component"
    if "recipe" in keys:
        return "pipeline"
    # Image Builder's own shapes too: get-container-recipe's wrapper, CloudFormation's case.
    if keys & {"parentImage", "containerRecipe", "ContainerType"}:
        return "container-recipe"
    if "base" in keys:
        return "recipe"
    if keys & {"regions", "import"} or keys == {"distribution"}:
        return "distribution"
    return None
