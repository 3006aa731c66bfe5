"""Publishing stored artifacts: AWS distribution (ebs-direct | import-snapshot | import-image).

Public entry points: `distribute(build_dir, config, dry_run=, on_progress=)` and
`load_distribution(data, file, field_prefix)` (validation before any VM starts).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vmbuild.config.distribution import DistributionConfig, load_distribution

if TYPE_CHECKING:
    from vmbuild.publish.distributor import DistributionResult, distribute

__all__ = ["DistributionConfig", "DistributionResult", "distribute", "load_distribution"]


def __getattr__(name: str) -> Any:
    # boto3 is slow to import: load the AWS machinery only when it is used.
    if name in ("distribute", "DistributionResult"):
        from vmbuild.publish import distributor as module

        return getattr(module, name)
    raise AttributeError(name)
