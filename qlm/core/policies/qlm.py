"""``qlm``: the global scheduler — groups onto virtual queues, maximising SLO attainment.

Objective: maximise Σ_g weight(class_g)·size_g·p_g, p_g the expected fraction of group
g's requests whose first token beats their deadline under the timing model of
:mod:`qlm.core.policies.planning` (model-swap time charged between adjacent groups of
different models, and from the worker's active model to the first group). A group is
placed only on a worker whose GPU has a profile for its model.

**Exact MILP** (``scipy.optimize.milp``/HiGHS) when ``num_groups × num_workers ≤
milp_max_cells``, within ``milp_node_limit`` branch-and-bound nodes (a deterministic
budget: same snapshot, same plan) and ``milp_time_limit_s`` (a wall-clock backstop).
Positions k = 0..K−1 per worker w, K = number of groups, times relative to ``now``,
means only (no variance):

* ``x[g,w,k] ∈ {0,1}``: g at position k of w; Σ_{w,k} x = 1 per g; Σ_g x[·,w,k] ≤ 1;
  positions filled contiguously (Σ_g x[·,w,k+1] ≤ Σ_g x[·,w,k]).
* ``z[w,k,m] ∈ {0,1}``: a swap *into* model m before position k:
  z ≥ Σ_{g∈m} x[g,w,k] − Σ_{g∈m} x[g,w,k−1] (k=0: the active model counts as position −1).
* ``E[w,k]`` (lane drained after k) ≥ E[w,k−1] + Σ_g S_{gw}·x[g,w,k] + Σ_m c_{wm}·z[w,k,m],
  E[w,−1] = the running work's drain time; ``B[w,k]`` (position k's start) ≥ B[w,k−1],
  ≥ E[w,k−1] − Σ_g lead_{gw}·x[g,w,k] (a same-model group starts when a slot frees),
  ≥ E[w,k−1] + c_{wm} − M(1 − z[w,k,m]) (after a swap: full drain plus the swap).
* ``t_g ≥ B[w,k] + prefill_{gw} − M(1 − x[g,w,k])``: the group's first-token time.
* ``u[g,j] ∈ {0,1}``: deadline quantile j of g is met:
  t_g + q_j·Σ spread_{gw}·x[g,w,k] ≤ d_{gj} + M(1 − u[g,j]) (the linearised SLO term).
* maximise Σ weight_g·size_g/J·u[g,j] − ε·Σ t_g.

Every time variable is bounded to [0, horizon] (horizon: all work and one swap per group
after the running work), and each big-M is the smallest value that leaves its
constraint slack when the indicator is 0 — the LP relaxation stays tight enough for
HiGHS to prove optimality on ~10 groups × 2 workers in well under a second.

The MILP runs only when the heuristic's plan falls short of an upper bound (every group
alone on an idle worker, :func:`attainment_bound`); both plans are
scored by the (stochastic) planning model and the better one is used; a MILP that fails
or finds nothing within its budget falls back to the heuristic.

**Heuristic** (large instances, and always as the MILP's competitor), O(G·log W):

1. groups in deadline order (earliest deadline quantile, then key);
2. each goes to one of at most three candidate workers per GPU shape — least drained
   lane already ending with its model (no swap), least drained lane where the model
   sleeps resident (wake), least drained lane overall (cold load) — picked from heaps;
   among candidates within 0.02 of the best p_meet, the one that drains earliest
   (load balancing over heterogeneous workers by estimated wait); with
   ``spare_versatile`` (off by default), a group surely met (p ≥ ``SURE_P``) on several
   candidates goes to the one whose GPU shape can serve the fewest of the queued
   models, so work that fits anywhere leaves the only workers that fit some other
   queued model (llama-70b needs 4×A100) to that model: a shorter makespan, but those
   workers then switch to that model sooner, which can cost attainment when its
   requests are already lost (WB at the paper's scale: +42% throughput; attainment
   +0.004 at one rate, −0.07 at twice that rate);
3. a group that would likely miss (p < 0.5) may displace one earlier group on that
   lane when that raises the lane's value (weighted Moore–Hodgson); displaced groups,
   and groups still hopeless (p < 0.02 on every candidate), are appended last, where
   they cost nobody (with ``spare_versatile``: on the least versatile shape serving them);
4. local improvement: adjacent swaps inside each lane that raise its value, within an
   evaluation budget (``improve_budget``), so the pass is deterministic;
5. groups whose deadlines have all passed, in deadline order, each on the lane that would
   finish it first: last (the default), or, within ``late_insert_budget`` placements,
   at the earliest position where no group after it loses expected attainment (ahead of
   batch work with slack, behind groups it would make miss). They count for nothing,
   but a user still waits for them, and placed last they wait for the whole backlog.

**LSOs**: *pull* via :func:`qlm.core.pulls.plan_pulls` (backpressure); *model swap* when
a worker's head group needs another model and the worker has drained; *eviction* when
too few slots of a worker free up within the slack of its head group (with
``evict_lookahead_groups``, of each of the first groups of its lane, counted with those
ahead of it): just enough running requests of looser classes are evicted (largest
remaining slack first: those past their first token have met their TTFT SLO already);
they keep their progress (see :func:`plan_evictions`). With ``kv_state_swap`` an eviction
sets ``Evict.state_swap`` when moving the KV state over PCIe is cheaper than recomputing
it. *Rejections* only with ``reject_late=True`` (requests whose
deadline has passed) and ``reject_unservable=True`` (requests of a group that no worker of
the snapshot can serve: no profile for its model on their GPUs, or too few GPUs; the
reason names the model). Without it such a group stays queued and unplaced.

Cost per decision: one pass over the requests of groups whose request tuple changed
(memoised), one over running requests of workers whose running set changed; the search
itself touches groups and workers only.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from qlm.core.errors import InvalidInput
from qlm.core.estimator import LengthStats
from qlm.core.policies.base import PolicyContext, register
from qlm.core.policies.planning import (
    DEADLINE_QUANTILES,
    CostModel,
    GroupStats,
    GroupStatsCache,
    Lane,
    Slot,
    WorkerLoad,
    WorkerLoadCache,
    lane_value,
    output_stats_from,
    p_meet,
    place_after,
    walk,
)
from qlm.core.pulls import DEFAULT_EXPECTED_OUTPUT_TOKENS, kv_reservation
from qlm.core.types import (
    Decision,
    Evict,
    Place,
    Pull,
    QueueSnapshot,
    Reject,
    SLOClass,
    Swap,
)

#: p_meet at which ``spare_versatile`` may move a group to a less versatile shape.
SURE_P = 0.999

DEFAULT_OPTIONS: Mapping[str, Any] = {
    "milp_max_cells": 12,  # use the MILP when groups × workers ≤ this
    "milp_time_limit_s": 2.0,  # wall-clock backstop only (never binds in practice)
    "milp_node_limit": 100,  # the deterministic budget
    "improve_budget": 400,  # lane walks the local search may spend
    # Group placements the early placement of late groups may spend per decision
    # (0: late groups go last; see heuristic step 5).
    "late_insert_budget": 0,
    "hopeless_p": 0.02,
    "displace_below_p": 0.5,
    "evict": True,
    # How many groups at the head of a lane evictions provide for (1: the head group only).
    "evict_lookahead_groups": 1,
    # Fraction of the modelled per-slot decode rate trusted when counting running requests
    # that finish within a head group's slack (fewer counted: more evictions).
    "evict_rate_credit": 1.0,
    # Count that decode time only after the prompts ahead are prefilled (more evictions).
    "evict_prefill_aware": False,
    "kv_state_swap": False,
    # Multiplies every modelled service time: how much slower than the profile's steady
    # batch a worker really serves (prefill stalls, batches that never fill).
    "service_scale": 1.0,
    "pcie_gb_per_s": 25.0,
    "reject_late": False,
    "reject_unservable": False,
    # Throughput over attainment: see the module docstring (off: attainment first).
    "spare_versatile": False,
    "class_weights": {},
    "output_stats": {},
}


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
                              service_scale=service_scale)

    def fresh_lanes(self) -> list[Lane]:
        return [Lane(i, w, self.loads[i], self.cost, self.now)
                for i, w in enumerate(self.snapshot.workers)]

    def weight(self, gi: int) -> float:
        return self.weights.get(self.stats[gi].key.slo_class, 1.0)

    def score(self, orders: Sequence[Sequence[int]]) -> float:
        lanes = self.fresh_lanes()
        return sum(lane_value(self.cost, lanes[i], list(o), self.weights)
                   for i, o in enumerate(orders) if o)


# ------------------------------------------------------------------ heuristic
class _Heaps:
    """Least-drained lanes per (shape, tail model), (shape, resident model) and shape."""

    def __init__(self, lanes: Sequence[Lane], cost: CostModel) -> None:
        self.cost = cost
        self.tail: dict[tuple[int, str | None], list[tuple[float, int, int]]] = {}
        self.resident: dict[tuple[int, str], list[tuple[float, int, int]]] = {}
        self.any: dict[int, list[tuple[float, int, int]]] = {}
        for lane in lanes:
            self.push(lane)

    def push(self, lane: Lane) -> None:
        shape = self.cost.shape_of[lane.index]
        entry = (lane.end_at, lane.index, lane.version)
        heapq.heappush(self.tail.setdefault((shape, lane.tail), []), entry)
        for m in lane.worker.models:
            if m != lane.tail:  # ending with m already: the tail heap has it, no swap
                heapq.heappush(self.resident.setdefault((shape, m), []), entry)
        heapq.heappush(self.any.setdefault(shape, []), entry)

    @staticmethod
    def top(heap: list[tuple[float, int, int]] | None, lanes: Sequence[Lane]) -> Lane | None:
        while heap:
            _, index, version = heap[0]
            if lanes[index].version == version:
                return lanes[index]
            heapq.heappop(heap)
        return None

    def candidates(self, model: str, shapes: Sequence[int], lanes: Sequence[Lane]) -> list[Lane]:
        """Per shape: the least-drained lane ending with ``model`` (no swap), then the
        least-drained one where it sleeps (wake) and the least-drained overall (load),
        each only if it drains earlier than the ones before — otherwise it is dominated
        (starts no earlier and pays at least as much swap)."""
        found: dict[int, Lane] = {}
        for shape in shapes:
            bound = math.inf
            for heap in (self.tail.get((shape, model)), self.resident.get((shape, model)),
                         self.any.get(shape)):
                lane = self.top(heap, lanes)
                if lane is not None and lane.end_at < bound:
                    found[lane.index] = lane
                    bound = lane.end_at
        return [found[i] for i in sorted(found)]

    def earliest_end(self, gi: int, shapes: Sequence[int], lanes: Sequence[Lane]
                     ) -> Lane | None:
        """The lane that would finish group ``gi`` first, among each shape's least-drained
        lane ending with its model and least-drained lane overall (late groups only need
        to be served soon, not at the best position)."""
        cost = self.cost
        model = cost.stats[gi].model
        best: tuple[float, int] | None = None
        for shape in shapes:
            svc = None
            for heap in (self.tail.get((shape, model)), self.any.get(shape)):
                lane = self.top(heap, lanes)
                if lane is None:
                    continue
                if svc is None:  # the same for every lane of the shape
                    svc = cost.service(gi, lane.index)
                    assert svc is not None
                end = lane.end_at + svc.mean_s
                if lane.tail != model:
                    end += cost.swap_s(lane.index, model, lane.tail)
                    if lane.tail is not None and lane.end_at > lane.seg_start_at:
                        end += cost.drain_tail_s(lane.index, lane.tail)
                if best is None or (end, lane.index) < best:
                    best = (end, lane.index)
        return None if best is None else lanes[best[1]]


def heuristic_plan(pc: PlanningContext, options: Mapping[str, Any], score: bool = True) -> Plan:
    """The heuristic of the module docstring; ``score=False`` skips the final scoring walk."""
    cost, stats = pc.cost, pc.stats
    lanes = pc.fresh_lanes()
    heaps = _Heaps(lanes, cost)
    shape_reps = _shape_representatives(cost)
    shapes_of_model: dict[str, list[int]] = {}

    def shapes_for(gi: int) -> list[int]:
        model = stats[gi].model
        found = shapes_of_model.get(model)
        if found is None:
            found = shapes_of_model[model] = [
                s for s, rep in enumerate(shape_reps) if cost.service(gi, rep) is not None]
        return found

    # How many of the queued models each shape can serve: with ``spare_versatile``, a group
    # that can go equally well on a less versatile shape goes there, keeping the workers that
    # alone serve some other queued model (e.g. the only ones that fit llama-70b) for it.
    reach = _shape_reach(pc) if options["spare_versatile"] else None
    hopeless_p = float(options["hopeless_p"])
    displace_below = float(options["displace_below_p"])
    deferred: list[int] = []
    late: list[int] = []
    order = sorted(range(len(stats)), key=lambda i: (stats[i].deadline_points[0], stats[i].key))
    for gi in order:
        shapes = shapes_for(gi)
        if not shapes:
            continue  # no worker can ever serve it: left out of every queue
        if stats[gi].latest_deadline_at < pc.now:
            late.append(gi)  # every deadline has passed: placed after the rest (step 5)
            continue
        lane, slot = _best_slot(gi, heaps.candidates(stats[gi].model, shapes, lanes), cost,
                                reach)
        if lane is None or slot is None:
            continue
        if slot.p_meet < displace_below and lane.order:
            displaced = _displace_one(pc, lane, gi)
            if displaced is not None:
                deferred.append(displaced)
                heaps.push(lane)
                continue
        if slot.p_meet < hopeless_p:
            deferred.append(gi)
            continue
        lane.append(gi, slot, cost)
        heaps.push(lane)

    def shapes_behind(gi: int) -> list[int]:
        """Where a deferred or late group may go: with ``spare_versatile``, only on the
        least versatile shapes that serve it."""
        shapes = shapes_for(gi)
        if reach is not None and shapes:
            least = min(reach[s] for s in shapes)
            shapes = [s for s in shapes if reach[s] == least]
        return shapes

    for gi in sorted(deferred, key=lambda i: (stats[i].deadline_points[0], stats[i].key)):
        target = heaps.earliest_end(gi, shapes_behind(gi), lanes)
        if target is not None:
            slot = target.slot_for(gi, cost, with_p=False)
            assert slot is not None
            target.append(gi, slot, cost)
            heaps.push(target)
    _improve(pc, lanes, int(options["improve_budget"]))
    _insert_late(pc, lanes, late, shapes_behind, int(options["late_insert_budget"]))
    orders = tuple(tuple(lane.order) for lane in lanes)
    return Plan(orders, pc.score(orders) if score else math.nan, "heuristic")


def _insert_late(pc: PlanningContext, lanes: Sequence[Lane], late: Sequence[int],
                 shapes_for: Callable[[int], list[int]], budget: int) -> None:
    """Place each group whose deadlines have all passed as early as it costs nobody.

    No position changes such a group's own value (it counts 0 anywhere), so the search
    alone would leave it anywhere, and a group placed last waits for every other queued
    group, a whole batch backlog included: an interactive request that missed its SLO by
    a little would then wait minutes. Instead, in deadline order, each goes to the lane
    that would finish it first and there ahead of every group that can absorb the delay,
    the earliest position at which no group after it loses expected attainment (ahead of
    a batch job with slack, behind interactive groups that would then miss). Later late
    groups go after earlier ones. Positions are tried from the back, each costing one
    placement per group after it; once ``budget`` placements are spent, late groups go
    last. Runs after the local search, which would otherwise move them back for gains
    of float noise.
    """
    if not late:
        return
    cost, stats = pc.cost, pc.stats
    heaps = _Heaps(lanes, cost)  # the local search reset lanes: fresh heaps
    floor: dict[int, int] = {}  # per lane: the position after its last late group
    lane_slots: dict[int, list[Slot]] = {}  # per lane: the walk of its current order
    for gi in sorted(late, key=lambda i: (stats[i].deadline_points[0], stats[i].key)):
        target = heaps.earliest_end(gi, shapes_for(gi), lanes)
        if target is None:
            continue
        if budget <= 0:  # out of budget: last, as a group nobody waits for
            slot = target.slot_for(gi, cost, with_p=False)
            assert slot is not None
            target.append(gi, slot, cost)
            lane_slots.pop(target.index, None)
        else:
            slots = lane_slots.get(target.index)
            if slots is None:
                slots = walk(cost, target, target.order)
            pos, budget = _harmless_position(pc, target, slots, gi,
                                             floor.get(target.index, 0), budget)
            lane_slots[target.index] = target.reset(
                [*target.order[:pos], gi, *target.order[pos:]], cost)
            floor[target.index] = pos + 1
        heaps.push(target)


def _harmless_position(pc: PlanningContext, lane: Lane, slots: Sequence[Slot], gi: int,
                       floor: int, budget: int) -> tuple[int, int]:
    """The earliest position ≥ ``floor`` in ``lane`` (whose walk is ``slots``) where
    inserting ``gi`` lowers no later group's value (scanning from the back, stopping at
    the first that does), and the budget left."""
    cost, order = pc.cost, lane.order
    best, suffix = len(order), 0.0
    for k in range(len(order) - 1, floor - 1, -1):
        steps = len(order) - k + 1
        if steps > budget:
            break
        budget -= steps
        suffix += pc.weight(order[k]) * cost.stats[order[k]].size * slots[k].p_meet
        if k == 0:
            tail, seg, end, var = lane.initial
        else:
            before = slots[k - 1]
            tail, seg, end, var = (cost.stats[order[k - 1]].model, before.seg_start_at,
                                   before.end_at, before.end_var)
        delayed = 0.0
        for g in (gi, *order[k:]):
            svc = cost.service(g, lane.index)
            assert svc is not None  # the lane serves every group placed on it
            slot = place_after(cost, lane.index, cost.stats[g], svc, tail, seg, end, var,
                               with_p=g != gi)
            if g != gi:
                delayed += pc.weight(g) * cost.stats[g].size * slot.p_meet
            tail, seg, end, var = cost.stats[g].model, slot.seg_start_at, slot.end_at, slot.end_var
        if delayed < suffix - 1e-9 * (1.0 + suffix):
            break
        best = k
    return best, budget


def _shape_representatives(cost: CostModel) -> list[int]:
    reps: dict[int, int] = {}
    for i, shape in enumerate(cost.shape_of):
        reps.setdefault(shape, i)
    return [reps[s] for s in sorted(reps)]


def _shape_reach(pc: PlanningContext) -> list[int]:
    """Per worker shape: how many of the queued models it can serve."""
    cost = pc.cost
    reps = _shape_representatives(cost)
    first_of_model: dict[str, int] = {}
    for gi, g in enumerate(pc.stats):
        first_of_model.setdefault(g.model, gi)
    return [sum(1 for gi in first_of_model.values() if cost.service(gi, rep) is not None)
            for rep in reps]


def _best_slot(gi: int, candidates: Sequence[Lane], cost: CostModel,
               reach: Sequence[int] | None = None) -> tuple[Lane | None, Slot | None]:
    """Among the candidates within 0.02 of the best p_meet: the least versatile shape
    (with ``reach``), then the earliest drain."""
    options = [(lane, lane.slot_for(gi, cost)) for lane in candidates]
    valid = [(lane, s) for lane, s in options if s is not None]
    if not valid:
        return None, None
    best_p = max(s.p_meet for _, s in valid)
    good = [(lane, s) for lane, s in valid if s.p_meet >= best_p - 0.02]
    earliest = min(good, key=lambda ls: (ls[1].end_at, ls[0].index))
    if reach is not None:
        sure = [(lane, s) for lane, s in good if s.p_meet >= SURE_P]
        if sure:  # only work that is surely met there moves to a less versatile shape
            return min(sure, key=lambda ls: (reach[cost.shape_of[ls[0].index]],
                                             ls[1].end_at, ls[0].index))
    return earliest


def _displace_one(pc: PlanningContext, lane: Lane, gi: int) -> int | None:
    """Drop the earlier group whose removal most raises the lane's value with ``gi`` added."""
    cost = pc.cost
    base = lane_value(cost, lane, [*lane.order, gi], pc.weights)
    best_gain, best_pos = 1e-9, -1
    for pos in range(len(lane.order)):
        trial = [*lane.order[:pos], *lane.order[pos + 1:], gi]
        gain = lane_value(cost, lane, trial, pc.weights) - base
        if gain > best_gain:
            best_gain, best_pos = gain, pos
    if best_pos < 0:
        return None
    removed = lane.order[best_pos]
    lane.reset([*lane.order[:best_pos], *lane.order[best_pos + 1:], gi], cost)
    return removed


