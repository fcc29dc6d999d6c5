"""One scheduling step: requeue expired leases → snapshot → ``decide`` → apply.

The decision is the policy's pure ``decide(QueueSnapshot, PolicyContext)`` — the same
code the simulator runs, with the RWT/planning estimator in process (no gRPC on the
decision path: the policy needs per-request sizes that a remote call would have to
ship every step, and a round trip per step buys nothing). What a decision means is
:func:`qlm.runtime.apply.apply`, shared with the simulator; this module only translates
between the store and the policy and carries out the applier's primitive effects
(:class:`StoreEffects`):

========================  ================================================================
effect                    here
========================  ================================================================
``set_virtual_queues``    ``store.set_virtual_queues`` (one atomic script for every
                          worker whose queue differs from the snapshot's); workers the
                          store knows that are no longer live get an empty queue
``evict``                 one ``evict`` LSO command per worker on ``qlm.lso``
                          (``keep_kv`` = ``state_swap``)
``swap``                  one ``swap`` LSO command on ``qlm.lso``
``keep_model``            nothing (a swap not yet sent is not sent)
``cap_batch``             one ``cap`` LSO command, only when the worker's cap differs
                          from the last one sent to it (``max_batch_size`` absent: lift)
``reject``                ``store.reject`` (queued → failed with the reason)
``pull``                  nothing: workers pull the head of their virtual queue
                          themselves under backpressure (the same ``plan_pulls``), with a
                          lease, woken when requests are queued
========================  ================================================================

After the virtual queues are written, the :class:`~qlm.core.forecast.Forecaster` (the RWT
estimator, the simulator's too) forecasts every queued group on the queue it was just
given and ``store.set_forecasts`` replaces the groups' forecasts (one hash field per
group): the predicted wait GetRequest returns is refreshed at every decision.

The scheduler holds every queued request in memory (the store's mirror): up to a
million objects that live for minutes, which each full pass of Python's garbage collector
would walk (about a second at 1M, a step's whole budget). After a step whose snapshots
have read ``gc_freeze_records`` queued requests since the last time (the first step reads
the whole queue), :class:`HeapFreezer` moves every object alive into the collector's
permanent generation (``gc.freeze()``): the full passes then walk only what is younger.
Frozen objects are still freed when their last reference goes (requests are acyclic); only
a reference cycle that is alive at a freeze and dies later is never collected, at most
once per ``gc_freeze_records`` requests read.

A policy with state to keep (:class:`~qlm.core.policies.base.StatefulPolicy`: qlm's
fair-share counters) has it saved while this replica leads, after a step, at most every
``state_interval_s`` (``store.save_policy_state``, under the fencing token: a deposed
leader writes nothing), as ``{"fence", "saved_at", "state"}``; on taking the lease (a new
fencing token), before its first decision, the replica reads it back and restores it into
its policy, unless it saved it itself under its previous token (then what it holds is
newer). A malformed saved state is logged with the field named and ignored: the policy
goes on with what it holds. Other policies save and restore nothing.

The commands of a step are queued on the producer (linger 0: sent at once), and their
acknowledgements are awaited before the next step writes anything (:meth:`SchedulingLoop.
settle_commands`, at the start of its apply, and on stop): the broker's round trip
(acks=all) overlaps the next snapshot and decision instead of holding up the step, the
worker gets the command as soon, and a command the broker refused fails the next step
(then retried as any failed step) instead of this one.

The same evict/swap command is not repeated within ``command_cooldown_s`` (the worker
needs a moment to carry it out and report; until then the snapshot still shows the old
state and the policy asks again). Commands carry the leader's fencing token in
``command_id``. A replica that does not hold the lease computes nothing and applies
nothing; the lease is checked again right before the writes.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import math
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from qlm.bus.producer import BusProducer
from qlm.bus.records import LsoCommand, lso_command_id
from qlm.core.errors import InvalidInput
from qlm.core.forecast import Forecaster
from qlm.core.perf import ProfileBook
from qlm.core.policies.base import (
    FinishObserver,
    Policy,
    PolicyContext,
    StatefulPolicy,
    policy_state,
    restore_policy_state,
)
from qlm.core.policies.planning import resumed
from qlm.core.pulls import kv_reserved_tokens
from qlm.core.types import (
    BatchCap,
    Decision,
    Evict,
    GroupKey,
    QueueSnapshot,
    Reject,
    RequestState,
    SLOClass,
    Swap,
    WorkerView,
)
from qlm.log import get_logger
from qlm.roster import WorkerRoster
from qlm.runtime.apply import apply
from qlm.store.errors import FenceLost
from qlm.store.store import RedisQueueStore, StoreSnapshot
from services.scheduler.lease import LeaderLease
from services.scheduler.metrics import SchedulerMetrics

log = get_logger("services.scheduler")

#: The ``linger_ms`` of the scheduler's Kafka producer: a step queues all its commands
#: before it awaits the first acknowledgement, so there is nothing more to wait for, and
#: the default linger (5 ms) would be added to every step that sends a command.
COMMAND_LINGER_MS: Final = 0

#: Finished requests kept for the policy between two steps, at most (the oldest go).
MAX_PENDING_FINISHED: Final = 100_000


# ------------------------------------------------------------------ pure parts
def queue_snapshot(store_snapshot: StoreSnapshot, workers: Iterable[WorkerView], now: float
                   ) -> QueueSnapshot:
    """The policy's input: live ``workers`` with their running requests from the store."""
    return store_snapshot.to_queue_snapshot(now, workers)


