"""``shepherd``: a SHEPHERD-style preemptive, goodput-maximising planner (Zhang et al., NSDI'23).

SHEPHERD's online scheduler (Flex) serves, on every GPU that frees up, the largest batch
of queued requests that can still meet their deadlines, and preempts a running batch
when a candidate batch that would otherwise miss is at least λ times as valuable. Here
the unit is a request group and the GPU a worker:

1. **Plan**: workers are taken in order of when they drain (running work plus what is
   already planned on them). The next one receives, among the ``window`` earliest-
   deadline groups it can serve, the group with the most requests expected to meet
   their deadline if it starts there (goodput = size·p_meet, ties by deadline). A group
   with no goodput anywhere is not planned ahead of others: it is appended at the end.
2. **Not swap-aware**: the plan prices every model swap at zero (the simulator still
   charges it); a worker simply swaps when its head group needs another model and it
   has drained.
3. **Preemption**: when a worker's head group would miss waiting for free slots but
   meets starting now, and its goodput is at least ``preempt_factor`` × the number of
   running requests that must go, those requests are evicted (least progress first,
   whatever their class — SHEPHERD values every request alike). A head group of another
   model preempts everything running on the worker, then it swaps.

Pulls are the shared backpressure pulls (:func:`qlm.core.pulls.with_pulls`).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from qlm.core.estimator import LengthStats
from qlm.core.policies.base import (
    ContextOptions,
    PolicyContext,
    QueueOrder,
    by_deadline,
    option,
    parse_options,
    register,
)
from qlm.core.policies.planning import (
    CostModel,
    GroupStatsCache,
    Lane,
    WorkerLoadCache,
    output_stats_from,
    p_meet,
    walk,
)
from qlm.core.pulls import DEFAULT_EXPECTED_OUTPUT_TOKENS, with_pulls
from qlm.core.types import Decision, Evict, Place, QueueSnapshot, Swap


@dataclass(frozen=True, slots=True)
class ShepherdOptions:
    """Options of ``shepherd``."""

    window: int = option(32, "earliest-deadline groups a free worker chooses from", ge=1)
    preempt_factor: float = option(
        2.0, "λ: preempt when the new group's goodput ≥ λ × requests preempted", ge=0)
    min_goodput_p: float = option(
        0.02, "a group expected to meet less than this fraction is planned last", ge=0)
    output_stats: Mapping[str, Any] = option(
        {}, "per-model output length {model: [mean, std]}; '*' covers the others")

    def __post_init__(self) -> None:
        object.__setattr__(self, "output_stats", output_stats_from(self.output_stats))


@register("shepherd")
class ShepherdPolicy:
    """See the module docstring. Options: :class:`ShepherdOptions`."""

    name: ClassVar[str] = "shepherd"
    options_type: ClassVar[type[Any]] = ShepherdOptions
    queue_order: ClassVar[QueueOrder] = staticmethod(by_deadline)

    def __init__(self, options: ShepherdOptions | None = None, **given: Any) -> None:
        self.options = parse_options(ShepherdOptions, given, policy=self.name,
                                     base=options or ShepherdOptions())
        self._context = ContextOptions(ShepherdOptions, self.options, self.name)
        self._groups = GroupStatsCache()
        self._workers = WorkerLoadCache()

    def decide(self, snapshot: QueueSnapshot, ctx: PolicyContext) -> Decision:
        options: ShepherdOptions = self._context.of(ctx)
        output_stats: dict[str, LengthStats] = dict(options.output_stats)
        stats = self._groups.refresh(snapshot.groups, output_stats, ctx.profiles)
        loads = self._workers.refresh(snapshot.workers, output_stats)
        cost = CostModel(ctx.profiles, snapshot.workers, stats, output_stats, charge_swaps=False,
                         memos=self._groups.memos)
        now = snapshot.now
        lanes = [Lane(i, w, loads[i], cost, now) for i, w in enumerate(snapshot.workers)]
        window = options.window
        min_p = options.min_goodput_p

        sizes = [g.size for g in stats]
        firsts = [g.deadline_points[0] for g in stats]
        pending = sorted(range(len(stats)), key=lambda i: (firsts[i], stats[i].key))
        servable = {gi for gi in pending
                    if any(cost.service(gi, lane.index) is not None for lane in lanes)}
        pending = [gi for gi in pending if gi in servable]
        hopeless: list[int] = []
        heap = [(lane.end_at, lane.index) for lane in lanes]
        heapq.heapify(heap)
        blocked: set[int] = set()
        while pending and heap:
            _, li = heapq.heappop(heap)
            lane = lanes[li]
            best: tuple[float, float, int] | None = None
            for gi in pending[:window]:
                # skip a group that cannot outrank the best so far (found earlier in
                # deadline order): its goodput is at most its size (p_meet ≤ 1), and at
                # equal goodput the later deadline ranks behind
                if best is not None and (sizes[gi] < -best[0] or (
                        sizes[gi] == -best[0] and firsts[gi] > best[1])):
                    continue
                slot = lane.slot_for(gi, cost)
                if slot is None:
                    continue
                goodput = stats[gi].size * slot.p_meet
                rank = (-goodput, stats[gi].deadline_points[0], gi)
                if best is None or rank < best:
                    best = rank
            if best is None:
                blocked.add(li)  # serves none of the first groups; retried after them
                continue
            gi = best[2]
            pending.remove(gi)
            if -best[0] < min_p * stats[gi].size:
                hopeless.append(gi)
                heapq.heappush(heap, (lane.end_at, li))
                continue
            slot = lane.slot_for(gi, cost)
            assert slot is not None
            lane.append(gi, slot, cost)
            heapq.heappush(heap, (lane.end_at, li))
            if blocked:
                for b in blocked:
                    heapq.heappush(heap, (lanes[b].end_at, b))
                blocked.clear()
        for gi in [*hopeless, *pending]:
            cands = [lane for lane in lanes if cost.service(gi, lane.index) is not None]
            target = min(cands, key=lambda lane: (lane.end_at, lane.index))
            slot = target.slot_for(gi, cost)
            assert slot is not None
            target.append(gi, slot, cost)

        keys = [g.key for g in stats]
        placements = tuple(Place(lane.worker.id, tuple(keys[g] for g in lane.order))
                           for lane in lanes)
        evictions, swaps = self._preempt_and_swap(snapshot, cost, lanes, loads, options)
        decision = Decision(placements=placements, evictions=evictions, swaps=swaps)
        return with_pulls(decision, snapshot, ctx.profiles, DEFAULT_EXPECTED_OUTPUT_TOKENS)

    def _preempt_and_swap(self, snapshot: QueueSnapshot, cost: CostModel, lanes: list[Lane],
                          loads: list[Any], options: ShepherdOptions
                          ) -> tuple[tuple[Evict, ...], tuple[Swap, ...]]:
        now = snapshot.now
        factor = options.preempt_factor
        evictions: list[Evict] = []
        swaps: list[Swap] = []
        for lane in lanes:
            w = lane.worker
            if not lane.order or w.swapping_until is not None:
                continue
            gi = lane.order[0]
            g = cost.stats[gi]
            if not w.running:
                if g.model != w.active_model:
                    swaps.append(Swap(w.id, g.model))
                continue
            svc = cost.service(gi, lane.index)
            if svc is None:
                continue
            fresh = Lane(lane.index, w, loads[lane.index], cost, now)
            queued = walk(cost, fresh, [gi])[0].p_meet
            started_now = p_meet(g, svc, now, 0.0)
            gain = g.size * (started_now - queued)
            if gain <= 0:
                continue
            if g.model != w.active_model:
                victims = list(w.running)
            else:
                need = min(g.size, svc.batch) - max(0, svc.batch - w.batch_size)
                if need <= 0:
                    continue
                victims = sorted(w.running, key=lambda rr: (rr.request.num_generated,
                                                            -rr.started_at, rr.request.id))[:need]
            if gain >= factor * len(victims):
                evictions.extend(Evict(w.id, rr.request.id, reason=f"shepherd:{g.key}")
                                 for rr in victims)
        return tuple(evictions), tuple(swaps)
