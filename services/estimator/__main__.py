"""``python -m services.estimator [--port 50052] [--workers-file F] [--redis-url ...]``.

Flags override ``QLM_*`` environment variables (qlm.config.EstimatorSettings); ``--help``
lists them all.
"""

from __future__ import annotations

import asyncio
import sys

from qlm.config import EstimatorSettings, load_settings
from qlm.core.errors import InvalidInput, Unavailable
from qlm.log import configure
from services.estimator.app import serve


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(EstimatorSettings, sys.argv[1:] if argv is None else argv)
    except InvalidInput as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_json, service="estimator")
    try:
        asyncio.run(serve(settings))
    except (Unavailable, InvalidInput) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
