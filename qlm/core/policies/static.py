"""``static``: what most operators run — one fixed vLLM deployment per model, FCFS within.

Each model is served by a fixed set of workers sized by its share of the load; a
request waits for a worker of its model in first-come-first-served order and goes to
the least-loaded one of them. There is no scheduler beyond that: no model swaps in
steady state, no preemption, no SLO awareness. It stands for a cluster provisioned
once from expected traffic (one ``vllm serve`` per model behind a router).

**The split.** Which model each worker serves is decided from what the policy can
know, and the workers' current models are its only memory (the policy is stateless):

* With the ``shares`` option (``{"model": weight, ...}``, the operator's capacity
  plan), the workers are apportioned over the models with a positive weight by
  largest remainder, at least one worker per model while workers last. Workers keep
  their model where it fits the plan; the others (idle ones first, then by id) are
  swapped once to the models short of workers, the models with the fewest capable
  workers first. The plan never changes, so once reached it is never left: no swap
  after the initial assignment.
* Without it, the split is the deployment as it starts (each worker's resident
  model) and no worker ever changes model, except that a model with work (queued or
  running) and **no worker at all** takes one: from a model with no work, or with
  at least two workers, the one with most workers above its share of the snapshot's
  work (expected seconds of queued plus running work per model) first, idle first.
  A model that only a worker busy with the last deployment of another model could
  serve is not served (the deployment lacks it; its requests miss their SLO).

In both cases a model left with no worker takes one by the rule above, so no queued
model starves while another model's deployment has spare workers.

Swaps (the initial assignment) take effect as in the simulator and the services: the
worker's running requests go back to the queue with their progress. Dispatch, pulls
and everything else as :mod:`qlm.core.policies.baseline` with the FCFS order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from qlm.core.errors import InvalidInput
from qlm.core.perf import ProfileBook
from qlm.core.policies.base import QueueOrder, by_arrival, option, register
from qlm.core.policies.baseline import (
    BaselineOptions,
    OrderedDispatchPolicy,
    _Dispatch,
    group_work_s,
    running_work_s,
    swap_cost_s,
)
from qlm.core.pulls import can_serve
from qlm.core.types import QueueSnapshot, RequestGroup, Swap, WorkerView


def check_shares(shares: Any) -> tuple[tuple[str, float], ...]:
    """The ``shares`` option as sorted (model, weight) pairs; InvalidInput if malformed."""
    if not isinstance(shares, Mapping) or not shares:
        raise InvalidInput("options.shares", "must be a non-empty object {model: weight}")
    pairs = []
    for model, weight in shares.items():
        if not isinstance(model, str) or not model:
            raise InvalidInput("options.shares", f"model names must be strings, got {model!r}")
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise InvalidInput(f"options.shares.{model}", f"must be a number, got {weight!r}")
        if not (math.isfinite(weight) and weight >= 0):
            raise InvalidInput(f"options.shares.{model}", f"must be finite and >= 0, got {weight}")
        pairs.append((model, float(weight)))
    if not any(w > 0 for _, w in pairs):
        raise InvalidInput("options.shares", "at least one weight must be > 0")
    return tuple(sorted(pairs))


@dataclass(frozen=True, slots=True)
class StaticOptions(BaselineOptions):
    """Options of ``static``."""

    shares: Mapping[str, float] | None = option(
        None, "capacity plan {model: weight} (default: the deployment as it starts)", ge=0)

    def __post_init__(self) -> None:
        if self.shares is not None:  # sorted by model: the plan's one order
            object.__setattr__(self, "shares", MappingProxyType(dict(check_shares(self.shares))))


def apportion(num_workers: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Workers per model by largest remainder, at least one per model with weight > 0
    while workers last (the heaviest models first). Ties by model name."""
    models = sorted((m for m, w in weights.items() if w > 0), key=lambda m: (-weights[m], m))
    counts = {m: 0 for m in models}
    if not models or num_workers <= 0:
        return counts
    for m in models[:num_workers]:
        counts[m] = 1
    spare = num_workers - sum(counts.values())
    if spare <= 0:
        return counts
    total = sum(weights[m] for m in models)
    ideal = {m: num_workers * weights[m] / total for m in models}
    for m in models:
        extra = max(0, math.floor(ideal[m]) - counts[m])
        extra = min(extra, spare)
        counts[m] += extra
        spare -= extra
    by_remainder = sorted(models, key=lambda m: (-(ideal[m] - counts[m]), m))
    for m in by_remainder[:spare]:
        counts[m] += 1
    return counts


