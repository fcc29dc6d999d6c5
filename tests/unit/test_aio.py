"""The asyncio helpers: a cancellation that arrives as the awaited event is set is kept
(Python 3.11's ``wait_for`` loses it, and a service loop built on it never stops), and
a stop goes on without a task that does not end."""

from __future__ import annotations

import asyncio

import pytest

from qlm.aio import cancel_and_wait, wait_event, watch_loop_lag


async def _service_loop(wake: asyncio.Event, rounds: list[int]) -> None:
    """A service loop as the scheduler's: wait for a wake-up or a tick, then work."""
    while True:
        await wait_event(wake, timeout_s=5.0)
        wake.clear()
        rounds.append(1)


async def test_a_cancellation_arriving_as_the_event_is_set_ends_the_loop() -> None:
    wake, rounds = asyncio.Event(), []
    task = asyncio.create_task(_service_loop(wake, rounds))
    await asyncio.sleep(0)  # the loop waits
    wake.set()
    await asyncio.sleep(0)  # the inner wait completes; the loop has not resumed yet
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=1.0)
    assert task in done and task.cancelled()


async def test_wait_event_says_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    event.set()
    assert await wait_event(event, 0.01) is True


async def test_cancel_and_wait_names_a_task_that_ignores_its_cancellation() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue  # swallows every cancellation

    async def obedient() -> None:
        await asyncio.sleep(60)

    tasks = [asyncio.create_task(stubborn(), name="stubborn"),
             asyncio.create_task(obedient(), name="obedient")]
    await asyncio.sleep(0)
    assert await cancel_and_wait(tasks, grace_s=0.1) == ["stubborn"]
    assert tasks[1].cancelled()
    release.set()
    await tasks[0]


async def test_cancel_and_wait_retrieves_a_task_error() -> None:
    async def failing() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    assert await cancel_and_wait([task], grace_s=0.1) == []
    assert isinstance(task.exception(), RuntimeError)


async def test_watch_loop_lag_reports_how_late_each_timer_ran() -> None:
    """Lateness = elapsed − interval, never negative; measured with the clock given."""
    ticks = iter([0.0, 0.35, 1.0, 1.05])  # the second timer fires early: lag 0
    seen: list[float] = []

    def observe(lag: float) -> None:
        seen.append(lag)
        if len(seen) == 2:
            raise asyncio.CancelledError  # stop after two readings

    task = asyncio.create_task(watch_loop_lag(observe, "test", interval_s=0.1,
                                              clock=lambda: next(ticks)))
    done, _ = await asyncio.wait([task], timeout=5.0)
    assert task in done
    assert seen[0] == pytest.approx(0.25) and seen[1] == 0.0
