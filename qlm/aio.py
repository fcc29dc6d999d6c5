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
from collections.abc import Iterable
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
