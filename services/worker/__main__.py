"""``python -m services.worker --engine sim|vllm --worker-id ID --gpu GPU --models m1,m2
[--time-scale X]`` or ``--workers-file docker/workers.cpu.yaml`` (several simulated
workers in one process). Every flag also reads ``QLM_<NAME>``; see
:class:`qlm.config.WorkerSettings`."""

from __future__ import annotations

import asyncio
import sys

from qlm.config import WorkerSettings, load_settings
from qlm.core.errors import QlmError
from qlm.log import configure
from services.worker.app import serve


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(WorkerSettings, sys.argv[1:] if argv is None else argv)
    except QlmError as error:
        print(f"qlm worker: {error}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_json, service="worker")
    try:
        asyncio.run(serve(settings))
    except QlmError as error:
        print(f"qlm worker: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
