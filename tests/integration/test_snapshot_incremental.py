"""The scheduler's incremental snapshot equals a whole re-read, and so do its decisions.

:meth:`RedisQueueStore.snapshot` keeps the queue's membership between calls and reads
only what the queue log says changed (:mod:`qlm.store.mirror`). Over random programs of
admissions (of two tenants, whose groups are their own), pulls, claims, finishes,
evictions (with progress), cancellations, rejections, expired leases and a trimmed
queue log, on a real redis-server, each
snapshot of one long-lived store must equal the snapshot a new store takes (which reads
the whole membership and every record), the decisions of the scheduler's policies
made from each must be equal too, and so must the ids each says are queued (the
long-lived store answers from its copy of the membership: the applier's check).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import hypothesis
import hypothesis.strategies as st
import pytest
import redis.asyncio as aioredis
from queue_helpers import T0, WINDOW_S, FakeClock, make_request

from qlm.core.perf import ProfileBook
from qlm.core.policies import PolicyContext, make_policy
from qlm.core.policies.base import Policy
from qlm.core.types import Decision, RequestState, SLOClass, WorkerView
from qlm.roster import WorkerInfo, view_of
from qlm.store import LeaseLost, RedisQueueStore
from qlm.store.base import StoreSnapshot
from qlm.store.store import RUNNING_CHANGING_FIELDS
from services.scheduler.loop import decide, queue_snapshot

pytestmark = pytest.mark.redis

MODELS = ("mistral-7b", "vicuna-13b")
WORKERS = (WorkerInfo("w0", "A100-80GB", MODELS, MODELS[0]),
           WorkerInfo("w1", "A10-24GB", MODELS, MODELS[1]))
POLICIES = ("qlm", "fcfs", "edf")
PROFILES = ProfileBook.load()

# One operation: a name and small numbers that pick its target among what exists.
_pick = st.integers(0, 1_000)
OPERATIONS = st.one_of(
    st.tuples(st.just("enqueue"), st.integers(1, 6), _pick, st.sampled_from(
        [SLOClass.INTERACTIVE, SLOClass.BATCH_1, SLOClass.CUSTOM]), st.integers(0, 40)),
    st.tuples(st.just("place"), _pick),
    st.tuples(st.just("pull"), _pick, st.integers(1, 5)),
    st.tuples(st.just("claim"), _pick, _pick),
    st.tuples(st.just("progress"), _pick, st.integers(1, 8)),
    st.tuples(st.just("finish"), _pick),
    st.tuples(st.just("evict"), _pick, st.integers(0, 30)),
    st.tuples(st.just("cancel"), _pick),
    st.tuples(st.just("reject"), _pick),
    st.tuples(st.just("expire"), st.integers(1, 40)),
    st.tuples(st.just("trim"), st.integers(0, 5)),
)


@dataclass
class Program:
    """Runs operations against one queue and remembers what it made."""

    store: RedisQueueStore
    raw: aioredis.Redis
    clock: FakeClock
    ids: list[str] = field(default_factory=list)
    numbers: itertools.count[int] = field(default_factory=itertools.count)

    async def run(self, op: tuple) -> None:  # type: ignore[type-arg]
        name, *args = op
        await getattr(self, name)(*args)

    async def _held(self) -> list[tuple[str, str]]:
        """(worker, id) of every running request, in a stable order."""
        snap = await self.store.snapshot()
        return sorted((w, r.request.id) for w, runs in snap.running.items() for r in runs)

    async def _queued(self) -> list[str]:
        snap = await self.store.snapshot()
        return sorted(r.id for g in snap.groups for r in g.requests)

    async def enqueue(self, count: int, model: int, slo_class: SLOClass, age_s: int) -> None:
        items = []
        for _ in range(count):
            rid = f"r{next(self.numbers)}"
            self.ids.append(rid)
            request = make_request(
                rid, model=MODELS[model % 2], slo_class=slo_class,
                arrival_at=self.clock.now - age_s - len(items) * 0.1,
                ttft_s=30.0 + age_s if slo_class is SLOClass.CUSTOM else None,
                max_tokens=32 + 7 * (len(self.ids) % 9))
            if age_s % 3 == 1:  # another tenant: groups of its own
                request = replace(request, tenant="team|b")
            items.append((request, "p", None))
        assert all(not isinstance(r, Exception) for r in await self.store.enqueue_many(items))

    async def place(self, k: int) -> None:
        snap = await self.store.snapshot()
        worker = WORKERS[k % 2]
        order = [g.key for g in snap.groups]
        order = order[k % max(1, len(order)):] + order[:k % max(1, len(order))]
        await self.store.set_virtual_queue(worker.id, order)

    async def pull(self, k: int, n: int) -> None:
        worker = WORKERS[k % 2]
        model = MODELS[k // 2 % 2]
        await self.store.pull(worker.id, model, n)

    async def claim(self, k: int, j: int) -> None:
        queued = await self._queued()
        if queued:
            await self.store.claim(WORKERS[k % 2].id, [queued[j % len(queued)]])

    async def progress(self, k: int, n: int) -> None:
        held = await self._held()
        if held:
            worker, rid = held[k % len(held)]
            record = await self.store.get(rid)
            n = min(n, record.request.remaining_tokens)
            await self.store.append_tokens(worker, rid, token_ids=[1] * n)

    async def finish(self, k: int) -> None:
        held = await self._held()
        if held:
            await self.store.ack(*held[k % len(held)])

    async def evict(self, k: int, generated: int) -> None:
        held = await self._held()
        if held:
            worker, rid = held[k % len(held)]
            record = await self.store.get(rid)
            await self.store.requeue(
                worker, rid, num_generated=min(generated, record.request.max_tokens))

    async def cancel(self, k: int) -> None:
        if self.ids:
            await self.store.cancel(self.ids[k % len(self.ids)])

    async def reject(self, k: int) -> None:
        queued = await self._queued()
        if queued:
            await self.store.reject(queued[k % len(queued)], "cannot meet its SLO")

    async def expire(self, seconds: int) -> None:
        self.clock.advance(seconds)
        await self.store.requeue_expired()

    async def trim(self, keep: int) -> None:
        """Drop old entries of the queue log (as MAXLEN does under a burst of changes)."""
        await self.raw.xtrim(self.store.keys.queue_log, maxlen=keep, approximate=False)


def views() -> tuple[WorkerView, ...]:
    out = []
    for worker in WORKERS:
        view = view_of(worker, PROFILES)
        assert view is not None
        out.append(view)
    return tuple(out)


def decisions(policies: dict[str, Policy], stored: StoreSnapshot, now: float
              ) -> dict[str, Decision]:
    snapshot = queue_snapshot(stored, views(), now)
    return {name: decide(policy, snapshot, PolicyContext(PROFILES))
            for name, policy in policies.items()}


async def check_same(store: RedisQueueStore, url: str, prefix: str, clock: FakeClock,
                     policies: dict[str, Policy], ids: list[str]) -> None:
    incremental = await store.snapshot()
    fresh = RedisQueueStore.from_url(url, group_window_s=WINDOW_S, lease_s=20.0, clock=clock,
                                     prefix=prefix)
    try:
        whole = await fresh.snapshot()
    finally:
        await fresh.aclose()
    assert incremental == whole
    queued = {r.id for g in whole.groups for r in g.requests}
    asked = {*ids, "never-queued"}
    assert incremental.queued_ids is not None and whole.queued_ids is not None
    assert incremental.queued_ids.among(asked) == whole.queued_ids.among(asked) == queued
    now = clock.now
    fresh_policies = {name: make_policy(name) for name in POLICIES}
    assert decisions(policies, incremental, now) == decisions(fresh_policies, whole, now)


@hypothesis.settings(max_examples=60, deadline=None, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(ops=st.lists(OPERATIONS, min_size=1, max_size=40))
async def test_incremental_snapshot_and_decisions_equal_a_whole_read(
    redis_url: str, ops: list[tuple]  # type: ignore[type-arg]
) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}:"  # a queue of its own per example
    clock = FakeClock(T0 + 1000)
    store = RedisQueueStore.from_url(redis_url, group_window_s=WINDOW_S, lease_s=20.0,
                                     clock=clock, prefix=prefix)
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    program = Program(store, raw, clock)
    policies = {name: make_policy(name) for name in POLICIES}  # kept: their memos too
    try:
        await program.enqueue(3, 0, SLOClass.INTERACTIVE, 5)
        for op in ops:
            whole_reads = store.num_whole_snapshots
            with contextlib.suppress(LeaseLost):  # a random pick can name a lost request
                await program.run(op)
            await check_same(store, redis_url, prefix, clock, policies, program.ids)
            if op[0] != "trim":  # every change was logged: nothing was read whole again
                assert store.num_whole_snapshots == max(1, whole_reads)
    finally:
        await store.aclose()
        await raw.aclose()


@pytest.fixture
async def program(redis_url: str) -> AsyncIterator[Program]:
    """A store on a fake clock, a raw client and a program over them; closed after."""
    clock = FakeClock(T0 + 1000)
    store = RedisQueueStore.from_url(redis_url, group_window_s=WINDOW_S, clock=clock)
    raw = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield Program(store, raw, clock)
    await store.aclose()
    await raw.aclose()


async def test_a_snapshot_reads_only_the_records_of_requests_that_entered_a_group(
    program: Program,
) -> None:
    store, raw = program.store, program.raw
    await program.enqueue(50, 0, SLOClass.BATCH_1, 5)
    first = await store.snapshot()
    (group,) = first.groups
    assert (await store.snapshot()).groups[0] is group  # unchanged: the same object
    await store.set_virtual_queue("w0", [group.key])
    await store.pull("w0", MODELS[0], 1)
    await program.enqueue(1, 1, SLOClass.INTERACTIVE, 0)
    await store.requeue("w0", group.requests[0].id, num_generated=5)

    reads = await count_record_reads(raw, store)
    snap = await store.snapshot()
    assert await count_record_reads(raw, store) - reads == 2  # the new one, the evicted
    assert {g.size for g in snap.groups} == {50, 1}
    assert snap.group(group.key).requests[0].num_generated == 5


async def test_running_rows_come_from_the_run_field_or_from_the_fields(
    program: Program, redis_url: str
) -> None:
    """Pull, claim and append_tokens keep a running record's moving fields joined in its
    ``run`` field, which the snapshot reads (one field per running request); a record
    without it (written before records kept it) is read field by field, to the same
    snapshot as a new store's whole read."""
    clock, store, raw = program.clock, program.store, program.raw
    keys = store.keys
    await program.enqueue(6, 0, SLOClass.BATCH_1, 5)
    (group,) = (await store.snapshot()).groups
    await store.set_virtual_queue("w0", [group.key])
    pulled = await store.pull("w0", MODELS[0], 2)
    await store.claim("w1", [group.requests[5].id])
    await store.snapshot()  # the long-lived store now knows the three running ids
    clock.now += 1
    await store.append_tokens("w0", pulled[0].request.id, token_ids=[1, 2, 3])
    running = [pulled[0].request.id, pulled[1].request.id, group.requests[5].id]
    for rid in running:
        fields = await raw.hmget(keys.request(rid), *RUNNING_CHANGING_FIELDS)
        assert await raw.hget(keys.request(rid), "run") == "|".join(f or "" for f in fields)
    assert await store.snapshot() == await whole_read(redis_url, clock)

    # records from before `run`: progress written without it is read all the same
    for rid in running:
        await raw.hdel(keys.request(rid), "run")
    await raw.hset(keys.request(pulled[1].request.id), mapping={
        "num_generated": 4, "first_token_at": repr(clock.now)})
    snap = await store.snapshot()
    assert snap == await whole_read(redis_url, clock)
    (moved,) = [r for r in snap.running["w0"] if r.request.id == pulled[1].request.id]
    assert moved.request.num_generated == 4 and moved.first_token_at == clock.now


