"""The estimator's data plane: the core RWT estimator over a cached view of the queue.

Transport-free: the estimator service's gRPC servicer (``services/estimator``) only
translates messages; the ingest service may run this plane in process instead of calling
the service (``--workers-file`` without ``--estimator-addr``). Two services run it, so it
lives in the library and neither service imports the other.

* **View**: a :class:`~qlm.core.types.QueueSnapshot` rebuilt from the Redis store (queued
  groups, running requests, virtual queues) and the :class:`~qlm.roster.WorkerRoster`
  (live workers) at most every ``refresh_interval_s``; reads in between use the cache.
* **predict_wait** (ingest's question): the new request as a group of one, placed on each
  worker that can serve its model (:func:`qlm.core.pulls.can_serve`) right after the
  groups of that worker's virtual queue that the scheduler's policy keeps ahead of it
  (the policy's own ``queue_order``, :func:`qlm.core.policies.base.order_key`: a queued
  group stays ahead when its key is not larger; for qlm, edf and shepherd those whose
  earliest deadline is not later than its own — the earliest place a deadline-ordered
  queue gives it; for fcfs, static and vllm-swap every group that arrived before it; for
  priority the interactive groups, then earlier arrivals); its wait there is
  :meth:`RWTEstimator.queue_waits` — running work, model swaps, the groups ahead, its
  own prefill. The best worker is the one with
  the highest P(meet SLO), then the shortest mean wait.
* **admission**: admit when P(meet SLO) at the best place >= ``admission_min_p``; batch
  classes are always admitted. ``retry_after_s`` of a refused request: the time t after
  which a request sent then would reach ``admission_min_p`` if the work ahead drains at
  one second per second and nothing new arrives ahead of it:
  ``t = mean + std·Φ⁻¹(min_p) − ttft_slo`` (at least 0.1 s).
  With no live worker for the model there is nothing to predict: wait 0, admitted.
* **estimate_batch** (the scheduler's question): every group × worker at once,
  vectorised over the groups of each model (:func:`estimate_batch`).
* **Online correction**: telemetry's per-step predicted (raw profile) and observed decode
  step times move the (model, GPU) factor with :meth:`RWTEstimator.with_observation`.
* **Output lengths**: learned from ``finished`` events, per model and (model, class), as
  the scheduler's forecaster does (:class:`qlm.core.forecast.LengthLearner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist
from types import MappingProxyType
from typing import Final

import numpy as np

from qlm.bus.records import Event, Telemetry
from qlm.core.errors import InvalidInput, NotFound, Unavailable
from qlm.core.estimator import (
    PREFILL_TOKENS_PER_STEP,
    RWTEstimator,
    WaitEstimate,
    chunked_work_s,
)
from qlm.core.forecast import LengthLearner
from qlm.core.perf import PerfProfile
from qlm.core.policies.base import GroupOrder, order_key
from qlm.core.pulls import DEFAULT_EXPECTED_OUTPUT_TOKENS, can_serve
from qlm.core.types import (
    SLO,
    GroupKey,
    QueueSnapshot,
    Request,
    RequestGroup,
    SLOClass,
    WorkerView,
)
from qlm.roster import WorkerRoster
from qlm.sim.batching import chunked_first_token_s
from qlm.store.store import RedisQueueStore

#: Classes admission control never refuses.
ALWAYS_ADMITTED: Final = frozenset({SLOClass.BATCH_1, SLOClass.BATCH_2})
#: z-score of the 90th percentile.
Z_P90: Final = 1.2815515655446004
MIN_RETRY_AFTER_S: Final = 0.1
#: Predictions remembered to pair with realised waits.
_PENDING_LIMIT: Final = 100_000


@dataclass(frozen=True, slots=True)
class WaitQuery:
    """PredictWait's question: a new request of this shape, if queued now."""

    model: str
    slo_class: SLOClass
    prompt_tokens: int
    max_tokens: int
    ttft_slo_s: float | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise InvalidInput("model", "is required")
        if self.prompt_tokens <= 0:
            raise InvalidInput("prompt_tokens", f"must be > 0, got {self.prompt_tokens}")
        if self.max_tokens <= 0:
            raise InvalidInput("max_tokens", f"must be > 0, got {self.max_tokens}")
        if self.ttft_slo_s is not None and not (math.isfinite(self.ttft_slo_s)
                                                and self.ttft_slo_s > 0):
            raise InvalidInput("ttft_slo_s", f"must be > 0 when set, got {self.ttft_slo_s}")

    def request(self, now: float) -> Request:
        return Request("predict", self.model, self.prompt_tokens, self.max_tokens,
                       self.slo_class, SLO.for_class(self.slo_class, self.ttft_slo_s), now)


