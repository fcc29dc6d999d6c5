"""The ``qlm`` heuristic planner (steps 1–6 of the package docstring): deadline order,
candidate lanes from heaps, weighted Moore–Hodgson displacement, adjacent-swap local
search, the placement of groups whose deadlines have all passed, and each model's
settled work in one run."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

from qlm.core.policies.planning import (
    CostModel,
    Lane,
    Slot,
    lane_terms,
    lane_value,
    new_slot,
    p_meet,
    place_after,
    rewalk,
    state_before,
    walk,
)
from qlm.core.policies.qlm.context import (
    Plan,
    PlanningContext,
    shape_reach,
    shape_representatives,
)
from qlm.core.policies.qlm.options import QlmOptions

#: p_meet at which ``spare_versatile`` may move a group to a less versatile shape.
SURE_P = 0.999
#: A group whose p_meet is at most this, or at least 1 − this, is settled (step 6).
SETTLED_P = 0.01


class _Heaps:
    """Least-drained lanes per (shape, tail model), (shape, resident model) and shape;
    ``resident=False`` keeps no heaps of resident models (:meth:`earliest_end` does not
    ask them)."""

    def __init__(self, lanes: Sequence[Lane], cost: CostModel, resident: bool = True) -> None:
        self.cost = cost
        self.tail: dict[tuple[int, str | None], list[tuple[float, int, int]]] = {}
        self.resident: dict[tuple[int, str], list[tuple[float, int, int]]] = {}
        self.any: dict[int, list[tuple[float, int, int]]] = {}
        self._with_resident = resident
        for lane in lanes:
            self.push(lane)

    def push(self, lane: Lane) -> None:
        shape = self.cost.shape_of[lane.index]
        entry = (lane.end_at, lane.index, lane.version)
        tail = lane.tail
        heapq.heappush(self.tail.setdefault((shape, tail), []), entry)
        if self._with_resident:
            resident = self.resident
            for m in lane.worker.models:
                if m != tail:  # ending with m already: the tail heap has it, no swap
                    heapq.heappush(resident.setdefault((shape, m), []), entry)
        heapq.heappush(self.any.setdefault(shape, []), entry)

    @staticmethod
    def top(heap: list[tuple[float, int, int]] | None, lanes: Sequence[Lane]) -> Lane | None:
        while heap:
            _, index, version = heap[0]
            lane = lanes[index]
            if lane.version == version:
                return lane
            heapq.heappop(heap)
        return None

    def candidates(self, model: str, shapes: Sequence[int], lanes: Sequence[Lane]) -> list[Lane]:
        """Per shape: the least-drained lane ending with ``model`` (no swap), then the
        least-drained one where it sleeps (wake) and the least-drained overall (load),
        each only if it drains earlier than the ones before — otherwise it is dominated
        (starts no earlier and pays at least as much swap)."""
        found: dict[int, Lane] = {}
        tail, resident, any_ = self.tail, self.resident, self.any
        pop = heapq.heappop
        for shape in shapes:
            bound = math.inf
            key = (shape, model)
            for heap in (tail.get(key), resident.get(key), any_.get(shape)):
                while heap:  # :meth:`top`, inlined (a dozen heaps per group placed)
                    _, index, version = heap[0]
                    lane = lanes[index]
                    if lane.version == version:
                        if lane.end_at < bound:
                            found[index] = lane
                            bound = lane.end_at
                        break
                    pop(heap)
        return [found[i] for i in sorted(found)]

    def earliest_end(self, gi: int, shapes: Sequence[int], lanes: Sequence[Lane]
                     ) -> Lane | None:
        """The lane that would finish group ``gi`` first, among each shape's least-drained
        lane ending with its model and least-drained lane overall (late groups only need
        to be served soon, not at the best position).

        A shape whose least-drained lane would end ``gi`` later than the best found so far
        even with no swap is passed over: its lanes' ends are that at least (times only
        grow by what the walk adds)."""
        cost = self.cost
        model = cost.stats[gi].model
        top, tail, any_ = self.top, self.tail, self.any
        best: Lane | None = None
        best_end = 0.0
        for shape in shapes:
            least = top(any_.get(shape), lanes)
            if least is None:
                continue  # no lane of this shape
            svc = cost.shape_service(gi, shape)  # the same for every lane of the shape
            assert svc is not None
            mean = svc.mean_s
            if best is not None and least.end_at + mean > best_end:
                continue
            same = top(tail.get((shape, model)), lanes)
            for lane in (least,) if same is None or same is least else (same, least):
                end = lane.end_at + mean
                lane_tail = lane.tail
                if lane_tail != model:
                    end += cost.swap_s(lane.index, model, lane_tail)
                    if lane_tail is not None and lane.end_at > lane.seg_start_at:
                        end += cost.drain_tail_s(lane.index, lane_tail)
                # the least (end, lane index)
                if best is None or end < best_end or (end == best_end
                                                      and lane.index < best.index):
                    best, best_end = lane, end
        return best


def heuristic_plan(pc: PlanningContext, options: QlmOptions, score: bool = True) -> Plan:
    """The heuristic of the package docstring; ``score=False`` skips the final scoring walk."""
    cost, stats = pc.cost, pc.stats
    lanes = pc.fresh_lanes()
    heaps = _Heaps(lanes, cost)
    shape_reps = shape_representatives(cost)
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
    reach = shape_reach(pc) if options.spare_versatile else None
    hopeless_p = options.hopeless_p
    displace_below = options.displace_below_p
    deferred: list[int] = []
    late: list[int] = []
    for gi in pc.urgency_order():
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

    behind_of_model: dict[str, list[int]] = {}

    def shapes_behind(gi: int) -> list[int]:
        """Where a deferred or late group may go: with ``spare_versatile``, only on the
        least versatile shapes that serve it (per model: asked of every late group)."""
        model = stats[gi].model
        shapes = behind_of_model.get(model)
        if shapes is None:
            shapes = shapes_for(gi)
            if reach is not None and shapes:
                least = min(reach[s] for s in shapes)
                shapes = [s for s in shapes if reach[s] == least]
            behind_of_model[model] = shapes
        return shapes

    lane_walks = _improve(pc, lanes, options.improve_budget)
    # Hopeless and displaced groups count (almost) nothing wherever they go, like late
    # ones: each goes as early as it costs nobody, not behind the whole backlog.
    lane_walks = _insert_late(pc, lanes, [*deferred, *late], shapes_behind,
                              options.late_insert_budget, lane_walks)
    _serve_in_runs(pc, lanes, lane_walks)
    orders = tuple(tuple(lane.order) for lane in lanes)
    return Plan(orders, pc.score(orders) if score else math.nan, "heuristic")


def _insert_late(pc: PlanningContext, lanes: Sequence[Lane], late: Sequence[int],
                 shapes_for: Callable[[int], list[int]], budget: int,
                 lane_walks: dict[int, list[Slot]] | None = None) -> dict[int, list[Slot]]:
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
    of float noise. ``lane_walks``: per lane index, the walk of its order (what the local
    search walked), not walked again. Returns the walks of the lanes as they are now (those
    it knows: a lane left out is walked by whoever needs it).
    """
    if not late:
        return dict(lane_walks or {})
    cost, stats = pc.cost, pc.stats
    heaps = _Heaps(lanes, cost, resident=False)  # the local search reset lanes: fresh heaps
    floor: dict[int, int] = {}  # per lane: the position after its last late group
    lane_slots = dict(lane_walks or {})  # per lane: the walk of its current order
    placing = set(late)
    for gi in [gi for gi in pc.deadline_order() if gi in placing]:
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
            pos, budget, walked = _harmless_position(pc, target, slots, gi,
                                                     floor.get(target.index, 0), budget)
            kept = slots[:pos]
            if walked:  # the search walked gi and the groups behind it: no walk again
                first = walked[0]
                svc = cost.service(gi, target.index)
                assert svc is not None
                walked[0] = new_slot(Slot, (*first[:-1], p_meet(stats[gi], svc, first.start_at,
                                                                  first.start_var)))
                kept = [*kept, *walked]
            lane_slots[target.index] = target.reset(
                [*target.order[:pos], gi, *target.order[pos:]], cost, kept)
            floor[target.index] = pos + 1
        heaps.push(target)
    return lane_slots


