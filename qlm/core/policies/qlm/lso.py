"""The ``qlm`` policy's low-level operations from a plan: model swaps, evictions,
rejections, batch caps and the backpressure pulls."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from qlm.core.policies.planning import TPOT_HEADROOM
from qlm.core.policies.qlm.context import Plan, PlanningContext, unservable_groups
from qlm.core.policies.qlm.options import QlmOptions
from qlm.core.types import BatchCap, Decision, Evict, Pull, Reject, SLOClass, Swap
from qlm.sim.batching import tpot_batch_cap


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


def plan_evictions(pc: PlanningContext, plan: Plan, options: QlmOptions) -> tuple[Evict, ...]:
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
    but its requests count: a pull admits them first. The head group is provided for
    only as far as its prompts can be prefilled before its last deadline, after those of
    running requests still prefilling: with long prompts under overload, a slot freed
    for a request that misses anyway costs the evicted request's re-prefill for nothing.

    Looking past the head group (``evict_lookahead_groups`` > 1, the default) helps
    bursts: several groups of one class arrive within a few seconds, the slots that free
    up serve the first, and evictions for the next start only once it is the head, its
    slack gone. Under sustained overload an unbounded lookahead evicts batch work for
    groups that miss anyway, so past the head it stops at the first group that does not
    fit the steady batch with those ahead, or whose prompts (with those ahead) cannot be
    prefilled before its last deadline. Requests resumed after an eviction are not
    candidates (:func:`qlm.core.policies.planning.resumed`): no request is evicted twice;
    nor is one whose expected remaining decode takes less than re-prefilling its context
    would (it pays to let it finish). One decision evicts at most ``evict_budget``
    requests over all workers.
    """
    if not options.evict:
        return ()
    credit = options.evict_rate_credit
    state_swaps = options.kv_state_swap
    evictions: list[Evict] = []
    budget = options.evict_budget
    for wi, (w, order) in enumerate(zip(pc.snapshot.workers, plan.orders, strict=True)):
        if len(evictions) >= budget:
            break  # the rest wait for the next decision (no cluster-wide thrash at once)
        if not order or w.swapping_until is not None or not w.running:
            continue
        if pc.stats[order[0]].model != w.active_model:
            continue
        load = pc.loads[wi]
        # Two queues, each in descending TTFT SLO: past their first token, then the rest.
        k = load.num_started
        parts = (load.eviction_order[:k], load.eviction_order[k:])
        remaining = (load.eviction_remaining[:k], load.eviction_remaining[k:])
        profile = pc.cost.profiles.get(w.active_model, w.gpu)
        cursors = [0, 0]
        taken = 0
        lookahead = order[:max(1, options.evict_lookahead_groups)]
        for gi, short in _shortfalls(pc, wi, lookahead, credit, options.evict_prefill_aware):
            head = pc.stats[gi]
            reason = f"slo:{head.key}"
            svc = pc.cost.service(gi, wi)
            slot_rate = svc.tokens_per_s / svc.batch if svc is not None else math.inf
            for p, part in enumerate(parts):
                while taken < short and cursors[p] < len(part) and len(evictions) < budget:
                    rr = part[cursors[p]]
                    if rr.request.slo.ttft_s <= head.ttft_s:
                        break  # past the looser ones, none qualifies for this group
                    cursors[p] += 1
                    if remaining[p][cursors[p] - 1] / slot_rate \
                            < profile.prefill_s(rr.request.context_tokens):
                        # It pays only when the slot it frees is worth more than its
                        # re-prefill: one that finishes sooner than it would re-prefill
                        # (a long prompt, a few tokens left) is left to finish.
                        continue
                    evictions.append(Evict(w.id, rr.request.id, reason, state_swaps
                                           and _state_swap_pays(pc, wi, rr, options)))
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
    for k, (gi, num_admitted) in enumerate(_pull_walk(pc, wi, order)):
        g = pc.stats[gi]
        svc = cost.service(gi, wi)
        if svc is None:
            break  # no profile for it here: nothing to size evictions by
        admitted += num_admitted
        total += g.size
        need = total  # slots groups 0..k need
        if k == 0:
            # The head is provided for as far as its prompts can be prefilled before its
            # last deadline (after those of running requests still prefilling): a slot
            # freed for a request whose prompt cannot be ready in time is a re-prefill
            # paid for nothing (long prompts under overload).
            need = _prefillable(p, now, prompt_tokens, g.mean_prompt, g.size,
                                g.latest_deadline_at)
            if need == 0:
                break
        prompt_tokens += g.size * g.mean_prompt
        if k > 0 and (total > svc.batch
                      or now + p.prefill_s(round(prompt_tokens)) > g.latest_deadline_at):
            # Past the head, evictions provide only for groups they can still bring in
            # on time: all of groups 1..k fit the steady batch at once (beyond it they
            # wait for each other's completions whatever is evicted), and the prompts
            # ahead of group k and its own can be prefilled before its last deadline.
            # Under sustained overload the lookahead stops here instead of evicting
            # for groups that miss anyway (each evicted request pays a re-prefill).
            break
        slack_s = g.deadline_points[0] - now - svc.prefill_s
        if g.latest_deadline_at - now - svc.prefill_s < 0 or math.isinf(slack_s):
            continue  # all late already, or nothing left to meet: evicting cannot help it
        # Running requests decode only in the time the prompts ahead leave: vLLM mixes
        # prompt chunks into its decode steps, which then take that much longer.
        decode_s = (g.deadline_points[0] - now - p.prefill_s(round(prompt_tokens))
                    if prefill_aware else slack_s)
        per_slot_rate = credit * svc.tokens_per_s / svc.batch
        freed = _count_at_most(remaining, max(0.0, decode_s) * per_slot_rate)
        short = min(need, svc.batch) - admitted - freed
        if short > 0:
            out.append((gi, short))
    return out


