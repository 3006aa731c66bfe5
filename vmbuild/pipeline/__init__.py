"""Pipelines: a recipe built on demand, on a schedule or when its dependencies change,
with every run recorded in a local history and old builds pruned.

- `schedule`: cron expressions with a time zone (5 fields, or EC2 Image Builder's 6);
- `debversion`, `apt`: Debian version ordering and the mirror's Release/Packages indexes;
- `deps`: what "dependencies updated" means, and the check that answers it;
- `history`: the SQLite run history (and the scheduler's persisted state);
- `lifecycle`: which builds to delete; `runner`: one run, locked and recorded;
- `scheduler`: the daemon; `export`: systemd units and crontab lines; `cli`: the verbs.
"""