def _serve_in_runs(pc: PlanningContext, lanes: Sequence[Lane],
                   lane_walks: dict[int, list[Slot]]) -> None:
    """Step 6: each model's settled work in one run, so that a worker swaps models only
    where the swap serves a deadline.

    A group is *settled* where its ``p_meet`` is at most :data:`SETTLED_P` or at least
    1 − :data:`SETTLED_P`: met with slack (a batch job due in an hour) or lost (its
    deadlines passed, or hopeless where it sits). Steps 1–5 leave such groups in deadline
    order, one model after another, and every change of model on a lane is a drain and a
    swap: under a backlog of several models a worker then swaps every few seconds and
    serves ever-draining batches (WB on trace replays: 91 swaps where fcfs made 3, at
    0.6× its throughput). Here each stretch of consecutive settled groups is put together
    by model, each model's groups in their order; the runs go first the model fewest
    workers can serve (the work only this worker can do is not left for last), then the
    model the stretch starts from (no swap), then in order of first appearance. The
    grouping is kept only where no group of the lane loses more than :data:`SETTLED_P` of
    its ``p_meet``, the lane's value does not drop and its work drains no later: a swap
    that serves a deadline stays. All the lane's stretches are tried at once, then, if
    that fails, each on its own (left to right, each kept if it passes). With fair share
    binding, a stretch whose grouping would put a group ahead of one that fair share keeps
    before it is left as it is. ``lane_walks`` gives the walks of the lanes it holds (the
    others are walked here)."""
    cost, stats = pc.cost, pc.stats
    binds = pc.fair_order_binds()
    for lane in lanes:
        order = lane.order
        if len(order) < 2:
            continue
        first_model = stats[order[0]].model
        if all(stats[gi].model == first_model for gi in order):
            continue  # one model: nothing to put together
        slots = lane_walks.get(lane.index)
        if slots is None:
            slots = walk(cost, lane, order)
        changes = _stretch_runs(pc, lane, order, slots, binds)
        if not changes:
            continue
        tries = [changes] if len(changes) == 1 else [changes, *([c] for c in changes)]
        for tried in tries:
            regrouped = list(order)
            for start, together in tried:
                regrouped[start:start + len(together)] = together
            first = tried[0][0]
            fresh = walk(cost, lane, regrouped[first:],
                         state_before(cost, lane, order, slots, first))
            if _loses_nothing(pc, order[first:], slots[first:], regrouped[first:], fresh):
                order, slots = regrouped, [*slots[:first], *fresh]
                lane.reset(order, cost, slots)
                if tried is changes:
                    break


