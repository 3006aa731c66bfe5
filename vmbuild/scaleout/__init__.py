"""Builds spread over many hosts: Celery workers on a Redis broker (app, tasks, worker),
the S3-compatible artifact store shared by them (artifacts), progress events and
cancellation through Redis (events). Single-host vmbuild imports none of this."""
