"""The Redis queue store on a real Redis Cluster of three masters.

Every key of a queue carries the queue's hash tag (``{qlm:}``), so each Lua script —
including the keys it derives from what it reads — runs on one slot. These tests run
the store's contract and every script (enqueue, pull with a lease, claim, renewal,
tokens, eviction, expiry, finish, cancel, snapshot) on the cluster, check that a
queue's keys all sit in one slot of one master, that two queues spread over the
masters, that primaries with an empty script cache still run pipelined scripts, and
that the scheduler's leader lease and the workers' wake-up on enqueue work there,
and that the cluster indeed refuses a script that strays into another slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis
import test_queue_contract as contract
from queue_helpers import T0, WINDOW_S, FakeClock, group_of, make_request
from redis.crc import key_slot

from qlm.core.errors import NotFound
from qlm.core.types import RequestState, SLOClass
from qlm.localstack import LocalRedisCluster
from qlm.store import LeaseLost, RedisQueueStore, TokenAppend
from qlm.store.client import redis_client
from qlm.store.keys import Keys
from services.scheduler.lease import LeaderLease, LeaseKeys
from services.worker.wakeup import QueueWatcher

pytestmark = pytest.mark.redis


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def open_store(url: str, clock: FakeClock, prefix: str = "qlm:") -> RedisQueueStore:
    return RedisQueueStore.from_url(
        url, group_window_s=WINDOW_S, lease_s=30.0, clock=clock, prefix=prefix
    )


@pytest.fixture
async def store(redis_cluster_url: str, clock: FakeClock) -> AsyncIterator[RedisQueueStore]:
    queue = open_store(redis_cluster_url, clock)
    yield queue
    await queue.aclose()


def keys_per_node(cluster: LocalRedisCluster) -> dict[int, set[str]]:
    """Every key of every master, by the master's port."""
    out = {}
    for node in cluster.nodes:
        client = redis.Redis(host=node.host, port=node.port, decode_responses=True)
        try:
            out[node.port] = set(client.scan_iter(count=1000))
        finally:
            client.close()
    return out


def flush_scripts(cluster: LocalRedisCluster) -> None:
    for node in cluster.nodes:
        client = redis.Redis(host=node.host, port=node.port)
        try:
            client.script_flush()
        finally:
            client.close()


async def test_the_queue_contract_holds_on_a_cluster(redis_cluster_url: str) -> None:
    async def on_cluster(clock: FakeClock) -> RedisQueueStore:
        return open_store(redis_cluster_url, clock)

    await contract.test_queue_contract(on_cluster)
    await contract.test_policy_state_round_trips_and_only_the_current_fence_writes(on_cluster)


async def test_every_script_runs_on_a_cluster_and_a_queue_stays_in_one_slot(
    store: RedisQueueStore, clock: FakeClock, redis_cluster: LocalRedisCluster
) -> None:
    interactive = [make_request(f"i{n}") for n in range(3)]
    batch = [make_request(f"b{n}", slo_class=SLOClass.BATCH_2) for n in range(3)]
    results = await store.enqueue_many([(r, "hi", {}) for r in (*interactive, *batch)])
    assert all(not isinstance(r, Exception) and r.created for r in results)
    assert not (await store.enqueue(interactive[0], prompt="hi")).created
    assert await store.queue_depths() == {
        ("llama-8b", SLOClass.INTERACTIVE): 3, ("llama-8b", SLOClass.BATCH_2): 3
    }

    await store.set_virtual_queues({
        "w1": [group_of(interactive[0])], "w2": [group_of(batch[0])]
    })  # fmt: skip
    (head,) = await store.queue_head("w1", "llama-8b", 2)
    assert [r.id for r in head.requests] == ["i0", "i1"]
    pulled = await store.pull("w1", "llama-8b", 2, lease_s=5.0)
    assert [r.id for r in pulled] == ["i0", "i1"]
    assert all(r.state is RequestState.RUNNING for r in pulled)
    claimed = await store.claim("w2", ["b0", "b1", "i0"])  # i0 is not queued: skipped
    assert [r.id for r in claimed] == ["b0", "b1"]

    assert await store.append_tokens("w1", "i0", token_ids=(1, 2), text="ab") == 2
    assert await store.append_tokens_many("w1", [
        TokenAppend("i0", (3,), "c"), TokenAppend("i1", (4, 5), "de"),
    ]) == [3, 2]  # fmt: skip
    renewal = await store.renew_leases("w1", ["i0", "i1", "b0"])
    assert renewal.lost == ("b0",)
    await store.ack("w1", "i0", num_generated=3)
    chunks = [chunk async for chunk in store.read_tokens("i0")]
    assert [c.token_ids for c in chunks[:-1]] == [(1, 2), (3,)]
    assert chunks[-1].final_state is RequestState.FINISHED
    assert len(await store.token_chunks("i1")) == 1

    assert await store.requeue("w2", "b0", num_generated=4) is RequestState.QUEUED
    assert await store.cancel("b1") is RequestState.RUNNING  # flagged for its worker
    assert (await store.renew_leases("w2", ["b1"])).cancel_requested == ("b1",)
    assert await store.cancel("i2") is RequestState.CANCELLED
    assert await store.reject("b2", "cannot meet its SLO") is RequestState.FAILED
    with pytest.raises(LeaseLost):
        await store.ack("w2", "b0")

    clock.advance(60.0)  # i1's 5 s lease and b1's 30 s lease are over
    assert await store.requeue_expired() == {
        "i1": RequestState.QUEUED, "b1": RequestState.CANCELLED
    }  # fmt: skip
    snap = await store.snapshot()
    queued = {r.id: r for g in snap.groups for r in g.requests}
    assert set(queued) == {"b0", "i1"}
    assert queued["b0"].num_generated == 4 and queued["i1"].num_generated == 2
    assert snap.running == {"w1": (), "w2": ()}
    with pytest.raises(NotFound):
        await store.get("missing")

    placed = {port: keys for port, keys in keys_per_node(redis_cluster).items() if keys}
    assert len(placed) == 1, f"one queue's keys are spread over {sorted(placed)}"
    (names,) = placed.values()
    keys = Keys()
    assert {keys.stream("i1"), keys.virtual_queue("w2"), keys.workers, keys.groups} <= names
    assert {key_slot(name.encode()) for name in names} == {key_slot(Keys().prefix.encode())}