async def whole_read(redis_url: str, clock: FakeClock) -> StoreSnapshot:
    """The snapshot of a new store (reads every record whole)."""
    fresh = RedisQueueStore.from_url(redis_url, group_window_s=WINDOW_S, clock=clock)
    try:
        return await fresh.snapshot()
    finally:
        await fresh.aclose()


async def test_a_snapshot_after_arrivals_and_pulls_is_one_script_call(
    program: Program, redis_url: str
) -> None:
    """The records of the ids that entered a group or started running since the previous
    snapshot come with the membership, in the same script: no second round trip."""
    clock, store, raw = program.clock, program.store, program.raw
    await program.enqueue(20, 0, SLOClass.BATCH_1, 5)
    (group,) = (await store.snapshot()).groups
    await store.set_virtual_queue("w0", [group.key])
    pulled = await store.pull("w0", MODELS[0], 3)
    await program.enqueue(2, 1, SLOClass.INTERACTIVE, 0)

    calls = await count_script_calls(raw)
    snap = await store.snapshot()
    assert await count_script_calls(raw) - calls == 1
    assert {r.request.id for r in snap.running["w0"]} == {p.request.id for p in pulled}
    assert sum(g.size for g in snap.groups) == 19
    assert snap == await whole_read(redis_url, clock)  # as a read of every record


