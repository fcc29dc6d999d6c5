"""The discrete-event simulation of a cluster of LLM workers under one scheduling policy.

Model (every time is virtual seconds):

* **Worker** = one model instance on ``num_gpus`` GPUs of one type. It holds a set of
  resident models (awake or asleep) and has at most one active model. It is always
  in one *phase*: idle, prefill, mixed (chunked), decode, swap or stall (KV copy to CPU).
* **Continuous batching.** A decode phase is a segment of whole decode steps of a
  fixed batch, each step advancing every running request by one token
  (:mod:`qlm.sim.batching`); it ends at the next completion, when the KV cache
  would overflow, or earlier at the next step boundary when something must change
  (admission, eviction, swap).
* **Prefill** (``SimConfig.prefill_mode``; step maths in :mod:`qlm.sim.batching`):
  ``chunked`` (default, vLLM's): each step has a budget of ``max_prefill_tokens``
  tokens, one per decoding request, then prompt chunks of the requests being
  prefilled (``admitting``), then newly admitted ones (backpressure pull,
  :func:`qlm.core.pulls.plan_pulls`); such a *mixed* step takes
  :func:`~qlm.sim.batching.mixed_step_s`; a busy worker only admits requests queued
  before its previous step began (asynchronous scheduling), and first-token and finish
  times are the step's end plus the profile's output latency. Steps without prompt
  chunks run as decode segments.
  ``whole`` (vLLM without chunked prefill): at a step boundary the worker admits
  requests (at most ``max_prefill_tokens`` prompt tokens) and prefills them in one step
  while its running batch waits; the prefill emits each admitted request's first token,
  so **TTFT = end of its admission prefill**.
* **Eviction keeps progress.** An evicted request returns to the queue with its
  generated tokens. Re-admission recomputes its KV state by a prefill of
  prompt + generated tokens, unless it was evicted with ``state_swap`` and comes
  back to the same worker: then it pays ``bytes/PCIe bandwidth`` on the way out
  (a stall) and on the way in, instead of the prefill. When the KV cache would
  overflow, the engine itself evicts the latest admitted request (recompute),
  like vLLM's preemption.
* **Model swap** = sleep the active model (``sleep_s`` of its profile) + wake the
  target (``wake_s`` if resident, else ``cold_load_s``). Running requests are
  evicted first (progress kept); the worker serves nothing while swapping; the old
  model stays resident (asleep in CPU memory).
* **Scheduler** invoked at the arrival of a request of a new group, at every
  completion or eviction, and on a periodic tick; invocations at one instant are
  coalesced. Each ``decide()`` call's wall time is measured by the injected
  ``timer``. A decision means what :func:`qlm.runtime.apply.apply` says (shared with
  the scheduler service and the GPU harness): its placements become the workers'
  virtual queues; its evictions and swaps take effect at each worker's next step
  boundary; workers pull from the head of their virtual queues at every step boundary
  (a decision's pulls forecast those); a batch cap (``BatchCap``) limits what a worker
  admits from then on (running requests above it finish). Invalid actions are ignored
  and counted.
* **Predicted waits** (with a ``forecaster``): after every decision the
  :class:`~qlm.core.forecast.Forecaster` forecasts each queued group on the virtual
  queue just written, as the scheduler service does, and every queued request's
  prediction is its group's at its place (:meth:`GroupForecast.first_token_at_for`);
  the first one after arrival and the last one before its first token are recorded.
  Finished requests teach the forecaster their output lengths.
* **Admission** refuses a request that fits no worker of the cluster able to serve its
  model (prompt + ``max_tokens`` beyond each one's ``max_model_len`` and KV cache:
  :func:`qlm.core.fit.refusal`, the check ingest applies) at its arrival, as the services
  do: it never enters the queue and is reported as *refused*, apart from SLO misses.
* Running requests in a worker's view show progress as of the worker's last step
  boundary, refreshed once it moved ``VIEW_LAG_TOKENS`` tokens (views are cheap to
  keep, costly to rebuild for every request at every step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from qlm.core.errors import InvalidInput
from qlm.core.fit import SequenceLimit, refusal, serving_limits
from qlm.core.forecast import Forecaster
from qlm.core.perf import PerfProfile, ProfileBook
from qlm.core.policies.base import FinishObserver, Policy, PolicyContext
from qlm.core.pulls import kv_reservation, plan_pulls
from qlm.core.queue import QueueIndex
from qlm.core.types import (
    Decision,
    GroupKey,
    QueueSnapshot,
    Request,
    RunningRequest,
    WorkerView,
    group_key_for,
)
from qlm.runtime.apply import apply
from qlm.sim.batching import (
    admit_prefix,
    decode_segment_s,
    decode_steps,
    decode_steps_within,
    kv_copy_s,
    mixed_step_s,
    output_latency_s,
    plan_chunks,
    prefill_step_s,
)
from qlm.sim.cluster import Job, SimConfig, WorkerSpec
from qlm.sim.events import Arrival, Boundary, Decide, Event, EventQueue, Tick
from qlm.sim.metrics import RequestRecord, RunResult, summarise

Timer = Callable[[], float]
#: A running request's view is refreshed once its progress moved this many tokens.
VIEW_LAG_TOKENS = 8
Scheduled = list[tuple[float, Event]]


class Phase(Enum):
    IDLE = "idle"
    PREFILL = "prefill"
    MIXED = "mixed"  # one chunked step: decode tokens plus prompt chunks
    DECODE = "decode"
    SWAP = "swap"
    STALL = "stall"


@dataclass
class _Live:
    """The simulator's mutable record of one request."""

    job: Job
    key: GroupKey
    request: Request
    generated: int = 0
    started_at: float | None = None
    admitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    worker_id: str | None = None
    num_evictions: int = 0
    rejected: bool = False
    refused: bool = False
    kv_on_worker: str | None = None
    predicted_at: float | None = None
    predicted_first_token_at: float | None = None
    last_predicted_at: float | None = None
    last_predicted_first_token_at: float | None = None
    queued_at: float = 0.0
    prefill_need: int = 0  # chunked: prompt tokens its admission prefills (0: KV restore)
    prefilled: int = 0  # chunked: of which done