@dataclass(frozen=True, slots=True)
class WaitAnswer:
    """PredictWait's answer (seconds; ``best_worker_id`` empty when no worker serves it)."""

    wait_mean_s: float
    wait_std_s: float
    p_meet_slo: float
    admit: bool
    best_worker_id: str = ""
    retry_after_s: float = 0.0

    @property
    def wait_p90_s(self) -> float:
        return max(0.0, self.wait_mean_s + Z_P90 * self.wait_std_s)


@dataclass(frozen=True, slots=True)
class QueueIndex:
    """Per worker, its queued groups in virtual-queue order with their ordering facts:
    built once per queue view, so a prediction never walks the requests."""

    groups: tuple[RequestGroup, ...]
    queues: Mapping[str, tuple[tuple[GroupOrder, RequestGroup], ...]]

    @classmethod
    def of(cls, snapshot: QueueSnapshot,
           order_of: Callable[[RequestGroup], GroupOrder] | None = None) -> QueueIndex:
        by_key = {g.key: g for g in snapshot.groups}
        ordering = order_of or GroupOrder.of
        orders = {g.key: ordering(g) for g in snapshot.groups}
        queues = {worker: tuple((orders[k], by_key[k]) for k in order if k in by_key)
                  for worker, order in snapshot.virtual_queues.items()}
        return cls(snapshot.groups, MappingProxyType(queues))

    def fits(self, snapshot: QueueSnapshot) -> bool:
        return self.groups is snapshot.groups


def place_after_urgent(index: QueueIndex, worker: WorkerView, group: RequestGroup,
                       policy: str = "qlm") -> list[RequestGroup]:
    """``worker``'s queued groups that stay ahead of ``group`` under ``policy``'s order
    (the policy's ``queue_order``), in queue order, followed by ``group``."""
    key = order_key(policy)
    mine = key(GroupOrder.of(group))
    ahead = [g for o, g in index.queues.get(worker.id, ()) if key(o) <= mine]
    return [*ahead, group]


def predict_wait(estimator: RWTEstimator, snapshot: QueueSnapshot, query: WaitQuery,
                 admission_min_p: float, index: QueueIndex | None = None,
                 policy: str = "qlm") -> WaitAnswer:
    """The answer for ``query`` on ``snapshot`` (rules in the module docstring) when the
    scheduler runs ``policy``. Pure. ``index`` (built from the same groups) saves
    indexing the queue on every call."""
    now = snapshot.now
    order_key(policy)  # InvalidInput for an unknown policy
    if index is None or not index.fits(snapshot):
        index = QueueIndex.of(snapshot)
    if not any(m == query.model for m, _ in estimator.profiles.profiles):
        raise NotFound("model", query.model)
    request = query.request(now)
    group = RequestGroup(GroupKey(query.model, query.slo_class, -1), (request,))
    best: tuple[float, float, str, WaitEstimate] | None = None
    for worker in snapshot.workers:
        if not can_serve(worker, query.model, estimator.profiles):
            continue
        queue = place_after_urgent(index, worker, group, policy)
        wait = estimator.queue_waits(worker, queue, now)[-1]
        p = p_within(wait, request.deadline_at - now)
        candidate = (-p, wait.mean_s, worker.id, wait)
        if best is None or candidate[:3] < best[:3]:
            best = candidate
    if best is None:
        return WaitAnswer(0.0, 0.0, 1.0, True)
    p, wait = -best[0], best[3]
    admit = p >= admission_min_p or query.slo_class in ALWAYS_ADMITTED
    retry_after = 0.0 if admit else retry_after_s(wait, request.slo.ttft_s, admission_min_p)
    return WaitAnswer(wait.mean_s, wait.std_s, p, admit, best[2], retry_after)


def p_within(wait: WaitEstimate, slack_s: float) -> float:
    """P(W <= slack_s): :meth:`RWTEstimator.p_meet_slo` for a group of one request,
    without numpy (PredictWait evaluates it once per worker)."""
    if wait.std_s == 0.0:
        return 1.0 if wait.mean_s <= slack_s else 0.0
    return 0.5 * math.erfc((wait.mean_s - slack_s) / (wait.std_s * math.sqrt(2.0)))