@register("static")
@dataclass(frozen=True)
class StaticPolicy(OrderedDispatchPolicy):
    """See the module docstring. Option: ``shares`` (model → weight), else the deployment."""

    name: ClassVar[str] = "static"
    options_type: ClassVar[type[Any]] = StaticOptions
    queue_order: ClassVar[QueueOrder] = staticmethod(by_arrival)

    options: Any = field(default_factory=StaticOptions)

    @property
    def shares(self) -> Mapping[str, float] | None:
        shares: Mapping[str, float] | None = self.options.shares
        return shares

    def plan_swaps(
        self,
        snapshot: QueueSnapshot,
        order: Sequence[RequestGroup],
        state: _Dispatch,
        profiles: ProfileBook,
    ) -> tuple[Swap, ...]:
        workers = sorted(snapshot.workers, key=lambda w: w.id)
        load = self._work_by_model(snapshot, order, profiles)
        planned = dict(self.shares) if self.shares is not None else load
        target = apportion(len(workers), {
            m: w for m, w in planned.items() if any(can_serve(x, m, profiles) for x in workers)
        })
        desired = {w.id: state.serving[w.id] for w in workers}
        if self.shares is not None:
            desired = self._rebalance(workers, desired, target, profiles)
        desired = self._cover(workers, desired, target, load, profiles)
        swaps = []
        for w in workers:
            model = desired[w.id]
            if model is None or model == state.serving[w.id]:
                continue
            swaps.append(Swap(w.id, model))
            state.load_s[w.id] = swap_cost_s(w, model, profiles)
            state.serving[w.id] = model
        return tuple(swaps)

    # ------------------------------------------------------------ the split
    def _work_by_model(
        self, snapshot: QueueSnapshot, order: Sequence[RequestGroup], profiles: ProfileBook
    ) -> dict[str, float]:
        """Expected seconds of queued plus running work per model (one reference profile
        per model: the first worker by id that can serve it)."""
        work: dict[str, float] = {}
        workers = sorted(snapshot.workers, key=lambda w: w.id)
        for group in order:
            ref = next((w for w in workers if can_serve(w, group.model, profiles)), None)
            if ref is None:
                continue
            profile = profiles.get(group.model, ref.gpu)
            work[group.model] = work.get(group.model, 0.0) + group_work_s(
                group, profile, self.expected_output_tokens
            )
        for w in workers:
            if w.active_model is not None and w.running and profiles.has(w.active_model, w.gpu):
                profile = profiles.get(w.active_model, w.gpu)
                work[w.active_model] = work.get(w.active_model, 0.0) + running_work_s(
                    w, profile, self.expected_output_tokens
                )
        return work

    def _rebalance(
        self,
        workers: Sequence[WorkerView],
        desired: dict[str, str | None],
        target: Mapping[str, int],
        profiles: ProfileBook,
    ) -> dict[str, str | None]:
        """Workers keep a model the plan still needs; the others fill the models short of
        workers (scarcest first), idle workers first."""
        kept: dict[str, int] = {}
        result: dict[str, str | None] = {}
        for w in workers:
            m = desired[w.id]
            if m is not None and kept.get(m, 0) < target.get(m, 0):
                result[w.id] = m
                kept[m] = kept.get(m, 0) + 1
        free = [w for w in workers if w.id not in result]
        for m in sorted(target, key=lambda m: (_num_capable(workers, m, profiles), m)):
            while kept.get(m, 0) < target[m]:
                candidates = [w for w in free if can_serve(w, m, profiles)]
                if not candidates:
                    break
                chosen = min(candidates, key=lambda w: (not _idle(w), w.id))
                result[chosen.id] = m
                kept[m] = kept.get(m, 0) + 1
                free.remove(chosen)
        for w in free:
            result[w.id] = desired[w.id]
        return result

    def _cover(
        self,
        workers: Sequence[WorkerView],
        desired: dict[str, str | None],
        target: Mapping[str, int],
        load: Mapping[str, float],
        profiles: ProfileBook,
    ) -> dict[str, str | None]:
        """A model with work and no worker takes one from a model that has no work or at
        least two workers (most above its share first, idle first, then by id)."""
        result = dict(desired)
        needy = [m for m in load if load[m] > 0]
        for m in sorted(needy, key=lambda m: (_num_capable(workers, m, profiles), m)):
            if any(model == m for model in result.values()):
                continue
            servers: dict[str | None, int] = {}
            for model in result.values():
                servers[model] = servers.get(model, 0) + 1
            candidates = [
                w for w in workers
                if can_serve(w, m, profiles) and _spare(result[w.id], load, servers)
            ]
            if not candidates:
                continue
            chosen = min(candidates, key=lambda w: (
                -(servers[result[w.id]] - target.get(result[w.id] or "", 0)),
                not _idle(w), w.id,
            ))
            result[chosen.id] = m
        return result


def _spare(model: str | None, load: Mapping[str, float], servers: Mapping[str | None, int]) -> bool:
    """Whether a worker of ``model`` may change model: it has none, its model has no
    work, or the model keeps another worker."""
    return model is None or load.get(model, 0.0) <= 0 or servers[model] >= 2


def _idle(worker: WorkerView) -> bool:
    return not worker.running and worker.swapping_until is None


def _num_capable(workers: Sequence[WorkerView], model: str, profiles: ProfileBook) -> int:
    return sum(1 for w in workers if can_serve(w, model, profiles))


__all__ = ["StaticPolicy", "apportion", "check_shares"]
