"""The Redis queue store on a real redis-server: queue contract, idempotency, leases,
eviction, cancellation, concurrency, snapshots, bad input and restarts (AOF)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis

from qlm.core.errors import InvalidInput, NotFound, Unavailable
from qlm.core.types import SLO, GroupKey, Request, RequestState, SLOClass
from qlm.localstack import RedisServer
from qlm.store import (
    EnqueueResult,
    IdempotencyConflict,
    LeaseLost,
    RedisQueueStore,
    TokenAppend,
)
from qlm.store.keys import Keys

pytestmark = pytest.mark.redis

WINDOW_S = 10.0
T0 = 1_000_000.0


class FakeClock:
    """A settable clock: ``clock()`` returns ``clock.now``."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_request(
    request_id: str,
    *,
    model: str = "llama-8b",
    slo_class: SLOClass = SLOClass.INTERACTIVE,
    arrival_at: float = T0,
    ttft_s: float | None = None,
    max_tokens: int = 64,
    prompt_tokens: int = 100,
) -> Request:
    return Request(
        id=request_id,
        model=model,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        slo_class=slo_class,
        slo=SLO.for_class(slo_class, ttft_s),
        arrival_at=arrival_at,
    )


def group_of(request: Request) -> GroupKey:
    return GroupKey(request.model, request.slo_class, int(request.arrival_at // WINDOW_S))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(redis_url: str, clock: FakeClock) -> AsyncIterator[RedisQueueStore]:
    queue = RedisQueueStore.from_url(redis_url, group_window_s=WINDOW_S, lease_s=30.0, clock=clock)
    yield queue
    await queue.aclose()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def all_keys(raw: aioredis.Redis) -> set[str]:
    return {key async for key in raw.scan_iter(match=f"{Keys().prefix}*", count=1000)}


async def dump(raw: aioredis.Redis) -> dict[str, object]:
    """Every qlm key with its type and value: to show that nothing changed."""
    out: dict[str, object] = {}
    for key in sorted(await all_keys(raw)):
        kind = await raw.type(key)
        if kind == "hash":
            out[key] = await raw.hgetall(key)
        elif kind == "zset":
            out[key] = await raw.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            out[key] = await raw.lrange(key, 0, -1)
        elif kind == "set":
            out[key] = sorted(await raw.smembers(key))
        elif kind == "stream":
            out[key] = await raw.xrange(key)
    return out


# ------------------------------------------------------------------ the contract
StoreFactory = Callable[[str, FakeClock], Awaitable[RedisQueueStore]]


async def _redis_store(url: str, clock: FakeClock) -> RedisQueueStore:
    return RedisQueueStore.from_url(url, group_window_s=WINDOW_S, lease_s=30.0, clock=clock)


# One body for the queue operations, run over every store implementation.
@pytest.mark.parametrize("make_store", [_redis_store], ids=["redis"])
async def test_queue_contract(redis_url: str, make_store: StoreFactory) -> None:
    clock = FakeClock()
    queue = await make_store(redis_url, clock)
    try:
        early = make_request("early", arrival_at=T0)
        late = make_request("late", arrival_at=T0 + 1)
        batch = make_request("batch", slo_class=SLOClass.BATCH_1, arrival_at=T0)
        other_model = make_request("other", model="qwen-7b", arrival_at=T0)
        for request in (late, batch, early, other_model):
            assert (await queue.enqueue(request, prompt="hi")).created

        snap = await queue.snapshot()
        # groups by earliest deadline: interactive (T0+20) < qwen (T0+20, later key) < batch
        assert [g.key for g in snap.groups] == [group_of(early), group_of(other_model),
                                                group_of(batch)]
        assert [r.id for r in snap.groups[0].requests] == ["early", "late"]
        assert snap.running == {}

        # nothing is pulled before the worker has a virtual queue
        assert await queue.pull("w1", "llama-8b", 10) == ()

        await queue.set_virtual_queue("w1", [group_of(batch), group_of(early)])
        pulled = await queue.pull("w1", "llama-8b", 2)
        assert [r.id for r in pulled] == ["batch", "early"]  # virtual-queue order first
        assert all(r.state is RequestState.RUNNING and r.worker_id == "w1" for r in pulled)
        assert pulled[0].prompt == "hi"

        snap = await queue.snapshot()
        assert [g.key for g in snap.groups] == [group_of(other_model), group_of(late)]
        assert sorted(r.request.id for r in snap.running["w1"]) == ["batch", "early"]
        assert snap.virtual_queues["w1"] == (group_of(batch), group_of(early))

        clock.advance(1.0)
        await queue.ack("w1", "early", num_generated=64)
        assert (await queue.requeue("w1", "batch", num_generated=7)) is RequestState.QUEUED
        finished = await queue.get("early")
        assert finished.state is RequestState.FINISHED
        assert finished.finished_at == T0 + 1.0
        assert finished.request.num_generated == 64

        snap = await queue.snapshot()
        assert {r.id for g in snap.groups for r in g.requests} == {"late", "batch", "other"}
        assert snap.running == {"w1": ()}
        requeued = snap.group(group_of(batch)).requests[0]
        assert requeued.num_generated == 7

        assert (await queue.cancel("late")) is RequestState.CANCELLED
        with pytest.raises(NotFound):
            await queue.get("missing")
    finally:
        await queue.aclose()


# ------------------------------------------------------------------ idempotency
async def test_enqueue_same_id_same_payload_returns_existing(
    store: RedisQueueStore, raw: aioredis.Redis, clock: FakeClock
) -> None:
    request = make_request("r1")
    first = await store.enqueue(request, prompt="hello", params={"temperature": 0.5})
    before = await dump(raw)

    clock.advance(3.0)  # a retry arrives later: arrival time may differ, payload may not
    retry = make_request("r1", arrival_at=T0 + 3.0)
    second = await store.enqueue(retry, prompt="hello", params={"temperature": 0.5})

    assert first.created and not second.created
    assert second.record.request == request  # the stored one, not the retry
    assert second.record.params == {"temperature": 0.5}
    assert await dump(raw) == before
    assert await raw.zcard(Keys().group(group_of(request))) == 1


async def test_enqueue_same_id_after_finish_returns_finished_record(store: RedisQueueStore) -> None:
    request = make_request("r1")
    await store.enqueue(request)
    await store.set_virtual_queue("w1", [group_of(request)])
    await store.pull("w1", request.model, 1)
    await store.ack("w1", "r1")

    again = await store.enqueue(request)
    assert not again.created
    assert again.record.state is RequestState.FINISHED
    assert (await store.snapshot()).groups == ()


@pytest.mark.parametrize(
    ("changed", "field"),
    [
        ({"max_tokens": 65}, "max_tokens"),
        ({"model": "qwen-7b"}, "model"),
        ({"slo_class": SLOClass.BATCH_1}, "slo_class"),
        ({"prompt": "other prompt"}, "prompt"),
        ({"params": {"temperature": 0.9}}, "params"),
    ],
)
async def test_enqueue_same_id_different_payload_names_the_conflict(
    store: RedisQueueStore, raw: aioredis.Redis, changed: dict[str, object], field: str
) -> None:
    await store.enqueue(make_request("r1"), prompt="hello", params={"temperature": 0.5})
    before = await dump(raw)

    request_fields = {k: v for k, v in changed.items() if k not in ("prompt", "params")}
    retry = make_request("r1", **request_fields)  # type: ignore[arg-type]
    with pytest.raises(IdempotencyConflict) as error:
        await store.enqueue(
            retry,
            prompt=changed.get("prompt", "hello"),
            params=changed.get("params", {"temperature": 0.5}),  # type: ignore[arg-type]
        )
    assert error.value.field == field
    assert "r1" in str(error.value)
    assert await dump(raw) == before


async def test_enqueue_many_answers_each_item_as_enqueue_would(
    store: RedisQueueStore, raw: aioredis.Redis
) -> None:
    await store.enqueue(make_request("old"), prompt="p")

    results = await store.enqueue_many(
        [
            (make_request("new"), "p", None),
            (make_request("old"), "p", None),  # duplicate: the stored record
            (make_request("old", max_tokens=3), "p", None),  # conflict
            (make_request("bad"), "p", {"x": object()}),  # not JSON: nothing sent
            (make_request("new2"), "p", {"top_k": 5}),
        ]
    )

    new, duplicate, conflict, bad, new2 = results
    assert isinstance(new, EnqueueResult) and new.created
    assert isinstance(duplicate, EnqueueResult) and not duplicate.created
    assert isinstance(conflict, IdempotencyConflict) and conflict.field == "max_tokens"
    assert isinstance(bad, InvalidInput) and bad.field == "params"
    assert isinstance(new2, EnqueueResult) and new2.record.params == {"top_k": 5}
    assert await raw.zrange(Keys().group(group_of(make_request("x"))), 0, -1) == [
        "new", "new2", "old"
    ]
    assert not await raw.exists(Keys().request("bad"))
    assert await store.enqueue_many([]) == []


# ------------------------------------------------------------------ pull and leases
async def test_pull_takes_groups_in_virtual_queue_order_then_deadline_order(
    store: RedisQueueStore,
) -> None:
    custom = [
        make_request("c-loose", slo_class=SLOClass.CUSTOM, ttft_s=50.0, arrival_at=T0),
        make_request("c-tight", slo_class=SLOClass.CUSTOM, ttft_s=5.0, arrival_at=T0 + 2),
    ]
    interactive = [make_request(f"i{k}", arrival_at=T0 + k) for k in range(3)]
    for request in [*interactive, *custom]:
        await store.enqueue(request)
    await store.set_virtual_queue("w1", [group_of(custom[0]), group_of(interactive[0])])

    first = await store.pull("w1", "llama-8b", 3)
    second = await store.pull("w1", "llama-8b", 3)
    third = await store.pull("w1", "llama-8b", 3)

    assert [r.id for r in first] == ["c-tight", "c-loose", "i0"]  # deadline order in a group
    assert [r.id for r in second] == ["i1", "i2"]
    assert third == ()


async def test_pull_stops_at_the_first_queued_group_of_another_model(
    store: RedisQueueStore,
) -> None:
    empty_mistral = make_request("m", model="mistral-7b")
    qwen = make_request("q", model="qwen-7b")
    llama = make_request("l")
    for request in (empty_mistral, qwen, llama):
        await store.enqueue(request)
    await store.cancel("m")  # its group is empty now: skipped, whatever its model
    await store.set_virtual_queue("w1", [group_of(empty_mistral), group_of(qwen), group_of(llama)])

    assert await store.pull("w1", "llama-8b", 5) == ()  # qwen's group must be served first
    assert [r.id for r in await store.pull("w1", "qwen-7b", 5)] == ["q"]
    assert [r.id for r in await store.pull("w1", "llama-8b", 5)] == ["l"]


async def test_queue_head_shows_what_pull_would_take(store: RedisQueueStore) -> None:
    llama = [make_request(f"l{k}", arrival_at=T0 + k) for k in range(3)]
    later = make_request("l-later", arrival_at=T0 + WINDOW_S)
    qwen = make_request("q", model="qwen-7b")
    for request in [*llama, later, qwen]:
        await store.enqueue(request)
    order = [group_of(llama[0]), group_of(later), group_of(qwen)]
    await store.set_virtual_queue("w1", order)

    head = await store.queue_head("w1", "llama-8b", 4)
    assert [(g.key, [r.id for r in g.requests]) for g in head] == [
        (group_of(llama[0]), ["l0", "l1", "l2"]),
        (group_of(later), ["l-later"]),
    ]
    assert head[0].requests[0] == llama[0]
    assert [r.id for g in await store.queue_head("w1", "llama-8b", 2) for r in g.requests] == [
        "l0", "l1"
    ]
    assert await store.queue_head("w1", "qwen-7b", 4) == ()  # llama groups come first
    pulled = await store.pull("w1", "llama-8b", 4)
    assert [r.id for r in pulled] == [r.id for g in head for r in g.requests]
    assert await store.queue_head("w2", "llama-8b", 4) == ()  # no virtual queue


async def test_pull_holds_a_lease_until_now_plus_lease_s(
    store: RedisQueueStore, raw: aioredis.Redis, clock: FakeClock
) -> None:
    request = make_request("r1")
    await store.enqueue(request)
    await store.set_virtual_queue("w1", [group_of(request)])
    clock.advance(2.0)

    (record,) = await store.pull("w1", "llama-8b", 1, lease_s=5.0)

    assert record.started_at == T0 + 2.0
    assert record.lease_expires_at == T0 + 7.0
    assert record.num_pulls == 1
    assert await raw.zscore(Keys().leases, "r1") == T0 + 7.0
    assert await raw.smembers(Keys().running("w1")) == {"r1"}
    assert not await raw.exists(Keys().group(group_of(request)))
    assert await raw.zcard(Keys().groups) == 0


async def test_expired_lease_returns_request_to_its_group(
    store: RedisQueueStore, clock: FakeClock
) -> None:
    request = make_request("r1")
    await store.enqueue(request)
    await store.set_virtual_queue("w1", [group_of(request)])
    await store.pull("w1", "llama-8b", 1, lease_s=5.0)
    await store.append_tokens("w1", "r1", token_ids=[1, 2, 3])

    clock.advance(4.0)
    assert await store.requeue_expired() == {}
    renewal = await store.renew_leases("w1", ["r1"], lease_s=5.0)  # now expires at T0 + 9
    assert renewal.lost == () and renewal.cancel_requested == ()
    clock.advance(4.0)
    assert await store.requeue_expired() == {}

    clock.advance(2.0)
    assert await store.requeue_expired() == {"r1": RequestState.QUEUED}
    record = await store.get("r1")
    assert record.state is RequestState.QUEUED
    assert record.worker_id is None
    assert record.num_evictions == 1
    assert record.request.num_generated == 3  # progress kept
    snap = await store.snapshot()
    assert [r.id for g in snap.groups for r in g.requests] == ["r1"]
    assert snap.running == {"w1": ()}

    # the worker that lost the lease can no longer report on it
    with pytest.raises(LeaseLost):
        await store.ack("w1", "r1")
    with pytest.raises(LeaseLost):
        await store.append_tokens("w1", "r1", token_ids=[4])
    assert (await store.renew_leases("w1", ["r1"])).lost == ("r1",)

    # another worker picks it up again
    await store.set_virtual_queue("w2", [group_of(request)])
    (again,) = await store.pull("w2", "llama-8b", 1)
    assert again.num_pulls == 2 and again.worker_id == "w2"


async def test_eviction_requeue_keeps_progress_and_first_token_time(
    store: RedisQueueStore, clock: FakeClock
) -> None:
    request = make_request("r1", max_tokens=50)
    later = make_request("r2", arrival_at=T0 + 1)
    await store.enqueue(request)
    await store.enqueue(later)
    await store.set_virtual_queue("w1", [group_of(request)])
    await store.pull("w1", "llama-8b", 1)
    clock.advance(1.5)
    assert await store.append_tokens("w1", "r1", text="ab", token_ids=[1, 2]) == 2
    clock.advance(0.5)
    assert await store.append_tokens("w1", "r1", token_ids=[3, 4, 5]) == 5

    assert await store.requeue("w1", "r1") is RequestState.QUEUED

    # it keeps its deadline, so it goes back ahead of the later arrival
    await store.set_virtual_queue("w2", [group_of(request)])
    (resumed,) = await store.pull("w2", "llama-8b", 1)
    assert resumed.id == "r1"
    assert resumed.request.num_generated == 5
    assert resumed.first_token_at == T0 + 1.5
    assert resumed.num_evictions == 1
    kept = await store.token_chunks("r1")  # the output produced before the eviction
    assert [c.token_ids for c in kept] == [(1, 2), (3, 4, 5)] and kept[0].text == "ab"
    assert await store.append_tokens("w2", "r1", token_ids=[6]) == 6
    await store.requeue("w2", "r1", num_generated=9)  # progress reported explicitly
    assert (await store.get("r1")).request.num_generated == 9


# ------------------------------------------------------------------ cancel and reject
async def test_cancel_queued_request_ends_it_and_closes_its_stream(
    store: RedisQueueStore, raw: aioredis.Redis
) -> None:
    request = make_request("r1")
    await store.enqueue(request)

    assert await store.cancel("r1") is RequestState.CANCELLED
    record = await store.get("r1")
    assert record.state is RequestState.CANCELLED
    assert not await raw.exists(Keys().group(group_of(request)))
    assert await raw.zcard(Keys().groups) == 0
    chunks = [c async for c in store.read_tokens("r1")]
    assert [c.final_state for c in chunks] == [RequestState.CANCELLED]
    assert 0 < await raw.ttl(Keys().request("r1")) <= 24 * 3600
    # cancelling again changes nothing
    assert await store.cancel("r1") is RequestState.CANCELLED
    with pytest.raises(NotFound):
        await store.cancel("nope")


async def test_cancel_running_request_flags_it_for_its_worker(
    store: RedisQueueStore, clock: FakeClock
) -> None:
    first, second = make_request("r1"), make_request("r2")
    await store.enqueue(first)
    await store.enqueue(second)
    await store.set_virtual_queue("w1", [group_of(first)])
    await store.pull("w1", "llama-8b", 2, lease_s=5.0)

    assert await store.cancel("r1") is RequestState.RUNNING
    assert await store.cancel("r2") is RequestState.RUNNING
    record = await store.get("r1")
    assert record.state is RequestState.RUNNING and record.cancel_requested

    renewal = await store.renew_leases("w1", ["r1", "r2"])
    assert set(renewal.cancel_requested) == {"r1", "r2"} and renewal.lost == ()

    await store.ack("w1", "r1", RequestState.CANCELLED)
    assert (await store.get("r1")).state is RequestState.CANCELLED
    # a flagged request whose worker died is cancelled, not requeued
    clock.advance(60.0)
    assert await store.requeue_expired() == {"r2": RequestState.CANCELLED}
    assert (await store.snapshot()).groups == ()


async def test_evicting_a_cancel_requested_request_cancels_it(store: RedisQueueStore) -> None:
    request = make_request("r1")
    await store.enqueue(request)
    await store.set_virtual_queue("w1", [group_of(request)])
    await store.pull("w1", "llama-8b", 1)
    await store.cancel("r1")

    assert await store.requeue("w1", "r1") is RequestState.CANCELLED
    assert (await store.snapshot()).groups == ()


async def test_reject_fails_a_queued_request_only(store: RedisQueueStore) -> None:
    queued, running = make_request("q", arrival_at=T0 + 1), make_request("r")
    await store.enqueue(queued)
    await store.enqueue(running)
    await store.set_virtual_queue("w1", [group_of(queued)])
    await store.pull("w1", "llama-8b", 1)

    assert await store.reject("q", "cannot meet its SLO") is RequestState.FAILED
    assert (await store.get("q")).error == "cannot meet its SLO"
    assert await store.reject("r", "cannot meet its SLO") is RequestState.RUNNING
    assert not (await store.get("r")).cancel_requested


async def test_claim_takes_named_queued_requests(store: RedisQueueStore) -> None:
    for k in range(3):
        await store.enqueue(make_request(f"r{k}", arrival_at=T0 + k))

    claimed = await store.claim("w1", ["r2", "r0", "missing"])
    assert [r.id for r in claimed] == ["r2", "r0"]
    assert await store.claim("w2", ["r2"]) == ()  # already running on w1
    snap = await store.snapshot()
    assert [r.id for r in snap.groups[0].requests] == ["r1"]
    assert sorted(r.request.id for r in snap.running["w1"]) == ["r0", "r2"]


# ------------------------------------------------------------------ concurrency
async def test_concurrent_pulls_never_hand_out_a_request_twice(
    store: RedisQueueStore, raw: aioredis.Redis
) -> None:
    requests = [make_request(f"r{k:03d}", arrival_at=T0 + k * 0.1) for k in range(300)]
    await asyncio.gather(*(store.enqueue(r) for r in requests))
    groups = sorted({group_of(r) for r in requests})
    await store.set_virtual_queues({"w1": groups, "w2": list(reversed(groups))})

    batches = await asyncio.gather(
        *(store.pull(f"w{1 + k % 2}", "llama-8b", 4) for k in range(100))
    )

    ids = [r.id for batch in batches for r in batch]
    assert len(ids) == len(set(ids)) == 300
    holders = {r.id: r.worker_id for batch in batches for r in batch}
    for worker in ("w1", "w2"):
        assert await raw.smembers(Keys().running(worker)) == {
            i for i, w in holders.items() if w == worker
        }
    assert await raw.zcard(Keys().leases) == 300
    assert (await store.snapshot()).groups == ()


async def test_snapshots_during_concurrent_pulls_see_each_request_once(
    store: RedisQueueStore,
) -> None:
    requests = [make_request(f"r{k:03d}", arrival_at=T0 + k * 0.05) for k in range(200)]
    for request in requests:
        await store.enqueue(request)
    groups = sorted({group_of(r) for r in requests})
    await store.set_virtual_queues({"w1": groups, "w2": groups})

    async def pull_all(worker: str) -> None:
        while await store.pull(worker, "llama-8b", 3):
            await asyncio.sleep(0)

    async def snapshots() -> list[tuple[list[str], list[str]]]:
        seen = []
        for _ in range(15):
            snap = await store.snapshot()
            queued = [r.id for g in snap.groups for r in g.requests]
            running = [rr.request.id for rs in snap.running.values() for rr in rs]
            seen.append((queued, running))
            await asyncio.sleep(0)
        return seen

    *_, seen = await asyncio.gather(pull_all("w1"), pull_all("w2"), snapshots())

    everyone = {r.id for r in requests}
    for queued, running in seen:
        assert len(queued) + len(running) == len(everyone)
        assert set(queued) | set(running) == everyone


async def test_snapshot_sees_progress_made_between_two_snapshots(store: RedisQueueStore) -> None:
    request = make_request("r1")
    await store.enqueue(request)
    await store.enqueue(make_request("r2"))
    first = await store.snapshot()
    assert await store.snapshot() == first

    # pulled, progressed and evicted between two snapshots: never seen running
    await store.claim("w1", ["r1"])
    await store.append_tokens("w1", "r1", token_ids=[1, 2, 3])
    await store.requeue("w1", "r1")
    second = await store.snapshot()

    by_id = {r.id: r for g in second.groups for r in g.requests}
    assert by_id["r1"].num_generated == 3
    assert by_id["r2"] == make_request("r2")
    await store.cancel("r2")
    assert [r.id for g in (await store.snapshot()).groups for r in g.requests] == ["r1"]


# ------------------------------------------------------------------ token streams
async def test_token_stream_is_read_as_it_is_written(store: RedisQueueStore) -> None:
    request = make_request("r1")
    await store.enqueue(request)
    await store.set_virtual_queue("w1", [group_of(request)])
    await store.pull("w1", "llama-8b", 1)

    async def reader() -> list[str]:
        texts = []
        async for chunk in store.read_tokens("r1", block_ms=200):
            texts.append(chunk.text if chunk.final_state is None else f"<{chunk.final_state}>")
        return texts

    reading = asyncio.create_task(reader())
    await asyncio.sleep(0.05)
    for word in ("Hello", " world"):
        await store.append_tokens("w1", "r1", text=word, token_ids=[7])
        await asyncio.sleep(0.01)
    await store.ack("w1", "r1")

    assert await asyncio.wait_for(reading, timeout=10) == ["Hello", " world", "<finished>"]
    chunks = [c async for c in store.read_tokens("r1")]  # a late reader sees it all
    assert [c.num_generated for c in chunks[:2]] == [1, 2]
    assert await store.token_chunks("r1") == tuple(chunks)
    with pytest.raises(NotFound):
        _ = [c async for c in store.read_tokens("unknown")]


async def test_append_tokens_many_answers_each_request(
    store: RedisQueueStore, clock: FakeClock
) -> None:
    for request_id in ("a", "b", "c"):
        await store.enqueue(make_request(request_id, max_tokens=4))
    await store.claim("w1", ["a", "b"])
    await store.claim("w2", ["c"])

    results = await store.append_tokens_many(
        "w1",
        [
            TokenAppend("a", token_ids=(1, 2), text="hi"),
            TokenAppend("b", num_tokens=5),  # past max_tokens
            TokenAppend("c", token_ids=(3,)),  # held by w2
            TokenAppend("a", token_ids=(4,)),
        ],
    )

    assert results[0] == 2 and results[3] == 3
    assert isinstance(results[1], InvalidInput) and results[1].field == "num_tokens"
    assert isinstance(results[2], LeaseLost) and results[2].holder == "w2"
    assert [c.token_ids for c in await store.token_chunks("a")] == [(1, 2), (4,)]
    assert await store.token_chunks("c") == ()
    assert (await store.get("b")).request.num_generated == 0


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("max_requests", [0, -1])
async def test_pull_with_no_room_is_invalid(store: RedisQueueStore, max_requests: int) -> None:
    with pytest.raises(InvalidInput) as error:
        await store.pull("w1", "llama-8b", max_requests)
    assert error.value.field == "max_requests"


async def test_bad_worker_reports_are_invalid_and_write_nothing(
    store: RedisQueueStore, raw: aioredis.Redis
) -> None:
    request = make_request("r1", max_tokens=10)
    await store.enqueue(request)
    await store.set_virtual_queue("w1", [group_of(request)])
    await store.pull("w1", "llama-8b", 1)
    before = await dump(raw)

    cases: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("lease_s", lambda: store.pull("w1", "llama-8b", 1, lease_s=0)),
        ("worker_id", lambda: store.pull("", "llama-8b", 1)),
        ("state", lambda: store.ack("w1", "r1", RequestState.QUEUED)),
        ("num_generated", lambda: store.ack("w1", "r1", num_generated=11)),
        ("num_generated", lambda: store.requeue("w1", "r1", num_generated=-1)),
        ("num_generated", lambda: store.requeue("w1", "r1", num_generated=11)),
        ("num_tokens", lambda: store.append_tokens("w1", "r1", token_ids=list(range(11)))),
        ("order", lambda: store.set_virtual_queue("w1", [group_of(request)] * 2)),
        ("params", lambda: store.enqueue(make_request("r2"), params={"x": object()})),
        ("reason", lambda: store.reject("r1", "")),
        ("max_requests", lambda: store.queue_head("w1", "llama-8b", 0)),
    ]
    for field, call in cases:
        with pytest.raises(InvalidInput) as error:
            await call()
        assert error.value.field == field, (field, error.value)
    assert await dump(raw) == before


def test_store_options_are_validated() -> None:
    client = aioredis.Redis(decode_responses=True)
    with pytest.raises(InvalidInput, match="group_window_s"):
        RedisQueueStore(client, group_window_s=0)
    with pytest.raises(InvalidInput, match="client"):
        RedisQueueStore(aioredis.Redis())
    with pytest.raises(InvalidInput, match="prefix"):
        RedisQueueStore(client, prefix="")


# ------------------------------------------------------------------ durability
@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
async def test_restart_keeps_the_queue(
    redis_server: RedisServer, redis_url: str, clock: FakeClock, kill: bool
) -> None:
    before_store = RedisQueueStore.from_url(redis_url, group_window_s=WINDOW_S, clock=clock)
    requests = [make_request(f"r{k}", arrival_at=T0 + k * 4) for k in range(6)]
    for request in requests:
        await before_store.enqueue(request, prompt=[1, 2, 3])
    await before_store.set_virtual_queue("w1", [group_of(requests[0])])
    await before_store.pull("w1", "llama-8b", 2)
    await before_store.append_tokens("w1", "r0", text="x", token_ids=[5])
    before = await before_store.snapshot()
    record_before = await before_store.get("r0")
    await before_store.aclose()

    await asyncio.to_thread(redis_server.restart, kill)

    after_store = RedisQueueStore.from_url(redis_url, group_window_s=WINDOW_S, clock=clock)
    try:
        # the restarted server lost its scripts: a pipelined batch loads them again
        (again,) = await after_store.enqueue_many([(requests[5], [1, 2, 3], None)])
        assert isinstance(again, EnqueueResult) and not again.created
        assert await after_store.snapshot() == before
        assert await after_store.get("r0") == record_before
        # and it keeps working: leases still expire, scripts load again
        clock.advance(3600)
        assert set(await after_store.requeue_expired()) == {"r0", "r1"}
        await after_store.set_virtual_queue("w1", sorted({group_of(r) for r in requests}))
        pulled = await after_store.pull("w1", "llama-8b", 10)
        assert [r.id for r in pulled] == ["r0", "r1", "r2", "r3", "r4", "r5"]
    finally:
        await after_store.aclose()


async def test_only_documented_keys_are_used(store: RedisQueueStore, raw: aioredis.Redis) -> None:
    request = make_request("r1")
    await store.enqueue(request)
    await store.set_virtual_queue("w1", [group_of(request)])
    await store.pull("w1", "llama-8b", 1)
    await store.append_tokens("w1", "r1", token_ids=[1])

    keys = Keys()
    assert await all_keys(raw) == {
        keys.request("r1"),
        keys.virtual_queue("w1"),
        keys.workers,
        keys.running("w1"),
        keys.leases,
        keys.stream("r1"),
    }
    await store.ack("w1", "r1")
    assert await all_keys(raw) == {keys.request("r1"), keys.virtual_queue("w1"), keys.workers,
                                   keys.stream("r1")}
    assert 0 < await raw.ttl(keys.stream("r1")) <= 3600


async def test_redis_down_is_unavailable_and_writes_resume_after(
    redis_server: RedisServer, store: RedisQueueStore
) -> None:
    await store.enqueue(make_request("r1"))
    await asyncio.to_thread(redis_server.stop)
    try:
        assert not await store.ping()
        with pytest.raises(Unavailable):
            await store.get("r1")
        with pytest.raises(Unavailable):
            await store.enqueue(make_request("r2"))
    finally:
        await asyncio.to_thread(redis_server.start)
    assert await store.ping()
    assert (await store.get("r1")).state is RequestState.QUEUED
    assert (await store.enqueue(make_request("r2"))).created
