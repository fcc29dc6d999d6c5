"""Group-level cost model shared by the planning policies (``qlm``, ``shepherd``).

The planners never look at single requests while they search: every request group is
summarised once (:class:`GroupStats`, memoised across decisions while the group's
request tuple is unchanged) and every worker once (:class:`WorkerLoad`). A search
step then costs O(1) per (group, worker) pair, whatever the number of queued requests.

Timing model of one worker's virtual queue (a *lane*), in the estimator's terms:

* the worker decodes at Θ(model, GPU, B) tokens/s, B the steady batch
  ``min(max_batch_size, kv_capacity // mean context)``; a group of n requests with
  expected output tokens Σμᵢ occupies it for ``S = Σμᵢ/Θ + n·prefill(mean prompt)``
  (variance Σσᵢ²/Θ²; output lengths are Normal by the central limit theorem);
* ``end`` is when all work placed so far on the lane has drained (running requests
  first, then the groups in order);
* a group of the model already active starts when a slot frees, i.e. when the work
  ahead minus what B in-flight requests still hold (``lead = B·μ/2/Θ``) has drained:
  ``start = max(segment_start, end − lead)``; a group of another model waits for the
  full drain, the longest in-flight request's tail (95th-percentile output at batch 1)
  and the swap (sleep, then ``wake_s`` when the model sleeps on the worker, else
  ``cold_load_s``): ``start = end + tail + swap``;
* its requests are admitted over ``spread = S·max(0, 1 − B/n)`` seconds in arrival
  order (so in deadline order), each after its own prefill.

A group's expected SLO attainment is the mean over a few deadline quantiles dⱼ of
Φ((dⱼ − start − qⱼ·spread − prefill) / σ), σ the standard deviation of the start.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np

from qlm.core.errors import InvalidInput
from qlm.core.estimator import DEFAULT_OUTPUT_STATS, LengthStats
from qlm.core.fit import can_serve
from qlm.core.perf import PerfProfile, ProfileBook
from qlm.core.pulls import kv_reservations
from qlm.core.types import (
    GroupKey,
    Request,
    RequestGroup,
    RunningRequest,
    SLOClass,
    WorkerView,
)
from qlm.sim.batching import tpot_batch_cap

#: Deadline quantiles at which a group's attainment is evaluated.
DEADLINE_QUANTILES: tuple[float, ...] = (0.0625, 0.1875, 0.3125, 0.4375, 0.5625, 0.6875,
                                         0.8125, 0.9375)
#: The key, in a group's memo (:attr:`GroupStatsCache.memos`), of the KV reservations of
#: its requests in pull order summed from its head (a list of ints), computed on first use
#: (:func:`memo_cumulative_reservations`) from its reservations (an int array, under
#: :data:`RESERVATIONS`): a decision asks it of the groups at the head of a lane only.
CUMULATIVE_RESERVATIONS = "cumulative_reservations"
RESERVATIONS = "reservations"
#: Floor on a start time's standard deviation (s): keeps Φ finite and smooth.
MIN_STD_S = 0.25
#: Beyond this many standard deviations a deadline counts as surely met or missed.
SURE_Z = 5.0

def output_stats_from(raw: Mapping[str, Any] | None) -> dict[str, LengthStats]:
    """Per-model output-length statistics from the ``output_stats`` option.

    Accepts ``{model: LengthStats}`` or ``{model: (mean, std)}``; key "*" (default
    :data:`qlm.core.estimator.DEFAULT_OUTPUT_STATS`) covers every other model.
    """
    raw = raw or {}
    stats: dict[str, LengthStats] = {"*": DEFAULT_OUTPUT_STATS}
    for model, value in raw.items():
        if isinstance(value, LengthStats):
            stats[model] = value
            continue
        try:
            mean, std = value
        except (TypeError, ValueError):
            raise InvalidInput(f"options.output_stats.{model}",
                               "expected LengthStats or (mean, std)") from None
        stats[model] = LengthStats(float(mean), float(std))
    return stats


_SQRT2 = math.sqrt(2.0)


def phi(x: float) -> float:
    """Standard normal CDF."""
    return 0.5 * (1.0 + math.erf(x / _SQRT2))


# --------------------------------------------------------------- group summaries
@dataclass(frozen=True, slots=True)
class GroupStats:
    """What the planners need of one group, computed in one pass over its requests."""

    key: GroupKey
    model: str
    index: int
    size: int
    mean_prompt: float
    out_mean_total: float
    out_var_total: float
    mean_output: float
    deadline_points: tuple[float, ...]
    earliest_deadline_at: float
    latest_deadline_at: float
    ttft_s: float
    #: The tightest TPOT target of its requests (None: none has one).
    tpot_s: float | None = None


@dataclass(frozen=True, slots=True)
class GroupArrays:
    """Per-request terms of a group, in group order: remaining-output mean and variance
    (the estimator's truncated log-normal given the progress kept), tokens to prefill
    (prompt plus progress kept) and deadlines (infinite for a request that already had its
    first token, e.g. one evicted after it started: its TTFT SLO is settled), TPOT
    targets (infinite without one) and KV reservations (:func:`qlm.core.pulls.
    kv_reservation`)."""

    out_mean: np.ndarray
    out_var: np.ndarray
    prompt: np.ndarray
    deadline: np.ndarray
    tpot: np.ndarray
    reserved: np.ndarray

    @classmethod
    def of(cls, requests: Sequence[Request], lengths: LengthStats) -> GroupArrays:
        n = len(requests)
        cap = np.fromiter((r.max_tokens for r in requests), float, n)
        done = np.fromiter((r.num_generated for r in requests), float, n)
        prompt_tokens = np.fromiter((r.prompt_tokens for r in requests), np.int64, n)
        # A request that generated tokens had its first token: its TTFT SLO is settled.
        deadline = np.fromiter((r.arrival_at + r.slo.ttft_s if r.num_generated == 0
                                else math.inf for r in requests), float, n)
        tpot = np.fromiter((math.inf if r.slo.tpot_s is None else r.slo.tpot_s
                            for r in requests), float, n)
        mean, var = lengths.remaining_moments(cap, done)
        reserved = kv_reservations(prompt_tokens, cap.astype(np.int64), done.astype(np.int64))
        return cls(np.maximum(mean, 1.0), var, prompt_tokens + done, deadline, tpot, reserved)

    def part(self, start: int, stop: int) -> GroupArrays:
        """The terms of requests ``start`` to ``stop`` (views)."""
        return GroupArrays(self.out_mean[start:stop], self.out_var[start:stop],
                           self.prompt[start:stop], self.deadline[start:stop],
                           self.tpot[start:stop], self.reserved[start:stop])

    def taken(self, positions: np.ndarray) -> GroupArrays:
        """The terms at ``positions`` (an index array), in that order."""
        return GroupArrays(self.out_mean[positions], self.out_var[positions],
                           self.prompt[positions], self.deadline[positions],
                           self.tpot[positions], self.reserved[positions])

    def extended(self, more: GroupArrays) -> GroupArrays:
        return GroupArrays(*(np.concatenate((a, b)) for a, b in (
            (self.out_mean, more.out_mean), (self.out_var, more.out_var),
            (self.prompt, more.prompt), (self.deadline, more.deadline),
            (self.tpot, more.tpot), (self.reserved, more.reserved))))


def stats_of(key: GroupKey, index: int, arrays: GroupArrays, ttft_s: float) -> GroupStats:
    n = len(arrays.deadline)
    deadlines = np.sort(arrays.deadline)
    out_mean = float(arrays.out_mean.sum())
    picks = [min(n - 1, int(q * n)) for q in DEADLINE_QUANTILES]
    tpot = float(arrays.tpot.min())
    return GroupStats(
        key=key, model=key.model, index=index, size=n, mean_prompt=float(arrays.prompt.mean()),
        out_mean_total=out_mean, out_var_total=float(arrays.out_var.sum()),
        mean_output=out_mean / n, deadline_points=tuple(float(deadlines[i]) for i in picks),
        earliest_deadline_at=float(deadlines[0]), latest_deadline_at=float(deadlines[-1]),
        ttft_s=ttft_s, tpot_s=None if math.isinf(tpot) else tpot,
    )


def summarise_group(group: RequestGroup, index: int,
                    output_stats: Mapping[str, LengthStats]) -> GroupStats:
    """The group's :class:`GroupStats` in one vectorised pass over its requests."""
    lengths = output_stats.get(group.model, output_stats["*"])
    return stats_of(group.key, index, GroupArrays.of(group.requests, lengths),
                    group.requests[0].slo.ttft_s)


@dataclass(slots=True)
class _Entry:
    requests: tuple[Request, ...]
    arrays: GroupArrays
    stats: GroupStats
    memo: dict[Any, Any]


def kept_tail(old: tuple[Request, ...], new: tuple[Request, ...]) -> int | None:
    """k when ``new`` is ``old`` without its first k requests, then requests appended
    (what pulls and arrivals at the tail do to a group): its terms are then a slice of
    the old ones, without a lookup per request (groups hold thousands at 1M queued)."""
    first = new[0]
    for k, request in enumerate(old):
        if request is first:
            kept = len(old) - k
            return k if kept <= len(new) and old[k:] == new[:kept] else None
    return None


def kept_positions(old: tuple[Request, ...], new: tuple[Request, ...]) -> list[int]:
    """For each request of ``new``, its position in ``old`` (the same object), -1 for a
    request new to the group. Pulls take requests from a group's head, arrivals join it
    anywhere in deadline order (one that arrived a moment after another may have the
    earlier deadline), an evicted request returns with its progress (a new object)."""
    at = dict(zip(map(id, old), range(len(old)), strict=True))
    return list(map(at.get, map(id, new), repeat(-1)))


class GroupStatsCache:
    """Memo of :class:`GroupStats` across decisions.

    An entry is reused while the group's request tuple is the same object. When a group
    changed, the per-request terms of the requests it kept are taken over and only its
    new requests are read (:meth:`_changed`). Entries of groups that left the queue
    are dropped at every refresh. Exact: a summary never differs from a fresh one.
    """

    def __init__(self) -> None:
        self._entries: dict[GroupKey, _Entry] = {}
        self._basis: tuple[Any, ...] = ()
        #: Per group of the last refresh (same order): a memo holding the group's KV
        #: reservations (:data:`RESERVATIONS`, summed on first use into
        #: :data:`CUMULATIVE_RESERVATIONS`) and the row of its :class:`Service` per worker
        #: shape the cost model fills (:meth:`CostModel._service_rows`); survives while
        #: the group's request tuple does.
        self.memos: list[dict[Any, Any]] = []

    def refresh(self, groups: Sequence[RequestGroup],
                output_stats: Mapping[str, LengthStats],
                profiles: ProfileBook | None = None) -> list[GroupStats]:
        basis = (tuple(sorted(output_stats.items(), key=lambda kv: kv[0])), id(profiles))
        if basis != self._basis:
            self._entries = {}
            self._basis = basis
        entries = self._entries
        out: list[_Entry] = []
        changed: list[int] = []
        num_new = 0  # groups without an entry
        for index, group in enumerate(groups):
            entry = entries.get(group.key)
            if entry is not None and entry.requests is group.requests:  # unchanged
                if entry.stats.index != index:
                    entry.stats = _reindexed(entry.stats, index)
            else:
                changed.append(index)
                num_new += entry is None
            out.append(entry)  # type: ignore[arg-type]  # the changed ones are set below
        if changed:
            for index, entry in zip(changed, self._changed([(i, groups[i]) for i in changed],
                                                           output_stats), strict=True):
                out[index] = entry
        if num_new or len(groups) != len(entries):  # groups joined or left: entries anew
            self._entries = {group.key: entry for group, entry in zip(groups, out, strict=True)}
        else:  # the same groups: only the changed entries are new
            for index in changed:
                entries[groups[index].key] = out[index]
        self.memos = [entry.memo for entry in out]
        return [entry.stats for entry in out]

    def _changed(self, changed: Sequence[tuple[int, RequestGroup]],
                 output_stats: Mapping[str, LengthStats]) -> list[_Entry]:
        """The entries of the groups (index, group) whose request tuple is new: the terms
        of the requests a group kept are taken over (:func:`kept_tail`, else
        :func:`kept_positions`), and the
        requests new to the groups are read together, one vectorised
        :meth:`GroupArrays.of` per length model (a few dozen arrivals in each of a few
        groups per decision: one pass per group was mostly numpy's per-call overhead)."""
        new_requests: dict[int, tuple[LengthStats, list[Request]]] = {}
        plans = []
        for index, group in changed:
            lengths = output_stats.get(group.model, output_stats["*"])
            cached = self._entries.get(group.key)
            reqs = group.requests
            head: int | None = None
            positions: list[int] | None = None
            added: Sequence[int] = range(len(reqs))  # a new group: every request
            if cached is not None:
                head = kept_tail(cached.requests, reqs)
                if head is not None:
                    added = range(len(cached.requests) - head, len(reqs))
                else:
                    positions = kept_positions(cached.requests, reqs)
                    added = [j for j, i in enumerate(positions) if i < 0]
            bucket = new_requests.setdefault(id(lengths), (lengths, []))[1]
            plans.append((index, group, cached, head, positions, added, id(lengths),
                          len(bucket)))
            bucket.extend(reqs[j] for j in added)
        read = {k: GroupArrays.of(reqs, lengths)
                for k, (lengths, reqs) in new_requests.items() if reqs}
        entries = []
        for index, group, cached, head, positions, added, k, start in plans:
            fresh = read[k].part(start, start + len(added)) if added else None
            if cached is None:
                assert fresh is not None
                arrays = fresh
            elif positions is None:  # the old tail from ``head`` on, then the new ones
                assert head is not None
                arrays = cached.arrays.part(head, len(cached.requests))
                if fresh is not None:
                    arrays = arrays.extended(fresh)
            else:
                arrays = cached.arrays
                if fresh is not None:
                    arrays = arrays.extended(fresh)
                    for n, j in enumerate(added):
                        positions[j] = len(cached.requests) + n
                arrays = arrays.taken(np.array(positions, dtype=np.intp))
            entries.append(_Entry(
                group.requests, arrays,
                stats_of(group.key, index, arrays, group.requests[0].slo.ttft_s),
                {RESERVATIONS: arrays.reserved}))
        return entries


def memo_cumulative_reservations(memo: dict[Any, Any]) -> list[int] | None:
    """The group's :data:`CUMULATIVE_RESERVATIONS` from its memo, summed the first time it
    is asked; None for a memo without its reservations."""
    found: list[int] | None = memo.get(CUMULATIVE_RESERVATIONS)
    if found is None:
        reserved = memo.get(RESERVATIONS)
        if reserved is None:
            return None
        found = memo[CUMULATIVE_RESERVATIONS] = np.cumsum(reserved).tolist()
    return found


def _reindexed(s: GroupStats, index: int) -> GroupStats:
    """``replace(s, index=index)``, by the constructor (every group behind one that left
    the queue moves, every decision)."""
    return GroupStats(s.key, s.model, index, s.size, s.mean_prompt, s.out_mean_total,
                      s.out_var_total, s.mean_output, s.deadline_points,
                      s.earliest_deadline_at, s.latest_deadline_at, s.ttft_s, s.tpot_s)


# --------------------------------------------------------------- worker summaries
@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """One worker's running work: remaining expected tokens, sorted, and their sum."""

    remaining_tokens: float
    remaining_var: float
    remaining_sorted: tuple[float, ...]
    kv_reserved_tokens: int
    loosest_ttft_s: float  # the largest TTFT SLO among running requests (0 if none)
    #: Running requests that may be evicted (not :func:`resumed` ones), in the order they
    #: should be evicted: largest remaining slack
    #: first — past their first token (TTFT SLO settled: infinite slack) before the
    #: others — then loosest class, latest deadline, least progress to recompute, id.
    eviction_order: tuple[RunningRequest, ...] = ()
    #: How many of ``eviction_order`` (its head) are past their first token; each of the
    #: two parts is in descending TTFT SLO order.
    num_started: int = 0
    #: Context tokens of the running requests without a first token (still prefilling).
    pending_prefill_tokens: int = 0
    #: Expected remaining output tokens of each of ``eviction_order``.
    eviction_remaining: tuple[float, ...] = ()
    #: The tightest TPOT target of the running requests (None: none has one) and the mean
    #: prompt of those that have one.
    tpot_s: float | None = None
    tpot_mean_prompt: float = 0.0


def resumed(rr: RunningRequest) -> bool:
    """True when ``rr`` runs again after an eviction: its first token predates this start."""
    return rr.first_token_at is not None and rr.first_token_at < rr.started_at


def summarise_running(running: Sequence[RunningRequest],
                      output_stats: Mapping[str, LengthStats]) -> WorkerLoad:
    """Remaining-output moments of a worker's running requests and their KV reservations
    (the same reservation as :func:`qlm.core.pulls.kv_reservation`)."""
    return summarise_workers([running], output_stats)[0]


_IDLE = WorkerLoad(0.0, 0.0, (), 0, 0.0)


def summarise_workers(runnings: Sequence[Sequence[RunningRequest]],
                      output_stats: Mapping[str, LengthStats]) -> list[WorkerLoad]:
    """:func:`summarise_running` of each of ``runnings`` (the running requests of several
    workers). The remaining-output moments are elementwise, so they are computed in one
    vectorised pass over the requests of all the workers that share a length model, then
    cut per worker: every worker's running requests move between two snapshots of a
    live queue (they generate tokens), and one pass per worker spent most of its time in
    numpy's per-call overhead on arrays of a few dozen elements."""
    out: list[WorkerLoad] = [_IDLE] * len(runnings)
    by_lengths: dict[int, tuple[LengthStats, list[int]]] = {}
    for k, running in enumerate(runnings):
        if running:
            lengths = output_stats.get(running[0].request.model, output_stats["*"])
            by_lengths.setdefault(id(lengths), (lengths, []))[1].append(k)
    for lengths, members in by_lengths.values():
        requests = [rr.request for k in members for rr in runnings[k]]
        n = len(requests)
        cap = np.fromiter([r.max_tokens for r in requests], float, n)
        done = np.fromiter([r.num_generated for r in requests], float, n)
        prompt = np.fromiter([r.prompt_tokens for r in requests], np.int64, n)
        mean, var = lengths.remaining_moments(cap, done)
        reserved = kv_reservations(prompt, cap.astype(np.int64), done.astype(np.int64))
        starts = [0]
        for k in members:
            starts.append(starts[-1] + len(runnings[k]))
        reserved_sums = np.add.reduceat(reserved, starts[:-1]).tolist()
        for m, k in enumerate(members):
            a, b = starts[m], starts[m + 1]
            out[k] = _load_of(runnings[k], mean[a:b], var[a:b], int(reserved_sums[m]))
    return out


def _load_of(running: Sequence[RunningRequest], mean: np.ndarray, var: np.ndarray,
             reserved_tokens: int) -> WorkerLoad:
    """One worker's :class:`WorkerLoad` from its requests' remaining-output moments."""
    # A request resumed after an eviction (its first token came before this start) is
    # not evicted again: each eviction pays a re-prefill of prompt + progress, and a
    # request taken again and again loses throughput for nobody's gain (anti-churn).
    left = mean.tolist()
    keys = [(rr.first_token_at is None, -rr.request.slo.ttft_s,
             -rr.request.deadline_at if rr.first_token_at is None else 0.0,
             rr.request.num_generated, rr.request.id, i)
            for i, rr in enumerate(running) if not resumed(rr)]
    keys.sort()
    ranked = [key[-1] for key in keys]
    order = tuple(running[i] for i in ranked)
    num_started = sum(1 for rr in order if rr.first_token_at is not None)
    pending = sum(rr.request.context_tokens for rr in running if rr.first_token_at is None)
    bound = [rr.request for rr in running if rr.request.slo.tpot_s is not None]
    tpot = min((r.slo.tpot_s for r in bound if r.slo.tpot_s is not None), default=None)
    tpot_prompt = sum(r.prompt_tokens for r in bound) / len(bound) if bound else 0.0
    return WorkerLoad(float(mean.sum()), float(var.sum()), tuple(sorted(left)),
                      reserved_tokens, max(rr.request.slo.ttft_s for rr in running), order,
                      num_started, pending, tuple(left[i] for i in ranked), tpot, tpot_prompt)


class WorkerLoadCache:
    """Memo of :class:`WorkerLoad` keyed by worker, reused while ``running`` is unchanged;
    the workers whose running requests changed are summarised together
    (:func:`summarise_workers`)."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[RunningRequest, ...], WorkerLoad]] = {}

    def refresh(self, workers: Sequence[WorkerView],
                output_stats: Mapping[str, LengthStats]) -> list[WorkerLoad]:
        entries = self._entries
        out: list[WorkerLoad] = []
        changed: list[int] = []
        for k, w in enumerate(workers):
            cached = entries.get(w.id)
            if cached is not None and cached[0] is w.running:
                out.append(cached[1])
            else:
                out.append(_IDLE)
                changed.append(k)
        if changed:
            loads = summarise_workers([workers[k].running for k in changed], output_stats)
            for k, load in zip(changed, loads, strict=True):
                out[k] = load
        self._entries = {w.id: (w.running, load) for w, load in zip(workers, out, strict=True)}
        return out


# --------------------------------------------------------------- cost model
_MISSING = object()
#: The share of a TPOT target the modelled mean step may take: the mean hides the steps
#: that carry a burst of prompt chunks, which a short request may meet several of. Chosen
#: on WA (7,000 requests, 40 ms on interactive, rates 160 and 320; qlm's combined TTFT+TPOT
#: attainment): 0.6 → 0.860, 0.753; 0.75 → 0.901, 0.774; 0.85 → 0.914, 0.791; 1.0 →
#: 0.915, 0.776; ignoring TPOT → 0.913, 0.778 (docs/results/sim_tpot/README.md).
TPOT_HEADROOM = 0.85

@dataclass(frozen=True, slots=True)
class Service:
    """A group's cost on one worker shape."""

    mean_s: float
    var_s2: float
    prefill_s: float
    spread_s: float
    lead_s: float
    batch: int
    tokens_per_s: float


def steady_batch(profile: PerfProfile, worker: WorkerView, mean_context: float) -> int:
    by_kv = int(worker.kv_capacity_tokens // max(1.0, mean_context))
    return max(1, min(worker.max_batch_size, profile.max_batch_size, by_kv))


class CostModel:
    """Per-decision cost tables: service of each group on each worker shape (lazy).

    ``charge_swaps=False`` prices every model swap at zero (a planner that is not
    swap-aware); a model the worker cannot serve stays impossible. ``tpot_aware``
    prices groups with a TPOT target at the batch it allows (:meth:`tpot_cap`); a
    planner that ignores TPOT (shepherd) leaves it off.
    """

    def __init__(self, profiles: ProfileBook, workers: Sequence[WorkerView],
                 stats: Sequence[GroupStats],
                 output_stats: Mapping[str, LengthStats],
                 charge_swaps: bool = True,
                 memos: Sequence[dict[Any, Any]] | None = None,
                 service_scale: float = 1.0, tpot_aware: bool = False) -> None:
        self.profiles = profiles
        self.service_scale = service_scale
        self.tpot_aware = tpot_aware
        self.charge_swaps = charge_swaps
        self.workers = workers
        self.stats = stats
        self.output_stats = output_stats
        shapes: dict[tuple[Any, ...], int] = {}
        self.shape_of: list[int] = []
        for w in workers:
            self.shape_of.append(shapes.setdefault(
                (w.gpu, w.kv_capacity_tokens, w.max_batch_size, w.num_gpus), len(shapes)))
        self.shape_keys: list[tuple[Any, ...]] = list(shapes)
        self.shape_worker: list[WorkerView] = [None] * len(shapes)  # type: ignore[list-item]
        for i, w in enumerate(workers):
            if self.shape_worker[self.shape_of[i]] is None:
                self.shape_worker[self.shape_of[i]] = w
        self._table: list[list[Any]] = self._service_rows(memos, len(stats))
        self._drain: dict[tuple[int, str], float] = {}
        self._swap: dict[tuple[int, str, str | None], float] = {}
        self._tail: dict[tuple[int, str], float] = {}
        #: The same values by what they depend on (GPU, model...), computed once for all
        #: the workers that share it.
        self._swap_of: dict[tuple[Any, ...], float] = {}
        self._tail_of: dict[tuple[str, str], float] = {}

    def _service_rows(self, memos: Sequence[dict[Any, Any]] | None, num_groups: int
                      ) -> list[list[Any]]:
        """Per group, its services by shape index (:data:`_MISSING` until computed). With
        ``memos``, each group's row lives in its memo under the shapes and pricing options
        it was computed for, so a group unchanged since the last decision keeps the
        services computed then: a decision reads a row per group instead of a memo lookup
        per (group, shape) pair it asks about (1,300 at 100k queued, 80 workers). The key
        is text, whose hash Python computes once."""
        width = len(self.shape_keys)
        if memos is None:
            return [[_MISSING] * width for _ in range(num_groups)]
        layout = repr(("services", self.shape_keys, self.service_scale, self.tpot_aware))
        rows = []
        for memo in memos:
            row = memo.get(layout)
            if row is None:
                row = memo[layout] = [_MISSING] * width
            rows.append(row)
        return rows

    def service(self, group_index: int, worker_index: int) -> Service | None:
        """Cost of group ``group_index`` on worker ``worker_index``; None if no profile."""
        found = self._table[group_index][self.shape_of[worker_index]]
        if found is not _MISSING:
            return found
        return self.shape_service(group_index, self.shape_of[worker_index])

    def shape_service(self, group_index: int, shape: int) -> Service | None:
        """:meth:`service` on any worker of shape ``shape`` (all of them cost the same)."""
        row = self._table[group_index]
        found = row[shape]
        if found is _MISSING:
            found = row[shape] = self._compute_service(group_index, shape)
        return found

    def _compute_service(self, group_index: int, shape: int) -> Service | None:
        g = self.stats[group_index]
        w = self.shape_worker[shape]
        if not can_serve(self.profiles, g.model, w.gpu, w.num_gpus):
            return None
        p = self.profiles.get(g.model, w.gpu)
        ctx = g.mean_prompt + g.mean_output / 2.0
        batch = steady_batch(p, w, ctx)
        if g.tpot_s is not None and self.tpot_aware:
            cap = self.tpot_cap(group_index, shape)
            if cap == 0 and any(self.tpot_cap(group_index, s) > 0
                                for s in range(len(self.shape_keys))):
                return None  # even a batch of one misses its TPOT here, not elsewhere
            batch = min(batch, cap or batch)
        theta = p.decode_tokens_per_s(batch, ctx)
        prefill = p.prefill_s(max(1, round(g.mean_prompt)))
        mean = self.service_scale * (g.out_mean_total / theta + g.size * prefill)
        var = g.out_var_total / (theta * theta)
        spread = mean * max(0.0, 1.0 - batch / g.size)
        lead = batch * (g.mean_output / 2.0) / theta
        return Service(mean, var, prefill, spread, lead, batch, theta)

    def tpot_cap(self, group_index: int, shape: int) -> int:
        """The batch a worker of ``shape`` may hold while the group's requests decode
        within their TPOT target (:func:`qlm.sim.batching.tpot_batch_cap`); 0 where even
        one request alone misses it or the shape cannot serve the group, -1 without a
        target."""
        g = self.stats[group_index]
        if g.tpot_s is None:
            return -1
        w = self.shape_worker[shape]
        if not can_serve(self.profiles, g.model, w.gpu, w.num_gpus):
            return 0
        p = self.profiles.get(g.model, w.gpu)
        return min(w.max_batch_size,
                   tpot_batch_cap(p, TPOT_HEADROOM * g.tpot_s, g.mean_prompt, g.mean_output))

    def drain_rate(self, worker_index: int, model: str) -> float:
        """Tokens/s at which the worker drains its running requests of ``model``."""
        shape = self.shape_of[worker_index]
        key = (shape, model)
        rate = self._drain.get(key)
        if rate is None:
            w = self.shape_worker[shape]
            if self.profiles.has(model, w.gpu):
                p = self.profiles.get(model, w.gpu)
                mean = self.output_stats.get(model, self.output_stats["*"]).mean
                ctx = 512.0 + mean / 2.0
                rate = p.decode_tokens_per_s(steady_batch(p, w, ctx), ctx)
            else:
                rate = 1000.0
            self._drain[key] = rate
        return rate

    def drain_tail_s(self, worker_index: int, model: str) -> float:
        """Seconds a worker decoding ``model`` needs past the fluid drain to finish its
        longest in-flight request before it can swap (the batch shrinks as it drains):
        the 95th-percentile output length decoded at batch 1."""
        if not self.charge_swaps:
            return 0.0
        key = (worker_index, model)
        found = self._tail.get(key)
        if found is None:
            gpu = self.workers[worker_index].gpu
            found = self._tail_of.get((gpu, model))
            if found is None:
                found = 0.0
                if self.profiles.has(model, gpu):
                    p = self.profiles.get(model, gpu)
                    lengths = self.output_stats.get(model, self.output_stats["*"])
                    tokens = lengths.quantile_tokens(0.95)
                    found = tokens * p.decode_step_s(1, int(512 + tokens / 2))
                self._tail_of[(gpu, model)] = found
            self._tail[key] = found
        return found

    def swap_s(self, worker_index: int, model: str, from_model: str | None = None) -> float:
        """Seconds to switch the worker to ``model``: sleep ``from_model``, wake or load."""
        key = (worker_index, model, from_model)
        found = self._swap.get(key)
        if found is None:
            w = self.workers[worker_index]
            basis = (w.gpu, w.num_gpus, model in w.models, model, from_model)
            found = self._swap_of.get(basis)
            if found is None:
                found = self._swap_of[basis] = self._compute_swap(worker_index, model,
                                                                  from_model)
            self._swap[key] = found
        return found

    def _compute_swap(self, worker_index: int, model: str, from_model: str | None) -> float:
        w = self.workers[worker_index]
        if not can_serve(self.profiles, model, w.gpu, w.num_gpus):
            return math.inf
        if not self.charge_swaps:
            return 0.0
        sleep = 0.0
        if from_model is not None and self.profiles.has(from_model, w.gpu):
            sleep = self.profiles.get(from_model, w.gpu).sleep_s
        return sleep + self.profiles.get(model, w.gpu).swap_in_s(model in w.models)


# --------------------------------------------------------------- lanes
class Lane:
    """A worker's virtual queue while a plan is built: its order and the walk's state.

    ``initial`` is the state before any queued group (running work only); ``tail``,
    ``seg_start_at``, ``end_at``, ``end_var`` the state after the last group of ``order``.
    """

    __slots__ = ("end_at", "end_var", "index", "initial", "order", "seg_start_at", "tail",
                 "version", "worker")

    def __init__(self, index: int, worker: WorkerView, load: WorkerLoad, cost: CostModel,
                 now: float) -> None:
        self.index = index
        self.worker = worker
        self.order: list[int] = []
        self.version = 0
        self.tail: str | None = None
        free_at = now
        model = worker.active_model
        if worker.swapping_until is not None:
            free_at = max(now, worker.swapping_until)
            model = worker.swapping_to
        end_at, end_var = free_at, 0.0
        if model is not None and load.remaining_tokens > 0:
            rate = cost.drain_rate(index, model)
            end_at = free_at + load.remaining_tokens / rate
            end_var = load.remaining_var / (rate * rate)
        self.initial: tuple[str | None, float, float, float] = (model, free_at, end_at, end_var)
        self.reset([], cost)

    def reset(self, order: list[int], cost: CostModel, kept: Sequence[Slot] = ()) -> list[Slot]:
        """Set the order and recompute the tail state; returns the slots of ``order``.
        ``kept``: the slots of a prefix of ``order`` (what a walk gives them), reused: the
        walk starts after them."""
        self.order = order
        self.version += 1
        if kept:
            n, last = len(kept), kept[-1]
            slots = [*kept, *walk(cost, self, order[n:], (
                cost.stats[order[n - 1]].model, last.seg_start_at, last.end_at, last.end_var))]
        else:
            slots = walk(cost, self, order)
        if slots:
            last = slots[-1]
            self.tail = cost.stats[order[-1]].model
            self.seg_start_at, self.end_at = last.seg_start_at, last.end_at
            self.end_var = last.end_var
        else:
            self.tail, self.seg_start_at, self.end_at, self.end_var = self.initial
        return slots

    def append(self, gi: int, slot: Slot, cost: CostModel) -> None:
        self.order.append(gi)
        self.version += 1
        self.tail = cost.stats[gi].model
        self.seg_start_at, self.end_at, self.end_var = slot.seg_start_at, slot.end_at, slot.end_var

    def slot_for(self, gi: int, cost: CostModel, with_p: bool = True) -> Slot | None:
        """Where group ``gi`` would sit if appended now; None if the worker can't serve it.

        ``with_p=False`` leaves ``p_meet`` at 0 (for callers that only need the times).
        """
        svc = cost.service(gi, self.index)
        if svc is None:
            return None
        return place_after(cost, self.index, cost.stats[gi], svc, self.tail, self.seg_start_at,
                           self.end_at, self.end_var, with_p)


class Slot(NamedTuple):
    """Where a group would sit on a lane: its start distribution and the lane after it.

    A named tuple, not a frozen dataclass: the planners make thousands per decision (every
    position they try), and a frozen dataclass costs several times more to build."""

    start_at: float
    start_var: float
    end_at: float
    end_var: float
    seg_start_at: float
    swapped: bool
    p_meet: float


#: ``new_slot(Slot, (start_at, ..., p_meet))`` is ``Slot(start_at, ..., p_meet)`` without
#: the named tuple's ``__new__``, a Python function: a call from C into Python per slot
#: (about twice the cost of the tuple itself) for the thousand slots of a decision.
new_slot = tuple.__new__


def place_after(cost: CostModel, worker_index: int, g: GroupStats, svc: Service,
                tail_model: str | None, seg_start_at: float, end_at: float,
                end_var: float, with_p: bool = True) -> Slot:
    """The walk's step: group ``g`` appended after a lane in state (tail, seg, end)."""
    if tail_model == g.model:
        start = end_at - svc.lead_s
        if not start > seg_start_at:  # max(seg_start_at, end_at - lead), without the call
            start = seg_start_at
        p = p_meet(g, svc, start, end_var) if with_p else 0.0
        return new_slot(Slot, (start, end_var, end_at + svc.mean_s, end_var + svc.var_s2,
                               seg_start_at, False, p))
    start = end_at + cost.swap_s(worker_index, g.model, tail_model)
    if tail_model is not None and end_at > seg_start_at:
        start += cost.drain_tail_s(worker_index, tail_model)
    p = p_meet(g, svc, start, end_var) if with_p else 0.0
    return new_slot(Slot, (start, end_var, start + svc.mean_s, end_var + svc.var_s2, start,
                           True, p))


def p_meet(g: GroupStats, svc: Service, start_at: float, start_var: float) -> float:
    """Expected fraction of ``g``'s requests whose first token beats their deadline."""
    first_token_at = start_at + svc.prefill_s
    std = math.sqrt(start_var) + MIN_STD_S
    points = g.deadline_points
    spread = svc.spread_s
    if (points[0] - first_token_at - spread) / std > SURE_Z:
        return 1.0
    if (points[-1] - first_token_at) / std < -SURE_Z:
        return 0.0
    total = 0.0
    erf = math.erf
    for q, d in zip(DEADLINE_QUANTILES, points, strict=True):
        total += 0.5 * (1.0 + erf((d - first_token_at - q * spread) / std / _SQRT2))  # phi
    return total / len(DEADLINE_QUANTILES)


def walk(cost: CostModel, lane: Lane, order: Sequence[int],
         state: tuple[str | None, float, float, float] | None = None) -> list[Slot]:
    """Slots of every group of ``order`` on ``lane`` from the lane's initial state (or from
    ``state``: tail model, segment start, end and its variance)."""
    tail, seg, end, var = lane.initial if state is None else state
    slots = []
    for gi in order:
        svc = cost.service(gi, lane.index)
        if svc is None:
            raise InvalidInput("placement", f"no profile for {cost.stats[gi].key} on "
                               f"worker {lane.worker.id}")
        slot = place_after(cost, lane.index, cost.stats[gi], svc, tail, seg, end, var)
        slots.append(slot)
        tail, seg, end, var = cost.stats[gi].model, slot.seg_start_at, slot.end_at, slot.end_var
    return slots


def lane_value(cost: CostModel, lane: Lane, order: Sequence[int],
               weights: Mapping[SLOClass, float]) -> float:
    """Σ weight·size·p_meet over the lane's groups (:func:`lane_terms` of its walk)."""
    return sum(lane_terms(cost, order, walk(cost, lane, order), weights))


def lane_terms(cost: CostModel, order: Sequence[int], slots: Sequence[Slot],
               weights: Mapping[SLOClass, float]) -> list[float]:
    """The terms of :func:`lane_value` (weight·size·p_meet per group, in order) of a lane
    whose walk of ``order`` is ``slots``: ``sum`` of them is its value, to the last bit."""
    stats = cost.stats
    return [weights.get(stats[gi].key.slo_class, 1.0) * stats[gi].size * s.p_meet
            for gi, s in zip(order, slots, strict=True)]


def state_before(cost: CostModel, lane: Lane, order: Sequence[int], slots: Sequence[Slot],
                 k: int) -> tuple[str | None, float, float, float]:
    """The walk's state (tail model, segment start, end, its variance) before position
    ``k`` of ``order``, whose walk on ``lane`` is ``slots``."""
    if k == 0:
        return lane.initial
    before = slots[k - 1]
    return cost.stats[order[k - 1]].model, before.seg_start_at, before.end_at, before.end_var


def rewalk(cost: CostModel, lane: Lane, order: Sequence[int], slots: Sequence[Slot],
           start: int, state: tuple[str | None, float, float, float]
           ) -> tuple[list[Slot], int]:
    """The walk of ``order[start:]`` on ``lane`` from ``state``, given ``slots``, its walk
    from another state: ``(fresh, k)``, the slots of ``order[start:k]`` walked, and those
    from ``k`` on are ``slots[k:]`` (the walk reached the same state there: the same
    groups then sit the same)."""
    stats = cost.stats
    fresh: list[Slot] = []
    for k in range(start, len(order)):
        if same_state(state, state_before(cost, lane, order, slots, k)):
            return fresh, k
        gi = order[k]
        svc = cost.service(gi, lane.index)
        if svc is None:
            raise InvalidInput("placement", f"no profile for {stats[gi].key} on "
                               f"worker {lane.worker.id}")
        slot = place_after(cost, lane.index, stats[gi], svc, *state)
        fresh.append(slot)
        state = (stats[gi].model, slot.seg_start_at, slot.end_at, slot.end_var)
    return fresh, len(order)


def same_state(a: tuple[str | None, float, float, float],
               b: tuple[str | None, float, float, float]) -> bool:
    """Whether a walk goes on identically from states ``a`` and ``b``: equal, and no
    zero among the times (0.0 and -0.0 compare equal but may round apart)."""
    return a == b and 0.0 not in (a[1], a[2], a[3])