def decide(policy: Policy, snapshot: QueueSnapshot, ctx: PolicyContext) -> Decision:
    """The decision step (pure: the policy's ``decide``)."""
    return policy.decide(snapshot, ctx)


def lso_commands(decision: Decision, fence: int, numbers: Iterable[int], issued_at: float
                 ) -> list[LsoCommand]:
    """The evict, swap and cap commands of ``decision``: one evict per worker (its request
    ids in decision order; ``keep_kv`` if any eviction asks for a state swap), one per
    swap, one per batch cap."""
    seq = iter(numbers)
    by_worker: dict[str, list[str]] = {}
    keep_kv: dict[str, bool] = {}
    reasons: dict[str, str] = {}
    for evict in decision.evictions:
        by_worker.setdefault(evict.worker_id, []).append(evict.request_id)
        keep_kv[evict.worker_id] = keep_kv.get(evict.worker_id, False) or evict.state_swap
        reasons.setdefault(evict.worker_id, evict.reason)
    commands = [
        LsoCommand(type="evict", command_id=lso_command_id(fence, next(seq)), worker=worker,
                   issued_at=issued_at, request_ids=tuple(ids), keep_kv=keep_kv[worker],
                   reason=reasons[worker] or None)
        for worker, ids in by_worker.items()
    ]
    commands += [
        LsoCommand(type="swap", command_id=lso_command_id(fence, next(seq)), worker=swap.worker_id,
                   issued_at=issued_at, to_model=swap.to_model)
        for swap in decision.swaps
    ]
    commands += [
        LsoCommand(type="cap", command_id=lso_command_id(fence, next(seq)), worker=cap.worker_id,
                   issued_at=issued_at, max_batch_size=cap.max_batch_size)
        for cap in decision.batch_caps
    ]
    return commands


@dataclass
class StoreEffects:
    """The scheduler service's :class:`qlm.runtime.apply.Effects`: collects what the
    applier asks for; :meth:`SchedulingLoop.apply` then writes it to Redis and Kafka."""

    orders: dict[str, tuple[GroupKey, ...]] | None = None
    rejections: list[Reject] = field(default_factory=list)
    evictions: list[Evict] = field(default_factory=list)
    swaps: list[Swap] = field(default_factory=list)
    caps: dict[str, int | None] = field(default_factory=dict)

    def set_virtual_queues(self, orders: Mapping[str, tuple[GroupKey, ...]]) -> None:
        self.orders = dict(orders)

    def reject(self, request_id: str, reason: str) -> None:
        self.rejections.append(Reject(request_id, reason))

    def evict(self, worker_id: str, request_id: str, state_swap: bool, reason: str) -> None:
        self.evictions.append(Evict(worker_id, request_id, reason, state_swap))

    def swap(self, worker_id: str, to_model: str) -> None:
        self.swaps.append(Swap(worker_id, to_model))

    def keep_model(self, worker_id: str) -> None:
        """Nothing to send: a swap command already sent cannot be withdrawn."""

    def cap_batch(self, worker_id: str, max_batch_size: int | None) -> None:
        self.caps[worker_id] = max_batch_size

    def pull(self, worker_id: str) -> None:
        """Nothing to send: the worker pulls its queue head itself."""

    @property
    def commands(self) -> Decision:
        """The evictions and swaps to send, as a decision (for :class:`CommandMemory`)."""
        return Decision(evictions=tuple(self.evictions), swaps=tuple(self.swaps))


