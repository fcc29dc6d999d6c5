"""The Redis queue store: durable requests, groups, virtual queues, leases and token streams.

Every change that touches more than one key is one Lua script (``qlm/store/lua``),
so each method below is atomic and, except :meth:`RedisQueueStore.snapshot` and
:meth:`RedisQueueStore.read_tokens`, one round trip. Key names and sorted-set scores
are defined in :mod:`qlm.store.keys`; the record schema is in ``docs/redis.md``.

Lifecycle of a request::

    enqueue ─▶ queued ──pull/claim──▶ running ──ack──▶ finished | failed | cancelled
                  ▲                      │
                  └── requeue (evicted) ─┤  lease expired ─▶ requeue_expired
    cancel: queued ─▶ cancelled;  running ─▶ cancel_requested (the worker stops it)

Time comes from the injected ``clock`` (seconds; ``time.time`` by default). Errors:
:class:`~qlm.core.errors.InvalidInput` for bad arguments (nothing written),
:class:`~qlm.core.errors.NotFound` for unknown ids,
:class:`~qlm.store.errors.LeaseLost` when a worker reports on a request it no longer
holds, :class:`~qlm.core.errors.Unavailable` when Redis does not answer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import redis.exceptions
from redis.asyncio import BlockingConnectionPool, Redis

from qlm.core.errors import InvalidInput, NotFound, QlmError, Unavailable
from qlm.core.forecast import GroupForecast
from qlm.core.types import (
    GroupKey,
    Request,
    RequestGroup,
    RequestState,
    RunningRequest,
    SLOClass,
    group_key_for,
)
from qlm.log import get_logger
from qlm.store.base import (
    DEFAULT_GROUP_WINDOW_S,
    DEFAULT_LEASE_S,
    EnqueueResult,
    LeaseRenewal,
    StoreSnapshot,
    decode_policy_state,
    encode_policy_state,
    require_count,
    require_id,
    require_positive,
)
from qlm.store.client import RedisClient, is_cluster_url, redis_client
from qlm.store.errors import FenceLost, IdempotencyConflict, LeaseLost
from qlm.store.keys import DEFAULT_PREFIX, Keys, group_member_score
from qlm.store.mirror import QueueMirror
from qlm.store.records import (
    SCHEDULING_FIELDS,
    RequestRecord,
    encode_json,
    identity_pairs,
    initial_pairs,
    record_from_fields,
    record_from_json,
    request_from_fields,
)
from qlm.store.scripts import Scripts, StoreScript

log = get_logger("qlm.store")

DEFAULT_RECORD_TTL_S = 24 * 3600.0
DEFAULT_STREAM_TTL_S = 3600.0
DEFAULT_STREAM_MAXLEN = 10_000
DEFAULT_MAX_CONNECTIONS = 256
_SNAPSHOT_CHUNK = 1000
#: Record-read script calls per pipelined round trip (20,000 records).
_READ_CALLS_PER_TRIP = 20
_EXPIRED_BATCH = 500


@dataclass(frozen=True, slots=True)
class TokenAppend:
    """One output chunk for :meth:`RedisQueueStore.append_tokens_many` (same meaning as
    the arguments of :meth:`RedisQueueStore.append_tokens`)."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    num_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class TokenChunk:
    """One entry of a request's token stream.

    ``final_state`` is set only on the last entry (the request ended); that entry
    carries no tokens and ``error`` says why a failed or cancelled request ended.
    """

    entry_id: str
    at: float
    text: str = ""
    token_ids: tuple[int, ...] = ()
    num_generated: int = 0
    final_state: RequestState | None = None
    error: str = ""


@contextmanager
def _redis_errors() -> Iterator[None]:
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise Unavailable(f"redis: {exc}") from exc


def _ttl_arg(value: float, field_name: str) -> str:
    """Whole seconds for EXPIRE (0 = no expiry)."""
    if value != 0:
        require_positive(value, field_name)
    return str(math.ceil(value))


@dataclass(frozen=True, slots=True)
class _EnqueueCall:
    """The enqueue script's KEYS/ARGV for one request, and how to read its reply."""

    request: Request
    group: GroupKey
    enqueued_at: float
    prompt_json: str
    params_json: str
    keys: list[str]
    args: list[str]

    def result(self, reply: list[Any]) -> EnqueueResult:
        match reply[0]:
            case "created":
                record = RequestRecord(
                    request=self.request,
                    state=RequestState.QUEUED,
                    group=self.group,
                    enqueued_at=self.enqueued_at,
                    prompt=json.loads(self.prompt_json),
                    params=MappingProxyType(json.loads(self.params_json)),
                )
                return EnqueueResult(record, created=True)
            case "exists":
                return EnqueueResult(record_from_json(reply[1]), created=False)
            case "conflict":
                raise IdempotencyConflict(self.request.id, reply[1], reply[2])
        raise AssertionError(f"enqueue script replied {reply!r}")