def retry_after_s(wait: WaitEstimate, ttft_slo_s: float, min_p: float) -> float:
    """Seconds until the work ahead has drained enough for P(meet) >= ``min_p``."""
    z = NormalDist().inv_cdf(min(max(min_p, 1e-6), 1 - 1e-6))
    return max(MIN_RETRY_AFTER_S, wait.mean_s + wait.std_s * z - ttft_slo_s)


# ------------------------------------------------------------------ batch estimates
@dataclass(frozen=True, slots=True)
class GroupSummary:
    """A group as EstimateBatch describes it: sizes summed over its requests."""

    key: str
    model: str
    num_requests: int
    prefill_tokens: int
    max_output_tokens: int
    earliest_deadline_at: float = 0.0

    def __post_init__(self) -> None:
        if self.num_requests <= 0:
            raise InvalidInput(f"groups[{self.key}].num_requests", "must be > 0")
        if self.prefill_tokens <= 0:
            raise InvalidInput(f"groups[{self.key}].prefill_tokens", "must be > 0")
        if self.max_output_tokens <= 0:
            raise InvalidInput(f"groups[{self.key}].max_output_tokens", "must be > 0")


@dataclass(frozen=True, slots=True)
class WorkerSummary:
    """A worker as EstimateBatch describes it."""

    id: str
    gpu: str
    active_model: str | None
    resident_models: tuple[str, ...] = ()
    running_remaining_tokens: int = 0
    running_batch_size: int = 0


@dataclass(frozen=True, slots=True)
class BatchEstimates:
    """Matrices of shape (groups, workers); +inf mean where a worker cannot serve a group."""

    service_mean_s: np.ndarray
    service_std_s: np.ndarray
    head_wait_mean_s: np.ndarray
    head_wait_std_s: np.ndarray


def estimate_batch(estimator: RWTEstimator, groups: Sequence[GroupSummary],
                   workers: Sequence[WorkerSummary]) -> BatchEstimates:
    """Service time of every group on every worker and its wait at the head of the queue.

    Each group is taken as ``num_requests`` equal requests (mean prompt, mean output
    limit), which makes the service time exactly :meth:`RWTEstimator.group_service` for
    groups of equal requests (plus the swap when the worker's active model differs), and
    the head wait on an idle worker exactly ``queue_waits(worker, [group])``. On a busy
    worker the head wait adds the running work: ``running_remaining_tokens`` at the
    running batch's step time (all of it before a swap; less what the other slots hold
    when the group's model is active and the batch is full), with the spread of
    Σ remaining output of the running batch.
    """
    shape = (len(groups), len(workers))
    service_mean = np.full(shape, np.inf)
    service_std = np.zeros(shape)
    head_mean = np.full(shape, np.inf)
    head_std = np.zeros(shape)
    by_model: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        by_model.setdefault(group.model, []).append(index)
    profiles = estimator.profiles
    for wi, worker in enumerate(workers):
        for model, rows in by_model.items():
            if not profiles.has(model, worker.gpu):
                continue
            block = _block(estimator, [groups[i] for i in rows], model, worker)
            service_mean[rows, wi], service_std[rows, wi] = block[0], block[1]
            head_mean[rows, wi], head_std[rows, wi] = block[2], block[3]
    return BatchEstimates(service_mean, service_std, head_mean, head_std)


def _limits_profile(estimator: RWTEstimator, worker: WorkerSummary, model: str) -> PerfProfile:
    """The profile whose limits describe the worker (its active model's, as the roster)."""
    profiles = estimator.profiles
    if worker.active_model and profiles.has(worker.active_model, worker.gpu):
        return profiles.get(worker.active_model, worker.gpu)
    return profiles.get(model, worker.gpu)


