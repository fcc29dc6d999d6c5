"""``python -m services.worker --engine sim|vllm --worker-id ID --gpu GPU --models m1,m2
[--time-scale X]`` or ``--workers-file docker/workers.cpu.yaml`` (several simulated
workers in one process). Every flag also reads ``QLM_<NAME>``; see
:class:`services.worker.settings.WorkerSettings`."""

from __future__ import annotations

import sys

from services.common.entrypoint import run_service
from services.worker.app import serve
from services.worker.settings import WorkerSettings


def main(argv: list[str] | None = None) -> int:
    return run_service("worker", WorkerSettings, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
