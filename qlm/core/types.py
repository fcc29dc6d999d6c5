"""The data model every part of qlm shares: requests, SLOs, groups, snapshots, decisions.

All values are frozen dataclasses. A scheduling step reads a :class:`QueueSnapshot`
and returns a :class:`Decision`; the simulator and the scheduler service apply it.
Times are seconds on whatever clock the caller injects (virtual in the simulator,
``time.time()`` in the services).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Final, Protocol
from urllib.parse import quote, unquote

from qlm.core.errors import InvalidInput


class SLOClass(StrEnum):
    """Service classes. ``custom`` requests carry their own TTFT deadline."""

    INTERACTIVE = "interactive"
    BATCH_1 = "batch-1"
    BATCH_2 = "batch-2"
    CUSTOM = "custom"


#: Default TTFT SLOs of the evaluation protocol (QLM paper): 20 s, 60 s, 1 h.
DEFAULT_TTFT_SLO_S: Final[Mapping[SLOClass, float]] = MappingProxyType(
    {SLOClass.INTERACTIVE: 20.0, SLOClass.BATCH_1: 60.0, SLOClass.BATCH_2: 3600.0}
)


def parse_slo_class(value: str, field_name: str = "slo_class") -> SLOClass:
    try:
        return SLOClass(value)
    except ValueError:
        allowed = ", ".join(c.value for c in SLOClass)
        problem = f"unknown class {value!r}; expected one of {allowed}"
        raise InvalidInput(field_name, problem) from None


@dataclass(frozen=True, slots=True)
class SLO:
    """A latency objective: first token within ``ttft_s`` of arrival; optional TPOT target."""

    ttft_s: float
    tpot_s: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.ttft_s, int | float) and math.isfinite(self.ttft_s)):
            raise InvalidInput("slo.ttft_s", f"must be a finite number, got {self.ttft_s!r}")
        if self.ttft_s <= 0:
            raise InvalidInput("slo.ttft_s", f"must be > 0, got {self.ttft_s}")
        if self.tpot_s is not None and not (math.isfinite(self.tpot_s) and self.tpot_s > 0):
            raise InvalidInput("slo.tpot_s", f"must be > 0 when set, got {self.tpot_s}")

    @classmethod
    def for_class(cls, slo_class: SLOClass, ttft_s: float | None = None) -> SLO:
        """The class default, or ``ttft_s`` when given (required for ``custom``)."""
        if ttft_s is None:
            if slo_class is SLOClass.CUSTOM:
                raise InvalidInput("slo.ttft_s", "required for class 'custom'")
            ttft_s = DEFAULT_TTFT_SLO_S[slo_class]
        return cls.of(ttft_s)

    @classmethod
    def of(cls, ttft_s: float, tpot_s: float | None = None) -> SLO:
        """``SLO(ttft_s, tpot_s)``, one shared object per distinct pair: a queue of 100k
        requests then holds a handful of SLO objects, not one per request for the garbage
        collector to walk in every full collection (SLOs are frozen: sharing is safe)."""
        try:
            return _shared_slo(ttft_s, tpot_s)
        except TypeError:  # unhashable: let the constructor name the field
            return cls(ttft_s, tpot_s)


@functools.lru_cache(maxsize=4096, typed=True)
def _shared_slo(ttft_s: float, tpot_s: float | None) -> SLO:
    return SLO(ttft_s, tpot_s)


#: The tenant of a request that names none (and of a group key without one).
DEFAULT_TENANT: Final = "default"


class RequestState(StrEnum):
    """queued → running → finished | failed | cancelled; running → queued on eviction."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (RequestState.FINISHED, RequestState.FAILED, RequestState.CANCELLED)


