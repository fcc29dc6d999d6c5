"""``edf``: earliest deadline first.

Groups are served in order of their earliest TTFT deadline (arrival + SLO), ties
by first arrival. Dispatch, idle-only swaps and pulls as in
:mod:`qlm.core.policies.baseline`. Not swap-aware and no preemption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from qlm.core.policies.base import register
from qlm.core.policies.baseline import OrderedDispatchPolicy, earliest_deadline_at
from qlm.core.types import RequestGroup


def edf_key(group: RequestGroup) -> tuple[Any, ...]:
    return (earliest_deadline_at(group),)


@register("edf")
@dataclass(frozen=True)
class EDFPolicy(OrderedDispatchPolicy):
    name: ClassVar[str] = "edf"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sort_key", edf_key)