def _improve(pc: PlanningContext, lanes: Sequence[Lane], budget: int) -> None:
    """Adjacent swaps inside each lane that raise its value, until no gain or no budget."""
    cost = pc.cost
    for lane in lanes:
        if len(lane.order) < 2 or budget <= 0:
            continue
        slots = walk(cost, lane, lane.order)
        if all(s.p_meet > 0.99 or s.p_meet < 0.01 for s in slots):
            continue  # every group surely met or surely missed: no adjacent swap helps
        current = lane.order
        value = sum(pc.weight(gi) * cost.stats[gi].size * s.p_meet  # = lane_value
                    for gi, s in zip(current, slots, strict=True))
        improved = True
        while improved and budget > 0:
            improved = False
            for i in range(len(current) - 1):
                if budget <= 0:
                    break
                trial = [*current[:i], current[i + 1], current[i], *current[i + 2:]]
                budget -= 1
                v = lane_value(cost, lane, trial, pc.weights)
                if v > value + 1e-9:
                    current, value, improved = trial, v, True
        if current is not lane.order:
            lane.reset(current, cost)


# ------------------------------------------------------------------ MILP
def milp_plan(pc: PlanningContext, time_limit_s: float, node_limit: int = 2000) -> Plan | str:
    """The exact plan of the module docstring, or a string saying why there is none."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array

    if time_limit_s <= 0 or node_limit <= 0:
        return "no budget"
    cost, stats, now = pc.cost, pc.stats, pc.now
    lanes = pc.fresh_lanes()
    num_g, num_w = len(stats), len(lanes)
    if num_g == 0:
        return Plan(tuple(() for _ in lanes), 0.0, "milp")
    K = num_g
    models = sorted({g.model for g in stats})
    svc = {(g, w): cost.service(g, w) for g in range(num_g) for w in range(num_w)}
    allowed = [(g, w) for (g, w), s in svc.items() if s is not None]
    if not allowed:
        return "no profile"
    J = len(DEADLINE_QUANTILES)

    names: dict[tuple[Any, ...], int] = {}
    lower: list[float] = []
    upper: list[float] = []
    integral: list[int] = []

    def var(name: tuple[Any, ...], lo: float, hi: float, is_int: bool) -> int:
        names[name] = len(lower)
        lower.append(lo)
        upper.append(hi)
        integral.append(1 if is_int else 0)
        return names[name]

    swap_cost = {(w, m): cost.swap_s(w, m, lanes[w].initial[0]) for w in range(num_w)
                 for m in models}
    finite_swaps = [c for c in swap_cost.values() if math.isfinite(c)]
    horizon = (max(lane.initial[2] for lane in lanes) - now
               + sum(max((s.mean_s + s.prefill_s for (gg, _), s in svc.items()
                          if gg == g and s is not None), default=0.0)  # none: unplaceable
                     for g in range(num_g))
               + num_g * (max(finite_swaps) if finite_swaps else 0.0))
    max_prefill = max(sv.prefill_s for sv in svc.values() if sv is not None)
    time_hi = horizon + max_prefill + 1.0  # every time variable lies in [0, time_hi]
    big_m = time_hi

    for g, w in allowed:
        for k in range(K):
            var(("x", g, w, k), 0, 1, True)
    for w in range(num_w):
        for k in range(K):
            for m in models:
                hi = 1.0 if math.isfinite(swap_cost[(w, m)]) else 0.0
                var(("z", w, k, m), 0, hi, True)
            var(("E", w, k), 0.0, time_hi, False)
            var(("B", w, k), 0.0, time_hi, False)
    placeable = {g for g, _ in allowed}
    for g in range(num_g):
        var(("t", g), 0.0, time_hi, False)
        for j in range(J):  # a group no worker can serve meets nothing
            var(("u", g, j), 0, 1 if g in placeable else 0, True)

    rows: list[dict[int, float]] = []
    row_lo: list[float] = []
    row_hi: list[float] = []

    def row(coefs: dict[int, float], lo: float, hi: float) -> None:
        rows.append(coefs)
        row_lo.append(lo)
        row_hi.append(hi)

    xs_of_g: dict[int, list[tuple[int, int]]] = {}
    for g, w in allowed:
        xs_of_g.setdefault(g, []).append((g, w))
    for g in range(num_g):
        pairs = xs_of_g.get(g, [])
        if pairs:
            row({names[("x", g, w, k)]: 1.0 for _, w in pairs for k in range(K)}, 1, 1)
    gs_on_w = {w: [g for g, ww in allowed if ww == w] for w in range(num_w)}
    for w in range(num_w):
        tail0, seg0, end0, _ = lanes[w].initial
        seg0, end0 = seg0 - now, end0 - now
        for k in range(K):
            here = {names[("x", g, w, k)]: 1.0 for g in gs_on_w[w]}
            if here:
                row(dict(here), -math.inf, 1)
            if k > 0 and here:
                coefs = dict(here)
                for g in gs_on_w[w]:
                    coefs[names[("x", g, w, k - 1)]] = -1.0
                row(coefs, -math.inf, 0)
            for m in models:
                coefs = {names[("z", w, k, m)]: 1.0}
                for g in gs_on_w[w]:
                    if stats[g].model == m:
                        coefs[names[("x", g, w, k)]] = -1.0
                        if k > 0:
                            coefs[names[("x", g, w, k - 1)]] = 1.0
                lo = -1.0 if (k == 0 and tail0 == m) else 0.0
                row(coefs, lo, math.inf)
            e, b = names[("E", w, k)], names[("B", w, k)]
            # E[w,k] >= E[w,k-1] + sum S x + sum c z
            coefs = {e: 1.0}
            for g in gs_on_w[w]:
                s = svc[(g, w)]
                assert s is not None
                coefs[names[("x", g, w, k)]] = -s.mean_s
            for m in models:
                if math.isfinite(swap_cost[(w, m)]):
                    coefs[names[("z", w, k, m)]] = -swap_cost[(w, m)]
            prev_e = names[("E", w, k - 1)] if k > 0 else None
            if prev_e is not None:
                coefs[prev_e] = -1.0
            row(coefs, 0.0 if prev_e is not None else end0, math.inf)
            # B[w,k] >= B[w,k-1]  (or the free time)
            if k > 0:
                row({b: 1.0, names[("B", w, k - 1)]: -1.0}, 0.0, math.inf)
            else:
                row({b: 1.0}, seg0, math.inf)
            # B[w,k] >= E[w,k-1] - sum lead x
            coefs = {b: 1.0}
            for g in gs_on_w[w]:
                s = svc[(g, w)]
                assert s is not None
                coefs[names[("x", g, w, k)]] = s.lead_s
            if prev_e is not None:
                coefs[prev_e] = -1.0
            row(coefs, 0.0 if prev_e is not None else end0, math.inf)
            # B[w,k] >= E[w,k-1] + c_m - M (1 - z)
            for m in models:
                c = swap_cost[(w, m)]
                if not math.isfinite(c):
                    continue
                coefs = {b: 1.0, names[("z", w, k, m)]: -(c + big_m)}
                if prev_e is not None:
                    coefs[prev_e] = -1.0
                row(coefs, -big_m if prev_e is not None else end0 - big_m, math.inf)
    for g, w in allowed:
        s = svc[(g, w)]
        assert s is not None
        t = names[("t", g)]
        for k in range(K):
            # t_g >= B[w,k] + prefill - M (1 - x)
            row({t: 1.0, names[("B", w, k)]: -1.0, names[("x", g, w, k)]: -big_m},
                s.prefill_s - big_m, math.inf)
    for g in range(num_g):
        t = names[("t", g)]
        spreads = [sv.spread_s for (gg, _), sv in svc.items() if gg == g and sv is not None]
        for j, (q, d) in enumerate(zip(DEADLINE_QUANTILES, stats[g].deadline_points,
                                       strict=True)):
            # the tightest M that keeps u = 0 feasible: how late t + q·spread can be
            m_gj = max(0.0, time_hi + q * max(spreads, default=0.0) - (d - now))
            coefs = {t: 1.0, names[("u", g, j)]: m_gj}
            for _, w in xs_of_g.get(g, []):
                s = svc[(g, w)]
                assert s is not None
                for k in range(K):
                    coefs[names[("x", g, w, k)]] = q * s.spread_s
            row(coefs, -math.inf, d - now + m_gj)

    objective = np.zeros(len(lower))
    eps = 1e-2 / max(1.0, horizon * num_g)
    for g in range(num_g):
        objective[names[("t", g)]] = eps
        for j in range(J):
            objective[names[("u", g, j)]] = -pc.weight(g) * stats[g].size / J
    r_idx, c_idx, vals = [], [], []
    for i, coefs in enumerate(rows):
        for c, v in coefs.items():
            r_idx.append(i)
            c_idx.append(c)
            vals.append(v)
    matrix = coo_array((vals, (r_idx, c_idx)), shape=(len(rows), len(lower))).tocsr()
    result = milp(
        objective,
        constraints=LinearConstraint(matrix, np.array(row_lo), np.array(row_hi)),
        integrality=np.array(integral),
        bounds=Bounds(np.array(lower), np.array(upper)),
        options={"time_limit": time_limit_s, "node_limit": node_limit, "presolve": True,
                 "mip_rel_gap": 1e-7},
    )
    if result.x is None:
        return f"status {result.status}: {result.message}"
    orders: list[list[tuple[int, int]]] = [[] for _ in range(num_w)]
    for g, w in allowed:
        for k in range(K):
            if result.x[names[("x", g, w, k)]] > 0.5:
                orders[w].append((k, g))
    final = tuple(tuple(g for _, g in sorted(o)) for o in orders)
    return Plan(final, pc.score(final), "milp" if result.status == 0 else "milp (budget hit)")


def attainment_bound(pc: PlanningContext) -> float:
    """An upper bound on any plan's value: every group alone on an idle worker of the
    shape that suits it best, starting now (no queue, no running work, no swap)."""
    reps = _shape_representatives(pc.cost)
    total = 0.0
    for gi, g in enumerate(pc.stats):
        best = 0.0
        for rep in reps:
            svc = pc.cost.service(gi, rep)
            if svc is not None:
                best = max(best, p_meet(g, svc, pc.now, 0.0))
        total += pc.weight(gi) * g.size * best
    return total


# ------------------------------------------------------------------ LSOs
def plan_swaps(pc: PlanningContext, plan: Plan) -> tuple[Swap, ...]:
    """A drained worker whose head group needs another model switches to it."""
    swaps = []
    for w, order in zip(pc.snapshot.workers, plan.orders, strict=True):
        if not order or w.swapping_until is not None or w.running:
            continue
        head = pc.stats[order[0]].model
        if head != w.active_model:
            swaps.append(Swap(w.id, head))
    return tuple(swaps)


def plan_evictions(pc: PlanningContext, plan: Plan, options: Mapping[str, Any]
                   ) -> tuple[Evict, ...]:
    """Make room for the groups at the head of a worker's lane whose earliest requests
    would miss waiting for free slots.

    For each in-time group k among the first ``evict_lookahead_groups`` of the lane (of
    the worker's active model, before any swap): the slots groups 1..k need, min(their
    total size, steady batch), less the requests of groups 1..k a pull would admit now
    (free slots and KV headroom, walked as :func:`qlm.core.pulls.plan_pulls` walks them),
    less the running requests expected to finish before group k's earliest deadlines.
    Those decode at ``evict_rate_credit`` of the modelled per-slot rate during the
    group's slack or, with ``evict_prefill_aware``, only in the time before its deadline
    that prefilling the prompts ahead leaves (those of running requests without a first
    token and of groups 1..k): vLLM mixes prompt chunks into its decode steps. The
    largest shortfall is evicted, each request only for a group of a tighter class than
    its own, in :attr:`WorkerLoad.eviction_order` (past their first token first: their
    TTFT SLO is settled). They keep their progress. Requests of a group's own class are
    never taken for it: they would return to a group of the same deadlines and be
    pulled right back. A group whose deadlines have all passed is never evicted for,
    but its requests count: a pull admits them first.

    Looking past the head group (``evict_lookahead_groups`` > 1) helps bursts: several
    groups of one class arrive within a few seconds, the slots that free up serve the
    first, and evictions for the next start only once it is the head, its slack gone.
    Under sustained overload it evicts batch work for groups that miss anyway (see
    docs/results/gpu/README.md), hence the default of 1; ``evict_prefill_aware`` is off
    by default for the same reason.
    """
    if not options["evict"]:
        return ()
    credit = float(options["evict_rate_credit"])
    state_swaps = bool(options["kv_state_swap"])
    evictions: list[Evict] = []
    for wi, (w, order) in enumerate(zip(pc.snapshot.workers, plan.orders, strict=True)):
        if not order or w.swapping_until is not None or not w.running:
            continue
        if pc.stats[order[0]].model != w.active_model:
            continue
        load = pc.loads[wi]
        # Two queues, each in descending TTFT SLO: past their first token, then the rest.
        parts = (load.eviction_order[:load.num_started], load.eviction_order[load.num_started:])
        cursors = [0, 0]
        taken = 0
        lookahead = order[:max(1, int(options["evict_lookahead_groups"]))]
        for gi, short in _shortfalls(pc, wi, lookahead, credit,
                                     bool(options["evict_prefill_aware"])):
            head = pc.stats[gi]
            reason = f"slo:{head.key}"
            for p, part in enumerate(parts):
                while taken < short and cursors[p] < len(part):
                    rr = part[cursors[p]]
                    if rr.request.slo.ttft_s <= head.ttft_s:
                        break  # past the looser ones, none qualifies for this group
                    evictions.append(Evict(w.id, rr.request.id, reason, state_swaps
                                           and _state_swap_pays(pc, wi, rr, options)))
                    cursors[p] += 1
                    taken += 1
    return tuple(evictions)


def _shortfalls(pc: PlanningContext, wi: int, order: Sequence[int], credit: float,
                prefill_aware: bool) -> list[tuple[int, int]]:
    """(group, slots short) for the in-time groups at the head of ``order`` that are short,
    in lane order (see :func:`plan_evictions`)."""
    now, cost = pc.now, pc.cost
    load = pc.loads[wi]
    p = cost.profiles.get(pc.stats[order[0]].model, pc.snapshot.workers[wi].gpu)
    remaining = load.remaining_sorted
    prompt_tokens = float(load.pending_prefill_tokens)  # to prefill before group k's first token
    admitted = total = 0
    out: list[tuple[int, int]] = []
    for gi, num_admitted in _pull_walk(pc, wi, order):
        g = pc.stats[gi]
        svc = cost.service(gi, wi)
        if svc is None:
            break  # no profile for it here: nothing to size evictions by
        admitted += num_admitted
        total += g.size
        prompt_tokens += g.size * g.mean_prompt
        slack_s = g.deadline_points[0] - now - svc.prefill_s
        if g.latest_deadline_at - now - svc.prefill_s < 0 or math.isinf(slack_s):
            continue  # all late already, or nothing left to meet: evicting cannot help it
        # Running requests decode only in the time the prompts ahead leave: vLLM mixes
        # prompt chunks into its decode steps, which then take that much longer.
        decode_s = (g.deadline_points[0] - now - p.prefill_s(round(prompt_tokens))
                    if prefill_aware else slack_s)
        per_slot_rate = credit * svc.tokens_per_s / svc.batch
        freed = _count_at_most(remaining, max(0.0, decode_s) * per_slot_rate)
        short = min(total, svc.batch) - admitted - freed
        if short > 0:
            out.append((gi, short))
    return out


def _pull_walk(pc: PlanningContext, wi: int, order: Iterable[int]
               ) -> Iterator[tuple[int, int]]:
    """(group, how many of its requests a pull would admit now) for the groups of
    ``order`` until one of another model than worker ``wi``'s active one (a swap comes
    first: nothing after it starts on this model's slots).

    The walk of :func:`qlm.core.pulls.plan_pulls`: free batch slots, then each request's
    KV reservation against the headroom, in order, until one does not fit; the running
    requests' reservations come from the memoised worker summary.
    """
    w, load = pc.snapshot.workers[wi], pc.loads[wi]
    model = w.active_model
    if model is None:
        return
    p = pc.cost.profiles.get(model, w.gpu)
    free_slots = min(w.max_batch_size, p.max_batch_size) - w.batch_size
    headroom = min(w.kv_capacity_tokens, p.kv_capacity_tokens) - load.kv_reserved_tokens
    for gi in order:
        g = pc.stats[gi]
        if g.model != model:
            return
        admitted = 0
        for r in pc.snapshot.groups[g.index].requests:
            need = kv_reservation(r, DEFAULT_EXPECTED_OUTPUT_TOKENS)
            if free_slots <= 0 or need > headroom:
                free_slots = 0
                break
            admitted += 1
            free_slots -= 1
            headroom -= need
        yield gi, admitted


def _count_at_most(sorted_values: Sequence[float], limit: float) -> int:
    import bisect

    return bisect.bisect_right(sorted_values, limit)


def _state_swap_pays(pc: PlanningContext, wi: int, rr: Any, options: Mapping[str, Any]) -> bool:
    """True when copying the KV state to CPU and back beats recomputing it by prefill.

    Copy time: 2 · context tokens · ``notes.kv_bytes_per_token`` / ``pcie_gb_per_s``
    (per GPU of a tensor-parallel instance the bytes and the links both divide).
    """
    if not options["kv_state_swap"]:
        return False
    w = pc.snapshot.workers[wi]
    profile = pc.cost.profiles.get(rr.request.model, w.gpu)
    bytes_per_token = float(profile.notes.get("kv_bytes_per_token", 0.0) or 0.0)
    if bytes_per_token <= 0:
        return False
    tokens = rr.request.context_tokens
    copy_s = 2.0 * tokens * bytes_per_token / (float(options["pcie_gb_per_s"]) * 1e9
                                               * profile.num_gpus)
    return copy_s < profile.prefill_s(tokens)


def unservable_groups(pc: PlanningContext) -> list[int]:
    """Indices of the groups that no worker of the snapshot can serve."""
    reps = _shape_representatives(pc.cost)
    return [gi for gi in range(len(pc.stats))
            if all(pc.cost.service(gi, rep) is None for rep in reps)]


def plan_rejections(pc: PlanningContext, options: Mapping[str, Any]) -> tuple[Reject, ...]:
    rejected: list[Reject] = []
    seen: set[str] = set()
    if options["reject_unservable"]:
        for gi in unservable_groups(pc):
            model = pc.stats[gi].model
            for r in pc.snapshot.groups[gi].requests:
                rejected.append(Reject(r.id, f"no worker can serve model {model}"))
                seen.add(r.id)
    if options["reject_late"]:
        rejected.extend(Reject(r.id, "deadline passed") for g in pc.snapshot.groups
                        for r in g.requests if r.deadline_at < pc.now and r.id not in seen)
    return tuple(rejected)


# ------------------------------------------------------------------ policy
def merged_options(base: Mapping[str, Any], ctx: PolicyContext) -> dict[str, Any]:
    """The defaults, overridden by the policy's own options, then by the context's."""
    return checked_options({**base, **ctx.options})


def checked_options(given: Mapping[str, Any]) -> dict[str, Any]:
    options = dict(DEFAULT_OPTIONS)
    options.update(given)
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise InvalidInput("options", f"unknown qlm option(s): {', '.join(sorted(unknown))}")
    return options


def class_weights(options: Mapping[str, Any]) -> dict[SLOClass, float]:
    out: dict[SLOClass, float] = {}
    for name, value in dict(options["class_weights"]).items():
        if not (isinstance(value, int | float) and value >= 0):
            raise InvalidInput(f"options.class_weights.{name}", "must be a number >= 0")
        out[SLOClass(name)] = float(value)
    return out


@register("qlm")
class QlmPolicy:
    """The qlm global scheduler (see the module docstring). Options: :data:`DEFAULT_OPTIONS`.

    The instance memoises per-group and per-worker summaries between decisions; the
    decision itself depends only on ``snapshot`` and ``ctx``.
    """

    name: ClassVar[str] = "qlm"

    #: Score every plan (tests and diagnostics); decisions do not need it.
    always_score: bool = False

    def __init__(self, **options: Any) -> None:
        self.options = options
        class_weights(checked_options(options))  # a bad option fails here, not mid-run
        self._groups = GroupStatsCache()
        self._workers = WorkerLoadCache()

    def planning_context(self, snapshot: QueueSnapshot, ctx: PolicyContext,
                         options: Mapping[str, Any]) -> PlanningContext:
        output_stats = output_stats_from(options)
        stats = self._groups.refresh(snapshot.groups, output_stats, ctx.profiles)
        loads = self._workers.refresh(snapshot.workers, output_stats)
        return PlanningContext(snapshot, ctx, stats, loads, output_stats, class_weights(options),
                               self._groups.memos, float(options["service_scale"]))

    def plan(self, snapshot: QueueSnapshot, ctx: PolicyContext) -> tuple[PlanningContext, Plan]:
        options = merged_options(self.options, ctx)
        pc = self.planning_context(snapshot, ctx, options)
        cells = len(pc.stats) * len(snapshot.workers)
        use_milp = bool(pc.stats) and cells <= int(options["milp_max_cells"])
        heuristic = heuristic_plan(pc, options, score=use_milp or self.always_score)
        if not use_milp or heuristic.value >= attainment_bound(pc) - 1e-3 * len(pc.stats):
            return pc, heuristic  # nothing for the MILP to win
        exact = milp_plan(pc, float(options["milp_time_limit_s"]),
                          int(options["milp_node_limit"]))
        if isinstance(exact, str):
            return pc, Plan(heuristic.orders, heuristic.value, f"heuristic (milp: {exact})")
        return pc, exact if exact.value >= heuristic.value - 1e-3 else heuristic

    def decide(self, snapshot: QueueSnapshot, ctx: PolicyContext) -> Decision:
        options = merged_options(self.options, ctx)
        pc, plan = self.plan(snapshot, ctx)
        keys = [g.key for g in pc.stats]
        placements = tuple(Place(w.id, tuple(keys[g] for g in order))
                           for w, order in zip(snapshot.workers, plan.orders, strict=True))
        decision = Decision(
            placements=placements,
            evictions=plan_evictions(pc, plan, options),
            swaps=plan_swaps(pc, plan),
            rejections=plan_rejections(pc, options),
        )
        return replace(decision, pulls=plan_pulls_for(pc, decision))


def plan_pulls_for(pc: PlanningContext, decision: Decision) -> tuple[Pull, ...]:
    """The shared backpressure pulls of ``decision``, as :func:`qlm.core.pulls.with_pulls`
    computes them (a test holds the two equal).

    Workers that evict or swap in this decision pull nothing (as in ``with_pulls``). The
    walk is :func:`_pull_walk`'s. No request is excluded: a group sits on one worker only.
    """
    profiles = pc.cost.profiles
    busy = {e.worker_id for e in decision.evictions} | {s.worker_id for s in decision.swaps}
    groups, by_key = pc.snapshot.groups, pc.stats_by_key
    pulls = []
    for wi, (place, w) in enumerate(zip(decision.placements, pc.snapshot.workers, strict=True)):
        model = w.active_model
        if not place.order or model is None or w.swapping_until is not None or w.id in busy:
            continue
        if place.order[0].model != model or not profiles.has(model, w.gpu):
            continue
        ids: list[str] = []
        for gi, n in _pull_walk(pc, wi, (by_key[key].index for key in place.order)):
            requests = groups[pc.stats[gi].index].requests
            ids.extend(r.id for r in requests[:n])
            if n < len(requests):
                break  # no room left for the groups after it
        if ids:
            pulls.append(Pull(w.id, tuple(ids)))
    return tuple(pulls)
