"""``edf``: earliest deadline first.

Groups are served in order of their earliest TTFT deadline (arrival + SLO), ties
by first arrival. Dispatch, idle-only swaps and pulls as in
:mod:`qlm.core.policies.baseline`. Not swap-aware and no preemption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from qlm.core.policies.base import QueueOrder, by_deadline, register
from qlm.core.policies.baseline import OrderedDispatchPolicy


@register("edf")
@dataclass(frozen=True)
class EDFPolicy(OrderedDispatchPolicy):
    name: ClassVar[str] = "edf"
    queue_order: ClassVar[QueueOrder] = staticmethod(by_deadline)