@dataclass(frozen=True, slots=True)
class Request:
    """One inference request as the scheduler sees it (no prompt text, only its size).

    ``max_tokens`` bounds the output; ``num_generated`` is the progress kept across
    evictions (an evicted request resumes, it does not restart).
    """

    id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    slo_class: SLOClass
    slo: SLO
    arrival_at: float
    tenant: str = DEFAULT_TENANT
    num_generated: int = 0

    def __post_init__(self) -> None:
        if not self.id:
            raise InvalidInput("id", "must not be empty")
        if not self.model:
            raise InvalidInput("model", "must not be empty")
        if self.prompt_tokens <= 0:
            raise InvalidInput("prompt_tokens", f"must be > 0, got {self.prompt_tokens}")
        if self.max_tokens <= 0:
            raise InvalidInput("max_tokens", f"must be > 0, got {self.max_tokens}")
        if not 0 <= self.num_generated <= self.max_tokens:
            raise InvalidInput(
                "num_generated",
                f"must be in [0, max_tokens={self.max_tokens}], got {self.num_generated}",
            )
        if not math.isfinite(self.arrival_at):
            raise InvalidInput("arrival_at", f"must be finite, got {self.arrival_at}")

    def with_generated(self, num_generated: int) -> Request:
        """This request with ``num_generated`` tokens of progress: ``replace(self,
        num_generated=...)`` checking only that field (the others were checked when this
        one was made), at half the cost. The simulator and the scheduler's snapshot make
        one per running request that progressed, every step."""
        if not 0 <= num_generated <= self.max_tokens:
            raise InvalidInput(
                "num_generated",
                f"must be in [0, max_tokens={self.max_tokens}], got {num_generated}",
            )
        clone = _new_object(Request)
        _set_id(clone, self.id)
        _set_model(clone, self.model)
        _set_prompt_tokens(clone, self.prompt_tokens)
        _set_max_tokens(clone, self.max_tokens)
        _set_slo_class(clone, self.slo_class)
        _set_slo(clone, self.slo)
        _set_arrival_at(clone, self.arrival_at)
        _set_tenant(clone, self.tenant)
        _set_num_generated(clone, num_generated)
        return clone

    @property
    def tpot_s(self) -> float | None:
        """The request's time-per-output-token target, if it has one."""
        return self.slo.tpot_s

    @property
    def deadline_at(self) -> float:
        """When the first token must have arrived to meet the TTFT SLO."""
        return self.arrival_at + self.slo.ttft_s

    @property
    def remaining_tokens(self) -> int:
        return self.max_tokens - self.num_generated

    @property
    def context_tokens(self) -> int:
        """Tokens whose KV state the request holds when (re)admitted."""
        return self.prompt_tokens + self.num_generated


#: Request's slot setters (the frozen class's own ``__setattr__`` refuses), for
#: :meth:`Request.with_generated`, which sets every field of a new object directly (a
#: field added to Request must be added there: tests/unit/test_types.py checks).
_new_object = object.__new__
(_set_id, _set_model, _set_prompt_tokens, _set_max_tokens, _set_slo_class, _set_slo,
 _set_arrival_at, _set_tenant, _set_num_generated) = (
    getattr(Request, name).__set__ for name in (
        "id", "model", "prompt_tokens", "max_tokens", "slo_class", "slo", "arrival_at",
        "tenant", "num_generated"))


