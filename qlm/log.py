"""Structured logging: one JSON object per line, with the request id bound where known.

Call :func:`configure` once at service start. Inside a request, bind its id with
``with request_context(request_id=...)`` (structlog contextvars) so that every line
logged while handling it carries ``request_id``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog


def configure(level: str = "info", json: bool = True, service: str = "qlm") -> None:
    """Configure structlog (and stdlib logging) to write to stderr."""
    numeric = logging.getLevelName(level.upper())
    logging.basicConfig(stream=sys.stderr, level=numeric, format="%(message)s")
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


def get_logger(name: str) -> Any:
    """A bound logger whose lines carry ``logger_name=name``."""
    return structlog.get_logger(logger_name=name)


@contextmanager
def request_context(**values: Any) -> Iterator[None]:
    """Bind ``values`` (e.g. request_id) to every log line inside the block."""
    with structlog.contextvars.bound_contextvars(**values):
        yield
