"""``python -m services.scheduler [--policy qlm|fcfs|edf|shepherd|priority] [--workers-file F]``.

Flags override ``QLM_*`` environment variables (qlm.config.SchedulerSettings); ``--help``
lists them all. Run two replicas for a standby: one holds the leader lease.
"""

from __future__ import annotations

import asyncio
import sys

from qlm.config import SchedulerSettings, load_settings
from qlm.core.errors import InvalidInput, Unavailable
from qlm.log import configure
from services.scheduler.app import serve


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(SchedulerSettings, sys.argv[1:] if argv is None else argv)
    except InvalidInput as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_json, service="scheduler")
    try:
        asyncio.run(serve(settings))
    except (Unavailable, InvalidInput) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