@dataclass(frozen=True, slots=True, order=True)
class GroupKey:
    """Requests of one model, SLO class and tenant that arrived in the same window.

    Groups are per tenant so that the scheduler can order one tenant's work against
    another's (fair share, :mod:`qlm.core.fairness`); a worker pulls a group's requests
    in deadline order, so tenants mixed in one group could not be told apart.

    Text form (``str``; the Redis group name): ``model|slo_class|window`` for the default
    tenant (as before tenants had groups of their own), ``model|slo_class|window|tenant``
    otherwise, the tenant percent-encoded (``|`` and ``%`` cannot be mistaken for a
    separator). The model may contain ``|``: the window, an integer, tells the forms apart.
    """

    model: str
    slo_class: SLOClass
    window: int
    tenant: str = DEFAULT_TENANT
    #: The hash, computed once: keys are looked up thousands of times a scheduling step
    #: (the store's mirror, the policies' memos, the applier), and the generated hash
    #: built a tuple and called the class enum's hash each time. The same value.
    _hash: int = field(init=False, repr=False, compare=False, hash=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash",
                           hash((self.model, self.slo_class, self.window, self.tenant)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[GroupKey], tuple[str, SLOClass, int, str]]:
        """Pickled by its fields: the hash of a string differs between processes."""
        return GroupKey, (self.model, self.slo_class, self.window, self.tenant)

    def __str__(self) -> str:
        text = f"{self.model}|{self.slo_class.value}|{self.window}"
        if self.tenant == DEFAULT_TENANT:
            return text
        return f"{text}|{quote(self.tenant, safe='')}"

    @classmethod
    def parse(cls, text: str) -> GroupKey:
        parts = text.rsplit("|", 3)
        try:
            if len(parts) == 4 and _INT.fullmatch(parts[2]):
                model, slo_class, window, tenant = parts
                return cls(model, SLOClass(slo_class), int(window), unquote(tenant))
            model, slo_class, window = text.rsplit("|", 2)
            return cls(model, SLOClass(slo_class), int(window))
        except ValueError:
            raise InvalidInput("group", f"malformed group key {text!r}") from None


_INT: Final = re.compile(r"-?[0-9]+")


def group_key_for(request: Request, window_s: float) -> GroupKey:
    if window_s <= 0:
        raise InvalidInput("window_s", f"must be > 0, got {window_s}")
    return GroupKey(request.model, request.slo_class, math.floor(request.arrival_at / window_s),
                    request.tenant)


@dataclass(frozen=True, slots=True)
class RequestGroup:
    """A scheduling unit: the queued requests of one :class:`GroupKey`, in arrival order."""

    key: GroupKey
    requests: tuple[Request, ...]

    def __post_init__(self) -> None:
        if not self.requests:
            raise InvalidInput("requests", f"group {self.key} must not be empty")

    @property
    def model(self) -> str:
        return self.key.model

    @property
    def slo_class(self) -> SLOClass:
        return self.key.slo_class

    @property
    def size(self) -> int:
        return len(self.requests)

    @property
    def first_arrival_at(self) -> float:
        return min(r.arrival_at for r in self.requests)

    @property
    def earliest_deadline_at(self) -> float:
        return min(r.deadline_at for r in self.requests)

    @property
    def total_prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.requests)


def group_requests(requests: Iterable[Request], window_s: float) -> tuple[RequestGroup, ...]:
    """Partition ``requests`` into groups; groups sorted by key, requests by arrival."""
    buckets: dict[GroupKey, list[Request]] = {}
    for request in requests:
        buckets.setdefault(group_key_for(request, window_s), []).append(request)
    return tuple(
        RequestGroup(key, tuple(sorted(reqs, key=lambda r: (r.arrival_at, r.id))))
        for key, reqs in sorted(buckets.items())
    )


@dataclass(frozen=True, slots=True)
class RunningRequest:
    """A request that a worker is serving, with when it started and its progress."""

    request: Request
    started_at: float
    first_token_at: float | None = None


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What the scheduler knows of one worker (one model instance on one or more GPUs).

    ``models`` are the models the worker can serve without a cold load (awake or
    asleep); ``active_model`` is the awake one, or None while idle or swapping.
    While a model swap is under way, ``swapping_to`` names the model being woken
    and ``swapping_until`` when it will be ready.
    """

    id: str
    gpu: str
    models: tuple[str, ...]
    active_model: str | None
    kv_capacity_tokens: int
    max_batch_size: int
    running: tuple[RunningRequest, ...] = ()
    num_gpus: int = 1
    swapping_until: float | None = None
    swapping_to: str | None = None
    #: The batch cap in force (:class:`BatchCap`), None when the worker's own limit applies.
    batch_cap: int | None = None
    #: The physical GPU(s) this worker shares with others (the workers file's ``device``):
    #: workers of one device run their engines side by side, each slowing the other's
    #: steps. None: a device of its own.
    device: str | None = None

    @property
    def batch_limit(self) -> int:
        """Running requests the worker admits up to: ``max_batch_size``, or the batch cap."""
        if self.batch_cap is None:
            return self.max_batch_size
        return min(self.max_batch_size, self.batch_cap)

    @property
    def kv_used_tokens(self) -> int:
        return sum(r.request.context_tokens for r in self.running)

    @property
    def batch_size(self) -> int:
        return len(self.running)


VirtualQueues = Mapping[str, tuple[GroupKey, ...]]


def _frozen_mapping(value: VirtualQueues) -> VirtualQueues:
    return MappingProxyType(dict(value))


class QueuedIndex(Protocol):
    """An environment's index of its queued requests (:attr:`QueueSnapshot.queued_ids`)."""

    def among(self, request_ids: set[str]) -> set[str]:
        """Those of ``request_ids`` that are queued in the snapshot's groups."""
        ...


