"""Simulator events and the event queue.

The queue is a heap of ``(time, rank, seq, event)``: events at the same virtual time
run in rank order (a worker's step boundary first, so completions free capacity
before anything else looks; arrivals next; the periodic tick; the scheduler's
decision last, so that it sees everything that happened at that instant), and
events of equal time and rank in the order they were pushed (``seq``, counted per
simulation).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from enum import IntEnum


class Rank(IntEnum):
    BOUNDARY = 0
    ARRIVAL = 1
    TICK = 2
    DECIDE = 3


@dataclass(frozen=True, slots=True)
class Arrival:
    """Job ``index`` of the workload arrives."""

    index: int
    rank: Rank = Rank.ARRIVAL


@dataclass(frozen=True, slots=True)
class Boundary:
    """Worker ``worker_id`` ends its current phase (stale unless ``epoch`` is current)."""

    worker_id: str
    epoch: int
    rank: Rank = Rank.BOUNDARY


@dataclass(frozen=True, slots=True)
class Tick:
    """The scheduler's periodic invocation."""

    rank: Rank = Rank.TICK


@dataclass(frozen=True, slots=True)
class Decide:
    """Run one scheduling step now."""

    rank: Rank = Rank.DECIDE


Event = Arrival | Boundary | Tick | Decide


@dataclass
class EventQueue:
    _heap: list[tuple[float, int, int, Event]] = field(default_factory=list)
    _next_seq: int = 0

    def push(self, at: float, event: Event) -> None:
        heapq.heappush(self._heap, (at, int(event.rank), self._next_seq, event))
        self._next_seq += 1

    def pop(self) -> tuple[float, Event]:
        at, _, _, event = heapq.heappop(self._heap)
        return at, event

    def __len__(self) -> int:
        return len(self._heap)