def _loses_nothing(pc: PlanningContext, order: Sequence[int], slots: Sequence[Slot],
                   regrouped: Sequence[int], fresh: Sequence[Slot]) -> bool:
    """Whether ``regrouped`` (walked: ``fresh``), a reordering of ``order`` (``slots``),
    drains no later, has no less value and lowers no group's ``p_meet`` by more than
    :data:`SETTLED_P` (a group met with slack may start a little later)."""
    if fresh[-1].end_at > slots[-1].end_at + 1e-9:
        return False
    was = {gi: s.p_meet for gi, s in zip(order, slots, strict=True)}
    if any(s.p_meet < was[gi] - SETTLED_P for gi, s in zip(regrouped, fresh, strict=True)):
        return False
    cost, weights = pc.cost, pc.weights
    value = sum(lane_terms(cost, order, slots, weights))
    return sum(lane_terms(cost, regrouped, fresh, weights)) >= value - 1e-9 * (1.0 + value)


def _settled(slot: Slot) -> bool:
    """Whether a group in ``slot`` is surely met or surely missed there (step 6)."""
    return not SETTLED_P < slot.p_meet < 1.0 - SETTLED_P


def _stretch_runs(pc: PlanningContext, lane: Lane, order: Sequence[int],
                  slots: Sequence[Slot], binds: bool) -> list[tuple[int, list[int]]]:
    """The stretches of settled groups of ``order`` (walked: ``slots``) that grouping by
    model changes, each as its start and its groups so grouped (:func:`_serve_in_runs`)."""
    stats = pc.cost.stats
    changes: list[tuple[int, list[int]]] = []
    k, n = 0, len(order)
    while k < n:
        if not _settled(slots[k]):
            k += 1
            continue
        j = k + 1
        while j < n and _settled(slots[j]):
            j += 1
        stretch = order[k:j]
        runs: dict[str, list[int]] = {}
        for gi in stretch:
            runs.setdefault(stats[gi].model, []).append(gi)
        if len(runs) > 1:
            before = stats[order[k - 1]].model if k else lane.initial[0]
            # a stable sort: models that tie keep their order of first appearance
            ranked = sorted(runs, key=lambda m: (pc.num_workers_serving(m), m != before))
            together = [gi for m in ranked for gi in runs[m]]
            if together != stretch and not (binds and not pc.respects_fair_order([together])):
                changes.append((k, together))
        k = j
    return changes


