"""The one way a service process starts: settings → logging → ``serve`` → exit status.

Exit status 2 for bad settings (the message names the setting), 1 when a dependency
(Redis, Kafka, a profile) is missing or wrong at start, 0 after a graceful stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from pydantic_settings import BaseSettings

from qlm.core.errors import QlmError
from qlm.log import configure, get_logger
from services.common.settings import CommonSettings, load_settings

log = get_logger("services")

S = TypeVar("S", bound=CommonSettings)


def run_service(name: str, settings_cls: type[S],
                serve: Callable[[S], Coroutine[Any, Any, object]],
                argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(settings_cls, argv)
    if settings is None:
        return 2
    configure(settings.log_level, settings.log_json, service=name)
    try:
        asyncio.run(serve(settings))
    except QlmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


B = TypeVar("B", bound=BaseSettings)


def parse_settings(settings_cls: type[B], argv: Sequence[str] | None = None) -> B | None:
    """The settings from ``argv`` (default: the process's), or None after printing why not."""
    try:
        return load_settings(settings_cls, sys.argv[1:] if argv is None else argv)
    except QlmError as error:
        print(f"error: {error}", file=sys.stderr)
        return None


class Lifecycle(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def stop_on_signals(signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> asyncio.Event:
    """An event the running loop sets when one of ``signals`` arrives."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    return stop


async def run_until_signal(app: Lifecycle) -> None:
    """Start ``app``, wait for SIGTERM or SIGINT, then stop it gracefully."""
    await app.start()
    await stop_on_signals().wait()
    log.info("signal_received")
    with contextlib.suppress(asyncio.CancelledError):
        await app.stop()
