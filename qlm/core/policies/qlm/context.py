"""What one ``qlm`` decision computes once (group and worker summaries, cost tables,
lanes) and the plan it produces; shape helpers shared by the planners."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qlm.core.estimator import LengthStats
from qlm.core.policies.base import PolicyContext
from qlm.core.policies.planning import (
    CostModel,
    GroupStats,
    Lane,
    WorkerLoad,
    lane_value,
    p_meet,
)
from qlm.core.types import QueueSnapshot, SLOClass


@dataclass(frozen=True, slots=True)
class Plan:
    """A computed assignment: per worker index the ordered group indices, and its score."""

    orders: tuple[tuple[int, ...], ...]
    value: float
    mode: str  # "milp", "heuristic", or "heuristic (milp: <why>)"


class PlanningContext:
    """Everything one decision computes once: summaries, cost tables, lanes."""

    def __init__(self, snapshot: QueueSnapshot, ctx: PolicyContext, stats: list[GroupStats],
                 loads: list[WorkerLoad], output_stats: Mapping[str, LengthStats],
                 weights: Mapping[SLOClass, float],
                 memos: Sequence[dict[Any, Any]] | None = None,
                 service_scale: float = 1.0) -> None:
        self.snapshot = snapshot
        self.now = snapshot.now
        self.stats = stats
        self.stats_by_key = {g.key: g for g in stats}
        self.loads = loads
        self.weights = weights
        self.cost = CostModel(ctx.profiles, snapshot.workers, stats, output_stats, memos=memos,
                              service_scale=service_scale, tpot_aware=True)

    def fresh_lanes(self) -> list[Lane]:
        return [Lane(i, w, self.loads[i], self.cost, self.now)
                for i, w in enumerate(self.snapshot.workers)]

    def weight(self, gi: int) -> float:
        return self.weights.get(self.stats[gi].key.slo_class, 1.0)

    def score(self, orders: Sequence[Sequence[int]]) -> float:
        lanes = self.fresh_lanes()
        return sum(lane_value(self.cost, lanes[i], list(o), self.weights)
                   for i, o in enumerate(orders) if o)


def shape_representatives(cost: CostModel) -> list[int]:
    """One worker index per GPU shape (the first of each), in shape order."""
    reps: dict[int, int] = {}
    for i, shape in enumerate(cost.shape_of):
        reps.setdefault(shape, i)
    return [reps[s] for s in sorted(reps)]


def shape_reach(pc: PlanningContext) -> list[int]:
    """Per worker shape: how many of the queued models it can serve."""
    cost = pc.cost
    reps = shape_representatives(cost)
    first_of_model: dict[str, int] = {}
    for gi, g in enumerate(pc.stats):
        first_of_model.setdefault(g.model, gi)
    return [sum(1 for gi in first_of_model.values() if cost.service(gi, rep) is not None)
            for rep in reps]


def attainment_bound(pc: PlanningContext) -> float:
    """An upper bound on any plan's value: every group alone on an idle worker of the
    shape that suits it best, starting now (no queue, no running work, no swap)."""
    reps = shape_representatives(pc.cost)
    total = 0.0
    for gi, g in enumerate(pc.stats):
        best = 0.0
        for rep in reps:
            svc = pc.cost.service(gi, rep)
            if svc is not None:
                best = max(best, p_meet(g, svc, pc.now, 0.0))
        total += pc.weight(gi) * g.size * best
    return total


def unservable_groups(pc: PlanningContext) -> list[int]:
    """Indices of the groups that no worker of the snapshot can serve."""
    reps = shape_representatives(pc.cost)
    return [gi for gi in range(len(pc.stats))
            if all(pc.cost.service(gi, rep) is None for rep in reps)]