class RedisQueueStore:
    """The queue of qlm on one Redis server. Safe to share between asyncio tasks.

    ``client`` must decode responses (``decode_responses=True``); :meth:`from_url`
    builds one. Options: ``prefix`` of every key; ``group_window_s`` the arrival
    window that groups requests; ``lease_s`` the default lease of pulled requests;
    ``record_ttl_s`` / ``stream_ttl_s`` how long a record / token stream lives after
    its request ended (0 = forever; the id can be reused once the record is gone);
    ``stream_maxlen`` the approximate cap of each token stream.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = DEFAULT_PREFIX,
        group_window_s: float = DEFAULT_GROUP_WINDOW_S,
        lease_s: float = DEFAULT_LEASE_S,
        record_ttl_s: float = DEFAULT_RECORD_TTL_S,
        stream_ttl_s: float = DEFAULT_STREAM_TTL_S,
        stream_maxlen: int = DEFAULT_STREAM_MAXLEN,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not client.get_connection_kwargs().get("decode_responses"):
            raise InvalidInput("client", "must be created with decode_responses=True")
        self._redis = client
        self.keys = Keys(prefix)
        self.group_window_s = require_positive(group_window_s, "group_window_s")
        self.lease_s = require_positive(lease_s, "lease_s")
        self._record_ttl = _ttl_arg(record_ttl_s, "record_ttl_s")
        self._stream_ttl = _ttl_arg(stream_ttl_s, "stream_ttl_s")
        self._stream_maxlen = str(require_count(stream_maxlen, "stream_maxlen", minimum=1))
        self._clock = clock
        self._scripts = Scripts.register(client)
        #: The queue's membership and queued requests as of the previous snapshot.
        self._mirror = QueueMirror()
        #: The running requests as of the previous snapshot.
        self._running = _RunningRequests()
        self._snapshot_lock = asyncio.Lock()

    @property
    def num_whole_snapshots(self) -> int:
        """How many of this store's snapshots read the queue's membership whole (the
        first; then only after the queue log was trimmed past the previous one or
        disagreed with the groups): the others read only what changed."""
        return self._mirror.num_resets

    @property
    def num_records_read(self) -> int:
        """How many queued requests' records this store's snapshots have read in all (the
        whole queue at a whole read, then those that entered a group since)."""
        return self._mirror.num_read

    @property
    def client(self) -> RedisClient:
        """The Redis client (shared with what lives next to the queue, e.g. the tenants)."""
        return self._redis

    @classmethod
    def from_url(
        cls, url: str, *, max_connections: int = DEFAULT_MAX_CONNECTIONS, **options: Any
    ) -> RedisQueueStore:
        """A store on a new client for ``url`` (``redis://host:port/db``, or
        ``redis+cluster://host:port`` for a Redis Cluster: :mod:`qlm.store.client`).

        Callers beyond ``max_connections`` concurrent commands wait for a free
        connection (up to 20 s) instead of failing (on a cluster: per node, and they
        fail). Each :meth:`read_tokens` reader holds one connection while it waits for
        output, so size this to the number of concurrent token streams plus the other
        concurrent callers.
        """
        require_count(max_connections, "max_connections", minimum=1)
        if is_cluster_url(url):
            return cls(
                redis_client(url, decode_responses=True, max_connections=max_connections),
                **options,
            )
        pool = BlockingConnectionPool.from_url(
            url, decode_responses=True, max_connections=max_connections, timeout=20
        )
        return cls(Redis.from_pool(pool), **options)  # the client owns (closes) the pool

    async def aclose(self) -> None:
        """Close the client (and its pool when built by :meth:`from_url`)."""
        await self._redis.aclose()

    async def ping(self) -> bool:
        """True when Redis answers (for health checks); never raises."""
        try:
            return bool(await self._redis.ping())
        except (redis.exceptions.RedisError, OSError):
            return False

    # ------------------------------------------------------------------ helpers
    def _now(self) -> str:
        return repr(float(self._clock()))

    def _ttl_args(self) -> list[str]:
        return [self._record_ttl, self._stream_ttl, self._stream_maxlen]

    def _now_and_lease_until(self, lease_s: float | None) -> tuple[str, str]:
        """The time now and when a lease of ``lease_s`` (default: the store's) taken now ends."""
        lease = self.lease_s if lease_s is None else require_positive(lease_s, "lease_s")
        now = float(self._clock())
        return repr(now), repr(now + lease)

    def group_of(self, request: Request) -> GroupKey:
        """The group ``request`` is queued in under this store's window."""
        return group_key_for(request, self.group_window_s)

    # ------------------------------------------------------------------ ingest
    async def enqueue(
        self, request: Request, *, prompt: Any = None, params: Mapping[str, Any] | None = None
    ) -> EnqueueResult:
        """Store and queue ``request`` atomically (record + group entry + group index).

        Idempotent by ``request.id``: the same id with the same model, sizes, SLO,
        tenant, prompt and params returns the stored record (``created=False``),
        whatever its state; with any of those different raises
        :class:`IdempotencyConflict` naming the field. ``prompt`` is any JSON value
        (text or token ids), ``params`` a JSON object (sampling parameters).
        """
        call = self._enqueue_call(request, prompt, params)
        with _redis_errors():
            reply = await self._scripts.enqueue(keys=call.keys, args=call.args)
        return call.result(reply)

    async def enqueue_many(
        self, items: Sequence[tuple[Request, Any, Mapping[str, Any] | None]]
    ) -> list[EnqueueResult | InvalidInput]:
        """:meth:`enqueue` for each ``(request, prompt, params)``, in one pipeline.

        Each item is its own atomic script run, exactly as :meth:`enqueue` (the batch is
        not a transaction); one round trip for all of them. The answer has one entry per
        item, in order: its EnqueueResult, or the InvalidInput (IdempotencyConflict
        included) that :meth:`enqueue` would have raised for it. Unavailable when Redis
        does not answer (then any subset of the items may have been written).
        """
        calls: list[_EnqueueCall | InvalidInput] = []
        for request, prompt, params in items:
            try:
                calls.append(self._enqueue_call(request, prompt, params))
            except InvalidInput as error:
                calls.append(error)
        replies = iter(await self._run_enqueues([c for c in calls if isinstance(c, _EnqueueCall)]))
        results: list[EnqueueResult | InvalidInput] = []
        for call_or_error in calls:
            if isinstance(call_or_error, InvalidInput):
                results.append(call_or_error)
                continue
            try:
                results.append(call_or_error.result(next(replies)))
            except InvalidInput as error:
                results.append(error)
        return results

    async def _run_enqueues(self, calls: Sequence[_EnqueueCall]) -> list[Any]:
        """The enqueue script's replies for ``calls``, in one round trip."""
        return await self._run_pipelined(self._scripts.enqueue,
                                         [(call.keys, call.args) for call in calls])

    async def _run_pipelined(self, script: StoreScript,
                             calls: Sequence[tuple[Sequence[str], Sequence[str]]]) -> list[Any]:
        """``script``'s replies for each ``(keys, args)``: EVALSHA in one pipeline, one
        round trip (redis-py's pipelined Script would add a SCRIPT EXISTS round trip each
        time). The script is loaded and the batch sent again only if Redis lost it
        (NOSCRIPT: then no EVALSHA of the batch ran)."""
        if not calls:
            return []
        for _ in range(2):
            pipe = self._redis.pipeline(transaction=False)
            for keys, args in calls:
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            with _redis_errors():
                replies: list[Any] = await pipe.execute(raise_on_error=False)
            if not any(isinstance(r, redis.exceptions.NoScriptError) for r in replies):
                break
            with _redis_errors():
                await self._redis.script_load(script.script)
        for reply in replies:
            if isinstance(reply, Exception):
                with _redis_errors():
                    raise reply
        return replies

    def _enqueue_call(
        self, request: Request, prompt: Any, params: Mapping[str, Any] | None
    ) -> _EnqueueCall:
        if request.num_generated != 0:
            raise InvalidInput(
                "num_generated", f"must be 0 for a new request, got {request.num_generated}"
            )
        params = {} if params is None else params
        if not isinstance(params, Mapping):
            raise InvalidInput("params", f"must be a mapping, got {type(params).__name__}")
        prompt_json = encode_json(prompt, "prompt")
        params_json = encode_json(dict(params), "params")
        group = self.group_of(request)
        enqueued_at = float(self._clock())
        args = [
            request.id,
            str(group),
            repr(group_member_score(request.deadline_at)),
            json.dumps(identity_pairs(request, prompt_json, params_json)),
            json.dumps(initial_pairs(request, group, enqueued_at)),
        ]
        keys = [self.keys.request(request.id), self.keys.group(group), self.keys.groups,
                self.keys.queue_log]
        return _EnqueueCall(request, group, enqueued_at, prompt_json, params_json, keys, args)

    async def get(self, request_id: str) -> RequestRecord:
        """The record of ``request_id``; :class:`NotFound` if unknown (or expired)."""
        require_id(request_id, "request_id")
        with _redis_errors():
            fields: dict[str, str] = await self._redis.hgetall(  # type: ignore[assignment]
                self.keys.request(request_id)
            )
        if not fields:
            raise NotFound("request", request_id)
        return record_from_fields(fields)

    async def states(self, request_ids: Sequence[str]) -> dict[str, RequestState | None]:
        """The state of each of ``request_ids`` (None: unknown or expired), in one pipeline."""
        replies = await self._field_of_each(request_ids, "state")
        return {rid: RequestState(state) if state else None for rid, state in replies.items()}

    async def deadlines(self, request_ids: Sequence[str]) -> dict[str, float | None]:
        """The ``deadline_at`` of each of ``request_ids`` (None: unknown), in one pipeline."""
        replies = await self._field_of_each(request_ids, "deadline_at")
        return {rid: float(value) if value else None for rid, value in replies.items()}

    async def start_facts(self, request_ids: Sequence[str]
                          ) -> dict[str, tuple[float | None, float | None]]:
        """``(deadline_at, predicted first token)`` of each of ``request_ids`` in one
        pipeline: the prediction is the last forecast before it started (None: none, or
        the request is unknown)."""
        if not request_ids:
            return {}
        names = ("deadline_at", "forecast", "forecast_rank", "forecast_size")
        with _redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            for request_id in request_ids:
                pipe.hmget(self.keys.request(request_id), names)
            replies = await pipe.execute()
        out: dict[str, tuple[float | None, float | None]] = {}
        for request_id, (deadline, forecast, rank, size) in zip(request_ids, replies,
                                                                strict=True):
            predicted = None
            if forecast:
                predicted = GroupForecast.from_json(forecast).first_token_at_for(
                    int(rank or 0), int(size or 0) or None)
            out[request_id] = (float(deadline) if deadline else None, predicted)
        return out

    async def _field_of_each(self, request_ids: Sequence[str], name: str) -> dict[str, Any]:
        if not request_ids:
            return {}
        with _redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            for request_id in request_ids:
                pipe.hget(self.keys.request(request_id), name)
            replies = await pipe.execute()
        return dict(zip(request_ids, replies, strict=True))

    async def cancel(self, request_id: str, reason: str = "cancelled by client") -> RequestState:
        """Cancel a request. Queued → ``cancelled`` now (returned). Running → stays
        ``running`` with ``cancel_requested`` set; its worker stops it (returns
        ``running``). Terminal → unchanged (its state is returned). NotFound if unknown."""
        return await self._end_queued(request_id, "cancel", reason)

    async def reject(self, request_id: str, reason: str) -> RequestState:
        """End a *queued* request as ``failed`` with ``reason`` (a scheduler Reject).
        Returns the resulting state; a request that is not queued is left unchanged."""
        if not reason:
            raise InvalidInput("reason", "must not be empty")
        return await self._end_queued(request_id, "reject", reason)

    async def _end_queued(self, request_id: str, mode: str, reason: str) -> RequestState:
        require_id(request_id, "request_id")
        args = [self.keys.prefix, request_id, mode, reason, self._now(), *self._ttl_args()]
        with _redis_errors():
            reply = await self._scripts.cancel(keys=[self.keys.request(request_id)], args=args)
        if reply[0] == "not_found":
            raise NotFound("request", request_id)
        return RequestState(reply[1])

    # ------------------------------------------------------------------ scheduler
    async def set_virtual_queue(self, worker_id: str, order: Sequence[GroupKey]) -> None:
        """Replace ``worker_id``'s virtual queue by ``order`` (head first), atomically."""
        await self.set_virtual_queues({worker_id: order})

    async def set_virtual_queues(self, orders: Mapping[str, Sequence[GroupKey]],
                                 fence: int = 0) -> None:
        """Replace the virtual queues of all workers in ``orders`` in one atomic step.

        With ``fence`` (> 0), only while it is the current fencing token of the scheduler
        lease (checked inside the script), else FenceLost and nothing is written; with a
        fence and no worker, only the check."""
        workers = [require_id(w, "worker_id") for w in orders]
        texts: list[list[str]] = []
        for worker in workers:
            order = orders[worker]
            for group in order:
                if not isinstance(group, GroupKey):
                    raise InvalidInput("order", f"worker {worker!r}: not a GroupKey: {group!r}")
            if len(set(order)) != len(order):
                raise InvalidInput("order", f"worker {worker!r}: a group appears twice")
            texts.append([str(g) for g in order])
        if not workers and not fence:
            return
        keys = [*(self.keys.virtual_queue(w) for w in workers), self.keys.workers,
                self.keys.scheduler_fence]
        args = [str(len(workers)), *workers, json.dumps(texts, ensure_ascii=False), str(fence)]
        with _redis_errors():
            written = await self._scripts.set_virtual_queues(keys=keys, args=args)
        if int(written) < 0:
            raise FenceLost(fence)

    async def save_policy_state(self, policy: str, state: Mapping[str, Any], *,
                                fence: int = 0) -> None:
        """Keep ``state`` as ``policy``'s saved state (one hash field of
        ``scheduler:state``), fenced as :meth:`set_virtual_queues` (checked in the script)."""
        text = encode_policy_state(policy, state)
        keys = [self.keys.scheduler_state, self.keys.scheduler_fence]
        with _redis_errors():
            written = await self._scripts.set_policy_state(keys=keys,
                                                           args=[policy, text, str(fence)])
        if int(written) < 0:
            raise FenceLost(fence)

    async def policy_state(self, policy: str) -> dict[str, Any] | None:
        """The state last saved for ``policy`` (:meth:`save_policy_state`), or None."""
        require_id(policy, "policy")
        with _redis_errors():
            text = await self._redis.hget(self.keys.scheduler_state, policy)
        return decode_policy_state(policy, None if text is None else str(text))

    async def set_forecasts(self, forecasts: Mapping[GroupKey, GroupForecast]) -> None:
        """Replace every group's forecast (the scheduler, after each decision) in one
        script: one hash field per group, however many requests are queued."""
        args = [x for k, f in forecasts.items() for x in (str(k), f.to_json())]
        with _redis_errors():
            await self._scripts.set_forecasts(keys=[self.keys.forecast], args=args)

    async def forecast_for(self, record: RequestRecord) -> RequestRecord:
        """``record`` with its predicted first token: a queued request's from its group's
        forecast at its current place in the group (one pipelined round trip); any other
        request, and one evicted after its first token, keeps the one its pull recorded
        (the last made before it started)."""
        if record.state is not RequestState.QUEUED or record.first_token_at is not None:
            return record
        group = self.keys.group(record.group)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hget(self.keys.forecast, str(record.group))
            pipe.zrank(group, record.id)
            pipe.zcard(group)
            with _redis_errors():
                text, rank, size = await pipe.execute()
        if text is None or rank is None:
            return replace(record, forecast=None)
        return replace(record, forecast=GroupForecast.from_json(text),
                       forecast_rank=int(rank), forecast_size=int(size))

    async def scheduler_fence(self) -> int:
        """The fencing token of the current scheduler term (0 before any leader)."""
        with _redis_errors():
            value = await self._redis.get(self.keys.scheduler_fence)
        return int(value or 0)

    async def queue_depths(self) -> dict[tuple[str, SLOClass], int]:
        """Queued requests per (model, SLO class): the group index, then one pipelined
        ZCARD per queued group (cost grows with the number of groups, not of requests;
        not atomic: a gauge's view). Malformed group names are skipped."""
        with _redis_errors():
            names = [str(n) for n in await self._redis.zrange(self.keys.groups, 0, -1)]
            if not names:
                return {}
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.zcard(self.keys.group(name))
                sizes = await pipe.execute()
        depths: dict[tuple[str, SLOClass], int] = {}
        for name, size in zip(names, sizes, strict=True):
            try:
                key = GroupKey.parse(name)
            except InvalidInput:
                continue
            depths[(key.model, key.slo_class)] = depths.get((key.model, key.slo_class), 0) + size
        return depths

    async def snapshot(self) -> StoreSnapshot:
        """Queued groups with their requests, each worker's running requests and
        virtual queue: one atomic script for membership, the running requests' moving
        fields and the records of the ids that changed.

        The membership is kept between snapshots (:mod:`qlm.store.mirror`): the script
        returns only what the queue log says changed since this store's previous
        snapshot, with the whole records of the ids that entered a group since, or
        started running (a running request already known is updated from the fields
        the script returned: :class:`_RunningRequests`); one round trip in all. A group
        that did not change is the same :class:`RequestGroup` object as in the previous
        snapshot. The first snapshot, and one after the log was trimmed past the previous
        one or disagrees with the groups' sizes, reads the membership whole, then every
        record in pipelined round trips (1,000 records per script call). The snapshot's
        ``queued_ids`` answers from the mirror which ids are queued."""
        async with self._snapshot_lock:  # one fold of the log at a time
            return await self._snapshot()

    async def _snapshot(self) -> StoreSnapshot:
        mirror = self._mirror
        with _redis_errors():
            after = "" if mirror.position is None else str(mirror.position)
            position, changes, groups_raw, workers_raw, records = await self._membership(after)
            if changes is not False:
                mirror.apply(position, changes)
                if not mirror.agrees(groups_raw):
                    log.warning("queue_log_disagrees", position=position,
                                num_members=mirror.num_members)
                    position, changes, groups_raw, workers_raw, records = (
                        await self._membership(""))
            if changes is False:
                mirror.reset(position, groups_raw)
            unread = mirror.unread()
            running = self._running
            new_ids = running.fold(workers_raw)
            # the script returned the records of the ids its changes name; read the others
            # (all of them after a whole read of the membership)
            missing = [i for i in itertools.chain(unread, new_ids) if i not in records]
            if missing:
                rows = await self._read_records(missing)
                records = {**records, **dict(zip(missing, rows, strict=True))}
        running.add(new_ids, [records[i] for i in new_ids])
        mirror.fill({
            request_id: request_from_fields(dict(zip(SCHEDULING_FIELDS, row, strict=True)))
            if row[0] is not False else None
            for request_id, row in ((i, records[i]) for i in unread)
        })
        virtual_queues = {
            worker: tuple(map(mirror.key, order)) for worker, order, _, _ in workers_raw
        }
        groups = mirror.groups(group for group, _ in groups_raw)
        return StoreSnapshot(
            groups=groups,
            running=MappingProxyType(running.by_worker(workers_raw)),
            virtual_queues=MappingProxyType(virtual_queues),
            queued_ids=mirror.queued_ids(groups),
        )

    async def _membership(self, after: str
                          ) -> tuple[int, Any, list[Any], list[Any], dict[str, list[Any]]]:
        """The snapshot script's reply (``qlm/store/lua/snapshot.lua``): the log position,
        the changes after ``after`` (False: ``groups`` holds the ids), the groups in
        index order, the workers with their virtual queue, running ids and the
        :data:`RUNNING_CHANGING_FIELDS` of each, and the :data:`SCHEDULING_FIELDS` of the
        ids the changes queued or started running (id → values)."""
        reply = await self._scripts.snapshot(
            keys=[self.keys.groups, self.keys.workers, self.keys.queue_log],
            args=[self.keys.prefix, after, str(len(RUNNING_CHANGING_FIELDS)),
                  *RUNNING_CHANGING_FIELDS, *SCHEDULING_FIELDS],
        )
        position, changes, groups_raw, workers_raw, records = json.loads(reply)
        if changes is not False:
            changes = _json_list(changes)
        else:
            groups_raw = [(group, _json_list(ids)) for group, ids in _json_list(groups_raw)]
        workers = [(w, _json_list(vq), _json_list(run), _json_list(rows))
                   for w, vq, run, rows in _json_list(workers_raw)]
        return int(position), changes, _json_list(groups_raw), workers, records or {}

    async def _read_records(self, ids: Sequence[str]) -> list[list[Any]]:
        """The :data:`SCHEDULING_FIELDS` of each of ``ids`` (``False`` where the record or
        a field is missing); one pipelined round trip per :data:`_READ_CALLS_PER_TRIP`
        script calls of :data:`_SNAPSHOT_CHUNK` records (a whole read of a million records
        is fifty round trips, none of them holding the connection long enough to time
        out)."""
        calls = [([self.keys.request(i) for i in ids[start : start + _SNAPSHOT_CHUNK]],
                  SCHEDULING_FIELDS) for start in range(0, len(ids), _SNAPSHOT_CHUNK)]
        replies: list[Any] = []
        for start in range(0, len(calls), _READ_CALLS_PER_TRIP):
            replies += await self._run_pipelined(
                self._scripts.read_records, calls[start : start + _READ_CALLS_PER_TRIP])
        return [row for reply in replies for row in json.loads(reply)]

    async def requeue_expired(self) -> dict[str, RequestState]:
        """Return every request whose lease expired before now to its group (progress
        kept), or cancel it if its cancellation was requested. Returns ``id → new
        state`` (``queued`` or ``cancelled``)."""
        now = self._now()
        out: dict[str, RequestState] = {}
        while True:
            args = [self.keys.prefix, now, str(_EXPIRED_BATCH), *self._ttl_args()]
            with _redis_errors():
                reply = await self._scripts.requeue_expired(keys=[self.keys.leases], args=args)
            for request_id, outcome in zip(reply[::2], reply[1::2], strict=True):
                if outcome != "missing":
                    out[request_id] = RequestState(outcome)
            if len(reply) // 2 < _EXPIRED_BATCH:
                return out

    # ------------------------------------------------------------------ worker
    async def pull(
        self, worker_id: str, model: str, max_requests: int, *, lease_s: float | None = None
    ) -> tuple[RequestRecord, ...]:
        """Take up to ``max_requests`` queued requests from the head of ``worker_id``'s
        virtual queue (groups in queue order, each group by deadline) and hold them
        under a lease of ``lease_s`` (default: the store's). Groups with no queued
        request are skipped; the pull stops at the first group of a model other than
        ``model`` (the worker's active one), as :func:`qlm.core.pulls.plan_pulls` does.
        Returns the records now ``running`` (maybe none)."""
        require_id(worker_id, "worker_id")
        require_id(model, "model")
        require_count(max_requests, "max_requests", minimum=1)
        now, lease_until = self._now_and_lease_until(lease_s)
        keys = [
            self.keys.virtual_queue(worker_id),
            self.keys.running(worker_id),
            self.keys.leases,
            self.keys.workers,
            self.keys.forecast,
        ]
        args = [self.keys.prefix, worker_id, model, str(max_requests), now, lease_until]
        with _redis_errors():
            reply = await self._scripts.pull(keys=keys, args=args)
        return tuple(record_from_json(text) for text in reply)

    async def queue_head(
        self, worker_id: str, model: str, max_requests: int
    ) -> tuple[RequestGroup, ...]:
        """What :meth:`pull` with the same arguments would take now, without taking it:
        the leading queued groups of ``worker_id``'s virtual queue up to the first
        queued group of another model, with at most ``max_requests`` requests in all,
        in pull order. One atomic read; for planning a backpressure pull with
        :func:`qlm.core.pulls.plan_pulls` (the pull itself may then find less)."""
        require_id(worker_id, "worker_id")
        require_id(model, "model")
        require_count(max_requests, "max_requests", minimum=1)
        args = [self.keys.prefix, model, str(max_requests), *SCHEDULING_FIELDS]
        with _redis_errors():
            reply = await self._scripts.queue_head(
                keys=[self.keys.virtual_queue(worker_id)], args=args
            )
        groups = []
        for group, rows in _json_list(json.loads(reply)):
            requests = tuple(
                request_from_fields(dict(zip(SCHEDULING_FIELDS, row, strict=True)))
                for row in _json_list(rows)
                if row[0] is not False
            )
            if requests:
                groups.append(RequestGroup(GroupKey.parse(group), requests))
        return tuple(groups)

    async def claim(
        self, worker_id: str, request_ids: Sequence[str], *, lease_s: float | None = None
    ) -> tuple[RequestRecord, ...]:
        """Hold these named requests on ``worker_id`` under a lease (a scheduler
        ``Pull`` decision). Ids that are not queued are skipped; returns the claimed."""
        require_id(worker_id, "worker_id")
        ids = [require_id(i, "request_ids") for i in request_ids]
        if len(set(ids)) != len(ids):
            raise InvalidInput("request_ids", "an id appears twice")
        if not ids:
            return ()
        now, lease_until = self._now_and_lease_until(lease_s)
        keys = [self.keys.running(worker_id), self.keys.leases, self.keys.workers]
        args = [self.keys.prefix, worker_id, now, lease_until, *ids]
        with _redis_errors():
            reply = await self._scripts.claim(keys=keys, args=args)
        return tuple(record_from_json(text) for text in reply)

    async def renew_leases(
        self, worker_id: str, request_ids: Iterable[str], *, lease_s: float | None = None
    ) -> LeaseRenewal:
        """Heartbeat: extend the leases of the requests ``worker_id`` still holds."""
        require_id(worker_id, "worker_id")
        ids = [require_id(i, "request_ids") for i in request_ids]
        if not ids:
            return LeaseRenewal((), ())
        _, lease_until = self._now_and_lease_until(lease_s)
        args = [self.keys.prefix, worker_id, lease_until, *ids]
        with _redis_errors():
            lost, cancelled = await self._scripts.renew(keys=[self.keys.leases], args=args)
        return LeaseRenewal(tuple(lost), tuple(cancelled))

    async def ack(
        self,
        worker_id: str,
        request_id: str,
        state: RequestState = RequestState.FINISHED,
        *,
        num_generated: int | None = None,
        error: str = "",
    ) -> None:
        """Record the final ``state`` of a request ``worker_id`` holds, drop its lease,
        close its token stream and start the record/stream TTLs. Raises
        :class:`LeaseLost` (nothing written) if the worker no longer holds it."""
        require_id(worker_id, "worker_id")
        require_id(request_id, "request_id")
        if not isinstance(state, RequestState) or not state.is_terminal:
            raise InvalidInput("state", f"must be finished, failed or cancelled, got {state!r}")
        progress = self._progress_arg(num_generated)
        args = [
            self.keys.prefix,
            request_id,
            worker_id,
            state.value,
            progress,
            error,
            self._now(),
            *self._ttl_args(),
        ]
        with _redis_errors():
            reply = await self._scripts.finish(keys=[self.keys.request(request_id)], args=args)
        self._check_worker_reply(reply, worker_id, request_id)

    async def requeue(
        self, worker_id: str, request_id: str, *, num_generated: int | None = None
    ) -> RequestState:
        """Evict: return a request ``worker_id`` holds to its group keeping its progress
        (``num_generated``, default: the progress stored by :meth:`append_tokens`).
        Returns ``queued``, or ``cancelled`` when its cancellation was requested.
        Raises :class:`LeaseLost` if the worker no longer holds it."""
        require_id(worker_id, "worker_id")
        require_id(request_id, "request_id")
        args = [
            self.keys.prefix,
            request_id,
            worker_id,
            self._progress_arg(num_generated),
            self._now(),
            *self._ttl_args(),
        ]
        with _redis_errors():
            reply = await self._scripts.requeue(keys=[self.keys.request(request_id)], args=args)
        self._check_worker_reply(reply, worker_id, request_id)
        return RequestState(reply[0])

    @staticmethod
    def _progress_arg(num_generated: int | None) -> str:
        if num_generated is None:
            return ""
        return str(require_count(num_generated, "num_generated", minimum=0))

    @staticmethod
    def _check_worker_reply(reply: list[Any], worker_id: str, request_id: str) -> None:
        match reply[0]:
            case "not_found":
                raise NotFound("request", request_id)
            case "lost":
                raise LeaseLost(request_id, worker_id, reply[1], reply[2])
            case "invalid":
                raise InvalidInput(reply[1], reply[2])

    # ------------------------------------------------------------------ token streams
    async def append_tokens(
        self,
        worker_id: str,
        request_id: str,
        *,
        text: str = "",
        token_ids: Sequence[int] = (),
        num_tokens: int | None = None,
    ) -> int:
        """Append an output chunk to the request's stream and add ``num_tokens``
        (default ``len(token_ids)``) to its progress; the first chunk sets
        ``first_token_at``. Returns the new ``num_generated``. Raises
        :class:`LeaseLost` if ``worker_id`` no longer holds the request."""
        require_id(worker_id, "worker_id")
        require_id(request_id, "request_id")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in token_ids):
            raise InvalidInput("token_ids", "must be integers")
        count = len(token_ids) if num_tokens is None else num_tokens
        require_count(count, "num_tokens", minimum=0)
        keys = [self.keys.request(request_id), self.keys.stream(request_id)]
        args = [
            worker_id,
            self._now(),
            text,
            json.dumps(list(token_ids)),
            str(count),
            self._stream_maxlen,
        ]
        with _redis_errors():
            reply = await self._scripts.append_tokens(keys=keys, args=args)
        self._check_worker_reply(reply, worker_id, request_id)
        return int(reply[1])

    async def append_tokens_many(
        self, worker_id: str, appends: Sequence[TokenAppend]
    ) -> list[int | QlmError]:
        """:meth:`append_tokens` for several requests of ``worker_id`` in one round trip
        (a pipeline of the same script; each append is atomic on its own, the batch is
        not). Returns, in order, each request's new ``num_generated`` or the error
        :meth:`append_tokens` would have raised for it (:class:`LeaseLost`,
        :class:`NotFound`, :class:`InvalidInput`); bad arguments raise before anything
        is sent."""
        require_id(worker_id, "worker_id")
        calls = []
        for append in appends:
            require_id(append.request_id, "request_id")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in append.token_ids):
                raise InvalidInput("token_ids", "must be integers")
            count = len(append.token_ids) if append.num_tokens is None else append.num_tokens
            require_count(count, "num_tokens", minimum=0)
            keys = [self.keys.request(append.request_id), self.keys.stream(append.request_id)]
            args = [
                worker_id,
                self._now(),
                append.text,
                json.dumps(list(append.token_ids)),
                str(count),
                self._stream_maxlen,
            ]
            calls.append((keys, args))
        if not calls:
            return []
        with _redis_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    await self._scripts.append_tokens(keys=keys, args=args, client=pipe)
                replies = await pipe.execute()
        results: list[int | QlmError] = []
        for append, reply in zip(appends, replies, strict=True):
            try:
                self._check_worker_reply(reply, worker_id, append.request_id)
                results.append(int(reply[1]))
            except QlmError as error:
                results.append(error)
        return results

    async def read_tokens(
        self, request_id: str, *, after: str = "0-0", block_ms: int = 1000
    ) -> AsyncIterator[TokenChunk]:
        """Yield the request's stream entries after entry id ``after`` as they arrive
        (XREAD BLOCK), ending after the entry that carries ``final_state``. Raises
        :class:`NotFound` if the request is unknown. A request that ended and whose
        stream has expired yields nothing more."""
        require_id(request_id, "request_id")
        require_count(block_ms, "block_ms", minimum=1)
        stream = self.keys.stream(request_id)
        await self.get(request_id)  # NotFound before waiting
        last = after
        while True:
            with _redis_errors():
                reply: Any = await self._redis.xread({stream: last}, count=256, block=block_ms)
            if not reply:
                if await self._ended_without_stream(request_id, stream):
                    return
                continue
            for entry_id, fields in reply[0][1]:
                last = entry_id
                chunk = _chunk_from_entry(entry_id, fields)
                yield chunk
                if chunk.final_state is not None:
                    return

    async def token_chunks(self, request_id: str) -> tuple[TokenChunk, ...]:
        """Every entry of the request's token stream now (XRANGE; no waiting), e.g.
        the output an evicted request already produced. Empty when nothing was written
        yet or the stream expired; NotFound if the request is unknown."""
        require_id(request_id, "request_id")
        with _redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            pipe.exists(self.keys.request(request_id))
            pipe.xrange(self.keys.stream(request_id))
            exists, entries = await pipe.execute()
        if not exists:
            raise NotFound("request", request_id)
        return tuple(_chunk_from_entry(entry_id, fields) for entry_id, fields in entries)

    async def _ended_without_stream(self, request_id: str, stream: str) -> bool:
        with _redis_errors():
            pipe = self._redis.pipeline(transaction=False)
            pipe.hget(self.keys.request(request_id), "state")
            pipe.exists(stream)
            state, exists = await pipe.execute()
        return state is None or (RequestState(state).is_terminal and not exists)


