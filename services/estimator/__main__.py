"""``python -m services.estimator [--port 50052] [--workers-file F] [--redis-url ...]``.

Flags override ``QLM_*`` environment variables
(:class:`services.estimator.settings.EstimatorSettings`); ``--help`` lists them all.
"""

from __future__ import annotations

import sys

from services.common.entrypoint import run_service
from services.estimator.app import serve
from services.estimator.settings import EstimatorSettings


def main(argv: list[str] | None = None) -> int:
    return run_service("estimator", EstimatorSettings, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
