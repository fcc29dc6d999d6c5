"""``fcfs``: vLLM's default — first come, first served, least-loaded dispatch.

Groups are served in order of their first arrival; each goes to the least-loaded
worker already serving its model; a worker swaps model only when it idles and
nothing of its model is queued. No preemption beyond the engine's own on KV
shortage. See :mod:`qlm.core.policies.baseline` for the shared mechanics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from qlm.core.policies.base import register
from qlm.core.policies.baseline import OrderedDispatchPolicy, fcfs_key


@register("fcfs")
@dataclass(frozen=True)
class FCFSPolicy(OrderedDispatchPolicy):
    name: ClassVar[str] = "fcfs"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sort_key", fcfs_key)