def _prefillable(profile: Any, now: float, ahead_tokens: float, mean_prompt: float,
                 size: int, deadline_at: float) -> int:
    """How many of a group's ``size`` prompts (``mean_prompt`` tokens each) are prefilled
    by ``deadline_at``, after ``ahead_tokens`` of prompts ahead of them, starting ``now``."""
    lo, hi = 0, size  # the answer is in [lo, hi]; prefill time grows with the count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if now + profile.prefill_s(round(ahead_tokens + mid * mean_prompt)) <= deadline_at:
            lo = mid
        else:
            hi = mid - 1
    return lo


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
    free_slots = min(w.batch_limit, p.max_batch_size) - w.batch_size
    headroom = min(w.kv_capacity_tokens, p.kv_capacity_tokens) - load.kv_reserved_tokens
    for gi in order:
        if pc.stats[gi].model != model:
            return
        # Request by request, a pull admits while a slot is free and the next request's
        # reservation fits the headroom left: the first k fit while their sum does.
        reserved = pc.cumulative_reservations(gi)
        admitted = min(max(free_slots, 0), bisect.bisect_right(reserved, headroom))
        if admitted < len(reserved):
            free_slots = 0  # stopped inside this group: nothing after it is admitted
        else:
            free_slots -= admitted
        if admitted:
            headroom -= reserved[admitted - 1]
        yield gi, admitted


def _count_at_most(sorted_values: Sequence[float], limit: float) -> int:
    return bisect.bisect_right(sorted_values, limit)


def _state_swap_pays(pc: PlanningContext, wi: int, rr: Any, options: QlmOptions) -> bool:
    """True when copying the KV state to CPU and back beats recomputing it by prefill.

    Copy time: 2 · context tokens · ``notes.kv_bytes_per_token`` / ``pcie_gb_per_s``
    (per GPU of a tensor-parallel instance the bytes and the links both divide).
    """
    if not options.kv_state_swap:
        return False
    w = pc.snapshot.workers[wi]
    profile = pc.cost.profiles.get(rr.request.model, w.gpu)
    bytes_per_token = float(profile.notes.get("kv_bytes_per_token", 0.0) or 0.0)
    if bytes_per_token <= 0:
        return False
    tokens = rr.request.context_tokens
    copy_s = 2.0 * tokens * bytes_per_token / (options.pcie_gb_per_s * 1e9 * profile.num_gpus)
    return copy_s < profile.prefill_s(tokens)


