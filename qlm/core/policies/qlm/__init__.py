"""``qlm``: the global scheduler — groups onto virtual queues, maximising SLO attainment.

Objective: maximise Σ_g weight(class_g)·size_g·p_g, p_g the expected fraction of group
g's requests whose first token beats their deadline under the timing model of
:mod:`qlm.core.policies.planning` (model-swap time charged between adjacent groups of
different models, and from the worker's active model to the first group). A group is
placed only on a worker whose GPU has a profile for its model.

**Exact MILP** (:mod:`.milp`, ``scipy.optimize.milp``/HiGHS) when ``num_groups ×
num_workers ≤ milp_max_cells``, within ``milp_node_limit`` branch-and-bound nodes (a
deterministic budget: same snapshot, same plan) and ``milp_time_limit_s`` (a wall-clock
backstop); the formulation is in that module's docstring.

The MILP runs only when the heuristic's plan falls short of an upper bound (every group
alone on an idle worker, :func:`attainment_bound`); both plans are
scored by the (stochastic) planning model and the better one is used; a MILP that fails
or finds nothing within its budget falls back to the heuristic.

**Heuristic** (:mod:`.heuristic`; large instances, and always as the MILP's competitor), O(G·log W):

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
   requests are already lost (measured in docs/scheduler.md);
3. a group that would likely miss (p < 0.5) may displace one earlier group on that
   lane when that raises the lane's value (weighted Moore–Hodgson); displaced groups,
   and groups still hopeless (p < 0.02 on every candidate), are placed with the late
   groups of step 5 (with ``spare_versatile``: on the least versatile shape serving them);
4. local improvement: adjacent swaps inside each lane that raise its value, within an
   evaluation budget (``improve_budget``), so the pass is deterministic;
5. groups whose deadlines have all passed, and the hopeless and displaced groups of step
   3, in deadline order, each on the lane that would finish it first: within
   ``late_insert_budget`` placements at the earliest position where no group after it
   loses expected attainment (ahead of batch work with slack, behind groups it would
   make miss), last once the budget is spent. They count for (almost) nothing, but a
   user still waits for them, and placed last they wait for the whole backlog.
6. each model's settled work in one run: within each stretch of consecutive groups
   that are surely met or surely missed where they sit (p_meet ≥ 0.99 or ≤ 0.01, e.g.
   batch jobs due in an hour and groups already late), the groups of one model go
   together (the model fewest workers serve first, then the model the stretch starts
   from, then first appearance; each model's groups keep their order), kept only where
   no group loses more than 0.01 of its p_meet, the lane's value does not drop and it
   drains no later. Every change of model on a lane is a drain and a swap; left in
   deadline order, a backlog of several models made a worker swap every few seconds
   (WB trace replays: ~90 swaps where fcfs made 3, at 0.6× its throughput).

**Fair share** (``fair_share``, :mod:`qlm.core.fairness`): within an SLO class, tenants
share the GPUs as under VTC. The policy keeps a virtual token counter per (class, tenant),
fed by the snapshots it decides on (:meth:`QlmPolicy.observe`); step 1 gives the places a
class holds in deadline order to its groups in fair order (least counter after the group
first); step 3 displaces only groups of the displacing group's own tenant; step 4 does not
swap two groups of one class and different tenants out of fair order; the MILP, which
knows no fair order, runs only while no class has queued groups of two tenants (and a plan
of it that breaks the fair order would not be used). Deciding twice on one snapshot gives
one decision; the counters are what the instance has seen, or was given back by
:meth:`QlmPolicy.restore` (the scheduler service saves :meth:`QlmPolicy.state` while it
leads and restores it when it takes the lease: docs/scheduler.md).

**TPOT targets.** A group whose requests have a TPOT target is served, on each worker
shape, at the largest batch whose mean step (a decode step at the batch's mean context plus
the amortised prompt chunks of the requests that replace finished ones) meets its tightest
target (:func:`qlm.sim.batching.tpot_batch_cap`): its service time there is priced at that
batch, so the groups after it wait for the slower drain; a shape where even one request
alone misses the target is not a candidate (unless no shape meets it: then TPOT is ignored
for it). At run time (:func:`.lso.plan_batch_caps`) a worker whose running requests or
lane head carry a target gets that batch as its cap (``BatchCap``): it admits nothing
while its batch is at the cap, so those requests decode at or below it.

**LSOs** (:mod:`.lso`): *pull* via :func:`qlm.core.pulls.plan_pulls` (backpressure);
*model swap* when a worker's head group needs another model and the worker has drained;
*eviction* when too few slots of a worker free up within the slack of its head group or
of each of the next ``evict_lookahead_groups`` groups of its lane that evictions can
still bring in on time, counted with those ahead of it: just enough running requests of
looser classes are evicted (largest remaining slack first: those past their first token
have met their TTFT SLO already), never one evicted before nor one that would finish
sooner than it would re-prefill, at most ``evict_budget`` per decision; they keep their
progress (see :func:`.lso.plan_evictions`). With ``kv_state_swap`` an
eviction sets ``Evict.state_swap`` when moving the KV state over PCIe is cheaper than recomputing
it. *Rejections* only with ``reject_late=True`` (requests whose
deadline has passed) and ``reject_unservable=True`` (requests of a group that no worker of
the snapshot can serve: no profile for its model on their GPUs, or too few GPUs; the
reason names the model). Without it such a group stays queued and unplaced.

Cost per decision: one pass over the requests of groups whose request tuple changed
(memoised, :mod:`qlm.core.policies.planning`), one over running requests of workers
whose running set changed; the search itself touches groups and workers only.

Options: :class:`.options.QlmOptions`. Layout: ``options`` (the options), ``context``
(what a decision computes once, the plan), ``heuristic``, ``milp``, ``lso`` (swaps,
evictions, rejections, pulls), and the policy here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

from qlm.core.errors import InvalidInput
from qlm.core.fairness import TokenWeights, VirtualTokenCounters
from qlm.core.policies.base import (
    ContextOptions,
    PolicyContext,
    QueueOrder,
    by_deadline,
    parse_options,
    register,
)
from qlm.core.policies.planning import GroupStatsCache, WorkerLoadCache
from qlm.core.policies.qlm.context import Plan, PlanningContext, attainment_bound
from qlm.core.policies.qlm.heuristic import heuristic_plan
from qlm.core.policies.qlm.lso import (
    plan_batch_caps,
    plan_evictions,
    plan_pulls_for,
    plan_rejections,
    plan_swaps,
)
from qlm.core.policies.qlm.milp import milp_plan
from qlm.core.policies.qlm.options import QlmOptions
from qlm.core.types import Decision, Place, QueueSnapshot, SLOClass


def token_weights(options: QlmOptions) -> TokenWeights:
    """Fair share's token weights from the options."""
    return TokenWeights(options.fair_input_weight, options.fair_output_weight)


