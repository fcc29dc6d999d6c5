"""``python -m services.ingest [--port 50051] [--redis-url ...] [--kafka-bootstrap ...]``.

Flags override ``QLM_*`` environment variables (services.ingest.settings.IngestSettings); ``--help``
lists them all. ``--processes N`` runs N ingest processes on one port (the kernel spreads
connections over them, SO_REUSEPORT): one event loop tops out near one core. SIGTERM to
the first process stops it gracefully, then the others. Process ``i`` serves its
Prometheus metrics on ``--metrics-port`` + i.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys

from services.common.entrypoint import parse_settings
from services.ingest.app import run_child, run_one
from services.ingest.settings import IngestSettings


def run_many(settings: IngestSettings) -> int:
    """``settings.processes`` processes on one port: this one and its children."""
    if settings.port == 0:
        print("error: processes: needs a fixed --port (0 picks a different one each)",
              file=sys.stderr)
        return 2
    context = mp.get_context("spawn")
    children = [
        context.Process(target=run_child, args=(_nth(settings, i),), name=f"ingest-{i}")
        for i in range(1, settings.processes)
    ]
    for child in children:
        child.start()
    status = run_one(settings)
    for child in children:
        if child.is_alive():
            child.terminate()  # SIGTERM: the child stops gracefully too
    for child in children:
        child.join(settings.shutdown_grace_s + 30)
        if child.exitcode not in (0, -signal.SIGTERM):
            status = status or 1
    return status


def _nth(settings: IngestSettings, index: int) -> IngestSettings:
    """The settings of process ``index``: its own metrics port (``metrics_port + index``)."""
    port = settings.metrics_port + index if settings.metrics_port else 0
    return settings.model_copy(update={"metrics_port": port})


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(IngestSettings, argv)
    if settings is None:
        return 2
    return run_many(settings) if settings.processes > 1 else run_one(settings)


if __name__ == "__main__":
    sys.exit(main())
