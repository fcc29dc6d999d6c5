"""What the baseline policies (fcfs, edf, priority, static, vllm-swap) share: one global order,
least-loaded dispatch.

A baseline differs from the others only in its *sort key* over request groups
(and ``priority`` adds preemption). Every decision:

1. **Order** the queued groups by the policy's ``queue_order`` (ties: first arrival,
   then group key).
2. **Swap** (only a worker that idles): a worker with nothing running, not swapping,
   and no queued group of its active model, switches to the model of the first group
   in the order that it can serve and that *needs* capacity — no worker serves that
   model, or the queued work per server of that model exceeds the swap cost. A busy
   worker never swaps (vLLM has no model-swap policy; this is the most a serving
   stack without SLO awareness does). Each swap counts the worker as a server of the
   target model for the next idle worker's check, so idle workers do not all chase
   one group.
3. **Dispatch** each group, in order, to the least-loaded worker that serves its
   model (active, or being woken for it), where a worker's load is its estimated
   remaining work in seconds: running requests' expected remaining output plus the
   queued work dispatched to it so far, over its decode throughput Θ at a full
   batch, plus any swap time left. Groups are re-dispatched every decision (a
   global queue with least-loaded dispatch: work moves to a worker that frees up).
4. **Pull**: each worker's virtual queue is its groups in the global order;
   :func:`qlm.core.pulls.with_pulls` fills the backpressure pulls.

``static`` replaces step 2 (a fixed split of the workers over the models) and
``vllm-swap`` steps 2 and 3 (dispatch to whichever worker can start the group first,
swapping its model on demand); see their modules.

Expected output length per request is ``min(max_tokens, expected_output_tokens)``;
the true output length is never read. Pure and stateless: a decision depends only
on ``snapshot`` and ``ctx``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from qlm.core.perf import PerfProfile, ProfileBook
from qlm.core.policies.base import (
    ContextOptions,
    GroupOrder,
    PolicyContext,
    QueueOrder,
    by_arrival,
    option,
)
from qlm.core.pulls import DEFAULT_EXPECTED_OUTPUT_TOKENS, can_serve, with_pulls
from qlm.core.types import (
    Decision,
    Evict,
    GroupKey,
    Place,
    QueueSnapshot,
    RequestGroup,
    Swap,
    WorkerView,
)

#: Prompt tokens assumed for a typical request when sizing a worker's steady batch.
TYPICAL_PROMPT_TOKENS = 512


_MEMO_LIMIT = 50_000
_memo: dict[tuple[int, int, Hashable], tuple[RequestGroup, object, Any]] = {}


def _memoised(group: RequestGroup, what: Hashable, compute: Callable[[], Any],
              also: object = None) -> Any:
    """``compute()`` remembered per group object, and per ``also`` object when the value
    depends on one (a profile); groups are immutable, so a caller that keeps unchanged
    groups between decisions saves the per-request sums. Pure in effect."""
    key = (id(group), id(also), what)
    hit = _memo.get(key)
    if hit is not None and hit[0] is group and hit[1] is also:
        return hit[2]
    value = compute()
    if len(_memo) >= _MEMO_LIMIT:
        _memo.clear()
    _memo[key] = (group, also, value)
    return value


def group_order(group: RequestGroup) -> GroupOrder:
    """The group's ordering facts (memoised per group object)."""
    order: GroupOrder = _memoised(group, "order", lambda: GroupOrder.of(group))
    return order


@dataclass(frozen=True, slots=True)
class BaselineOptions:
    """Options of every baseline (fcfs, edf, priority; static and vllm-swap add theirs)."""

    expected_output_tokens: int = option(DEFAULT_EXPECTED_OUTPUT_TOKENS,
                                         "output tokens assumed per request", gt=0)


def expected_output(max_tokens: int, num_generated: int, expected_output_tokens: int) -> int:
    """Expected output tokens still to generate (never reads the true length)."""
    return max(0, min(max_tokens, expected_output_tokens) - num_generated)