@register("qlm")
class QlmPolicy:
    """The qlm global scheduler (see the package docstring). Options: :class:`QlmOptions`,
    given as one (``options``) or by name (``**given``, parsed by
    :func:`qlm.core.policies.base.parse_options`); ``PolicyContext.options`` override them
    per decision.

    The instance memoises per-group and per-worker summaries between decisions, and keeps
    fair share's counters (:attr:`counters`), fed by every snapshot it decides on; apart
    from them the decision depends only on ``snapshot`` and ``ctx``.
    """

    name: ClassVar[str] = "qlm"
    options_type: ClassVar[type[Any]] = QlmOptions
    #: Groups are planned in deadline order (the estimator's view of it).
    queue_order: ClassVar[QueueOrder] = staticmethod(by_deadline)

    #: Score every plan (tests and diagnostics); decisions do not need it.
    always_score: bool = False

    def __init__(self, options: QlmOptions | None = None, **given: Any) -> None:
        self.options: QlmOptions = parse_options(QlmOptions, given, policy=self.name,
                                                 base=options or QlmOptions())
        self._context = ContextOptions(QlmOptions, self.options, self.name)
        self._groups = GroupStatsCache()
        self._workers = WorkerLoadCache()
        #: Fair share's counters, fed by every snapshot decided on (:meth:`observe`).
        self.counters = VirtualTokenCounters(token_weights(self.options))

    def options_for(self, ctx: PolicyContext) -> QlmOptions:
        """This policy's options with ``ctx.options`` applied."""
        options: QlmOptions = self._context.of(ctx)
        return options

    def planning_context(self, snapshot: QueueSnapshot, ctx: PolicyContext,
                         options: QlmOptions) -> PlanningContext:
        output_stats = dict(options.output_stats)
        stats = self._groups.refresh(snapshot.groups, output_stats, ctx.profiles)
        loads = self._workers.refresh(snapshot.workers, output_stats)
        return PlanningContext(snapshot, ctx, stats, loads, output_stats, options.weights,
                               self._groups.memos, options.service_scale)

    def plan(self, snapshot: QueueSnapshot, ctx: PolicyContext) -> tuple[PlanningContext, Plan]:
        return self._plan(snapshot, ctx, self.options_for(ctx))

    def _plan(self, snapshot: QueueSnapshot, ctx: PolicyContext, options: QlmOptions
              ) -> tuple[PlanningContext, Plan]:
        pc = self.planning_context(snapshot, ctx, options)
        if options.fair_share:
            self.observe(snapshot, options)
            pc.set_fair_order(self.counters)
        cells = len(pc.stats) * len(snapshot.workers)
        use_milp = (bool(pc.stats) and cells <= options.milp_max_cells
                    and not pc.fair_order_binds())
        heuristic = heuristic_plan(pc, options, score=use_milp or self.always_score)
        if not use_milp or heuristic.value >= attainment_bound(pc) - 1e-3 * len(pc.stats):
            return pc, heuristic  # nothing for the MILP to win
        exact = milp_plan(pc, options.milp_time_limit_s, options.milp_node_limit)
        if isinstance(exact, str):
            return pc, Plan(heuristic.orders, heuristic.value, f"heuristic (milp: {exact})")
        if not pc.respects_fair_order(exact.orders):
            return pc, Plan(heuristic.orders, heuristic.value, "heuristic (milp: unfair)")
        return pc, exact if exact.value >= heuristic.value - 1e-3 else heuristic

    def observe(self, snapshot: QueueSnapshot, options: QlmOptions | None = None) -> None:
        """Feed fair share's counters with what ``snapshot`` shows was served (the same
        snapshot twice charges nothing twice)."""
        weights = token_weights(options or self.options)
        if weights != self.counters.weights:
            self.counters.weights = weights
        self.counters.observe(snapshot)

    def on_finished(self, request_id: str, slo_class: SLOClass, tenant: str,
                    num_prompt_tokens: int, num_output_tokens: int) -> None:
        """Charge fair share's counters what no snapshot saw of a finished request
        (:meth:`VirtualTokenCounters.on_finished`; :class:`~qlm.core.policies.base.
        FinishObserver`)."""
        self.counters.on_finished(request_id, (slo_class, tenant), num_prompt_tokens,
                                  num_output_tokens)

    def state(self) -> dict[str, Any]:
        """Fair share's counters as JSON-ready data (:class:`~qlm.core.policies.base.
        StatefulPolicy`; :meth:`VirtualTokenCounters.to_state`)."""
        return {"fair_share": self.counters.to_state()}

    def restore(self, state: Any) -> None:
        """Go on from :meth:`state`'s data: the counters become the ones saved (weights
        from this instance's options); InvalidInput naming the field when ``state`` is
        malformed, and then the counters held are kept."""
        if not isinstance(state, Mapping):
            raise InvalidInput("state", f"must be an object, got {type(state).__name__}")
        self.counters = VirtualTokenCounters.from_state(state.get("fair_share", {}),
                                                        token_weights(self.options))

    def decide(self, snapshot: QueueSnapshot, ctx: PolicyContext) -> Decision:
        options = self.options_for(ctx)
        pc, plan = self._plan(snapshot, ctx, options)
        keys = [g.key for g in pc.stats]
        placements = tuple(Place(w.id, tuple(keys[g] for g in order))
                           for w, order in zip(snapshot.workers, plan.orders, strict=True))
        decision = Decision(
            placements=placements,
            evictions=plan_evictions(pc, plan, options),
            swaps=plan_swaps(pc, plan),
            rejections=plan_rejections(pc, options),
            batch_caps=plan_batch_caps(pc, plan, options.colocated_loose_batch,
                                       options.colocated_pause_share),
        )
        return replace(decision, pulls=plan_pulls_for(pc, decision))


__all__ = ["Plan", "PlanningContext", "QlmOptions", "QlmPolicy", "attainment_bound",
           "heuristic_plan", "milp_plan", "plan_batch_caps", "plan_evictions", "plan_pulls_for",
           "plan_rejections", "plan_swaps"]
