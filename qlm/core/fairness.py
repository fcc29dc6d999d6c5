"""Fair share between tenants: virtual token counters in the manner of VTC (Sheng et al.,
"Fairness in Serving Large Language Models", OSDI 2024).

A *flow* is one tenant's traffic in one SLO class (fair share acts within a class;
classes keep their own urgency). Each flow has a **virtual token counter**: the service
it received, ``input_weight`` per prompt token admitted plus ``output_weight`` per output
token generated (VTC's w_p = 1, w_q = 2 by default: a decode token costs more GPU time
than a prefill token). Among the *backlogged* flows of a class (those with queued
requests) the one with the least counter is served first. When a flow becomes
backlogged its counter is lifted to the least counter of the class's backlogged flows,
or, when none is backlogged, to the counter of the last flow that left the backlog
(VTC's rule): time spent idle banks no credit, and a flow that asks for less than its
share is served at once without ever owning the GPU.

:class:`VirtualTokenCounters` keeps the counters and is fed with what the scheduler sees
anyway: each :class:`~qlm.core.types.QueueSnapshot` (:meth:`VirtualTokenCounters.observe`)
charges every running request for the prompt it was admitted with (once) and for the
output tokens it generated since it was last seen, and marks the flows with queued
requests as backlogged; :meth:`VirtualTokenCounters.on_finished` charges, from the
request's finished event, what no snapshot saw (the output made after its last snapshot;
all of a request that started and ended between two decisions). :func:`fair_order`
projects VTC onto a queue: it interleaves the queued groups of a class the way VTC would
admit them, charging each group its expected cost.

Pure: no I/O, no clock. The counters are state: the scheduler service keeps them across a
restart or a failover by :meth:`VirtualTokenCounters.to_state` /
:meth:`VirtualTokenCounters.from_state` (through the qlm policy's ``state`` / ``restore``;
docs/scheduler.md says where and how often).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from qlm.core.errors import InvalidInput
from qlm.core.types import QueueSnapshot, RunningRequest, SLOClass

#: A flow: (SLO class, tenant).
Flow = tuple[SLOClass, str]
#: Requests that left the running set whose charged output is remembered, at most (an
#: evicted request resumes with its progress; it must not be charged for it twice).
MAX_DEPARTED: Final = 100_000

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class TokenWeights:
    """What one token adds to a counter: ``input`` per prompt token, ``output`` per
    generated token (VTC's w_p and w_q)."""

    input: float = 1.0
    output: float = 2.0

    def __post_init__(self) -> None:
        for name in ("input", "output"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidInput(f"weights.{name}", f"must be a finite number >= 0, got {value}")

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        return self.input * input_tokens + self.output * output_tokens


class VirtualTokenCounters:
    """The counter of every flow seen, the backlogged flows, and what was charged per
    running request (module docstring)."""

    def __init__(self, weights: TokenWeights | None = None) -> None:
        self.weights = weights or TokenWeights()
        self._counters: dict[Flow, float] = {}
        self._backlogged: set[Flow] = set()
        #: Per class: the counter of the last flow that left its backlog.
        self._last_left: dict[SLOClass, float] = {}
        #: Running request id → output tokens charged so far (a request's flow is its own
        #: class and tenant). Ids and ints only: the garbage collector does not track these
        #: dicts, which hold up to MAX_DEPARTED entries beside a queue of 100k requests.
        self._running: dict[str, int] = {}
        #: Requests that left the running set (evicted or ended) → output tokens charged.
        self._departed: dict[str, int] = {}
        #: Worker id → its running requests as last observed (the tuple itself: the
        #: snapshot keeps a worker's tuple while none of its requests moved, so a worker
        #: whose tuple is the one seen has nothing to charge).
        self._views: dict[str, tuple[RunningRequest, ...]] = {}

    # ------------------------------------------------------------------ reading
    def counter(self, flow: Flow) -> float:
        """The flow's counter (0 for a flow never seen)."""
        return self._counters.get(flow, 0.0)

    @property
    def backlogged(self) -> frozenset[Flow]:
        return frozenset(self._backlogged)

    def counters(self) -> dict[Flow, float]:
        return dict(self._counters)

    # ------------------------------------------------------------------ events
    def charge(self, flow: Flow, input_tokens: float = 0, output_tokens: float = 0) -> None:
        """Add the service ``flow`` received: prompt tokens admitted, output tokens made."""
        if input_tokens < 0 or output_tokens < 0:
            raise InvalidInput("tokens", f"must be >= 0, got {input_tokens}, {output_tokens}")
        self._counters[flow] = self.counter(flow) + self.weights.cost(input_tokens, output_tokens)

    def set_backlogged(self, flows: Iterable[Flow]) -> None:
        """The flows with queued requests now: those newly backlogged are lifted to the
        least counter of their class's backlogged flows (or to the last one that left it,
        when none stayed); those no longer backlogged are remembered as having left."""
        now = set(flows)
        for flow in sorted(self._backlogged - now, key=lambda f: (self.counter(f), f)):
            self._last_left[flow[0]] = self.counter(flow)
        stayed: dict[SLOClass, float] = {}
        for flow in self._backlogged & now:
            c = self.counter(flow)
            stayed[flow[0]] = min(c, stayed.get(flow[0], c))
        for flow in now - self._backlogged:
            floor = stayed.get(flow[0], self._last_left.get(flow[0]))
            if floor is not None and self.counter(flow) < floor:
                self._counters[flow] = floor
            else:
                self._counters.setdefault(flow, self.counter(flow))
        self._backlogged = now

    def observe(self, snapshot: QueueSnapshot) -> None:
        """Charge what ``snapshot`` shows was served since the last one, then take its
        backlogged flows (:meth:`set_backlogged`). Observing the same snapshot again
        changes nothing.

        Incremental: only the workers whose tuple of running requests is not the one last
        observed are read (a request that moved made a new tuple on both workers), so the
        work is proportional to the running requests that changed, not to all of them."""
        views = self._views
        fresh: dict[str, tuple[RunningRequest, ...]] = {}
        before: list[tuple[RunningRequest, ...]] = []  # changed workers' previous tuples
        running, departed, counters = self._running, self._departed, self._counters
        cost = self.weights.cost
        now_running: set[str] = set()  # the requests on the changed workers now
        for worker in snapshot.workers:
            view = worker.running
            fresh[worker.id] = view
            previous = views.pop(worker.id, None)
            if previous is view:
                continue
            if previous:
                before.append(previous)
            for run in view:
                request = run.request
                request_id = request.id
                now_running.add(request_id)
                generated = request.num_generated
                charged = running.get(request_id)
                if charged is None:
                    charged = departed.pop(request_id, None)
                if charged is None:  # first seen: its prompt, and what it made already
                    prompt, charged = request.prompt_tokens, 0
                elif generated > charged:
                    prompt = 0
                else:
                    running[request_id] = charged
                    continue
                # charge() inlined (every running request moves at every snapshot; the
                # amounts here are never negative)
                flow = (request.slo_class, request.tenant)
                counters[flow] = counters.get(flow, 0.0) + cost(prompt, generated - charged)
                running[request_id] = generated
        before.extend(views.values())  # workers no longer in the snapshot
        for view in before:
            for run in view:
                request_id = run.request.id
                if request_id not in now_running and request_id in running:
                    departed[request_id] = running.pop(request_id)
        if (excess := len(departed) - MAX_DEPARTED) > 0:  # the oldest (insertion order)
            self._departed = dict(itertools.islice(departed.items(), excess, None))
        self._views = fresh
        self.set_backlogged((g.slo_class, g.key.tenant) for g in snapshot.groups)

    def on_finished(self, request_id: str, flow: Flow, prompt_tokens: int,
                    output_tokens: int) -> None:
        """Charge a request that finished what no snapshot showed of it: its prompt and
        all of its output when it was never seen running (it started and ended between
        two decisions), else the output made since it was last seen. A snapshot read
        before the finish that still shows it running charges nothing more."""
        if prompt_tokens < 0 or output_tokens < 0:
            raise InvalidInput("tokens", f"must be >= 0, got {prompt_tokens}, {output_tokens}")
        charged = self._running.pop(request_id, None)
        if charged is None:
            charged = self._departed.pop(request_id, None)
        if charged is None:
            self.charge(flow, prompt_tokens, output_tokens)
        elif output_tokens > charged:
            self.charge(flow, 0, output_tokens - charged)
        self._departed[request_id] = max(output_tokens, charged or 0)
        if len(self._departed) > MAX_DEPARTED:  # the oldest (insertion order)
            del self._departed[next(iter(self._departed))]

    # ------------------------------------------------------------------ state
    def to_state(self) -> dict[str, Any]:
        """What a restarted scheduler needs to go on where this one stopped, as JSON-ready
        data: per class each tenant's counter (``counters``), the counter of the last flow
        that left each class's backlog (``last_left``), the backlogged flows
        (``backlogged``: per class, tenants; so a flow that stays backlogged across the
        restart is not lifted as if it had just arrived) and the output tokens charged to
        each running request (``charged``: id → tokens; so a request that goes on running
        is not charged its prompt and output again). Requests that ended or were evicted
        before are forgotten: one evicted before the restart and resumed after it is
        charged again (prompt and output), as a request never seen."""
        by_class: dict[str, dict[str, float]] = {}
        for (slo_class, tenant), value in sorted(self._counters.items()):
            by_class.setdefault(slo_class.value, {})[tenant] = value
        backlogged: dict[str, list[str]] = {}
        for slo_class, tenant in sorted(self._backlogged):
            backlogged.setdefault(slo_class.value, []).append(tenant)
        return {"counters": by_class,
                "last_left": {c.value: v for c, v in sorted(self._last_left.items())},
                "backlogged": backlogged,
                "charged": dict(sorted(self._running.items()))}

    @classmethod
    def from_state(cls, state: Any, weights: TokenWeights | None = None
                   ) -> VirtualTokenCounters:
        """Counters from :meth:`to_state`'s data (every field optional; a running request
        of ``charged`` is charged only the output it makes from there on when it is seen
        again); InvalidInput names the field that is wrong."""
        if not isinstance(state, Mapping):
            raise InvalidInput("fair_share", f"must be an object, got {type(state).__name__}")
        out = cls(weights)
        for name in ("counters", "last_left", "backlogged", "charged"):
            if not isinstance(state.get(name, {}), Mapping):
                raise InvalidInput(f"fair_share.{name}", "must be an object")
        for class_name, tenants in state.get("counters", {}).items():
            slo_class = _slo_class(class_name)
            if not isinstance(tenants, Mapping):
                raise InvalidInput(f"fair_share.counters.{class_name}", "must be an object")
            for tenant, value in tenants.items():
                out._counters[(slo_class, str(tenant))] = _finite(
                    value, f"fair_share.counters.{class_name}.{tenant}")
        for class_name, value in state.get("last_left", {}).items():
            out._last_left[_slo_class(class_name)] = _finite(
                value, f"fair_share.last_left.{class_name}")
        for class_name, tenants in state.get("backlogged", {}).items():
            slo_class = _slo_class(class_name)
            if not isinstance(tenants, list) or not all(isinstance(t, str) for t in tenants):
                raise InvalidInput(f"fair_share.backlogged.{class_name}",
                                   "must be a list of tenant names")
            out._backlogged.update((slo_class, t) for t in tenants)
        for request_id, tokens in state.get("charged", {}).items():
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
                raise InvalidInput(f"fair_share.charged.{request_id}",
                                   f"must be an integer >= 0, got {tokens!r}")
            out._departed[str(request_id)] = tokens  # charged when seen running again
        return out


def _slo_class(name: Any) -> SLOClass:
    try:
        return SLOClass(name)
    except ValueError:
        raise InvalidInput("fair_share.state", f"unknown SLO class {name!r}") from None


def _finite(value: Any, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(field_name, f"must be a finite number, got {value!r}")
    return float(value)


def fair_order(items: Sequence[tuple[K, float]], counters: Mapping[K, float]) -> list[int]:
    """VTC's admission order projected over a queue: ``items`` are (flow, expected cost)
    of queued units (groups) of one class, in each flow's own order (deadline order);
    returns their indices in the order fair share serves them: repeatedly the next unit
    of the flow whose counter would be least *after* that unit (its counter now plus the
    cost of its units already ordered and of this one; ties: the unit first in
    ``items``). ``counters``: each flow's counter now (0 for a flow absent).

    VTC admits one request at a time, so it can compare counters before serving; a group
    is many requests, and a heavy tenant's group of a window can hold hundreds, which a
    light tenant whose counter is a little ahead would otherwise wait behind whole. The
    counter after the unit is fair queuing's virtual finish time (WFQ): a unit goes first
    when it ends the least far ahead of its fair share."""
    queues: dict[K, list[int]] = {}
    for index, (flow, _) in enumerate(items):
        queues.setdefault(flow, []).append(index)
    heap = [(counters.get(flow, 0.0) + items[indices[0]][1], indices[0], flow, 0)
            for flow, indices in queues.items()]
    heapq.heapify(heap)
    order: list[int] = []
    while heap:
        finish, index, flow, k = heapq.heappop(heap)
        order.append(index)
        nxt = k + 1
        indices = queues[flow]
        if nxt < len(indices):
            heapq.heappush(heap, (finish + items[indices[nxt]][1], indices[nxt], flow, nxt))
    return order
