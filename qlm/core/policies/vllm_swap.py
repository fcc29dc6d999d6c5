"""``vllm-swap``: the QLM paper's vLLM baseline — FCFS across models, model swap on demand.

It stands for a pool of vLLM instances behind one first-come-first-served queue, where
an instance whose next request needs a model it does not have awake swaps to it
(vLLM sleep/wake), with no look at what else is queued. This is the baseline against
which the paper reports its throughput gains: when requests of several models
interleave, instances swap back and forth (thrash) and serve small batches.

Every decision walks the queued groups in FCFS order (first arrival, then group key)
and gives each to the worker that can *start* it first: its estimated remaining work
(running and already dispatched, as :mod:`qlm.core.policies.baseline` counts it) plus,
when the model it will be serving by then differs, the swap to the group's model
(sleep + wake, or a cold load the first time). Only workers with a profile for the
model are candidates; ties by worker id. A group given to a worker that will be
serving another model makes that worker switch model at that point of its queue, so
the next group of the old model behind it needs a swap back: FCFS across models pays
a swap at every change of model in a worker's queue, even when work of the model it
serves is queued further back.

A worker swaps as soon as the head of its queue needs another model, busy or not: the
requests it is running go back to the queue with their progress (the swap's eviction,
as in the simulator and the services) and are served again in FCFS order, often by
another swap. With the option ``drain_first`` a busy worker instead admits nothing past
the head and swaps once its running batch has finished (an engine that never preempts);
on WB this rarely swaps at all, because each re-plan puts work of its model back at
the head before the batch drains. A worker whose head group is of its model pulls as
usual (:func:`qlm.core.pulls.with_pulls`). No other preemption, no SLO awareness. Pure
and stateless like the other baselines: the plan is made again at every decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qlm.core.perf import ProfileBook
from qlm.core.policies.base import QueueOrder, by_arrival, option, register
from qlm.core.policies.baseline import (
    BaselineOptions,
    OrderedDispatchPolicy,
    _Dispatch,
    group_work_s,
    swap_cost_s,
)
from qlm.core.pulls import can_serve
from qlm.core.types import QueueSnapshot, RequestGroup, Swap


@dataclass(frozen=True, slots=True)
class VLLMSwapOptions(BaselineOptions):
    """Options of ``vllm-swap``."""

    drain_first: bool = option(False, "swap only once the running batch has finished")


@register("vllm-swap")
@dataclass(frozen=True)
class VLLMSwapPolicy(OrderedDispatchPolicy):
    """See the module docstring. Options: ``drain_first`` (swap only once the running
    batch has finished; default False: swap at once) and ``expected_output_tokens``."""

    name: ClassVar[str] = "vllm-swap"
    options_type: ClassVar[type[Any]] = VLLMSwapOptions
    queue_order: ClassVar[QueueOrder] = staticmethod(by_arrival)

    options: Any = field(default_factory=VLLMSwapOptions)

    @property
    def drain_first(self) -> bool:
        return bool(self.options.drain_first)

    def plan_swaps(
        self,
        snapshot: QueueSnapshot,
        order: Sequence[RequestGroup],
        state: _Dispatch,
        profiles: ProfileBook,
    ) -> tuple[Swap, ...]:
        return ()  # swaps come from the dispatch itself (module docstring)

    def dispatch(
        self,
        snapshot: QueueSnapshot,
        order: Sequence[RequestGroup],
        state: _Dispatch,
        profiles: ProfileBook,
    ) -> tuple[Swap, ...]:
        workers = sorted(snapshot.workers, key=lambda w: w.id)
        now_serving = dict(state.serving)
        planned = dict(state.serving)  # the model each worker serves at the end of its queue
        capable: dict[str, list[int]] = {}
        for group in order:
            model = group.model
            if model not in capable:
                capable[model] = [i for i, w in enumerate(workers) if can_serve(w, model, profiles)]
            if not capable[model]:
                continue

            def start_s(i: int, model: str = model) -> float:
                w = workers[i]
                swap = 0.0 if planned[w.id] == model else swap_cost_s(w, model, profiles)
                return state.load_s[w.id] + swap

            best = min(capable[model], key=lambda i: (start_s(i), workers[i].id))
            target = workers[best]
            state.load_s[target.id] = start_s(best)
            planned[target.id] = model
            profile = profiles.get(model, target.gpu)
            state.load_s[target.id] += group_work_s(group, profile, self.expected_output_tokens)
            state.queues.setdefault(target.id, []).append(group.key)
        by_key = {g.key: g for g in order}
        swaps = []
        for w in workers:
            queue = state.queues.get(w.id)
            if not queue or w.swapping_until is not None or (self.drain_first and w.running):
                continue
            head_model = by_key[queue[0]].model
            if head_model != now_serving[w.id]:
                swaps.append(Swap(w.id, head_model))
        return tuple(swaps)