def plan_rejections(pc: PlanningContext, options: QlmOptions) -> tuple[Reject, ...]:
    """With ``reject_unservable``, every request of a group no worker can serve; with
    ``reject_late``, every request whose deadline has passed."""
    rejected: list[Reject] = []
    seen: set[str] = set()
    if options.reject_unservable:
        for gi in unservable_groups(pc):
            model = pc.stats[gi].model
            for r in pc.snapshot.groups[gi].requests:
                rejected.append(Reject(r.id, f"no worker can serve model {model}"))
                seen.add(r.id)
    if options.reject_late:
        rejected.extend(Reject(r.id, "deadline passed") for g in pc.snapshot.groups
                        for r in g.requests if r.deadline_at < pc.now and r.id not in seen)
    return tuple(rejected)


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


def plan_batch_caps(pc: PlanningContext, plan: Plan, colocated_loose_batch: int = 0,
                    colocated_pause_share: float = 0.0) -> tuple[BatchCap, ...]:
    """The batch cap of every worker: while requests with a TPOT target run on it or the
    head group of its lane (of its active model) has one, the largest batch whose mean
    step meets the tightest of those targets (:func:`qlm.sim.batching.tpot_batch_cap`,
    for the active model's profile on its GPU, their mean prompt and the model's mean
    output); otherwise None (its own limit). A target no batch meets (not even one
    request alone) sets no cap: it would cost the other work for nothing.

    The cap stops admissions while the batch is at or above it; the head group is pulled
    once the batch has drained below it, so its requests decode within their target from
    their first step. What the cap costs the other work the planner charged already: a
    group with a TPOT target is served at the capped batch (:meth:`CostModel.tpot_cap`),
    so the groups after it on the lane wait longer.

    With ``colocated_loose_batch`` or ``colocated_pause_share`` > 0, the caps of
    :func:`colocated_caps` apply too (the tighter of the two)."""
    caps: list[BatchCap] = []
    colocated = colocated_caps(pc, plan, colocated_loose_batch, colocated_pause_share)
    output_stats = pc.cost.output_stats
    for wi, (w, order) in enumerate(zip(pc.snapshot.workers, plan.orders, strict=True)):
        model = w.active_model
        if model is None or w.swapping_until is not None:
            caps.append(BatchCap(w.id, None))
            continue
        load = pc.loads[wi]
        targets: list[tuple[float, float]] = []
        if load.tpot_s is not None:
            targets.append((load.tpot_s, load.tpot_mean_prompt))
        if order:
            head = pc.stats[order[0]]
            if head.tpot_s is not None and head.model == model:
                targets.append((head.tpot_s, head.mean_prompt))
        cap: int | None = None
        if targets and pc.cost.profiles.has(model, w.gpu):
            profile = pc.cost.profiles.get(model, w.gpu)
            mean_output = output_stats.get(model, output_stats["*"]).mean
            found = min(tpot_batch_cap(profile, TPOT_HEADROOM * t, prompt, mean_output)
                        for t, prompt in targets)
            if 0 < found < min(w.max_batch_size, profile.max_batch_size):
                cap = found
        if wi in colocated and (cap is None or colocated[wi] < cap):
            cap = colocated[wi]
        caps.append(BatchCap(w.id, cap))
    return tuple(caps)


#: A looser group left less than this share of its TTFT SLO before its earliest deadline
#: lifts the co-location cap of its worker: the cap defers loose work, never past its SLO.
COLOCATED_SLACK_SHARE = 0.5
#: How fast the co-location cap closes as the interactive worker beside it fills: the
#: loose admissions above ``colocated_loose_batch`` shrink as (1 - KV share reserved) to
#: this power. Chosen on the simulator's copies of the H100 replays (engines slowing each
#: other, docs/results/gpu/README.md): 2 kept interactive attainment ≥ 0.993 at the output
#: rate of the cap off (a fixed cap, the power ∞, met 1.000 but cost up to 9 % of the
#: rate on rows 0–399; the power 1 let more batch in and missed more).
COLOCATED_PRESSURE_POWER = 2.0


