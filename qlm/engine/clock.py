"""Clocks for engines: the event loop's (real time) and a virtual one for tests.

An engine reads ``now()`` and waits with ``sleep_until(at)``; nothing else. The
:class:`VirtualClock` jumps to the next timer as soon as every task has had a chance
to run (like trio's autojump clock), so a test of a simulated engine runs in no real
time and its timestamps are exact sums of profile times.
"""

from __future__ import annotations

import asyncio
import heapq
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep_until(self, at: float) -> None: ...


class LoopClock:
    """The running event loop's monotonic clock (``loop.time()``)."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep_until(self, at: float) -> None:
        await asyncio.sleep(max(0.0, at - self.now()))


class VirtualClock:
    """Virtual time that advances only when every task waits on it.

    ``idle_rounds`` is how many event-loop iterations must pass with no new timer
    before the clock jumps to the earliest timer; enough for in-memory hand-offs
    (queues, events) to settle. Use only where nothing waits on real I/O.
    """

    def __init__(self, start_at: float = 0.0, idle_rounds: int = 20) -> None:
        self._now = start_at
        self._idle_rounds = idle_rounds
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = 0
        self._jumper: asyncio.Task[None] | None = None

    def now(self) -> float:
        return self._now

    async def sleep_until(self, at: float) -> None:
        if at <= self._now:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (at, self._seq, future))
        self._seq += 1
        if self._jumper is None or self._jumper.done():
            self._jumper = asyncio.create_task(self._jump(), name="virtual-clock")
        await future

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self._now + seconds)

    async def _jump(self) -> None:
        while self._timers:
            seen = self._seq
            for _ in range(self._idle_rounds):
                await asyncio.sleep(0)
            if self._seq != seen:  # someone set a new timer: let things settle again
                continue
            at, _, future = heapq.heappop(self._timers)
            if future.done():
                continue
            self._now = max(self._now, at)
            future.set_result(None)