def steady_throughput(profile: PerfProfile, expected_output_tokens: int) -> float:
    """Θ: output tokens/s of ``profile`` at the batch its KV cache sustains."""
    per_request = TYPICAL_PROMPT_TOKENS + expected_output_tokens
    batch = max(1, min(profile.max_batch_size, profile.kv_capacity_tokens // per_request))
    return profile.decode_tokens_per_s(batch, TYPICAL_PROMPT_TOKENS + expected_output_tokens / 2)


def group_work_s(group: RequestGroup, profile: PerfProfile, expected_output_tokens: int) -> float:
    """Seconds of worker time the group needs: its prefills plus its expected decode tokens
    (memoised per group and profile object: dispatch asks it of every group per decision)."""
    def work() -> float:
        context, tokens = _memoised(group, ("tokens", expected_output_tokens),
                                    lambda: _group_tokens(group, expected_output_tokens))
        prefill = group.size * profile.prefill_s(round(context / group.size))
        return float(prefill + tokens / steady_throughput(profile, expected_output_tokens))

    work_s: float = _memoised(group, ("work", expected_output_tokens), work, also=profile)
    return work_s


def _group_tokens(group: RequestGroup, expected_output_tokens: int) -> tuple[int, int]:
    """(context tokens to prefill, expected output tokens still to generate) of a group."""
    context = 0
    tokens = 0
    for r in group.requests:
        context += r.context_tokens
        tokens += max(0, min(r.max_tokens, expected_output_tokens) - r.num_generated)
    return context, tokens


def running_work_s(worker: WorkerView, profile: PerfProfile, expected_output_tokens: int) -> float:
    tokens = sum(
        expected_output(r.request.max_tokens, r.request.num_generated, expected_output_tokens)
        for r in worker.running
    )
    return tokens / steady_throughput(profile, expected_output_tokens)


def serving_model(worker: WorkerView) -> str | None:
    """The model a worker serves now or is being woken for."""
    return worker.swapping_to if worker.swapping_until is not None else worker.active_model


def swap_cost_s(worker: WorkerView, to_model: str, profiles: ProfileBook) -> float:
    sleep = 0.0
    if worker.active_model is not None and profiles.has(worker.active_model, worker.gpu):
        sleep = profiles.get(worker.active_model, worker.gpu).sleep_s
    target = profiles.get(to_model, worker.gpu)
    return sleep + target.swap_in_s(to_model in worker.models)


@dataclass
class _Dispatch:
    """Mutable scratch state of one decision (never escapes ``decide``)."""

    load_s: dict[str, float]
    serving: dict[str, str | None]
    queues: dict[str, list[GroupKey]] = field(default_factory=dict)


@dataclass(frozen=True)
class OrderedDispatchPolicy:
    """A baseline: a global group order plus least-loaded dispatch (see the module docstring).

    ``options`` are the ones it was made with; ``PolicyContext.options`` override them
    per decision. The steps read the options of the decision in progress as
    ``self.options``: :meth:`decide` runs them on a copy holding those.
    """

    name: ClassVar[str] = "baseline"
    options_type: ClassVar[type[Any]] = BaselineOptions
    queue_order: ClassVar[QueueOrder] = staticmethod(by_arrival)

    options: Any = field(default_factory=BaselineOptions)
    _context: ContextOptions = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_context",
                           ContextOptions(self.options_type, self.options, self.name))

    @property
    def expected_output_tokens(self) -> int:
        return int(self.options.expected_output_tokens)

    def decide(self, snapshot: QueueSnapshot, ctx: PolicyContext) -> Decision:
        options = self._context.of(ctx)
        if options is not self.options:  # context options: this decision runs with them
            return replace(self, options=options).decide(snapshot, replace(ctx, options={}))
        key = type(self).queue_order
        what = f"sort/{id(key)}"  # the order key is a function of the class

        def sort_key(g: RequestGroup) -> tuple[Any, ...]:
            o = group_order(g)
            return (*key(o), o.first_arrival_at, g.key)

        order = sorted(snapshot.groups,
                       key=lambda g: _memoised(g, what, lambda: sort_key(g)))
        state = self._initial_state(snapshot, ctx.profiles)
        swaps = self.plan_swaps(snapshot, order, state, ctx.profiles)
        swaps += self.dispatch(snapshot, order, state, ctx.profiles)
        evictions = self.preemptions(snapshot, order, state, ctx.profiles)
        placements = tuple(Place(w.id, tuple(state.queues.get(w.id, ()))) for w in snapshot.workers)
        decision = Decision(placements=placements, evictions=evictions, swaps=swaps)
        return with_pulls(decision, snapshot, ctx.profiles, self.expected_output_tokens)

    # ------------------------------------------------------------ steps
    def _initial_state(self, snapshot: QueueSnapshot, profiles: ProfileBook) -> _Dispatch:
        load: dict[str, float] = {}
        serving: dict[str, str | None] = {}
        for w in snapshot.workers:
            model = serving_model(w)
            serving[w.id] = model
            if model is None or not profiles.has(model, w.gpu):
                load[w.id] = 0.0
                continue
            swap_left = max(0.0, (w.swapping_until or snapshot.now) - snapshot.now)
            load[w.id] = swap_left + running_work_s(
                w, profiles.get(model, w.gpu), self.expected_output_tokens
            )
        return _Dispatch(load_s=load, serving=serving)

    def plan_swaps(
        self,
        snapshot: QueueSnapshot,
        order: Sequence[RequestGroup],
        state: _Dispatch,
        profiles: ProfileBook,
    ) -> tuple[Swap, ...]:
        """Swaps decided before dispatch (step 2 of the module docstring); each one sets
        ``state.serving`` and ``state.load_s`` of its worker."""
        queued_models = {g.model for g in order}
        work_by_model: dict[str, float] = {}
        swaps: list[Swap] = []
        for w in sorted(snapshot.workers, key=lambda w: w.id):
            idle = not w.running and w.swapping_until is None
            if not idle or (w.active_model is not None and w.active_model in queued_models):
                continue
            for group in order:
                m = group.model
                if m == w.active_model or not can_serve(w, m, profiles):
                    continue
                cost = swap_cost_s(w, m, profiles)
                if self._needs_capacity(snapshot, m, cost, state, work_by_model, order, profiles):
                    swaps.append(Swap(w.id, m))
                    state.serving[w.id] = m
                    state.load_s[w.id] = cost
                    break
        return tuple(swaps)

    def _needs_capacity(
        self,
        snapshot: QueueSnapshot,
        model: str,
        swap_cost: float,
        state: _Dispatch,
        work_by_model: dict[str, float],
        order: Sequence[RequestGroup],
        profiles: ProfileBook,
    ) -> bool:
        servers = [w for w in snapshot.workers if state.serving[w.id] == model]
        if not servers:
            return True
        if model not in work_by_model:
            ref = servers[0]
            profile = profiles.get(model, ref.gpu)
            work_by_model[model] = sum(
                group_work_s(g, profile, self.expected_output_tokens)
                for g in order
                if g.model == model
            )
        total = work_by_model[model] + sum(state.load_s[w.id] for w in servers)
        return total / len(servers) > swap_cost

    def dispatch(
        self,
        snapshot: QueueSnapshot,
        order: Sequence[RequestGroup],
        state: _Dispatch,
        profiles: ProfileBook,
    ) -> tuple[Swap, ...]:
        """Fill ``state.queues`` (step 3); returns the swaps the dispatch itself makes
        (none here: groups go only to workers that serve their model)."""
        by_model: dict[str, list[WorkerView]] = {}
        for w in snapshot.workers:
            model = state.serving[w.id]
            if model is not None and can_serve(w, model, profiles):
                by_model.setdefault(model, []).append(w)
        for group in order:
            candidates = by_model.get(group.model)
            if not candidates:
                continue
            if len(candidates) == 1:
                target = candidates[0]
            else:
                target = min(candidates, key=lambda w: (state.load_s[w.id], w.id))
            profile = profiles.get(group.model, target.gpu)
            state.load_s[target.id] += group_work_s(group, profile, self.expected_output_tokens)
            state.queues.setdefault(target.id, []).append(group.key)
        return ()

    def preemptions(
        self,
        snapshot: QueueSnapshot,
        order: Sequence[RequestGroup],
        state: _Dispatch,
        profiles: ProfileBook,
    ) -> tuple[Evict, ...]:
        """Evictions this policy makes: none for FCFS and EDF (the engine preempts on KV
        shortage only)."""
        return ()
