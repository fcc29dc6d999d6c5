"""The Redis queue store on a real redis-server: queue contract, idempotency, leases,
eviction, cancellation, concurrency, snapshots, bad input and restarts (AOF)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from queue_helpers import T0, WINDOW_S, FakeClock, group_of, make_request

from qlm.core.errors import InvalidInput, NotFound, Unavailable
from qlm.core.forecast import GroupForecast
from qlm.core.types import GroupKey, RequestState, SLOClass
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


async def test_a_request_evicted_after_its_first_token_keeps_the_prediction_made_before_it(
    store: RedisQueueStore, clock: FakeClock
) -> None:
    request = make_request("r1", max_tokens=50)
    await store.enqueue(request)
    key = group_of(request)
    before = GroupForecast("w1", T0, T0 + 2.0, 0.0, 0.1, 1)
    await store.set_forecasts({key: before})
    await store.set_virtual_queue("w1", [key])
    (pulled,) = await store.pull("w1", "llama-8b", 1)
    assert pulled.predicted_first_token_at == T0 + 2.0
    clock.advance(1.5)
    await store.append_tokens("w1", "r1", token_ids=[1])
    await store.requeue("w1", "r1")
    # forecasts made after its first token (of its resumption) do not replace it
    await store.set_forecasts({key: GroupForecast("w2", T0 + 2, T0 + 9.0, 0.0, 0.1, 1)})
    queued = await store.forecast_for(await store.get("r1"))
    assert queued.predicted_first_token_at == T0 + 2.0
    await store.set_virtual_queue("w2", [key])
    (resumed,) = await store.pull("w2", "llama-8b", 1)
    assert resumed.predicted_first_token_at == T0 + 2.0
    assert (await store.get("r1")).predicted_first_token_at == T0 + 2.0


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


async def test_virtual_queues_are_stored_exactly_as_given(
    store: RedisQueueStore, raw: aioredis.Redis
) -> None:
    """Every order is kept group for group, whatever characters the keys hold, an empty
    order empties its queue, and the queues of other workers are left as they were."""
    odd = [GroupKey("m|o\"d,e[l]\n", SLOClass.BATCH_1, 7, "t\u00e9nant \U0001f600|x"),
           GroupKey("m\u00f8del", SLOClass.CUSTOM, -3), GroupKey("m", SLOClass.INTERACTIVE, 0)]
    many = [GroupKey("m", SLOClass.BATCH_2, w) for w in range(1203)]  # RPUSH in chunks
    await store.set_virtual_queues({"w1": odd, "w2": many, "w3": odd[:1]})
    await store.set_virtual_queues({"w1": list(reversed(odd)), "w3": []})
    keys = Keys()
    assert await raw.lrange(keys.virtual_queue("w1"), 0, -1) == [str(g) for g in reversed(odd)]
    assert await raw.lrange(keys.virtual_queue("w2"), 0, -1) == [str(g) for g in many]
    assert not await raw.exists(keys.virtual_queue("w3"))
    assert await raw.smembers(keys.workers) == {"w1", "w2", "w3"}
    snap = await store.snapshot()
    assert snap.virtual_queues["w1"] == tuple(reversed(odd))
    assert snap.virtual_queues["w3"] == ()


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
        keys.queue_log,
    }
    await store.ack("w1", "r1")
    assert await all_keys(raw) == {keys.request("r1"), keys.virtual_queue("w1"), keys.workers,
                                   keys.stream("r1"), keys.queue_log}
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