def _block(estimator: RWTEstimator, groups: Sequence[GroupSummary], model: str,
           worker: WorkerSummary) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    profile = estimator.profiles.get(model, worker.gpu)
    limits = _limits_profile(estimator, worker, model)
    stats = estimator.output_stats(model)
    factor = estimator.correction(model, worker.gpu)
    n = np.array([g.num_requests for g in groups], dtype=float)
    prompt = np.array([g.prefill_tokens for g in groups], dtype=float) / n
    cap = np.array([g.max_output_tokens for g in groups], dtype=float) / n
    mean_r, var_r = stats.remaining_moments(cap, np.zeros_like(cap))
    residual = np.where(mean_r > 0, (var_r + mean_r * mean_r) / (2 * np.maximum(mean_r, 1e-12)),
                        0.0)
    context = prompt + residual
    reservation = prompt + np.minimum(cap, max(1, DEFAULT_EXPECTED_OUTPUT_TOKENS))
    kv = limits.kv_capacity_tokens
    if model != worker.active_model:
        kv = min(kv, profile.kv_capacity_tokens)
    max_batch = min(limits.max_batch_size, profile.max_batch_size)
    batch = np.maximum(1, np.minimum(max_batch, np.floor(kv / np.maximum(reservation, 1.0))))
    step = _decode_step(profile, batch, np.floor(batch * context))
    per_token = step / batch
    decode = n * np.clip(mean_r - 1.0, 0.0, None) * per_token * factor
    # Prefills, and the first token of the group's head once it starts: admitted at once
    # with the rest of the group that fits the batch (whole prefill: the whole prompts
    # that fit the step's budget; chunked: the budget filled, as RWTEstimator.queue_waits)
    if estimator.prefill_mode == "whole":
        first = np.maximum(1, np.minimum(np.minimum(n, batch), np.floor(
            PREFILL_TOKENS_PER_STEP / np.maximum(prompt, 1))))
        prefill = _admission_prefill(profile, n, prompt, batch, mean_r)
        head_prefill = _prefill(profile, prompt)
        bulk_prefill = _prefill(profile, first * prompt)
    else:
        prefill, head_prefill, bulk_prefill = _chunked_prefill(
            estimator, profile, n, prompt, batch, context, np.minimum(n, batch))
    swap = _swap_s(estimator, worker, model)
    service_mean = decode + prefill + swap
    service_std = np.sqrt(n * var_r) * per_token * factor
    # Head of the queue: the group's first token after the running work (and a swap).
    running_s, running_std = _running_work(estimator, worker, model, limits, context, factor)
    # behind a running batch of its model its prefill joins that batch; after a swap or on
    # an idle worker it is in the first admission (as RWTEstimator.queue_waits)
    joins = (model == worker.active_model and worker.running_batch_size > 0
             and worker.running_remaining_tokens > 0)
    first_token = np.maximum(head_prefill, bulk_prefill) if joins else bulk_prefill
    head_mean = running_s + first_token + swap
    return service_mean, service_std, head_mean, np.broadcast_to(running_std, n.shape)


