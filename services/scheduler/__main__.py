"""``python -m services.scheduler [--policy qlm|fcfs|edf|shepherd|priority] [--workers-file F]``.

Flags override ``QLM_*`` environment variables (qlm.config.SchedulerSettings); ``--help``
lists them all. Run two replicas for a standby: one holds the leader lease.
"""

from __future__ import annotations

import sys

from qlm.config import SchedulerSettings
from services.entrypoint import run_service
from services.scheduler.app import serve


def main(argv: list[str] | None = None) -> int:
    return run_service("scheduler", SchedulerSettings, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