@dataclass
class CommandMemory:
    """Which evictions and swaps were commanded recently (to not repeat them)."""

    cooldown_s: float
    _sent_at: dict[tuple[str, str], float] = field(default_factory=dict)

    def fresh(self, decision: Decision, now: float) -> Decision:
        """``decision`` without the evictions and swaps already commanded within the
        cooldown; remembers the ones it lets through."""
        self._sent_at = {k: t for k, t in self._sent_at.items() if now - t < self.cooldown_s}
        evictions = tuple(e for e in decision.evictions
                          if ("evict", e.request_id) not in self._sent_at)
        swaps = tuple(s for s in decision.swaps
                      if ("swap", f"{s.worker_id}>{s.to_model}") not in self._sent_at)
        for e in evictions:
            self._sent_at[("evict", e.request_id)] = now
        for s in swaps:
            self._sent_at[("swap", f"{s.worker_id}>{s.to_model}")] = now
        return Decision(decision.placements, decision.pulls, evictions, swaps,
                        decision.rejections)


def worker_states(snapshot: QueueSnapshot, decision: Decision) -> list[dict[str, Any]]:
    """One decision's view of each worker with running requests or a lane
    (``--log-worker-state``): its running requests by class (``/resumed``: running again
    after an eviction; ``prefilling``: no first token yet), the KV its running requests
    reserve (:func:`qlm.core.pulls.kv_reserved_tokens`) against its capacity, its lane's
    head group and length, the evictions this decision sends it and the batch cap it
    gives it (None: its own limit)."""
    lanes = {p.worker_id: p.order for p in decision.placements}
    caps = {c.worker_id: c.max_batch_size for c in decision.batch_caps}
    sizes = {g.key: g.size for g in snapshot.groups}
    evicted = Tally(e.worker_id for e in decision.evictions)
    out = []
    for w in snapshot.workers:
        lane = lanes.get(w.id, ())
        if not w.running and not lane:
            continue
        running = Tally(rr.request.slo_class.value + ("/resumed" if resumed(rr) else "")
                        for rr in w.running)
        out.append({
            "worker": w.id, "model": w.active_model, "running": dict(sorted(running.items())),
            "prefilling": sum(1 for rr in w.running if rr.first_token_at is None),
            "kv_reserved_tokens": kv_reserved_tokens(w),
            "kv_capacity_tokens": w.kv_capacity_tokens,
            "lane_head": str(lane[0]) if lane else None,
            "lane_head_size": sizes.get(lane[0], 0) if lane else 0,
            "lane_groups": len(lane), "evictions": evicted[w.id],
            "batch_cap": caps.get(w.id),
        })
    return out


def depth_by_class_and_model(snapshot: QueueSnapshot) -> Mapping[tuple[str, str], int]:
    tally: Tally[tuple[str, str]] = Tally()
    for group in snapshot.groups:
        tally[(group.slo_class.value, group.model)] += group.size
    return tally


@dataclass
class HeapFreezer:
    """``gc.freeze()`` once ``every_records`` queued requests were read since the last
    (module docstring); 0: never."""

    every_records: int
    _frozen_at: int = 0
    num_freezes: int = 0

    def after_step(self, num_records_read: int) -> None:
        if self.every_records and num_records_read - self._frozen_at >= self.every_records:
            gc.freeze()
            self._frozen_at = num_records_read
            self.num_freezes += 1


