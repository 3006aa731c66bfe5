"""AWSTOE-compatible component engine: load, validate and run component documents.

The build pipeline uses `find_component`, `load_document` and `run_document`;
`vmbuild component ...` (toe.cli) is the command-line face of the same API.
"""

from vmbuild.toe.actions import ACTIONS, S3Config
from vmbuild.toe.document import declared_parameters, load_document, validate_file
from vmbuild.toe.library import ComponentInfo, ComponentNotFound, find_component, list_components
from vmbuild.toe.model import Document, ParameterSpec
from vmbuild.toe.results import DocumentResult, PhaseResult, Status, StepResult
from vmbuild.toe.runner import MAX_REBOOTS, run_document

__all__ = [
    "ACTIONS",
    "MAX_REBOOTS",
    "ComponentInfo",
    "ComponentNotFound",
    "Document",
    "DocumentResult",
    "ParameterSpec",
    "PhaseResult",
    "S3Config",
    "Status",
    "StepResult",
    "declared_parameters",
    "find_component",
    "list_components",
    "load_document",
    "run_document",
    "validate_file",
]