async def test_two_queues_share_a_cluster_on_different_masters(
    redis_cluster_url: str, redis_cluster: LocalRedisCluster, clock: FakeClock
) -> None:
    thirds: dict[int, str] = {}
    for n in range(100):  # the three masters hold slots 0-5460, 5461-10922, 10923-16383
        thirds.setdefault(key_slot(f"q{n}:".encode()) * 3 // 16384, f"q{n}:")
    prefixes = [thirds[0], thirds[2]]
    stores = [open_store(redis_cluster_url, clock, prefix) for prefix in prefixes]
    try:
        for queue in stores:
            request = make_request("same-id")
            assert (await queue.enqueue(request, prompt=queue.keys.name)).created
            await queue.set_virtual_queue("w", [group_of(request)])
        for queue in stores:
            (pulled,) = await queue.pull("w", "llama-8b", 5)
            assert pulled.prompt == queue.keys.name  # each queue got its own request
    finally:
        for queue in stores:
            await queue.aclose()
    assert len([keys for keys in keys_per_node(redis_cluster).values() if keys]) == 2


async def test_primaries_without_the_scripts_still_run_pipelined_ones(
    store: RedisQueueStore, redis_cluster: LocalRedisCluster
) -> None:
    flush_scripts(redis_cluster)  # as on a primary just promoted or restarted
    requests = [make_request(f"r{n}", arrival_at=T0 + n) for n in range(1200)]
    results = await store.enqueue_many([(r, None, None) for r in requests])  # EVALSHA batch
    assert all(not isinstance(r, Exception) and r.created for r in results)
    flush_scripts(redis_cluster)
    snap = await store.snapshot()  # read_records in a pipeline, 1,000 records per call
    assert sum(len(g.requests) for g in snap.groups) == 1200
    await store.set_virtual_queue("w", [g.key for g in snap.groups])
    pulled = await store.pull("w", "llama-8b", 3)
    flush_scripts(redis_cluster)
    appended = await store.append_tokens_many("w", [TokenAppend(r.id, (7,)) for r in pulled])
    assert appended == [1, 1, 1]


async def test_scheduler_lease_and_worker_wake_up_work_on_a_cluster(
    store: RedisQueueStore, redis_cluster_url: str
) -> None:
    clients = [redis_client(redis_cluster_url, decode_responses=True) for _ in range(2)]
    leases = [LeaderLease(c, LeaseKeys.under("qlm:"), f"replica-{n}", ttl_s=30.0)
              for n, c in enumerate(clients)]  # fmt: skip
    watcher = QueueWatcher(redis_cluster_url, Keys())
    woken = asyncio.Event()
    watcher.register(woken)
    try:
        assert await leases[0].try_acquire() and leases[0].fence == 1
        assert not await leases[1].try_acquire()  # one leader (the acquire script: 2 keys)
        assert await leases[1].owner() == "replica-0"

        assert await watcher.start(), "keyspace notifications on the queue's master"
        await store.enqueue(make_request("wake"))
        await asyncio.wait_for(woken.wait(), timeout=10.0)
    finally:
        await watcher.stop()
        for client in clients:
            await client.aclose()


async def test_the_cluster_refuses_a_script_that_strays_into_another_slot(
    redis_cluster_url: str,
) -> None:
    client = redis_client(redis_cluster_url, decode_responses=True)
    assert isinstance(client, aioredis.RedisCluster)
    declared = Keys().groups

    def master_of(name: str) -> int:  # masters hold slots 0-5460, 5461-10922, 10923-16383
        return key_slot(name.encode()) * 3 // 16384

    # A group key as named before hash tags, on another master than the queue's slot.
    undeclared = next(
        name for name in (f"qlm:group:m|interactive|{n}" for n in range(100))
        if master_of(name) != master_of(declared)
    )  # fmt: skip
    try:
        with pytest.raises(redis.exceptions.ResponseError, match=r"slot|non local"):
            await client.eval(
                "redis.call('ZCARD', KEYS[1]); return redis.call('ZCARD', ARGV[1])",
                1, declared, undeclared,
            )  # fmt: skip
    finally:
        await client.aclose()
