"""Helpers shared by the tests that run the whole stack as processes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qlm.localstack.services import ServiceOptions, ServiceStack


@contextmanager
def running_stack(directory: Path, redis_url: str, kafka_bootstrap: str, workers_yaml: str,
                  profiles_source: Path | None = None, **options: Any
                  ) -> Iterator[ServiceStack]:
    """The four services and the workers of ``workers_yaml`` (a workers file's text) up
    under ``directory`` for the ``with`` block (``options``: :class:`ServiceOptions`);
    stopped after it, every process gone."""
    workers = directory / "workers.yaml"
    workers.write_text(workers_yaml)
    stack = ServiceStack(directory / "stack", redis_url, kafka_bootstrap,
                         ServiceOptions(workers_file=workers, **options),
                         **({} if profiles_source is None else
                            {"profiles_source": profiles_source}))
    try:
        stack.up()
        yield stack
    finally:
        stack.down()
    assert all(p.running_pid() is None for p in stack.processes.values())