#: A co-located worker's decode segment is cut short when its slowdown would move by more
#: than this (``SimConfig.colocation_slowdown``): small moves wait for its next segment.
RECUT_FACTOR_CHANGE = 0.05


@dataclass
class _Worker:
    spec: WorkerSpec
    active_model: str | None
    models: set[str]
    phase: Phase = Phase.IDLE
    phase_started_at: float = 0.0
    phase_end_at: float = 0.0
    epoch: int = 0
    running: list[str] = field(default_factory=list)
    admitting: list[str] = field(default_factory=list)
    seg_batch: int = 0
    seg_ctx0: int = 0
    seg_steps: int = 0
    #: How much slower than its profile the current phase runs (engines beside it on its
    #: card, ``SimConfig.colocation_slowdown``); fixed when the phase starts.
    pace_factor: float = 1.0
    swap_target: str | None = None
    stall_s: float = 0.0
    pending_evictions: dict[str, bool] = field(default_factory=dict)
    pending_swap: str | None = None
    restored: set[str] = field(default_factory=set)  # admitted by KV restore, not prefill
    order: tuple[GroupKey, ...] = ()
    batch_cap: int | None = None  # set by the scheduler (BatchCap): admit below it only
    busy_s: float = 0.0
    view: WorkerView | None = None
    reserved_tokens: int = 0  # KV reservations of ``view.running`` (valid with ``view``)
    # chunked prefill: the current step's decoding requests and prompt chunks, when the
    # last step began, whether a queued request was not yet visible to the scheduler
    step_decoding: list[str] = field(default_factory=list)
    step_chunks: dict[str, int] = field(default_factory=dict)
    last_step_at: float = 0.0
    deferred: bool = False

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def has_pending(self) -> bool:
        return bool(self.pending_evictions or self.pending_swap)


