"""Asyncio helpers the services share.

:func:`wait_event` exists because of a Python 3.11 bug (gh-86296, fixed in 3.12):
``asyncio.wait_for(event.wait(), timeout)`` *swallows* a cancellation that arrives in
the loop iteration in which the event is set, and returns normally. A service loop built
on it (wait for a wake-up or a tick, then work) then never ends: ``task.cancel()`` on
stop is lost and whoever awaits the task waits forever. ``asyncio.timeout`` keeps the
cancellation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

from qlm.log import get_logger

log = get_logger("qlm.aio")


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passes; True when it was set. A
    cancellation of the caller always propagates."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


#: How long a stop waits for its tasks to end after cancelling them.
STOP_GRACE_S = 5.0


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]],
                          grace_s: float = STOP_GRACE_S) -> list[str]:
    """Cancel ``tasks`` and wait up to ``grace_s`` for them to end; the names of those
    still running then (logged, left cancelled): a stop goes on without them rather than
    hang on one that does not end. A task that ended with an error is logged."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    if not pending:
        return []
    _, still = await asyncio.wait(pending, timeout=grace_s)
    for task in pending:  # retrieve every outcome, so none is reported as never retrieved
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.warning("task_failed", task=task.get_name(), error=repr(task.exception()))
    names = sorted(task.get_name() for task in still)
    if names:
        log.warning("tasks_not_stopped", tasks=names, grace_s=grace_s)
    return names


#: How often :func:`watch_loop_lag` wakes, and the lag above which it logs.
LAG_INTERVAL_S = 0.1
LAG_WARN_S = 0.25
#: Buckets of the services' event-loop lag histograms (seconds).
LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


async def watch_loop_lag(observe: Callable[[float], None], service: str,
                         interval_s: float = LAG_INTERVAL_S, warn_s: float = LAG_WARN_S,
                         clock: Callable[[], float] = time.monotonic) -> None:
    """Measure how late the event loop runs a timer, forever: each ``interval_s`` sleep
    that wakes late reports its lateness to ``observe`` (0 when on time) and logs one
    over ``warn_s``. A busy loop (CPU starved, or one callback running long) delays
    every task on it — a worker's pulls, a scheduler's decisions — by that much."""
    while True:
        started = clock()
        await asyncio.sleep(interval_s)
        lag = max(0.0, clock() - started - interval_s)
        observe(lag)
        if lag > warn_s:
            log.warning("event_loop_lag", service=service, lag_s=round(lag, 3))