def _harmless_position(pc: PlanningContext, lane: Lane, slots: Sequence[Slot], gi: int,
                       floor: int, budget: int) -> tuple[int, int, list[Slot]]:
    """The earliest position ≥ ``floor`` in ``lane`` (whose walk is ``slots``) where
    inserting ``gi`` lowers no later group's value (scanning from the back, stopping at
    the first that does), the budget left, and the walk of ``gi`` and the groups behind
    it from that position (``gi``'s ``p_meet`` left at 0; empty: ``gi`` goes last)."""
    cost, order = pc.cost, lane.order
    best, suffix = len(order), 0.0
    best_walk: list[Slot] = []
    for k in range(len(order) - 1, floor - 1, -1):
        steps = len(order) - k + 1
        if steps > budget:
            break
        budget -= steps
        suffix += pc.weight(order[k]) * cost.stats[order[k]].size * slots[k].p_meet
        tail, seg, end, var = state_before(cost, lane, order, slots, k)
        delayed = 0.0
        walked = []
        for g in (gi, *order[k:]):
            svc = cost.service(g, lane.index)
            assert svc is not None  # the lane serves every group placed on it
            slot = place_after(cost, lane.index, cost.stats[g], svc, tail, seg, end, var,
                               with_p=g != gi)
            walked.append(slot)
            if g != gi:
                delayed += pc.weight(g) * cost.stats[g].size * slot.p_meet
            tail, seg, end, var = cost.stats[g].model, slot.seg_start_at, slot.end_at, slot.end_var
        if delayed < suffix - 1e-9 * (1.0 + suffix):
            break
        best, best_walk = k, walked
    return best, budget, best_walk


def _best_slot(gi: int, candidates: Sequence[Lane], cost: CostModel,
               reach: Sequence[int] | None = None) -> tuple[Lane | None, Slot | None]:
    """Among the candidates (in lane order) within 0.02 of the best p_meet: the least
    versatile shape (with ``reach``), then the earliest drain."""
    valid = []
    best_p = -math.inf
    for lane in candidates:
        s = lane.slot_for(gi, cost)
        if s is not None:
            valid.append((lane, s))
            if s.p_meet > best_p:
                best_p = s.p_meet
    if not valid:
        return None, None
    least_p = best_p - 0.02
    good = [(lane, s) for lane, s in valid if s.p_meet >= least_p]
    earliest = good[0]  # the least (end, lane index): candidates come in lane order
    for lane, s in good:
        if s.end_at < earliest[1].end_at:
            earliest = (lane, s)
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
        if not pc.may_displace(lane.order[pos], gi):
            continue  # fair share: another tenant's group is not dropped for gi
        trial = [*lane.order[:pos], *lane.order[pos + 1:], gi]
        gain = lane_value(cost, lane, trial, pc.weights) - base
        if gain > best_gain:
            best_gain, best_pos = gain, pos
    if best_pos < 0:
        return None
    removed = lane.order[best_pos]
    lane.reset([*lane.order[:best_pos], *lane.order[best_pos + 1:], gi], cost)
    return removed


def _improve(pc: PlanningContext, lanes: Sequence[Lane], budget: int
             ) -> dict[int, list[Slot]]:
    """Adjacent swaps inside each lane that raise its value, until no gain or no budget;
    returns the walks of the lanes it walked (lane index → the slots of its order).

    Each trial walks only what the swap changes: the groups before the pair keep their
    slots, and those after it are walked again only until the walk is back in the state
    it had there before the swap (:func:`rewalk`); the value is the sum of the same
    terms in the same order as :func:`lane_value`'s, so it is the same float."""
    cost, weights = pc.cost, pc.weights
    stats = cost.stats
    walked: dict[int, list[Slot]] = {}
    for lane in lanes:
        if len(lane.order) < 2 or budget <= 0:
            continue
        slots = walked[lane.index] = walk(cost, lane, lane.order)
        if all(s.p_meet > 0.99 or s.p_meet < 0.01 for s in slots):
            continue  # every group surely met or surely missed: no adjacent swap helps
        current = lane.order
        terms = lane_terms(cost, current, slots, weights)
        value = sum(terms)  # = lane_value
        improved = True
        while improved and budget > 0:
            improved = False
            for i in range(len(current) - 1):
                if budget <= 0:
                    break
                if pc.fair_before(current[i], current[i + 1]):
                    continue  # fair share keeps this pair in order
                trial = [*current[:i], current[i + 1], current[i], *current[i + 2:]]
                budget -= 1
                pair = walk(cost, lane, trial[i:i + 2],
                            state_before(cost, lane, current, slots, i))
                after = (stats[trial[i + 1]].model, pair[1].seg_start_at, pair[1].end_at,
                         pair[1].end_var)
                fresh, kept_from = rewalk(cost, lane, current, slots, i + 2, after)
                changed = [*pair, *fresh]
                trial_slots = [*slots[:i], *changed, *slots[kept_from:]]
                trial_terms = [*terms[:i],
                               *lane_terms(cost, trial[i:kept_from], changed, weights),
                               *terms[kept_from:]]
                v = sum(trial_terms)
                if v > value + 1e-9:
                    current, value, improved = trial, v, True
                    slots, terms = trial_slots, trial_terms
        if current is not lane.order:
            lane.reset(current, cost, slots)
        walked[lane.index] = slots
    return walked