async def count_script_calls(raw: aioredis.Redis) -> int:
    stats = await raw.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
               for c in ("evalsha", "eval", "evalsha_ro", "eval_ro"))


async def count_record_reads(raw: aioredis.Redis, store: RedisQueueStore) -> int:
    """How many records were read so far (HMGET calls, counted by Redis also inside
    scripts: the snapshot reads each record with one)."""
    stats = await raw.info("commandstats")
    return int(stats.get("cmdstat_hmget", {}).get("calls", 0))


async def test_a_trimmed_or_reset_log_falls_back_to_a_whole_read(program: Program) -> None:
    store, raw = program.store, program.raw
    await program.enqueue(5, 0, SLOClass.BATCH_1, 5)
    assert sum(g.size for g in (await store.snapshot()).groups) == 5
    await program.enqueue(3, 1, SLOClass.BATCH_1, 5)
    # the log loses two of the three new entries
    await raw.xtrim(store.keys.queue_log, maxlen=1, approximate=False)
    assert sum(g.size for g in (await store.snapshot()).groups) == 8
    assert store.num_whole_snapshots == 2

    await raw.flushall()  # the queue is gone (or restored from an older copy) ...
    await program.enqueue(9, 1, SLOClass.BATCH_1, 5)  # ... and the log starts over
    snap = await store.snapshot()
    assert sorted(r.id for g in snap.groups for r in g.requests) == sorted(program.ids[-9:])
    assert store.num_whole_snapshots == 3
    assert (await store.get(program.ids[-1])).state is RequestState.QUEUED


async def test_concurrent_snapshots_of_one_store_fold_the_log_once(
    program: Program, redis_url: str
) -> None:
    clock, store = program.clock, program.store
    await program.enqueue(40, 0, SLOClass.BATCH_1, 5)
    await program.place(0)

    async def churn() -> None:
        for n in range(20):
            await program.enqueue(2, n, SLOClass.INTERACTIVE, n % 3)
            await program.pull(0, 3)

    await asyncio.gather(churn(), *(store.snapshot() for _ in range(20)))
    assert await store.snapshot() == await whole_read(redis_url, clock)
    assert store.num_whole_snapshots == 1
