"""Pipelines: a recipe built on demand, on a schedule or when its dependencies change,
with every run recorded in a local history and old builds pruned.

The pipeline file and its cron schedule are parsed in vmbuild.config (pipeline, cron);
Debian version ordering and the mirror's indexes are in vmbuild.debian. Here:
- `deps`: what "dependencies updated" means, and the check that answers it;
- `history`: the SQLite run history (and the scheduler's persisted state);
- `lifecycle`: which builds to delete; `runner`: one run, locked and recorded;
- `scheduler`: the daemon; `export`: systemd units and crontab lines; `clock`: time.
The verbs are in vmbuild.cli.pipeline.
"""
