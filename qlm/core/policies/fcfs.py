"""``fcfs``: vLLM's default — first come, first served, least-loaded dispatch.

Groups are served in order of their first arrival; each goes to the least-loaded
worker already serving its model; a worker swaps model only when it idles and
nothing of its model is queued. No preemption beyond the engine's own on KV
shortage. See :mod:`qlm.core.policies.baseline` for the shared mechanics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from qlm.core.policies.base import QueueOrder, by_arrival, register
from qlm.core.policies.baseline import OrderedDispatchPolicy


@register("fcfs")
@dataclass(frozen=True)
class FCFSPolicy(OrderedDispatchPolicy):
    name: ClassVar[str] = "fcfs"
    queue_order: ClassVar[QueueOrder] = staticmethod(by_arrival)