def colocated_caps(pc: PlanningContext, plan: Plan, loose_batch: int,
                   pause_share: float = 0.0) -> dict[int, int]:
    """Batch caps for workers that share a GPU (:attr:`WorkerView.device`) with a worker
    serving interactive work: {worker index: cap}.

    Engines side by side on one card slow each other's steps: a batch job pulled in full
    on one stretches the decode of the other's interactive requests, which then hold
    their KV longer, and the next burst finds no room (measured on the H100, two engines
    on one card: docs/results/gpu/README.md). While a co-located worker has interactive
    requests running or at the head of its lane, a worker admits its own interactive work
    (running and queued on its lane) plus ``loose_batch`` + (1 − p)^k × (its batch limit −
    ``loose_batch``) others, p the largest share of its KV pool such a worker has reserved
    and k :data:`COLOCATED_PRESSURE_POWER`: the batch job runs in full beside an idle
    neighbour and is held to ``loose_batch`` beside a full one. Requests above the cap
    finish. Not while a looser group on its lane has less than
    :data:`COLOCATED_SLACK_SHARE` of its SLO left before its earliest deadline: deferring
    loose work must not make it miss. ``loose_batch`` = 0 (the default): no such cap. On
    the H100 this cap made the replay worse (the neighbour slowed the card for longer,
    held thin): docs/scheduler.md, "Engines sharing a GPU".

    ``pause_share`` > 0 pauses instead of thinning: while such a worker has at least
    that share of its KV pool reserved, this worker admits its own interactive work and
    nothing else (0 others, whatever ``loose_batch`` says), and below it ``loose_batch``
    applies as above (no cap when it is 0): the loose work then runs in full once the
    card is quiet instead of thin all along. Off by default too: on the H100 it did not
    lift the missed slice and cost ~5 % of the output rate on the other
    (docs/results/gpu/README.md, Part 4, finding 6). Both caps bound the whole batch, so
    while loose requests admitted earlier run above the cap, this worker's own
    interactive arrivals wait for them too (its interactive attainment fell to
    0.95–0.98 under either cap there): a cap on loose admissions alone would be needed
    before either is tried again.
    """
    if loose_batch <= 0 and pause_share <= 0:
        return {}
    by_device: dict[str, list[int]] = {}
    for wi, w in enumerate(pc.snapshot.workers):
        if w.device is not None and w.active_model is not None and w.swapping_until is None:
            by_device.setdefault(w.device, []).append(wi)
    caps: dict[int, int] = {}
    interactive = SLOClass.INTERACTIVE
    for members in by_device.values():
        if len(members) < 2:
            continue
        running = {wi: sum(1 for rr in pc.snapshot.workers[wi].running
                           if rr.request.slo_class is interactive) for wi in members}
        # serving interactive work: some running, or a group of it at the lane's head
        busy = {wi for wi in members if running[wi] or (
            plan.orders[wi] and pc.stats[plan.orders[wi][0]].key.slo_class is interactive)}
        for wi in members:
            if not busy - {wi}:
                continue  # no other worker of this card serves interactive work now
            w = pc.snapshot.workers[wi]
            model = w.active_model
            assert model is not None  # members are workers with an active model
            profile_limit = (pc.cost.profiles.get(model, w.gpu).max_batch_size
                             if pc.cost.profiles.has(model, w.gpu) else w.max_batch_size)
            limit = min(w.max_batch_size, profile_limit)
            pressure = max(min(1.0, pc.loads[o].kv_reserved_tokens
                               / max(1, pc.snapshot.workers[o].kv_capacity_tokens))
                           for o in busy - {wi})
            if 0 < pause_share <= pressure:
                loose = 0
            elif loose_batch > 0:
                loose = loose_batch + int((1.0 - pressure) ** COLOCATED_PRESSURE_POWER
                                          * max(0, limit - loose_batch))
            else:
                continue  # beside a pool below the pause share, and no thinning cap
            # its own interactive work on the lane (up to a swap) comes on top; the walk
            # ends once that leaves no cap or a looser group is short of slack
            cap: int | None = running[wi] + loose
            for gi in plan.orders[wi]:
                g = pc.stats[gi]
                if cap is None or cap >= limit or g.model != model:
                    break  # no cap, or a swap first: nothing after it runs on these slots
                if g.key.slo_class is interactive:
                    cap += g.size
                elif g.earliest_deadline_at - pc.now < COLOCATED_SLACK_SHARE * g.ttft_s:
                    cap = None
            if cap is not None and cap < limit:
                caps[wi] = cap
    return caps
