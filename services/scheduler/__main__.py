"""``python -m services.scheduler [--policy qlm|fcfs|edf|shepherd|priority] [--workers-file F]``.

Flags override ``QLM_*`` environment variables
(:class:`services.scheduler.settings.SchedulerSettings`); ``--help`` lists them all.
Run two replicas for a standby: one holds the leader lease.
"""

from __future__ import annotations

import sys

from services.common.entrypoint import run_service
from services.scheduler.app import serve
from services.scheduler.settings import SchedulerSettings


def main(argv: list[str] | None = None) -> int:
    return run_service("scheduler", SchedulerSettings, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