#: The fields of a running request's record that move while it runs (progress, the
#: start of a new pull, the first token); ``arrival_at`` tells an id reused after its
#: record expired. The other scheduling fields of an id never change.
RUNNING_CHANGING_FIELDS = ("arrival_at", "num_generated", "started_at", "first_token_at")


class _RunningRequests:
    """The running requests of the previous snapshot. The snapshot script returns the
    fields that move (:data:`RUNNING_CHANGING_FIELDS`) of every running request with the
    membership; :meth:`fold` rebuilds only the requests whose fields moved and names the
    ids to read whole (started running since, or reused after their record expired), so
    no record of a request already known is read again, and a worker's tuple of running
    requests stays the same object (the policies memoise by it) while none of them
    changed (:meth:`fold`, then :meth:`add` with the records of the ids it names).

    A running request that only progressed (every one, every step, while it generates)
    is rebuilt from the one before with its new ``num_generated`` alone
    (:meth:`Request.with_generated <qlm.core.types.Request.with_generated>`): its start
    and first token are parsed again only when their text moved."""

    def __init__(self) -> None:
        #: id → (its moving fields joined by '|', as the script returns them; of that row,
        #: the ``arrival_at`` and the ``started_at|first_token_at`` texts; the request)
        self._known: dict[str, tuple[str, str, str, RunningRequest]] = {}
        self._by_worker: dict[str, tuple[RunningRequest, ...]] = {}

    def fold(self, workers_raw: Sequence[tuple[str, Any, Sequence[str], Sequence[Any]]]
             ) -> list[str]:
        """Take the moving fields of every running id already known (``workers_raw``: the
        snapshot script's workers); forget the ids no longer running or whose record is
        gone; returns the ids to read whole (then :meth:`add`): those not known yet, and
        the known ids whose record was replaced (the id reused after its record expired)."""
        known = self._known
        fresh: dict[str, tuple[str, str, str, RunningRequest]] = {}
        unknown = []
        for _, _, ids, rows in workers_raw:
            for request_id, row in zip(ids, rows, strict=True):
                if row is False:  # no record (expired): no group or worker shows it
                    continue
                entry = known.get(request_id)
                if entry is None:  # started running since
                    unknown.append(request_id)
                    continue
                if entry[0] == row:  # nothing moved
                    fresh[request_id] = entry
                    continue
                arrival_at, generated, since = row.split("|", 2)
                if arrival_at != entry[1]:  # reused after its record expired
                    unknown.append(request_id)
                    continue
                running = entry[3]
                request = running.request
                num_generated = int(generated)
                if num_generated != request.num_generated:
                    request = request.with_generated(num_generated)
                if since == entry[2]:
                    running = RunningRequest(request, running.started_at,
                                             running.first_token_at)
                else:  # pulled again, or its first token came
                    started_at, _, first_token_at = since.partition("|")
                    running = RunningRequest(request, float(started_at),
                                             float(first_token_at) if first_token_at else None)
                fresh[request_id] = (row, arrival_at, since, running)
        self._known = fresh
        return unknown

    def add(self, request_ids: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """The records of :meth:`fold`'s ids, read whole (:data:`SCHEDULING_FIELDS`;
        records that vanished meanwhile are left out)."""
        for request_id, row in zip(request_ids, rows, strict=True):
            if row[0] is not False:
                fields = dict(zip(SCHEDULING_FIELDS, row, strict=True))
                moving = "|".join(fields[f] or "" for f in RUNNING_CHANGING_FIELDS)
                arrival_at, _, since = moving.split("|", 2)  # as fold() splits a row
                self._known[request_id] = (moving, arrival_at, since,
                                           _running_from_fields(fields))

    def by_worker(self, workers_raw: Sequence[tuple[str, Any, Sequence[str], Sequence[Any]]]
                  ) -> dict[str, tuple[RunningRequest, ...]]:
        """Each worker's running requests by id (the previous tuple when the same)."""
        known, before = self._known, self._by_worker
        out = {}
        for worker, _, ids, _ in workers_raw:
            running = tuple([known[i][3] for i in sorted(ids) if i in known])
            previous = before.get(worker)
            if previous is not None and len(previous) == len(running) and all(
                    a is b for a, b in zip(previous, running, strict=True)):
                running = previous
            out[worker] = running
        self._by_worker = out
        return out


def _running_from_fields(fields: Mapping[str, str]) -> RunningRequest:
    first_token_at = fields["first_token_at"]
    return RunningRequest(
        request=request_from_fields(fields),
        started_at=float(fields["started_at"]),
        first_token_at=float(first_token_at) if first_token_at else None,
    )


def _json_list(value: Any) -> list[Any]:
    """A list from a script's JSON, where cjson writes an empty list as ``{}``."""
    return value if value else []


def _chunk_from_entry(entry_id: str, fields: Mapping[str, str]) -> TokenChunk:
    at = float(fields.get("at", "0") or 0)
    if "end" in fields:
        return TokenChunk(
            entry_id=entry_id,
            at=at,
            final_state=RequestState(fields["end"]),
            error=fields.get("error", ""),
        )
    return TokenChunk(
        entry_id=entry_id,
        at=at,
        text=fields.get("text", ""),
        token_ids=tuple(json.loads(fields.get("token_ids") or "[]")),
        num_generated=int(fields.get("num_generated", "0")),
    )