class Simulation:
    """One run: ``jobs`` on ``workers`` under ``policy``. Call :meth:`run` once."""

    def __init__(
        self,
        jobs: Sequence[Job],
        workers: Sequence[WorkerSpec],
        profiles: ProfileBook,
        policy: Policy,
        config: SimConfig | None = None,
        *,
        seed: int = 0,
        timer: Timer | None = None,
        forecaster: Forecaster | None = None,
        policy_options: Mapping[str, Any] | None = None,
        planning_profiles: ProfileBook | None = None,
    ) -> None:
        self.config = config or SimConfig()
        self.chunked = self.config.prefill_mode == "chunked"
        self.jobs = tuple(sorted(jobs, key=lambda j: (j.request.arrival_at, j.request.id)))
        self._validate(self.jobs, workers, profiles)
        self.profiles = profiles
        self.policy = policy
        # the policy plans with ``planning_profiles`` when given (workers slower or faster
        # than their profile, e.g. two engines sharing one GPU); the engine runs ``profiles``
        self.ctx = PolicyContext(planning_profiles or profiles, dict(policy_options or {}))
        self.rng = np.random.default_rng(seed)
        self.timer = timer
        self.forecaster = forecaster
        self.window_s = float(getattr(policy, "group_window_s", self.config.group_window_s))
        self.events = EventQueue()
        self.now = 0.0
        self.live: dict[str, _Live] = {}
        self.queued = QueueIndex()
        self.owner: dict[GroupKey, str] = {}
        self.running_views: dict[str, RunningRequest] = {}
        self.workers = {
            s.id: _Worker(spec=s, active_model=s.active_model, models=set(s.models))
            for s in workers
        }
        #: The other workers of each worker's card, for the workers that share one and only
        #: when the engines slow each other (``SimConfig.colocation_slowdown``).
        self.card_peers: dict[str, tuple[_Worker, ...]] = {}
        if self.config.colocation_slowdown:
            for w in self.workers.values():
                peers = tuple(o for o in self.workers.values() if o is not w
                              and o.spec.device is not None and o.spec.device == w.spec.device)
                if peers:
                    self.card_peers[w.id] = peers
        self.decide_pending = False
        self.last_decide_at = -math.inf
        self.decision_s: list[float] = []
        self.num_swaps = 0
        self.num_evictions = 0
        self.num_invalid = 0
        self.num_arrived = 0
        self.num_open = 0  # arrived, not finished, rejected or refused
        self._limits: dict[str, tuple[SequenceLimit, ...]] = {}

    @staticmethod
    def _validate(
        jobs: Sequence[Job], workers: Sequence[WorkerSpec], profiles: ProfileBook
    ) -> None:
        if not jobs:
            raise InvalidInput("jobs", "must not be empty")
        if not workers:
            raise InvalidInput("workers", "must not be empty")
        if len({j.request.id for j in jobs}) != len(jobs):
            raise InvalidInput("jobs", "request ids must be unique")
        if len({w.id for w in workers}) != len(workers):
            raise InvalidInput("workers", "worker ids must be unique")
        for w in workers:
            for m in w.models:
                if not profiles.has(m, w.gpu):
                    raise InvalidInput(f"worker {w.id}.models", f"no profile for {m}@{w.gpu}")

    # ================================================================ loop
    def run(self) -> RunResult:
        for index, job in enumerate(self.jobs):
            self.events.push(job.request.arrival_at, Arrival(index))
        self.events.push(self.jobs[0].request.arrival_at, Tick())
        horizon_at = self.jobs[-1].request.arrival_at + self.config.horizon_s
        while self.events:
            at, event = self.events.pop()
            if at > horizon_at:
                break
            self.now = at
            for new_at, new_event in self._handle(event):
                self.events.push(new_at, new_event)
        return self._result()

    def _handle(self, event: Event) -> Scheduled:
        if isinstance(event, Boundary):
            return self.on_boundary(event)
        if isinstance(event, Arrival):
            return self.on_arrival(event)
        if isinstance(event, Tick):
            return self.on_tick()
        return self.on_decide()

    # ============================================================== events
    def on_arrival(self, event: Arrival) -> Scheduled:
        job = self.jobs[event.index]
        live = _Live(job=job, key=group_key_for(job.request, self.window_s), request=job.request)
        self.live[job.request.id] = live
        self.num_arrived += 1
        if self._refuses(job.request):
            live.refused = True
            return []
        self.num_open += 1
        is_new_group = live.key not in self.queued
        self._enqueue(live)
        out: Scheduled = self.request_decision() if is_new_group else []
        owner = self.owner.get(live.key)
        if owner is not None:
            out += self._nudge(self.workers[owner])
        return out

    def _refuses(self, request: Request) -> bool:
        """Whether admission refuses ``request``: it fits no worker that can serve its model
        (:func:`qlm.core.fit.refusal`)."""
        limits = self._limits.get(request.model)
        if limits is None:
            limits = self._limits[request.model] = serving_limits(
                self.profiles, request.model,
                ((w.spec.gpu, w.spec.num_gpus) for w in self.workers.values()))
        return refusal(request.model, request.prompt_tokens, request.max_tokens,
                       limits) is not None

    def on_tick(self) -> Scheduled:
        if self.num_arrived == len(self.jobs) and self.num_open == 0:
            return []
        out: Scheduled = self.request_decision() if self.num_open else []
        out.append((self.now + self.config.tick_s, Tick()))
        return out

    def on_decide(self) -> Scheduled:
        self.decide_pending = False
        self.last_decide_at = self.now
        snapshot = self.snapshot()
        started = self.timer() if self.timer else 0.0
        decision = self.policy.decide(snapshot, self.ctx)
        if self.timer:
            self.decision_s.append(self.timer() - started)
        scheduled = self.apply(decision, snapshot)
        if self.forecaster is not None:
            self._record_predictions(snapshot)
        return scheduled

    def on_boundary(self, event: Boundary) -> Scheduled:
        worker = self.workers[event.worker_id]
        if event.epoch != worker.epoch:
            return []
        changed = self._end_phase(worker)
        changed |= self._apply_pending(worker)
        out = self._start_next_phase(worker)
        if changed:
            out += self.request_decision()
        return out

    def request_decision(self) -> Scheduled:
        if self.decide_pending:
            return []
        self.decide_pending = True
        at = max(self.now, self.last_decide_at + self.config.min_decision_interval_s)
        return [(at, Decide())]

    # ============================================================ snapshot
    def snapshot(self) -> QueueSnapshot:
        return QueueSnapshot(
            now=self.now,
            groups=self.queued.groups(),
            workers=tuple(self._view(w) for w in self.workers.values()),
            virtual_queues={w.id: w.order for w in self.workers.values()},
            queued_ids=self.queued.queued_ids(),
        )

    def _view(self, w: _Worker) -> WorkerView:
        if w.view is None:
            running = tuple(self._running_view(rid) for rid in (*w.running, *w.admitting))
            model = w.swap_target if w.phase is Phase.SWAP else w.active_model
            profile = self._profile(w, model) if model else None
            w.view = WorkerView(
                id=w.id,
                gpu=w.spec.gpu,
                # the model being woken counts as resident (it is awake when the swap ends)
                models=tuple(sorted(w.models | ({w.swap_target} if w.swap_target else set()))),
                active_model=None if w.phase is Phase.SWAP else w.active_model,
                kv_capacity_tokens=profile.kv_capacity_tokens if profile else 1,
                max_batch_size=profile.max_batch_size if profile else 1,
                running=running,
                num_gpus=w.spec.num_gpus,
                swapping_until=w.phase_end_at if w.phase is Phase.SWAP else None,
                swapping_to=w.swap_target if w.phase is Phase.SWAP else None,
                batch_cap=w.batch_cap,
                device=w.spec.device,
            )
            expected = self.config.expected_output_tokens
            w.reserved_tokens = sum(kv_reservation(r.request, expected) for r in running)
        return w.view

    def _running_view(self, rid: str) -> RunningRequest:
        """The request as running now (views are reused while its progress is unchanged)."""
        live = self.live[rid]
        view = self.running_views.get(rid)
        if (
            view is None
            or abs(view.request.num_generated - live.generated) >= VIEW_LAG_TOKENS
            or view.started_at != live.admitted_at
            or view.first_token_at != live.first_token_at
        ):
            request = live.job.request.with_generated(live.generated)
            view = RunningRequest(request, live.admitted_at, live.first_token_at)
            self.running_views[rid] = view
        return view

    def _profile(self, w: _Worker, model: str) -> PerfProfile:
        return self.profiles.get(model, w.spec.gpu)

    # ============================================================ decision
    def apply(self, decision: Decision, snapshot: QueueSnapshot) -> Scheduled:
        """Apply a decision made on ``snapshot`` (:func:`qlm.runtime.apply.apply`):
        rejections and placements now, evictions and swaps at step boundaries."""
        effects = _SimEffects(self)
        self.num_invalid += apply(decision, snapshot, self.profiles, effects)
        return effects.scheduled

    def _record_predictions(self, snapshot: QueueSnapshot) -> None:
        """Every queued request's prediction from the forecasts of the virtual queues the
        decision on ``snapshot`` just wrote (first after arrival, last before start)."""
        assert self.forecaster is not None
        orders = {w.id: w.order for w in self.workers.values()}
        forecasts = self.forecaster.forecast(snapshot, orders)
        for group in snapshot.groups:
            forecast = forecasts.get(group.key)
            if forecast is None:
                continue
            for rank, request in enumerate(group.requests):
                live = self.live.get(request.id)
                if live is None or live.first_token_at is not None or live.rejected:
                    continue
                at = forecast.first_token_at_for(rank)
                if live.predicted_at is None:
                    live.predicted_at, live.predicted_first_token_at = self.now, at
                live.last_predicted_at, live.last_predicted_first_token_at = self.now, at

    # ============================================================= workers
    def _nudge(self, w: _Worker) -> Scheduled:
        """Make ``w`` act on new work or pending actions at its next step boundary."""
        if w.phase is Phase.IDLE and (w.has_pending or self._pullable(w)):
            w.epoch += 1
            return [(self.now, Boundary(w.id, w.epoch))]
        if w.phase is Phase.DECODE and (w.has_pending or self._pullable(w)):
            return self._cut_segment(w)
        return []

    def _pullable(self, w: _Worker) -> bool:
        if w.active_model is None or not w.order:
            return False
        return bool(self._planned_pulls(w, limit_one=True))

    def _planned_pulls(self, w: _Worker, limit_one: bool = False) -> tuple[str, ...]:
        assert w.active_model is not None
        groups = []
        for k in w.order:
            if k in self.queued:
                groups.append(self.queued.group(k))
                if limit_one:
                    break
        if not groups:
            return ()
        return plan_pulls(
            self._view(w),
            groups,
            self._profile(w, w.active_model),
            self.config.expected_output_tokens,
            reserved_tokens=w.reserved_tokens,
        )

    def _cut_segment(self, w: _Worker) -> Scheduled:
        profile = self._profile(w, self._active(w))
        done = decode_steps_within(profile, w.seg_batch, w.seg_ctx0,
                                   (self.now - w.phase_started_at) / w.pace_factor)
        steps = min(done + 1, w.seg_steps)
        if steps == w.seg_steps:
            return []
        w.seg_steps = steps
        w.phase_end_at = w.phase_started_at + w.pace_factor * decode_segment_s(
            profile, w.seg_batch, w.seg_ctx0, steps
        )
        w.epoch += 1
        return [(w.phase_end_at, Boundary(w.id, w.epoch))]

    @staticmethod
    def _active(w: _Worker) -> str:
        if w.active_model is None:
            raise AssertionError(f"worker {w.id} has no active model")
        return w.active_model

    def _end_phase(self, w: _Worker) -> bool:
        """Account for the phase that ends now; True if requests finished."""
        finished = False
        if w.phase is Phase.MIXED:
            finished = self._end_mixed_step(w)
        elif w.phase is Phase.DECODE:
            w.busy_s += self.now - w.phase_started_at
            profile = self._profile(w, self._active(w))
            w.last_step_at = w.phase_started_at + w.pace_factor * decode_segment_s(
                profile, w.seg_batch, w.seg_ctx0, w.seg_steps - 1
            )
            for rid in list(w.running):
                live = self.live[rid]
                live.generated += w.seg_steps
                if live.generated >= live.job.output_tokens:
                    self._finish(w, live)
                    finished = True
        elif w.phase is Phase.PREFILL:
            w.busy_s += self.now - w.phase_started_at
            for rid in w.admitting:
                live = self.live[rid]
                if rid not in w.restored:  # a recompute prefill emits the next token
                    live.generated += 1
                if live.first_token_at is None:
                    live.first_token_at = self.now
                w.running.append(rid)
                if live.generated >= live.job.output_tokens:
                    self._finish(w, live)
                    finished = True
            w.admitting = []
            w.restored.clear()
        elif w.phase is Phase.SWAP:
            assert w.swap_target is not None
            w.active_model = w.swap_target
            w.models.add(w.swap_target)
            w.swap_target = None
        w.phase = Phase.IDLE
        w.view = None
        return finished

    def _end_mixed_step(self, w: _Worker) -> bool:
        """Chunked: every decoding request got a token; prompt chunks that complete a
        prefill emit the first token (a KV restore rejoins without one)."""
        w.busy_s += self.now - w.phase_started_at
        w.last_step_at = w.phase_started_at
        latency = self._output_latency_s(w)
        finished = False
        for rid in w.step_decoding:
            live = self.live[rid]
            live.generated += 1
            if live.generated >= live.job.output_tokens:
                self._finish(w, live)
                finished = True
        for rid, take in w.step_chunks.items():
            live = self.live[rid]
            live.prefilled += take
            if live.prefilled < live.prefill_need:
                continue
            w.admitting.remove(rid)
            w.running.append(rid)
            if rid in w.restored:
                w.restored.discard(rid)
                continue
            live.generated += 1
            if live.first_token_at is None:
                live.first_token_at = self.now + latency
            if live.generated >= live.job.output_tokens:
                self._finish(w, live)
                finished = True
        w.step_decoding = []
        w.step_chunks = {}
        return finished

    def _output_latency_s(self, w: _Worker) -> float:
        """Chunked: a token reaches the client this long after its step (0 when whole)."""
        if not self.chunked or w.active_model is None:
            return 0.0
        return output_latency_s(self._profile(w, w.active_model))

    def _apply_pending(self, w: _Worker) -> bool:
        """Apply pending evictions and the engine's own KV preemption; True if any."""
        changed = False
        for rid, state_swap in w.pending_evictions.items():
            if rid in w.running:
                self._evict(w, rid, state_swap)
                changed = True
            elif rid in w.admitting:  # chunked: a prefill under way is dropped
                self._evict(w, rid, state_swap=False)
                changed = True
        w.pending_evictions.clear()
        if w.active_model is not None:
            capacity = self._profile(w, w.active_model).kv_capacity_tokens
            while w.running or w.admitting:
                used = self._context(w.running) + len(w.running)
                used += sum(self.live[rid].prefilled for rid in w.admitting)
                if used <= capacity:
                    break
                latest = w.admitting[-1] if w.admitting else w.running[-1]
                self._evict(w, latest, state_swap=False)
                changed = True
        return changed

    def _start_next_phase(self, w: _Worker) -> Scheduled:
        target = w.pending_swap
        w.pending_swap = None
        if target is not None and target != w.active_model:
            return self._start_swap(w, target)
        if w.stall_s > 0:
            duration, w.stall_s = w.stall_s, 0.0
            return self._start_phase(w, Phase.STALL, duration)
        if w.active_model is not None and self.chunked:
            restore_s = self._admit_chunks(w)
            if w.admitting:
                return self._start_mixed_step(w, restore_s)
        elif w.active_model is not None:
            admitted = self._admit(w)
            if admitted:
                return self._start_phase(w, Phase.PREFILL, self._prefill_s(w, admitted))
        if w.running:
            return self._start_decode(w)
        return []

    def _start_phase(self, w: _Worker, phase: Phase, duration: float) -> Scheduled:
        w.phase = phase
        w.phase_started_at = self.now
        w.epoch += 1
        peers = self.card_peers.get(w.id)
        if not peers:  # a card of its own, or engines that do not slow each other
            w.pace_factor = 1.0
            w.phase_end_at = self.now + duration
            return [(w.phase_end_at, Boundary(w.id, w.epoch))]
        w.pace_factor = (self._colocation_factor(peers)
                         if phase in (Phase.DECODE, Phase.MIXED, Phase.PREFILL) else 1.0)
        w.phase_end_at = self.now + duration * w.pace_factor
        out: Scheduled = [(w.phase_end_at, Boundary(w.id, w.epoch))]
        # its batch may have changed: the decode segments of the others on its card whose
        # pace moved by more than RECUT_FACTOR_CHANGE end at their next step
        for other in peers:
            if (other.phase is Phase.DECODE
                    and abs(self._colocation_factor(self.card_peers[other.id])
                            - other.pace_factor) > RECUT_FACTOR_CHANGE):
                out += self._cut_segment(other)
        return out

    def _colocation_factor(self, peers: Sequence[_Worker]) -> float:
        """How much slower than its profile a step runs beside ``peers`` (the other workers
        of its card): 1 + ``colocation_slowdown`` × their running batch as a share of their
        ``max_batch_size``."""
        load = 0.0
        for other in peers:
            batch = len(other.running) + len(other.admitting)
            if batch and other.active_model is not None:
                load += batch / self._profile(other, other.active_model).max_batch_size
        return 1.0 + self.config.colocation_slowdown * load

    def _start_swap(self, w: _Worker, target: str) -> Scheduled:
        for rid in [*w.running, *w.admitting]:
            self._evict(w, rid, state_swap=False)
        sleep = self._profile(w, w.active_model).sleep_s if w.active_model else 0.0
        duration = sleep + self._profile(w, target).swap_in_s(target in w.models)
        w.active_model = None
        w.swap_target = target
        w.view = None
        self.num_swaps += 1
        duration, w.stall_s = duration + w.stall_s, 0.0
        return self._start_phase(w, Phase.SWAP, duration)

    def _start_decode(self, w: _Worker) -> Scheduled:
        profile = self._profile(w, self._active(w))
        batch = len(w.running)
        ctx0 = self._context(w.running)
        to_completion = min(
            self.live[rid].job.output_tokens - self.live[rid].generated for rid in w.running
        )
        w.seg_batch, w.seg_ctx0 = batch, ctx0
        w.seg_steps = 1 if w.deferred else decode_steps(profile, batch, ctx0, to_completion)
        return self._start_phase(
            w, Phase.DECODE, decode_segment_s(profile, batch, ctx0, w.seg_steps)
        )

    def _context(self, rids: Iterable[str]) -> int:
        total = 0
        for rid in rids:
            live = self.live[rid]
            total += live.job.request.prompt_tokens + live.generated
        return total

    # ============================================================ admission
    def _admit(self, w: _Worker) -> list[str]:
        """Admit the head of the virtual queue, within limits."""
        profile = self._profile(w, self._active(w))
        view = self._view(w)
        candidates = self._planned_pulls(w)
        expected = self.config.expected_output_tokens
        count = admit_prefix(
            ((kv_reservation(self.live[rid].request, expected),
              self.live[rid].request.context_tokens) for rid in candidates),
            min(profile.max_batch_size, view.batch_limit) - view.batch_size,
            profile.kv_capacity_tokens - w.reserved_tokens,
            self.config.max_prefill_tokens,
        )
        admitted = list(candidates[:count])
        self._mark_admitted(w, admitted)
        w.admitting = admitted
        if admitted:
            w.view = None
        return admitted

    def _admit_chunks(self, w: _Worker) -> float:
        """Chunked: admit the candidates that get a share of this step's token budget;
        the seconds of KV restores (from CPU memory) the step pays for them.

        With asynchronous scheduling a busy worker's step is planned when the previous
        step begins: requests queued after that are not visible yet (``w.deferred``)."""
        profile = self._profile(w, self._active(w))
        view = self._view(w)
        candidates = self._planned_pulls(w)
        visible_until = w.last_step_at if (w.running or w.admitting) else self.now
        num_visible = 0
        while (num_visible < len(candidates)
               and self.live[candidates[num_visible]].queued_at <= visible_until):
            num_visible += 1
        expected = self.config.expected_output_tokens
        count = admit_prefix(
            ((kv_reservation(self.live[rid].request, expected), 0)
             for rid in candidates[:num_visible]),
            min(profile.max_batch_size, view.batch_limit) - view.batch_size,
            profile.kv_capacity_tokens - w.reserved_tokens,
        )
        # the first request not visible yet stops the pull (if all before it fit)
        w.deferred = count == num_visible < len(candidates)
        eligible = list(candidates[:count])
        restore = {rid for rid in eligible if self._restores(w, self.live[rid])}
        plan = plan_chunks(
            self.config.max_prefill_tokens,
            len(w.running),
            [self.live[rid].prefill_need - self.live[rid].prefilled for rid in w.admitting],
            (0 if rid in restore else self.live[rid].request.context_tokens for rid in eligible),
        )
        admitted = eligible[: len(plan.admitted)]
        self._mark_admitted(w, admitted)
        w.step_chunks = dict(zip(w.admitting, plan.continuing, strict=True))
        restore_s = 0.0
        for rid, take in zip(admitted, plan.admitted, strict=True):
            live = self.live[rid]
            if rid in restore:
                w.restored.add(rid)
                restore_s += self._kv_copy_s(w, live)
            live.prefill_need = 0 if rid in restore else live.request.context_tokens
            live.prefilled = 0
            live.kv_on_worker = None
            w.step_chunks[rid] = take
        w.admitting.extend(admitted)
        if admitted:
            w.view = None
        return restore_s

    def _restores(self, w: _Worker, live: _Live) -> bool:
        """Whether the request's KV state comes back from CPU memory instead of a prefill."""
        return live.kv_on_worker == w.id and live.first_token_at is not None

    def _start_mixed_step(self, w: _Worker, restore_s: float) -> Scheduled:
        profile = self._profile(w, self._active(w))
        w.step_decoding = list(w.running)
        duration = mixed_step_s(
            profile, len(w.running), self._context(w.running), sum(w.step_chunks.values())
        )
        return self._start_phase(w, Phase.MIXED, duration + restore_s)

    def _mark_admitted(self, w: _Worker, admitted: Sequence[str]) -> None:
        for rid in admitted:
            live = self.live[rid]
            self._dequeue(live)
            live.admitted_at = self.now
            if live.started_at is None:
                live.started_at = self.now
            live.worker_id = w.id

    def _prefill_s(self, w: _Worker, admitted: Sequence[str]) -> float:
        profile = self._profile(w, self._active(w))
        recompute_tokens = 0
        restore_s = 0.0
        for rid in admitted:
            live = self.live[rid]
            if self._restores(w, live):
                restore_s += self._kv_copy_s(w, live)
                w.restored.add(rid)
            else:
                recompute_tokens += live.request.context_tokens
            live.kv_on_worker = None
        return prefill_step_s(profile, recompute_tokens, restore_s)

    def _kv_copy_s(self, w: _Worker, live: _Live) -> float:
        tokens = live.job.request.prompt_tokens + live.generated
        return kv_copy_s(self._profile(w, live.key.model), tokens, self.config.pcie_gb_s)

    # ============================================================== queue
    def _enqueue(self, live: _Live) -> None:
        live.queued_at = self.now
        self.queued.add(live.key, live.request)

    def _dequeue(self, live: _Live) -> None:
        self.queued.remove(live.key, live.request.id)

    def _evict(self, w: _Worker, rid: str, state_swap: bool) -> None:
        if rid in w.admitting:  # chunked: its prefill under way is lost
            w.admitting.remove(rid)
            w.restored.discard(rid)
        else:
            w.running.remove(rid)
        w.view = None
        live = self.live[rid]
        live.prefilled = 0
        live.num_evictions += 1
        self.num_evictions += 1
        live.request = live.job.request.with_generated(live.generated)
        if state_swap:
            live.kv_on_worker = w.id
            w.stall_s += self._kv_copy_s(w, live)
        self._enqueue(live)

    def _finish(self, w: _Worker, live: _Live) -> None:
        w.running.remove(live.request.id)
        self.running_views.pop(live.request.id, None)
        live.finished_at = self.now + self._output_latency_s(w)
        self.num_open -= 1
        request = live.request
        if self.forecaster is not None:
            self.forecaster.on_finished(request.model, request.slo_class, live.job.output_tokens)
        if isinstance(self.policy, FinishObserver):
            self.policy.on_finished(request.id, request.slo_class, request.tenant,
                                    request.prompt_tokens, live.job.output_tokens)

    def _reject(self, rid: str) -> None:
        live = self.live[rid]
        self._dequeue(live)
        live.rejected = True
        self.num_open -= 1

    # ============================================================= result
    def _result(self) -> RunResult:
        records = tuple(self._record(j) for j in self.jobs)
        metrics = summarise(
            records,
            busy_gpu_s=sum(w.busy_s * w.spec.num_gpus for w in self.workers.values()),
            num_gpus=sum(w.spec.num_gpus for w in self.workers.values()),
            swaps=self.num_swaps,
            evictions=self.num_evictions,
            decision_s=self.decision_s,
            invalid_actions=self.num_invalid,
        )
        return RunResult(metrics, records, tuple(self.decision_s))

    def _record(self, job: Job) -> RequestRecord:
        r = job.request
        live = self.live.get(r.id)
        if live is None:
            return RequestRecord(
                r.id, r.model, r.slo_class.value, r.arrival_at, r.deadline_at, r.prompt_tokens,
                job.output_tokens, None, None, None, None, 0, False, tenant=r.tenant,
                tpot_slo_s=r.slo.tpot_s,
            )
        return RequestRecord(
            id=r.id,
            model=r.model,
            slo_class=r.slo_class.value,
            arrival_at=r.arrival_at,
            deadline_at=r.deadline_at,
            prompt_tokens=r.prompt_tokens,
            output_tokens=job.output_tokens,
            started_at=live.started_at,
            first_token_at=live.first_token_at,
            finished_at=live.finished_at,
            worker_id=live.worker_id,
            num_evictions=live.num_evictions,
            rejected=live.rejected,
            refused=live.refused,
            predicted_at=live.predicted_at,
            predicted_first_token_at=live.predicted_first_token_at,
            last_predicted_at=live.last_predicted_at,
            last_predicted_first_token_at=live.last_predicted_first_token_at,
            tenant=r.tenant,
            tpot_slo_s=r.slo.tpot_s,
        )