# ------------------------------------------------------------------ the step
@dataclass(frozen=True, slots=True)
class StepReport:
    """What one step did and how long each phase took (seconds)."""

    applied: bool
    num_groups: int = 0
    num_queued: int = 0
    num_requeued: int = 0
    num_commands: int = 0
    snapshot_s: float = 0.0
    decide_s: float = 0.0
    apply_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.snapshot_s + self.decide_s + self.apply_s


class SchedulingLoop:
    """Runs steps for one replica: only while ``lease.is_held()`` does it do anything."""

    def __init__(self, store: RedisQueueStore, producer: BusProducer, lso_topic: str,
                 policy: Policy, ctx: PolicyContext, roster: WorkerRoster, lease: LeaderLease,
                 metrics: SchedulerMetrics, *, command_cooldown_s: float = 5.0,
                 clock: Callable[[], float] = time.time, decide_in_thread: bool = True,
                 profiles_source: Callable[[], ProfileBook] | None = None,
                 forecaster: Forecaster | None = None, gc_freeze_records: int = 0,
                 state_interval_s: float = 2.0, log_worker_state: bool = False) -> None:
        self.store = store
        self.producer = producer
        self.lso_topic = lso_topic
        self.policy = policy
        self.ctx = ctx
        self.roster = roster
        self.lease = lease
        self.metrics = metrics
        self.clock = clock
        self.decide_in_thread = decide_in_thread
        self.profiles_source = profiles_source
        self.memory = CommandMemory(command_cooldown_s)
        self.forecaster = forecaster
        self.heap = HeapFreezer(gc_freeze_records)
        self.log_worker_state = log_worker_state
        #: The batch cap last sent to each worker (absent: none sent, the worker's own).
        self.caps_sent: dict[str, int | None] = {}
        self._numbers = itertools.count(1)
        self.state_interval_s = state_interval_s
        #: The fencing token under which the policy state was last restored (or found
        #: absent, or ignored) and last saved; when it was saved (monotonic seconds).
        self._restored_fence = 0
        #: Finished requests (id, class, tenant, prompt, output) not yet given to the
        #: policy: events arrive between steps, the policy may be deciding in a thread.
        self._finished: deque[tuple[str, SLOClass, str, int, int]] = deque(
            maxlen=MAX_PENDING_FINISHED)
        self._saved_fence = 0
        self._state_saved_at = -math.inf
        self._depth_labels: set[tuple[str, str]] = set()
        #: The broker's acknowledgements of the commands sent by the last apply, awaited
        #: before the next one writes (module docstring).
        self._unacknowledged: list[asyncio.Future[Any]] = []

    @property
    def profiles(self) -> ProfileBook:
        return self.ctx.profiles

    def context(self) -> PolicyContext:
        """The policy's context: the measured profiles, or the online-corrected ones."""
        if self.profiles_source is None:
            return self.ctx
        book = self.profiles_source()
        if book is not self.ctx.profiles:
            self.ctx = PolicyContext(book, self.ctx.options)
        return self.ctx

    async def step(self) -> StepReport:
        """One step if we lead (see the module docstring); a no-op report otherwise."""
        if not self.lease.is_held():
            self.metrics.decisions.labels(self.policy.name, "skipped").inc()
            return StepReport(applied=False)
        started = time.perf_counter()
        await self.restore_state()
        self._charge_finished()
        requeued = await self.store.requeue_expired()
        for state in requeued.values():
            self.metrics.requeued.labels(state.value).inc()
        if requeued:
            log.info("leases_expired", num_requeued=sum(
                s is RequestState.QUEUED for s in requeued.values()), num_total=len(requeued))
        stored = await self.store.snapshot()
        now = self.clock()
        snapshot = queue_snapshot(stored, self.roster.views(now, self.profiles), now)
        read_at = time.perf_counter()
        ctx = self.context()
        if self.decide_in_thread:
            decision = await asyncio.to_thread(decide, self.policy, snapshot, ctx)
        else:
            decision = decide(self.policy, snapshot, ctx)
        decided_at = time.perf_counter()
        if not self.lease.is_held():  # lost the lease while deciding: write nothing
            self.metrics.decisions.labels(self.policy.name, "skipped").inc()
            return StepReport(applied=False)
        num_commands = await self.apply(decision, snapshot, stored.worker_ids)
        done_at = time.perf_counter()
        report = StepReport(True, len(snapshot.groups), snapshot.num_queued, len(requeued),
                            num_commands, read_at - started, decided_at - read_at,
                            done_at - decided_at)
        self._observe(report, snapshot)
        if self.log_worker_state:
            for view in worker_states(snapshot, decision):
                log.info("worker_state", now=round(now, 3), **view)
        self.heap.after_step(self.store.num_records_read)
        await self.save_state()
        return report

    # ------------------------------------------------------------------ policy state
    async def restore_state(self) -> str | None:
        """Once per term (fencing token), before its first decision: the policy's saved
        state back into it (module docstring). Returns the outcome (the metric's label),
        None when there was nothing to do."""
        fence = self.lease.fence
        if fence == self._restored_fence or not isinstance(self.policy, StatefulPolicy):
            return None
        name = self.policy.name
        saved: dict[str, Any] | None = None
        try:  # Redis away: Unavailable, the step fails and the next one tries again
            saved = await self.store.policy_state(name)
            outcome = self._restore(saved)
        except InvalidInput as error:
            log.warning("policy_state_ignored", policy=name, field=error.field,
                        error=str(error))
            outcome = "invalid"
        self._restored_fence = fence
        self.metrics.state_restores.labels(outcome).inc()
        log.info("policy_state_read", policy=name, fence=fence, outcome=outcome,
                 saved_fence=None if saved is None else saved.get("fence"))
        return outcome

    def _restore(self, saved: dict[str, Any] | None) -> str:
        if saved is None:
            return "none"
        field = f"scheduler:state.{self.policy.name}"
        fence = saved.get("fence")
        if isinstance(fence, bool) or not isinstance(fence, int):
            raise InvalidInput(f"{field}.fence", f"must be an integer, got {fence!r}")
        if "state" not in saved:
            raise InvalidInput(f"{field}.state", "missing")
        if self._saved_fence and fence == self._saved_fence:
            return "kept"  # we saved it ourselves, in our last term: what we hold is newer
        try:
            restore_policy_state(self.policy, saved["state"])
        except InvalidInput as error:  # named where it lies in the stored value
            raise InvalidInput(f"{field}.state.{error.field}", error.problem) from None
        return "restored"

    def note_finished(self, request_id: str, slo_class: SLOClass, tenant: str,
                      num_prompt_tokens: int, num_output_tokens: int) -> None:
        """A request finished (its event): the policy learns it before its next decision
        (:class:`~qlm.core.policies.base.FinishObserver`). Only the leader keeps these: a
        standby's would be counted again over the state it restores on taking over."""
        if self.lease.is_held() and isinstance(self.policy, FinishObserver):
            self._finished.append((request_id, slo_class, tenant, num_prompt_tokens,
                                   num_output_tokens))

    def _charge_finished(self) -> None:
        policy = self.policy
        if not isinstance(policy, FinishObserver):
            return
        while self._finished:
            policy.on_finished(*self._finished.popleft())

    async def save_state(self, *, force: bool = False) -> bool:
        """Save the policy's state if this replica leads and ``state_interval_s`` has passed
        since the last save (``force``: now); returns whether it was written."""
        if not self.lease.is_held() or not isinstance(self.policy, StatefulPolicy):
            return False
        at = time.monotonic()
        if not force and at - self._state_saved_at < self.state_interval_s:
            return False
        self._charge_finished()  # no decision runs now: after a step's, or stopped
        fence = self.lease.fence
        saved = {"fence": fence, "saved_at": self.clock(), "state": policy_state(self.policy)}
        try:
            await self.store.save_policy_state(self.policy.name, saved, fence=fence)
        except FenceLost:  # a newer term began: it owns the state now
            log.warning("fence_lost", fence=fence)
            self.lease.forfeit()
            return False
        self._state_saved_at = at
        self._saved_fence = fence
        self.metrics.state_saves.inc()
        return True

    async def apply(self, decision: Decision, snapshot: QueueSnapshot,
                    known_workers: Iterable[str]) -> int:
        """Carry the decision out (:func:`qlm.runtime.apply.apply`, effects in the module
        docstring); returns the commands sent. The virtual queues are written only while
        this scheduler's fencing token is current (checked inside Redis)."""
        await self.settle_commands()
        effects = StoreEffects()
        num_invalid = apply(decision, snapshot, self.profiles, effects, known_workers)
        if num_invalid:
            log.warning("invalid_actions", num_invalid=num_invalid)
        if effects.orders is not None:
            changed = {w: order for w, order in effects.orders.items()
                       if tuple(order) != snapshot.virtual_queues.get(w, ())}
            try:  # only the queues that changed; the fence is checked all the same
                await self.store.set_virtual_queues(changed, fence=self.lease.fence)
            except FenceLost:  # a newer term began: write nothing more, send no command
                log.warning("fence_lost", fence=self.lease.fence)
                self.lease.forfeit()
                return 0
        fresh = self.memory.fresh(effects.commands, snapshot.now)
        new_caps = tuple(BatchCap(w, cap) for w, cap in effects.caps.items()
                         if self.caps_sent.get(w) != cap)
        fresh = replace(fresh, batch_caps=new_caps)
        self.caps_sent.update((c.worker_id, c.max_batch_size) for c in new_caps)
        commands = lso_commands(fresh, self.lease.fence, self._numbers, self.clock())
        self._unacknowledged = [await self.producer.publish_soon(self.lso_topic, c)
                                for c in commands]
        for reject in effects.rejections:
            await self.store.reject(reject.request_id, reject.reason)
        for command in commands:
            if command.type == "evict":
                self.metrics.evictions.labels(command.worker).inc(len(command.request_ids))
            elif command.type == "swap":
                self.metrics.swaps.labels(command.worker, command.to_model or "").inc()
            log.info("lso_sent", type=command.type, worker=command.worker,
                     command_id=command.command_id, request_ids=list(command.request_ids),
                     to_model=command.to_model, max_batch_size=command.max_batch_size)
        self.metrics.rejections.inc(len(effects.rejections))
        if effects.orders is not None:  # after the commands: they are not held up by it
            await self._forecast(snapshot, effects.orders)
        return len(commands)

    async def settle_commands(self) -> None:
        """Wait for the broker to acknowledge the commands sent by the last apply (raises
        what their publishing raised: Kafka away, a record refused)."""
        pending, self._unacknowledged = self._unacknowledged, []
        if pending:
            await asyncio.gather(*pending)

    async def _forecast(self, snapshot: QueueSnapshot,
                        orders: Mapping[str, tuple[GroupKey, ...]]) -> None:
        """Every queued group's forecast on the virtual queue just written, stored."""
        forecaster = self.forecaster
        if forecaster is None:
            return
        forecaster.use_profiles(self.profiles)
        if self.decide_in_thread:
            forecasts = await asyncio.to_thread(forecaster.forecast, snapshot, orders)
        else:
            forecasts = forecaster.forecast(snapshot, orders)
        await self.store.set_forecasts(forecasts)

    def _observe(self, report: StepReport, snapshot: QueueSnapshot) -> None:
        m = self.metrics
        m.decisions.labels(self.policy.name, "applied").inc()
        for phase, seconds in (("snapshot", report.snapshot_s), ("decide", report.decide_s),
                               ("apply", report.apply_s), ("total", report.total_s)):
            m.decision_seconds.labels(phase).observe(seconds)
        depth = depth_by_class_and_model(snapshot)
        for labels in self._depth_labels - set(depth):
            m.queue_depth.labels(*labels).set(0)
        for labels, count in depth.items():
            m.queue_depth.labels(*labels).set(count)
        self._depth_labels |= set(depth)
        m.num_groups.set(report.num_groups)
        m.num_workers.set(len(snapshot.workers))
