"""``python -m services.estimator [--port 50052] [--workers-file F] [--redis-url ...]``.

Flags override ``QLM_*`` environment variables (qlm.config.EstimatorSettings); ``--help``
lists them all.
"""

from __future__ import annotations

import sys

from qlm.config import EstimatorSettings
from services.entrypoint import run_service
from services.estimator.app import serve


def main(argv: list[str] | None = None) -> int:
    return run_service("estimator", EstimatorSettings, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