class _SimEffects:
    """The simulator's :class:`qlm.runtime.apply.Effects`: a decision changes its
    in-memory state; what happens at step boundaries is left pending on the worker."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.scheduled: Scheduled = []

    def set_virtual_queues(self, orders: Mapping[str, tuple[GroupKey, ...]]) -> None:
        workers = self.sim.workers
        for worker_id, order in orders.items():
            workers[worker_id].order = order
        self.sim.owner = {}
        for w in workers.values():
            for k in w.order:
                self.sim.owner.setdefault(k, w.id)

    def reject(self, request_id: str, reason: str) -> None:
        self.sim._reject(request_id)

    def evict(self, worker_id: str, request_id: str, state_swap: bool, reason: str) -> None:
        self.sim.workers[worker_id].pending_evictions[request_id] = state_swap

    def swap(self, worker_id: str, to_model: str) -> None:
        self.sim.workers[worker_id].pending_swap = to_model

    def keep_model(self, worker_id: str) -> None:
        self.sim.workers[worker_id].pending_swap = None

    def cap_batch(self, worker_id: str, max_batch_size: int | None) -> None:
        worker = self.sim.workers[worker_id]
        if worker.batch_cap != max_batch_size:
            worker.batch_cap = max_batch_size
            worker.view = None

    def pull(self, worker_id: str) -> None:
        self.scheduled += self.sim._nudge(self.sim.workers[worker_id])


def simulate(
    jobs: Sequence[Job],
    workers: Sequence[WorkerSpec],
    profiles: ProfileBook,
    policy: Policy,
    config: SimConfig | None = None,
    **kwargs: Any,
) -> RunResult:
    """Run one simulation (see :class:`Simulation` for the keyword arguments)."""
    return Simulation(jobs, workers, profiles, policy, config, **kwargs).run()
