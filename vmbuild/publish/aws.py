"""boto3 clients for distribution, built one way: standard configuration, bounded retries.

Endpoints and credentials come from boto3's own chain (profiles, `AWS_ENDPOINT_URL`,
`AWS_ENDPOINT_URL_EC2` and the other per-service variables), so the same command works
against AWS and against a local endpoint. Sessions are not thread-safe: every client is
created up front in the calling thread, then shared (clients are thread-safe).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import boto3
import botocore.config
import botocore.exceptions

from vmbuild import __version__
from vmbuild.errors import VmbuildError

log = logging.getLogger("vmbuild.publish")

T = TypeVar("T")

THROTTLING = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "SlowDown",
        "RequestThrottled",
        "ProvisionedThroughputExceededException",
        "BandwidthLimitExceeded",
    }
)
TRANSIENT = frozenset(
    {
        "InternalError",
        "InternalFailure",
        "InternalServerError",
        "InternalServerException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
        "Unavailable",
    }
)


@dataclass
class RetryStats:
    """How often AWS pushed back: reported in the result so slow runs can be explained."""

    throttled: int = 0
    transient: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, kind: str) -> None:
        with self._lock:
            if kind == "throttled":
                self.throttled += 1
            else:
                self.transient += 1


@dataclass
class Backoff:
    """Exponential backoff with full jitter (the AWS-recommended shape)."""

    attempts: int = 10
    base: float = 0.25
    cap: float = 20.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap, self.base * 2**attempt))


def error_code(exc: BaseException) -> str:
    """The AWS error code of a botocore ClientError ("" for anything else)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def retry_kind(exc: BaseException) -> str | None:
    """'throttled', 'transient' or None (do not retry)."""
    code = error_code(exc)
    if code in THROTTLING:
        return "throttled"
    if code in TRANSIENT:
        return "transient"
    if isinstance(exc, botocore.exceptions.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status == 429:
            return "throttled"
        return "transient" if status >= 500 else None
    if isinstance(
        exc,
        botocore.exceptions.EndpointConnectionError
        | botocore.exceptions.ConnectionClosedError
        | botocore.exceptions.ReadTimeoutError
        | botocore.exceptions.ConnectTimeoutError,
    ):
        return "transient"
    return None


def with_retries(
    call: Callable[[], T],
    *,
    what: str,
    backoff: Backoff,
    stats: RetryStats | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run `call`, retrying throttling and server errors with backoff.

    Used where botocore's own retry budget is too small for the job (thousands of
    PutSnapshotBlock calls: one unlucky block must not fail a multi-GiB upload).
    """
    for attempt in range(backoff.attempts):
        try:
            return call()
        except Exception as exc:
            kind = retry_kind(exc)
            if kind is None or attempt == backoff.attempts - 1:
                raise
            if stats is not None:
                stats.count(kind)
            delay = backoff.delay(attempt)
            log.debug(
                "%s: %s (%s), retry %d in %.2fs",
                what,
                kind,
                error_code(exc) or exc,
                attempt + 1,
                delay,
            )
            sleep(delay)
    raise AssertionError("unreachable")


class Clients:
    """One boto3 session and its clients, per service and region, created on first use.

    Call `prepare()` from the main thread for every (service, region) a worker thread will
    need: botocore sessions must not be used concurrently, clients may.
    """

    def __init__(self, profile: str | None, *, max_pool: int = 32, max_attempts: int = 8) -> None:
        try:
            self.session = boto3.session.Session(profile_name=profile)
        except botocore.exceptions.ProfileNotFound as exc:
            raise VmbuildError(str(exc), hint="check `profile:` or AWS_PROFILE") from None
        self._clients: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self.config = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            max_pool_connections=max_pool,
            user_agent_extra=f"vmbuild/{__version__}",
            connect_timeout=20,
            read_timeout=120,
        )
        # EBS direct calls are retried by `with_retries` (bigger budget, counted);
        # botocore retrying underneath would multiply the attempts.
        self.ebs_config = self.config.merge(
            botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 1})
        )

    def get(self, service: str, region: str) -> Any:
        """The client for `service` in `region` (created once)."""
        key = (service, region)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                config = self.ebs_config if service == "ebs" else self.config
                client = self.session.client(service, region_name=region, config=config)
                self._clients[key] = client
            return client

    def probe(self, service: str, region: str) -> Any:
        """A client for the first call of a run: few attempts and a short connect timeout, so
        an unreachable endpoint is reported in seconds instead of after a minute of retries."""
        config = self.config.merge(
            botocore.config.Config(
                retries={"mode": "standard", "total_max_attempts": 2}, connect_timeout=5
            )
        )
        return self.session.client(service, region_name=region, config=config)

    def prepare(self, service: str, *regions: str) -> None:
        """Create clients now, in this thread, for later use from worker threads."""
        for region in regions:
            self.get(service, region)


def describe_error(exc: BaseException) -> str:
    """One line for a user: the AWS error code and message, or the exception text."""
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        op = getattr(exc, "operation_name", "")
        return f"{op}: {err.get('Code', '?')}: {err.get('Message', '')}".strip()
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return "no AWS credentials found"
    if isinstance(
        exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError
    ):
        return f"cannot reach AWS endpoint URL {exc.kwargs.get('endpoint_url', '?')}"
    return str(exc) or type(exc).__name__


def endpoint_hint() -> str:
    """The hint of an unreachable endpoint: where boto3 took the URL from."""
    return (
        "check the network, the region, and AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_<SERVICE> "
        "or `endpoint_url` in the AWS config (a local endpoint must be running)"
    )


def credentials_hint() -> str:
    """Where boto3 looks for credentials and endpoints (the hint of a credentials error)."""
    return (
        "configure credentials the standard boto3 way (AWS_PROFILE, ~/.aws/credentials, "
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY); AWS_ENDPOINT_URL points at a local endpoint"
    )
