"""The queue store contract: what the services and the simulator need of a queue.

:class:`QueueStore` is implemented by the Redis store (:class:`qlm.store.store.
RedisQueueStore`, the durable one the services run on) and by the in-memory store
(:class:`qlm.store.memory.MemoryQueueStore`, whose queue index the simulator keeps its
queued requests in). One contract suite runs over both
(``tests/integration/test_queue_contract.py``).

Order (the same in both; how every score is computed is said once, in
:mod:`qlm.store.keys`, and the order they make is :mod:`qlm.core.queue`'s
:func:`request_order_key` / :func:`group_order_key`): a group's requests are in pull
order, by their score ``deadline_at`` then id; groups are in index order, by their
head's score (the earliest deadline among their queued requests) then group key text. An evicted or
expired request keeps its deadline, so it returns ahead of later arrivals.

Lifecycle of a request::

    enqueue ─▶ queued ──pull/claim──▶ running ──ack──▶ finished | failed | cancelled
                  ▲                      │
                  └── requeue (evicted) ─┤  lease expired ─▶ requeue_expired
    cancel: queued ─▶ cancelled;  running ─▶ cancel_requested (the worker stops it)
    reject: queued ─▶ failed;  otherwise unchanged

Errors: :class:`~qlm.core.errors.InvalidInput` for bad arguments (nothing written),
:class:`~qlm.core.errors.NotFound` for unknown ids, :class:`~qlm.store.errors.LeaseLost`
when a worker reports on a request it does not hold,
:class:`~qlm.store.errors.IdempotencyConflict` when an id is reused with another payload.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from qlm.core.errors import InvalidInput
from qlm.core.types import (
    GroupKey,
    QueuedIndex,
    QueueSnapshot,
    Request,
    RequestGroup,
    RequestState,
    RunningRequest,
    WorkerView,
)
from qlm.store.records import RequestRecord

DEFAULT_GROUP_WINDOW_S = 10.0
DEFAULT_LEASE_S = 30.0


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    """``created`` is False when the id already existed with the same payload; ``record``
    is then the stored record (its state may be anything, e.g. finished)."""

    record: RequestRecord
    created: bool


@dataclass(frozen=True, slots=True)
class LeaseRenewal:
    """Result of a heartbeat: ``lost`` ids are no longer this worker's (stop them and
    do not report them); ``cancel_requested`` ids must be stopped and acked cancelled."""

    lost: tuple[str, ...]
    cancel_requested: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    """The queue as read by :meth:`QueueStore.snapshot`.

    Membership (which ids are queued in which group, which run where, every virtual
    queue) is read atomically, so no request appears twice. ``groups`` are in index
    order (earliest deadline first), each group's requests in pull order (deadline,
    then id). Record fields are read right after, so progress may be slightly newer.
    ``queued_ids``: which ids are queued in ``groups``, where the store keeps an index
    (:attr:`QueueSnapshot.queued_ids <qlm.core.types.QueueSnapshot>`); not compared.
    """

    groups: tuple[RequestGroup, ...]
    running: Mapping[str, tuple[RunningRequest, ...]]
    virtual_queues: Mapping[str, tuple[GroupKey, ...]]
    queued_ids: QueuedIndex | None = field(default=None, compare=False, repr=False)

    def group(self, key: GroupKey) -> RequestGroup:
        """The queued group ``key``; KeyError when it has no queued request."""
        for group in self.groups:
            if group.key == key:
                return group
        raise KeyError(str(key))

    @property
    def worker_ids(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.running) | set(self.virtual_queues)))

    def to_queue_snapshot(self, now: float, workers: Iterable[WorkerView]) -> QueueSnapshot:
        """A policy input: ``workers`` (their static view) with their running requests."""
        views = tuple(replace(w, running=self.running.get(w.id, ())) for w in workers)
        return QueueSnapshot(
            now=now, groups=self.groups, workers=views, virtual_queues=self.virtual_queues,
            queued_ids=self.queued_ids,
        )




class QueueStore(Protocol):
    """The operations of a queue store (see the module docstring for order and errors).
    Each method is atomic. """

    group_window_s: float
    lease_s: float

    def group_of(self, request: Request) -> GroupKey:
        """The group ``request`` is queued in under this store's window."""
        ...

    async def enqueue(self, request: Request, *, prompt: Any = None,
                      params: Mapping[str, Any] | None = None) -> EnqueueResult:
        """Store and queue ``request`` (idempotent by id)."""
        ...

    async def get(self, request_id: str) -> RequestRecord:
        """The record of ``request_id``."""
        ...

    async def cancel(self, request_id: str, reason: str = ...) -> RequestState:
        """Queued → cancelled; running → flagged ``cancel_requested``; else unchanged."""
        ...

    async def reject(self, request_id: str, reason: str) -> RequestState:
        """Queued → failed with ``reason``; else unchanged."""
        ...

    async def aclose(self) -> None:
        """Let go of what the store holds (connections)."""
        ...

    async def set_virtual_queue(self, worker_id: str, order: Sequence[GroupKey]) -> None:
        """Replace one worker's virtual queue (head first)."""
        ...

    async def set_virtual_queues(self, orders: Mapping[str, Sequence[GroupKey]]) -> None:
        """Replace these workers' virtual queues (head first) at once."""
        ...

    async def snapshot(self) -> StoreSnapshot:
        """Queued groups, running requests per worker and every virtual queue."""
        ...

    async def queue_head(self, worker_id: str, model: str, max_requests: int
                         ) -> tuple[RequestGroup, ...]:
        """What :meth:`pull` with the same arguments would take now, without taking it."""
        ...

    async def pull(self, worker_id: str, model: str, max_requests: int, *,
                   lease_s: float | None = None) -> tuple[RequestRecord, ...]:
        """Take up to ``max_requests`` from the head of the worker's virtual queue, up to
        the first queued group of another model, under a lease."""
        ...

    async def claim(self, worker_id: str, request_ids: Sequence[str], *,
                    lease_s: float | None = None) -> tuple[RequestRecord, ...]:
        """Take these named queued requests under a lease (others are skipped)."""
        ...

    async def renew_leases(self, worker_id: str, request_ids: Iterable[str], *,
                           lease_s: float | None = None) -> LeaseRenewal:
        """Heartbeat: extend the leases the worker holds; lost and cancel-requested ids."""
        ...

    async def ack(self, worker_id: str, request_id: str,
                  state: RequestState = RequestState.FINISHED, *,
                  num_generated: int | None = None, error: str = "") -> None:
        """Record the final state of a request the worker holds."""
        ...

    async def requeue(self, worker_id: str, request_id: str, *,
                      num_generated: int | None = None) -> RequestState:
        """Evict: back to its group with its progress (or cancelled if requested)."""
        ...

    async def requeue_expired(self) -> dict[str, RequestState]:
        """Every request whose lease expired: back to its group (or cancelled)."""
        ...

    async def save_policy_state(self, policy: str, state: Mapping[str, Any], *,
                                fence: int = 0) -> None:
        """Keep ``state`` (JSON-ready) as policy ``policy``'s saved state, replacing the
        one before. With ``fence`` (> 0), only while it is the current fencing token of the
        scheduler lease, else FenceLost and nothing is written (a store with no lease has
        no current token)."""
        ...

    async def policy_state(self, policy: str) -> dict[str, Any] | None:
        """The state last saved for ``policy`` (None: none saved); InvalidInput naming
        the field when what is stored is not a JSON object."""
        ...