@dataclass(frozen=True, slots=True)
class QueueSnapshot:
    """A read-only view of the whole queue at ``now``: the input of every policy.

    ``virtual_queues`` is the previous decision's order per worker (may be empty).
    ``queued_ids``, when the environment keeps an index of its queue (the Redis store's
    mirror, :mod:`qlm.store.mirror`), answers which ids are queued in ``groups``
    without a pass over them (:meth:`queued_among`); it takes no part in equality.
    """

    now: float
    groups: tuple[RequestGroup, ...]
    workers: tuple[WorkerView, ...]
    virtual_queues: Mapping[str, tuple[GroupKey, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    queued_ids: QueuedIndex | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.virtual_queues, MappingProxyType):
            object.__setattr__(self, "virtual_queues", _frozen_mapping(self.virtual_queues))

    @property
    def num_queued(self) -> int:
        return sum(g.size for g in self.groups)

    def queued_among(self, request_ids: Iterable[str]) -> set[str]:
        """Which of ``request_ids`` are queued (in ``groups``): through ``queued_ids``
        when given (as many lookups as ids), else one pass over the queued requests."""
        asked = set(request_ids)
        if not asked:
            return set()
        if self.queued_ids is not None:
            return self.queued_ids.among(asked)
        return {r.id for g in self.groups for r in g.requests if r.id in asked}

    def group(self, key: GroupKey) -> RequestGroup:
        for g in self.groups:
            if g.key == key:
                return g
        raise KeyError(str(key))

    def worker(self, worker_id: str) -> WorkerView:
        for w in self.workers:
            if w.id == worker_id:
                return w
        raise KeyError(worker_id)


# ---------------------------------------------------------------- decisions
@dataclass(frozen=True, slots=True)
class Place:
    """Set worker ``worker_id``'s virtual queue to ``order`` (head first)."""

    worker_id: str
    order: tuple[GroupKey, ...]


@dataclass(frozen=True, slots=True)
class Pull:
    """Worker ``worker_id`` admits these queued requests now (head of its queue)."""

    worker_id: str
    request_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Evict:
    """Preempt a running request; it keeps its progress and returns to the queue.

    ``state_swap``: keep its KV state in the worker's CPU memory (costs a GPU↔CPU copy
    each way) instead of recomputing it by prefill when it is admitted again.
    """

    worker_id: str
    request_id: str
    reason: str = ""
    state_swap: bool = False


@dataclass(frozen=True, slots=True)
class Swap:
    """Switch the worker's active model (sleep the current one, wake ``to_model``)."""

    worker_id: str
    to_model: str


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse a queued request (e.g. it can no longer meet its SLO and policy says drop)."""

    request_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class BatchCap:
    """From now on worker ``worker_id`` admits requests only while it runs fewer than
    ``max_batch_size`` (None: its own limit again; 0: it admits nothing for now). Set
    while requests with a TPOT target run there or head its queue (a smaller batch makes
    each decode step shorter), and beside interactive work on a shared GPU
    (:func:`qlm.core.policies.qlm.lso.colocated_caps`)."""

    worker_id: str
    max_batch_size: int | None

    def __post_init__(self) -> None:
        if self.max_batch_size is not None and self.max_batch_size < 0:
            raise InvalidInput("max_batch_size",
                               f"must be >= 0 when set, got {self.max_batch_size}")


@dataclass(frozen=True, slots=True)
class Decision:
    """Everything one scheduling step wants to happen. Pure data; applied elsewhere."""

    placements: tuple[Place, ...] = ()
    pulls: tuple[Pull, ...] = ()
    evictions: tuple[Evict, ...] = ()
    swaps: tuple[Swap, ...] = ()
    rejections: tuple[Reject, ...] = ()
    batch_caps: tuple[BatchCap, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not (
            self.placements or self.pulls or self.evictions or self.swaps or self.rejections
            or self.batch_caps
        )

    def order_for(self, worker_id: str) -> tuple[GroupKey, ...]:
        for place in self.placements:
            if place.worker_id == worker_id:
                return place.order
        return ()