def _running_work(estimator: RWTEstimator, worker: WorkerSummary, model: str,
                  limits: PerfProfile, context: np.ndarray, factor: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Seconds before the group can start behind the running batch, and its spread."""
    zero = np.zeros_like(context)
    if worker.running_batch_size <= 0 or worker.running_remaining_tokens <= 0:
        return zero, zero
    running_model = worker.active_model or model
    if not estimator.profiles.has(running_model, worker.gpu):
        return zero, zero
    profile = estimator.profiles.get(running_model, worker.gpu)
    size = worker.running_batch_size
    step = _decode_step(profile, np.full_like(context, size), np.floor(size * context))
    per_token = step / size * estimator.correction(running_model, worker.gpu)
    remaining = float(worker.running_remaining_tokens)
    stats = estimator.output_stats(running_model)
    spread = per_token * math.sqrt(remaining * stats.std * stats.std / max(stats.mean, 1.0))
    if running_model != model:
        return remaining * per_token, spread
    if size < limits.max_batch_size:
        return zero, zero  # a free slot: it starts at once
    credit = (size - 1) * (remaining / size) * per_token
    return np.maximum(0.0, remaining * per_token - credit), spread


def _chunked_prefill(estimator: RWTEstimator, profile: PerfProfile, n: np.ndarray,
                     prompt: np.ndarray, batch: np.ndarray, context: np.ndarray,
                     first: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The estimator's chunked-prefill timing (:func:`qlm.core.estimator.chunked_work_s`,
    :func:`qlm.sim.batching.chunked_first_token_s`) of n equal prompts, group by group."""
    budget = estimator.max_batched_tokens
    work, head, bulk = (np.zeros_like(prompt) for _ in range(3))
    for i in range(prompt.size):
        tokens, decoding = int(prompt[i]), int(batch[i]) - 1
        work[i] = n[i] * chunked_work_s(profile, np.array([tokens]), decoding, budget)
        head[i] = chunked_first_token_s(profile, tokens, decoding,
                                        int(decoding * context[i]), budget)
        bulk[i] = chunked_first_token_s(profile, tokens, 0, 0, budget,
                                        shared_tokens=int(first[i]) * tokens - tokens)
    return work, head, bulk


def _decode_step(profile: PerfProfile, batch: np.ndarray, context: np.ndarray) -> np.ndarray:
    return (profile.decode_base_s + profile.decode_per_seq_s * batch
            + profile.decode_per_ctx_token_s * context)


def _prefill(profile: PerfProfile, tokens: np.ndarray) -> np.ndarray:
    """``profile.prefill_s`` over an array (piecewise-linear, linear beyond the ends)."""
    xs = np.asarray(profile.prefill_tokens, dtype=float)
    ys = np.asarray(profile.prefill_seconds, dtype=float)
    lo = ys[0] + (ys[1] - ys[0]) / (xs[1] - xs[0]) * (tokens - xs[0])
    hi = ys[-1] + (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) * (tokens - xs[-1])
    out = np.where(tokens < xs[0], lo, np.where(tokens > xs[-1], hi, np.interp(tokens, xs, ys)))
    return np.where(tokens <= 0, 0.0, np.clip(out, 0.0, None))


def _admission_prefill(profile: PerfProfile, n: np.ndarray, prompt: np.ndarray,
                       batch: np.ndarray, mean_output: np.ndarray) -> np.ndarray:
    """:func:`qlm.core.estimator.admission_prefill_s` for n equal prompts, vectorised."""
    fixed = profile.prefill_seconds[0]
    marginal = n * np.clip(_prefill(profile, prompt) - fixed, 0.0, None)
    rate = batch / np.maximum(mean_output, 1.0)
    per_request = -np.expm1(-rate) / rate
    admissions = np.maximum(1.0, np.maximum(n * per_request,
                                            n * prompt / PREFILL_TOKENS_PER_STEP))
    return fixed * admissions + marginal


def _swap_s(estimator: RWTEstimator, worker: WorkerSummary, model: str) -> float:
    if worker.active_model == model:
        return 0.0
    profiles = estimator.profiles
    sleep = 0.0
    if worker.active_model and profiles.has(worker.active_model, worker.gpu):
        sleep = profiles.get(worker.active_model, worker.gpu).sleep_s
    resident = model in worker.resident_models
    return sleep + profiles.get(model, worker.gpu).swap_in_s(resident)


# ------------------------------------------------------------------ the plane
class EstimatorPlane:
    """Holds the estimator (replaced on every correction) and the cached queue view."""

    def __init__(self, estimator: RWTEstimator, roster: WorkerRoster,
                 store: RedisQueueStore | None, *, admission_min_p: float = 0.05,
                 refresh_interval_s: float = 1.0, clock: Callable[[], float] = time.time,
                 on_correction: Callable[[str, str, float], None] | None = None,
                 on_realised: Callable[[str, float, float], None] | None = None,
                 on_answer: Callable[[str, bool], None] | None = None,
                 policy: str = "qlm") -> None:
        if not 0.0 <= admission_min_p <= 1.0:
            raise InvalidInput("admission_min_p", f"must be in [0, 1], got {admission_min_p}")
        self.estimator = estimator
        self.roster = roster
        self.store = store
        self.admission_min_p = admission_min_p
        self.policy = policy
        order_key(policy)
        self.refresh_interval_s = refresh_interval_s
        self.clock = clock
        self.on_correction = on_correction
        self.on_realised = on_realised
        self.on_answer = on_answer
        self._view: QueueSnapshot | None = None
        self._view_at = -math.inf
        self._kept_fresh = False
        self._index: QueueIndex | None = None
        self._groups: dict[GroupKey, RequestGroup] = {}
        self._orders: dict[GroupKey, tuple[RequestGroup, GroupOrder]] = {}
        self._predicted: OrderedDict[str, float] = OrderedDict()
        self.learner = LengthLearner()

    async def view(self) -> QueueSnapshot:
        """The latest queue view, at the current time. Without a running
        :meth:`keep_fresh` it is re-read here when older than ``refresh_interval_s``; with
        one, a call never waits for Redis (except for the very first view)."""
        now = self.clock()
        stale = now - self._view_at >= self.refresh_interval_s
        if self._view is None or (stale and not self._kept_fresh):
            await self.refresh(now)
        assert self._view is not None
        workers = self._view.workers
        return QueueSnapshot(now, self._view.groups, workers, self._view.virtual_queues)

    async def keep_fresh(self) -> None:
        """Re-read the view every ``refresh_interval_s`` until cancelled (a task), so that
        predictions on the submit path never wait for a snapshot of a large queue; then,
        in a thread, work out every worker's queue once so that the estimator's memo holds
        the sums of every group that changed before a prediction needs them."""
        self._kept_fresh = True
        try:
            while True:
                started = self.clock()
                with contextlib.suppress(Unavailable):  # keep the last view; health says why
                    view = await self.refresh(started)
                    await asyncio.to_thread(self._warm, view)
                await asyncio.sleep(max(0.0, self.refresh_interval_s - (self.clock() - started)))
        finally:
            self._kept_fresh = False

    async def refresh(self, now: float | None = None) -> QueueSnapshot:
        now = self.clock() if now is None else now
        workers = self.roster.views(now, self.estimator.profiles)
        if self.store is None:
            self._view = QueueSnapshot(now, (), workers)
        else:
            stored = await self.store.snapshot()
            stored = replace(stored, groups=self._same_groups(stored.groups))
            self._view = stored.to_queue_snapshot(now, workers)
        self._view_at = now
        self._index = QueueIndex.of(self._view, self._order_of)
        return self._view

    def _same_groups(self, groups: tuple[RequestGroup, ...]) -> tuple[RequestGroup, ...]:
        """``groups``, where a group holds the very same requests as in the previous view
        the previous group object (the estimator memoises by group identity)."""
        known = self._groups
        out = []
        for group in groups:
            before = known.get(group.key)
            if before is not None and len(before.requests) == len(group.requests) and all(
                    a is b for a, b in zip(before.requests, group.requests, strict=True)):
                group = before
            out.append(group)
        self._groups = {g.key: g for g in out}
        self._orders = {k: v for k, v in self._orders.items() if k in self._groups}
        return tuple(out)

    def _order_of(self, group: RequestGroup) -> GroupOrder:
        """The group's ordering facts, remembered while the group object lives on."""
        known = self._orders.get(group.key)
        if known is not None and known[0] is group:
            return known[1]
        order = GroupOrder.of(group)
        self._orders[group.key] = (group, order)
        return order

    def _warm(self, view: QueueSnapshot) -> None:
        index = self._index
        if index is None:
            return
        estimator = self.estimator
        for worker in view.workers:
            queue = [g for _, g in index.queues.get(worker.id, ())]
            with contextlib.suppress(NotFound):
                estimator.queue_waits(worker, queue, view.now)

    async def predict_wait(self, query: WaitQuery) -> WaitAnswer:
        view = await self.view()
        answer = predict_wait(self.estimator, view, query, self.admission_min_p, self._index,
                              self.policy)
        if self.on_answer is not None:
            self.on_answer(query.slo_class.value, answer.admit)
        return answer

    def estimate_batch(self, groups: Sequence[GroupSummary], workers: Sequence[WorkerSummary]
                       ) -> BatchEstimates:
        return estimate_batch(self.estimator, groups, workers)

    def on_telemetry(self, record: Telemetry) -> bool:
        """Roster update, and a correction when the record has a measured step window."""
        self.roster.on_telemetry(record)
        if (record.model is None or record.step_time_predicted_s <= 0
                or record.step_time_observed_s <= 0
                or not self.estimator.profiles.has(record.model, record.gpu)):
            return False
        before = self.estimator.correction(record.model, record.gpu)
        self.estimator = self.estimator.with_observation(
            record.model, record.gpu, record.step_time_predicted_s * before,
            record.step_time_observed_s)
        if self.on_correction is not None:
            self.on_correction(record.model, record.gpu,
                               self.estimator.correction(record.model, record.gpu))
        return True

    def on_event(self, event: Event) -> None:
        """Pairs ``admitted`` predictions with the realised wait of ``first_token``;
        learns output lengths from ``finished`` events (:class:`LengthLearner`)."""
        self.roster.on_event(event)
        if event.request_id is None or event.slo_class is None or event.arrival_at is None:
            return  # a worker event (swapped): no request to pair
        if event.type == "finished" and event.num_output_tokens:
            self.learner.observe(event.model, SLOClass(event.slo_class), event.num_output_tokens)
            self.estimator = self.learner.refit(self.estimator)
        if event.type == "admitted" and event.predicted_wait_s is not None:
            self._predicted[event.request_id] = event.predicted_wait_s
            while len(self._predicted) > _PENDING_LIMIT:
                self._predicted.popitem(last=False)
        elif event.type == "first_token":
            predicted = self._predicted.pop(event.request_id, None)
            if predicted is not None and self.on_realised is not None:
                self.on_realised(event.slo_class, predicted, max(0.0, event.at - event.arrival_at))
