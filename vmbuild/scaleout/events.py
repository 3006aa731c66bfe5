"""Progress events and cancel requests of runs, through the broker's Redis.

Events go to a Redis stream per run (`vmbuild:run:<id>:events`, XADD): any host can
follow a run from its first event (`submit --wait`, `runs logs --follow`) without the
worker knowing who listens. A cancel request is one list entry (`vmbuild:run:<id>:cancel`)
the worker's supervisor blocks on, so it reacts at once. Keys expire after a week.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from vmbuild.errors import VmbuildError

KEY_TTL = 7 * 24 * 3600
STREAM_MAXLEN = 20_000  # a build's output lines; older ones are trimmed
WORKERS_KEY = "vmbuild:workers"


def events_key(run_id: int) -> str:
    return f"vmbuild:run:{run_id}:events"


def cancel_key(run_id: int) -> str:
    return f"vmbuild:run:{run_id}:cancel"


def connect(broker: str) -> Any:
    try:
        import redis
    except ModuleNotFoundError:
        raise VmbuildError("scale-out needs redis: pip install 'vmbuild[scale]'") from None
    # No read timeout: XREAD and BLPOP block on the server for their own timeouts
    # (redis-py's default of 5 s would cut them); keepalives notice a dead peer.
    return redis.Redis.from_url(
        broker, decode_responses=True, socket_connect_timeout=10, socket_timeout=None,
        socket_keepalive=True, health_check_interval=30,
    )  # fmt: skip


class RunEvents:
    """Publishes one run's events (kind: stage, status, output, end)."""

    def __init__(self, client: Any, run_id: int) -> None:
        self.client = client
        self.key = events_key(run_id)

    def publish(self, kind: str, **fields: Any) -> None:
        payload = {"kind": kind, "time": time.time(), **fields}
        pipe = self.client.pipeline()
        pipe.xadd(self.key, {"event": json.dumps(payload)}, maxlen=STREAM_MAXLEN, approximate=True)
        pipe.expire(self.key, KEY_TTL)
        pipe.execute()


def follow(client: Any, run_id: int, *, block_ms: int = 5000) -> Iterator[dict[str, Any] | None]:
    """Every event of a run from the first; yields None each `block_ms` without one
    (so the caller can look at the history), ends after the `end` event."""
    last = "0-0"
    key = events_key(run_id)
    while True:
        found = client.xread({key: last}, block=block_ms, count=500)
        if not found:
            yield None
            continue
        for entry_id, data in found[0][1]:
            last = entry_id
            event: dict[str, Any] = json.loads(data["event"])
            yield event
            if event["kind"] == "end":
                return


def history(client: Any, run_id: int) -> list[dict[str, Any]]:
    """The events a run has published so far (oldest first)."""
    return [json.loads(data["event"]) for _id, data in client.xrange(events_key(run_id))]


def render(event: dict[str, Any]) -> str:
    """One event as a log line (time, kind, what it says)."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(event["time"]))
    kind = event["kind"]
    if kind == "stage":
        secs = event.get("seconds")
        took = f" ({secs:.1f}s)" if isinstance(secs, int | float) else ""
        what = f"stage {event['stage']} {event['state']}: {event['title']}{took}"
    elif kind in ("status", "output"):
        what = str(event["text"])
    elif kind == "start":
        what = f"started on {event['worker']} (attempt {event['attempt']})"
    elif kind == "end":
        what = f"{event['status']}" + (f": {event['error']}" if event.get("error") else "")
    else:
        what = json.dumps(event)
    return f"{when} {kind:6} {what}\n"


def request_cancel(client: Any, run_id: int) -> None:
    pipe = client.pipeline()
    pipe.rpush(cancel_key(run_id), "cancel")
    pipe.expire(cancel_key(run_id), KEY_TTL)
    pipe.execute()


def wait_cancel(
    client: Any, run_id: int, timeout: float, wake_key: str | None = None
) -> str | None:
    """Block up to `timeout` seconds for a cancel request ("cancel", kept for other
    waiters) or an entry on `wake_key` ("wake": the supervisor's own child ended)."""
    keys = [cancel_key(run_id), *([wake_key] if wake_key else [])]
    got = client.blpop(keys, timeout=timeout)
    if not got:
        return None
    if got[0] == cancel_key(run_id):
        client.rpush(cancel_key(run_id), "cancel")  # still cancelled for a redelivery
        return "cancel"
    return "wake"


def cancel_requested(client: Any, run_id: int) -> bool:
    return bool(client.llen(cancel_key(run_id)))


def advertise(client: Any, name: str, info: dict[str, Any]) -> None:
    client.hset(WORKERS_KEY, name, json.dumps(info))


def workers(client: Any) -> dict[str, dict[str, Any]]:
    return {k: json.loads(v) for k, v in client.hgetall(WORKERS_KEY).items()}
