"""The Celery application: one task (`vmbuild.run`, a run id) on a Redis broker.

Long builds and Redis (why each setting):
- `task_acks_late`: a message is acknowledged when the run ENDS, so a worker that dies
  mid-build leaves it unacknowledged and Redis hands it to another worker;
- `task_reject_on_worker_lost`: the same when a pool thread/process is lost;
- `worker_prefetch_multiplier = 1`: a worker holds no more runs than it can start, so
  a queued run is never stuck behind a long build on a busy host;
- `visibility_timeout`: Redis redelivers an unacknowledged message after this long,
  even when its worker is alive. It must exceed the longest run (default 1 h would
  run a 2 h build twice); the run's lease (tasks.py) is the second guard: a delivery
  that finds the run alive on another worker waits instead of building it again.
"""

from __future__ import annotations

import os
from typing import Any

from vmbuild.errors import VmbuildError

TASK_NAME = "vmbuild.run"
DEFAULT_QUEUE = "tcg"  # x86 builds that any worker can run (KVM hosts serve it too)
CAPABILITY_QUEUES = ("kvm", "tcg", "arm64", "aws")
DEFAULT_VISIBILITY_TIMEOUT = 6 * 3600.0  # above the longest pipeline timeout we ship (4 h)


def broker_url(explicit: str | None) -> str:
    url = explicit or os.environ.get("VMBUILD_BROKER")
    if not url:
        raise VmbuildError(
            "no broker given", hint="pass --broker redis://HOST:6379/0 or set VMBUILD_BROKER"
        )
    if not url.startswith(("redis://", "rediss://")):
        raise VmbuildError(f"unsupported broker {url!r}", hint="use redis://HOST:PORT/DB")
    return url


def visibility_timeout() -> float:
    raw = os.environ.get("VMBUILD_VISIBILITY_TIMEOUT")
    try:
        return float(raw) if raw else DEFAULT_VISIBILITY_TIMEOUT
    except ValueError:
        raise VmbuildError(f"VMBUILD_VISIBILITY_TIMEOUT={raw!r}: expected seconds") from None


def make_app(broker: str, *, visibility: float | None = None) -> Any:
    """A Celery app for `broker` with vmbuild's one task registered."""
    try:
        from celery import Celery
    except ModuleNotFoundError:
        raise VmbuildError(
            "scale-out needs Celery and Redis", hint="pip install 'vmbuild[scale]'"
        ) from None
    app = Celery("vmbuild", broker=broker, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=DEFAULT_QUEUE,
        task_ignore_result=True,  # outcomes live in the run history
        task_serializer="json",
        accept_content=["json"],
        worker_send_task_events=True,  # Flower and `celery events` see every run
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": visibility or visibility_timeout()},
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    from vmbuild.scaleout import tasks

    tasks.register(app)
    return app
