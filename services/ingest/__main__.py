"""``python -m services.ingest [--port 50051] [--redis-url ...] [--kafka-bootstrap ...]``.

Flags override ``QLM_*`` environment variables (qlm.config.IngestSettings); ``--help``
lists them all.
"""

from __future__ import annotations

import asyncio
import sys

from qlm.config import IngestSettings, load_settings
from qlm.core.errors import InvalidInput, Unavailable
from qlm.log import configure
from services.ingest.app import serve


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(IngestSettings, sys.argv[1:] if argv is None else argv)
    except InvalidInput as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_json, service="ingest")
    try:
        asyncio.run(serve(settings))
    except Unavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
