"""The in-memory queue store: the :class:`~qlm.store.base.QueueStore` contract without Redis.

Two parts:

* :class:`~qlm.core.queue.QueueIndex` — the queued requests by group, in the
  contract's order. Synchronous and pure; the simulator keeps its queue in one.
* :class:`MemoryQueueStore` — the whole contract (records, leases, virtual queues)
  over a :class:`QueueIndex`, with the same errors as the Redis store; for tests and
  for running the services' logic without a server. Nothing is durable; token streams
  are not kept (they are the Redis store's transport).

Time comes from the injected ``clock``. Same contract suite as the Redis store:
``tests/integration/test_queue_contract.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from qlm.core.errors import InvalidInput, NotFound
from qlm.core.queue import QueueIndex
from qlm.core.types import (
    GroupKey,
    Request,
    RequestGroup,
    RequestState,
    RunningRequest,
    group_key_for,
)
from qlm.store import base
from qlm.store.base import EnqueueResult, LeaseRenewal, StoreSnapshot
from qlm.store.errors import FenceLost, IdempotencyConflict, LeaseLost
from qlm.store.records import RequestRecord, encode_json, identity_pairs


class MemoryQueueStore:
    """The queue in process memory (see the module docstring). Same options and
    errors as :class:`~qlm.store.store.RedisQueueStore` where they apply."""

    def __init__(self, *, group_window_s: float = base.DEFAULT_GROUP_WINDOW_S,
                 lease_s: float = base.DEFAULT_LEASE_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.group_window_s = base.require_positive(group_window_s, "group_window_s")
        self.lease_s = base.require_positive(lease_s, "lease_s")
        self._clock = clock
        self.index = QueueIndex()
        self._records: dict[str, RequestRecord] = {}
        self._identity: dict[str, list[tuple[str, str]]] = {}
        self._queues: dict[str, tuple[GroupKey, ...]] = {}
        self._running: dict[str, dict[str, None]] = {}  # worker → ids (known workers)
        self._policy_states: dict[str, str] = {}  # policy → its saved state (JSON text)

    def group_of(self, request: Request) -> GroupKey:
        return group_key_for(request, self.group_window_s)

    # ------------------------------------------------------------------ helpers
    def _now(self) -> float:
        return float(self._clock())

    def _lease_until(self, lease_s: float | None) -> float:
        lease = self.lease_s if lease_s is None else base.require_positive(lease_s, "lease_s")
        return self._now() + lease

    def _record(self, request_id: str) -> RequestRecord:
        base.require_id(request_id, "request_id")
        record = self._records.get(request_id)
        if record is None:
            raise NotFound("request", request_id)
        return record

    def _held(self, worker_id: str, request_id: str) -> RequestRecord:
        base.require_id(worker_id, "worker_id")
        record = self._record(request_id)
        if record.state is not RequestState.RUNNING or record.worker_id != worker_id:
            raise LeaseLost(request_id, worker_id, record.state.value, record.worker_id or "")
        return record

    def _progress(self, record: RequestRecord, num_generated: int | None) -> Request:
        if num_generated is None:
            return record.request
        base.require_count(num_generated, "num_generated", minimum=0)
        if num_generated > record.request.max_tokens:
            raise InvalidInput("num_generated", f"must be <= max_tokens="
                               f"{record.request.max_tokens}, got {num_generated}")
        return replace(record.request, num_generated=num_generated)

    def _end(self, record: RequestRecord, state: RequestState, error: str,
             request: Request | None = None) -> None:
        self._release(record)
        self._records[record.id] = replace(
            record, request=request or record.request, state=state, finished_at=self._now(),
            error=error, lease_expires_at=None)

    def _release(self, record: RequestRecord) -> None:
        if record.worker_id is not None:
            self._running.get(record.worker_id, {}).pop(record.id, None)

    def _requeue(self, record: RequestRecord, request: Request) -> None:
        self._release(record)
        queued = replace(record, request=request, state=RequestState.QUEUED, worker_id=None,
                         lease_expires_at=None, num_evictions=record.num_evictions + 1)
        self._records[record.id] = queued
        self.index.add(record.group, request)

    def _take(self, worker_id: str, request_id: str, now: float, lease_until: float
              ) -> RequestRecord:
        record = self._records[request_id]
        self.index.remove(record.group, request_id)
        taken = replace(record, state=RequestState.RUNNING, worker_id=worker_id, started_at=now,
                        lease_expires_at=lease_until, num_pulls=record.num_pulls + 1)
        self._records[request_id] = taken
        self._running.setdefault(worker_id, {})[request_id] = None
        return taken

    # ------------------------------------------------------------------ ingest
    async def enqueue(self, request: Request, *, prompt: Any = None,
                      params: Mapping[str, Any] | None = None) -> EnqueueResult:
        if request.num_generated != 0:
            raise InvalidInput(
                "num_generated", f"must be 0 for a new request, got {request.num_generated}")
        params = {} if params is None else params
        if not isinstance(params, Mapping):
            raise InvalidInput("params", f"must be a mapping, got {type(params).__name__}")
        prompt_json = encode_json(prompt, "prompt")
        params_json = encode_json(dict(params), "params")
        identity = identity_pairs(request, prompt_json, params_json)
        stored = self._identity.get(request.id)
        if stored is not None:
            for (name, value), (_, kept) in zip(identity, stored, strict=True):
                if value != kept:
                    raise IdempotencyConflict(request.id, name, kept)
            return EnqueueResult(self._records[request.id], created=False)
        group = self.group_of(request)
        record = RequestRecord(request=request, state=RequestState.QUEUED, group=group,
                               enqueued_at=self._now(), prompt=json.loads(prompt_json),
                               params=MappingProxyType(json.loads(params_json)))
        self._identity[request.id] = identity
        self._records[request.id] = record
        self.index.add(group, request)
        return EnqueueResult(record, created=True)

    async def get(self, request_id: str) -> RequestRecord:
        return self._record(request_id)

    async def cancel(self, request_id: str, reason: str = "cancelled by client") -> RequestState:
        record = self._record(request_id)
        if record.state is RequestState.QUEUED:
            self.index.remove(record.group, request_id)
            self._end(record, RequestState.CANCELLED, reason)
            return RequestState.CANCELLED
        if record.state is RequestState.RUNNING:
            self._records[request_id] = replace(record, cancel_requested=True, error=reason)
        return record.state

    async def reject(self, request_id: str, reason: str) -> RequestState:
        if not reason:
            raise InvalidInput("reason", "must not be empty")
        record = self._record(request_id)
        if record.state is not RequestState.QUEUED:
            return record.state
        self.index.remove(record.group, request_id)
        self._end(record, RequestState.FAILED, reason)
        return RequestState.FAILED

    async def aclose(self) -> None:
        """Nothing to close."""

    # ------------------------------------------------------------------ scheduler
    async def set_virtual_queue(self, worker_id: str, order: Sequence[GroupKey]) -> None:
        await self.set_virtual_queues({worker_id: order})

    async def set_virtual_queues(self, orders: Mapping[str, Sequence[GroupKey]]) -> None:
        checked: dict[str, tuple[GroupKey, ...]] = {}
        for worker in orders:
            base.require_id(worker, "worker_id")
            order = tuple(orders[worker])
            if not all(isinstance(g, GroupKey) for g in order):
                raise InvalidInput("order", f"worker {worker!r}: not a GroupKey in {order!r}")
            if len(set(order)) != len(order):
                raise InvalidInput("order", f"worker {worker!r}: a group appears twice")
            checked[worker] = order
        for worker, order in checked.items():
            self._queues[worker] = order
            self._running.setdefault(worker, {})

    async def save_policy_state(self, policy: str, state: Mapping[str, Any], *,
                                fence: int = 0) -> None:
        """As the Redis store's; there is no scheduler lease here, so no fencing token is
        current: any ``fence`` > 0 is FenceLost."""
        text = base.encode_policy_state(policy, state)
        if fence:
            raise FenceLost(fence)
        self._policy_states[policy] = text

    async def policy_state(self, policy: str) -> dict[str, Any] | None:
        base.require_id(policy, "policy")
        return base.decode_policy_state(policy, self._policy_states.get(policy))

    async def snapshot(self) -> StoreSnapshot:
        running = {
            worker: tuple(self._running_view(self._records[i]) for i in sorted(ids))
            for worker, ids in self._running.items()
        }
        queues = {worker: self._queues.get(worker, ()) for worker in self._running}
        return StoreSnapshot(self.index.groups(), MappingProxyType(running),
                             MappingProxyType(queues))

    @staticmethod
    def _running_view(record: RequestRecord) -> RunningRequest:
        assert record.started_at is not None
        return RunningRequest(record.request, record.started_at, record.first_token_at)

    async def requeue_expired(self) -> dict[str, RequestState]:
        now = self._now()
        out: dict[str, RequestState] = {}
        expired = sorted((r.lease_expires_at, r.id) for r in self._records.values()
                         if r.state is RequestState.RUNNING and r.lease_expires_at is not None
                         and r.lease_expires_at < now)
        for _, request_id in expired:
            record = self._records[request_id]
            if record.cancel_requested:
                self._end(record, RequestState.CANCELLED, "cancelled by request")
            else:
                self._requeue(record, record.request)
            out[request_id] = self._records[request_id].state
        return out

    # ------------------------------------------------------------------ worker
    def _head(self, worker_id: str, model: str, max_requests: int) -> list[RequestGroup]:
        """The leading queued groups of the worker's queue up to the first of another
        model, cut to ``max_requests`` requests in all."""
        groups: list[RequestGroup] = []
        remaining = max_requests
        for key in self._queues.get(worker_id, ()):
            if remaining <= 0:
                break
            if key not in self.index:
                continue
            if key.model != model:
                break
            group = self.index.group(key)
            groups.append(RequestGroup(key, group.requests[:remaining]))
            remaining -= len(groups[-1].requests)
        return groups

    def _check_pull(self, worker_id: str, model: str, max_requests: int) -> None:
        base.require_id(worker_id, "worker_id")
        base.require_id(model, "model")
        base.require_count(max_requests, "max_requests", minimum=1)

    async def queue_head(self, worker_id: str, model: str, max_requests: int
                         ) -> tuple[RequestGroup, ...]:
        self._check_pull(worker_id, model, max_requests)
        return tuple(self._head(worker_id, model, max_requests))

    async def pull(self, worker_id: str, model: str, max_requests: int, *,
                   lease_s: float | None = None) -> tuple[RequestRecord, ...]:
        self._check_pull(worker_id, model, max_requests)
        lease_until = self._lease_until(lease_s)
        now = self._now()
        self._running.setdefault(worker_id, {})
        return tuple(self._take(worker_id, r.id, now, lease_until)
                     for group in self._head(worker_id, model, max_requests)
                     for r in group.requests)

    async def claim(self, worker_id: str, request_ids: Sequence[str], *,
                    lease_s: float | None = None) -> tuple[RequestRecord, ...]:
        base.require_id(worker_id, "worker_id")
        ids = [base.require_id(i, "request_ids") for i in request_ids]
        if len(set(ids)) != len(ids):
            raise InvalidInput("request_ids", "an id appears twice")
        if not ids:
            return ()
        lease_until = self._lease_until(lease_s)
        now = self._now()
        self._running.setdefault(worker_id, {})
        return tuple(self._take(worker_id, i, now, lease_until) for i in ids
                     if i in self._records and self._records[i].state is RequestState.QUEUED)

    async def renew_leases(self, worker_id: str, request_ids: Iterable[str], *,
                           lease_s: float | None = None) -> LeaseRenewal:
        base.require_id(worker_id, "worker_id")
        ids = [base.require_id(i, "request_ids") for i in request_ids]
        if not ids:
            return LeaseRenewal((), ())
        lease_until = self._lease_until(lease_s)
        lost, cancelled = [], []
        for request_id in ids:
            record = self._records.get(request_id)
            if (record is None or record.state is not RequestState.RUNNING
                    or record.worker_id != worker_id):
                lost.append(request_id)
                continue
            self._records[request_id] = replace(record, lease_expires_at=lease_until)
            if record.cancel_requested:
                cancelled.append(request_id)
        return LeaseRenewal(tuple(lost), tuple(cancelled))

    async def ack(self, worker_id: str, request_id: str,
                  state: RequestState = RequestState.FINISHED, *,
                  num_generated: int | None = None, error: str = "") -> None:
        base.require_id(worker_id, "worker_id")
        base.require_id(request_id, "request_id")
        if not isinstance(state, RequestState) or not state.is_terminal:
            raise InvalidInput("state", f"must be finished, failed or cancelled, got {state!r}")
        record = self._held(worker_id, request_id)
        self._end(record, state, error, self._progress(record, num_generated))

    async def requeue(self, worker_id: str, request_id: str, *,
                      num_generated: int | None = None) -> RequestState:
        base.require_id(request_id, "request_id")
        record = self._held(worker_id, request_id)
        request = self._progress(record, num_generated)
        if record.cancel_requested:
            self._end(record, RequestState.CANCELLED, "cancelled by request", request)
            return RequestState.CANCELLED
        self._requeue(record, request)
        return RequestState.QUEUED