# ---------------------------------------------------------------- argument checks
def require_id(value: str, field_name: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(field_name, f"must be a non-empty string, got {value!r}")
    return value


def require_positive(value: float, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(field_name, f"must be a finite number, got {value!r}")
    if value <= 0:
        raise InvalidInput(field_name, f"must be > 0, got {value}")
    return value


def require_count(value: int, field_name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field_name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidInput(field_name, f"must be >= {minimum}, got {value}")
    return value


def encode_policy_state(policy: str, state: Mapping[str, Any]) -> str:
    """``state`` as the JSON text a store keeps; InvalidInput when it is not a JSON object."""
    require_id(policy, "policy")
    if not isinstance(state, Mapping):
        raise InvalidInput("state", f"must be an object, got {type(state).__name__}")
    try:
        return json.dumps(state, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidInput("state", f"must be JSON data: {exc}") from None


def decode_policy_state(policy: str, text: str | None) -> dict[str, Any] | None:
    """The state a store keeps for ``policy`` (None stays None); InvalidInput naming the
    stored field (``scheduler:state.<policy>``) when it is not a JSON object."""
    if text is None:
        return None
    field_name = f"scheduler:state.{policy}"
    try:
        state = json.loads(text)
    except ValueError as exc:
        raise InvalidInput(field_name, f"not JSON: {exc}") from None
    if not isinstance(state, dict):
        raise InvalidInput(field_name, f"must be a JSON object, got {type(state).__name__}")
    return state
