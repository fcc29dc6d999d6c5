"""What one ``qlm`` decision computes once (group and worker summaries, cost tables,
lanes) and the plan it produces; shape helpers shared by the planners."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from qlm.core.estimator import LengthStats
from qlm.core.fairness import VirtualTokenCounters, fair_order
from qlm.core.fit import can_serve
from qlm.core.policies.base import PolicyContext
from qlm.core.policies.planning import (
    CUMULATIVE_RESERVATIONS,
    CostModel,
    GroupStats,
    Lane,
    WorkerLoad,
    lane_value,
    memo_cumulative_reservations,
    p_meet,
)
from qlm.core.pulls import DEFAULT_EXPECTED_OUTPUT_TOKENS, kv_reservation
from qlm.core.types import GroupKey, QueueSnapshot, SLOClass


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
        #: Per group: its place in its class's fair order (:meth:`set_fair_order`); None:
        #: no fair share, the planners order groups by urgency alone.
        self.fair_rank: list[int] | None = None
        self._deadline_order: list[int] | None = None
        self._memos = memos
        self._serving: dict[str, int] = {}

    def cumulative_reservations(self, gi: int) -> list[int]:
        """The KV reservations (:func:`qlm.core.pulls.kv_reservation`) of group ``gi``'s
        requests in pull order, summed from its head: how far a pull of its first k
        requests takes a worker's headroom. Kept in the group's memo
        (:class:`~qlm.core.policies.planning.GroupStatsCache` reads the reservations with
        the group's other terms), so a lane head is not walked request by request at
        every decision."""
        memo = self._memos[gi] if self._memos is not None else {}
        found = memo_cumulative_reservations(memo)
        if found is None:  # a context made without the group memos
            requests = self.snapshot.groups[self.stats[gi].index].requests
            found = memo[CUMULATIVE_RESERVATIONS] = list(accumulate(
                kv_reservation(r, DEFAULT_EXPECTED_OUTPUT_TOKENS) for r in requests))
        return found

    def deadline_order(self) -> list[int]:
        """Group indices sorted by :meth:`deadline_key` (sorted once per decision)."""
        if self._deadline_order is None:
            self._deadline_order = sorted(range(len(self.stats)), key=self.deadline_key)
        return self._deadline_order

    def set_fair_order(self, counters: VirtualTokenCounters) -> None:
        """Rank each class's groups in the order VTC would serve them
        (:func:`qlm.core.fairness.fair_order`): each tenant's groups in deadline order,
        each charged its expected tokens (prompts and mean outputs) under the counters'
        weights."""
        weights = counters.weights
        by_class: dict[SLOClass, list[int]] = {}
        for gi in self.deadline_order():
            by_class.setdefault(self.stats[gi].key.slo_class, []).append(gi)
        rank = [0] * len(self.stats)
        for slo_class, members in by_class.items():
            tenant = self.stats[members[0]].key.tenant
            if all(self.stats[gi].key.tenant == tenant for gi in members):
                # one flow: fair share serves it in its own (deadline) order
                for position, gi in enumerate(members):
                    rank[gi] = position
                continue
            items = [((slo_class, self.stats[gi].key.tenant),
                      weights.cost(self.stats[gi].mean_prompt * self.stats[gi].size,
                                   self.stats[gi].out_mean_total)) for gi in members]
            flows = {flow for flow, _ in items}
            order = fair_order(items, {f: counters.counter(f) for f in flows})
            for position, k in enumerate(order):
                rank[members[k]] = position
        self.fair_rank = rank

    def deadline_key(self, gi: int) -> tuple[float, GroupKey]:
        """The planners' urgency order: earliest deadline quantile, then key."""
        return self.stats[gi].deadline_points[0], self.stats[gi].key

    def fair_before(self, a: int, b: int) -> bool:
        """Whether fair share keeps group ``a`` ahead of group ``b`` (same class, other
        tenants, ``a`` first in the fair order); never without fair share."""
        rank = self.fair_rank
        if rank is None:
            return False
        ka, kb = self.stats[a].key, self.stats[b].key
        return ka.slo_class is kb.slo_class and ka.tenant != kb.tenant and rank[a] < rank[b]

    def may_displace(self, victim: int, by: int) -> bool:
        """Whether group ``by`` may displace group ``victim`` from a lane (step 3 of the
        heuristic: the victim goes last, where it likely misses). With fair share only
        within a tenant: displacement weighs groups by size, and a light tenant's groups
        are small, so across tenants it would drop the light tenant's work first."""
        if self.fair_rank is None:
            return True
        return self.stats[victim].key.tenant == self.stats[by].key.tenant

    def urgency_order(self) -> list[int]:
        """Group indices in the order the heuristic places them: deadline order, in which,
        with fair share, the places a class holds go to its groups in fair order (classes
        keep their urgency against each other; a tenant's groups keep theirs)."""
        order = self.deadline_order()
        rank = self.fair_rank
        if rank is None:
            return list(order)
        by_class: dict[SLOClass, list[int]] = {}
        for gi in order:
            by_class.setdefault(self.stats[gi].key.slo_class, []).append(gi)
        fair = {c: iter(sorted(members, key=rank.__getitem__)) for c, members in by_class.items()}
        return [next(fair[self.stats[gi].key.slo_class]) for gi in order]

    def fair_order_binds(self) -> bool:
        """Whether fair share constrains the plan: some class has queued groups of two
        tenants or more (the MILP, which knows no fair order, is then not run)."""
        if self.fair_rank is None:
            return False
        tenants: dict[SLOClass, str] = {}
        for g in self.stats:
            first = tenants.setdefault(g.key.slo_class, g.key.tenant)
            if first != g.key.tenant:
                return True
        return False

    def respects_fair_order(self, orders: Sequence[Sequence[int]]) -> bool:
        """Whether no lane of ``orders`` puts a group behind one it should precede
        (:meth:`fair_before`). One pass per lane: per class, the highest fair rank seen so
        far of each of the two tenants that hold the highest; a group breaks the order
        when another tenant's group ahead of it ranks after it."""
        rank = self.fair_rank
        if rank is None:
            return True
        stats = self.stats
        for order in orders:
            top: dict[SLOClass, list[tuple[int, str]]] = {}  # ≤ 2 (rank, tenant) a class
            for gi in order:
                key = stats[gi].key
                r = rank[gi]
                seen = top.setdefault(key.slo_class, [])
                if any(other > r and tenant != key.tenant for other, tenant in seen):
                    return False
                mine = [(max(r, x), t) for x, t in seen if t == key.tenant] or [(r, key.tenant)]
                seen[:] = sorted([*mine, *((x, t) for x, t in seen if t != key.tenant)],
                                 reverse=True)[:2]
        return True

    def fresh_lanes(self) -> list[Lane]:
        return [Lane(i, w, self.loads[i], self.cost, self.now)
                for i, w in enumerate(self.snapshot.workers)]

    def num_workers_serving(self, model: str) -> int:
        """How many workers of the snapshot can serve ``model`` (a profile for it on their
        GPU, enough GPUs); counted once per model and decision."""
        counts = self._serving
        found = counts.get(model)
        if found is None:
            profiles = self.cost.profiles
            found = counts[model] = sum(
                1 for w in self.snapshot.workers if can_serve(profiles, model, w.gpu, w.num_gpus))
        return found

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
