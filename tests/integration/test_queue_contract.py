"""The queue store contract (qlm.store.base.QueueStore), one suite over every store:
the Redis store on a real redis-server and the in-memory store the simulator keeps its
queue in. Same operations, same order (groups by earliest deadline, requests by
deadline then id), same errors. Redis-only behaviour (keys, streams, TTLs, AOF,
concurrency) is in test_store.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest
from queue_helpers import T0, WINDOW_S, FakeClock, group_of, make_request

from qlm.core.errors import InvalidInput, NotFound
from qlm.core.types import RequestState, SLOClass
from qlm.store import RedisQueueStore
from qlm.store.base import QueueStore
from qlm.store.errors import FenceLost
from qlm.store.memory import MemoryQueueStore

StoreFactory = Callable[[FakeClock], Awaitable[QueueStore]]


@pytest.fixture(params=[pytest.param("redis", marks=pytest.mark.redis), "memory"])
def make_store(request: pytest.FixtureRequest) -> StoreFactory:
    """Builds the store under test on a given clock."""
    if request.param == "memory":
        async def memory(clock: FakeClock) -> QueueStore:
            return MemoryQueueStore(group_window_s=WINDOW_S, lease_s=30.0, clock=clock)

        return memory
    url = request.getfixturevalue("redis_url")

    async def on_redis(clock: FakeClock) -> QueueStore:
        return RedisQueueStore.from_url(url, group_window_s=WINDOW_S, lease_s=30.0, clock=clock)

    return on_redis


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(make_store: StoreFactory, clock: FakeClock) -> AsyncIterator[QueueStore]:
    queue = await make_store(clock)
    yield queue
    await queue.aclose()


# One body for the queue operations, run over every store implementation.
async def test_queue_contract(make_store: StoreFactory) -> None:
    clock = FakeClock()
    queue = await make_store(clock)
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


# One body for the scheduler policy's saved state, run over every store implementation.
async def test_policy_state_round_trips_and_only_the_current_fence_writes(
    make_store: StoreFactory,
) -> None:
    queue = await make_store(FakeClock())
    try:
        assert await queue.policy_state("qlm") is None
        state = {"fair_share": {"counters": {"interactive": {"a": 1200.5, "b": 40.0}},
                                "charged": {"r1": 3}}}
        await queue.save_policy_state("qlm", state)
        assert await queue.policy_state("qlm") == state
        await queue.save_policy_state("shepherd", {"x": [1, "y"]})
        assert await queue.policy_state("qlm") == state  # one entry per policy

        newer = {"fair_share": {"counters": {"interactive": {"a": 1300.0}}}}
        await queue.save_policy_state("qlm", newer)
        assert await queue.policy_state("qlm") == newer  # replaced, not merged

        # no leader ever took the lease here: no fencing token is current, nothing written
        with pytest.raises(FenceLost):
            await queue.save_policy_state("qlm", state, fence=1)
        for bad, field_name in ((["not", "an", "object"], "state"),
                                ({"x": float("nan")}, "state"), ({"x": {1, 2}}, "state")):
            with pytest.raises(InvalidInput) as raised:
                await queue.save_policy_state("qlm", bad)  # type: ignore[arg-type]
            assert raised.value.field == field_name
        with pytest.raises(InvalidInput, match="policy"):
            await queue.save_policy_state("", state)
        assert await queue.policy_state("qlm") == newer
    finally:
        await queue.aclose()


async def test_enqueue_same_id_after_finish_returns_finished_record(store: QueueStore) -> None:
    request = make_request("r1")
    await store.enqueue(request)
    await store.set_virtual_queue("w1", [group_of(request)])
    await store.pull("w1", request.model, 1)
    await store.ack("w1", "r1")

    again = await store.enqueue(request)
    assert not again.created
    assert again.record.state is RequestState.FINISHED
    assert (await store.snapshot()).groups == ()


async def test_pull_takes_groups_in_virtual_queue_order_then_deadline_order(
    store: QueueStore,
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
    store: QueueStore,
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


async def test_each_tenant_has_its_own_group_and_pull_walks_them_by_model(
    store: QueueStore,
) -> None:
    """Group names with a tenant (``model|class|window|tenant``, the model holding '|'):
    the pull reads their model right, in the store's scripts too."""
    a = replace(make_request("a/1", model="org|llama"), tenant="a")
    b = replace(make_request("b/1", model="org|llama"), tenant="b|x")
    qwen = replace(make_request("a/2", model="qwen-7b"), tenant="a")
    for request in (a, b, qwen):
        await store.enqueue(request)
    assert group_of(a) != group_of(b)
    assert {g.key for g in (await store.snapshot()).groups} == {
        group_of(a), group_of(b), group_of(qwen)}
    await store.set_virtual_queue("w1", [group_of(b), group_of(a), group_of(qwen)])

    assert [r.id for r in await store.pull("w1", "org|llama", 5)] == ["b/1", "a/1"]
    assert [(r.id, r.request.tenant) for r in await store.pull("w1", "qwen-7b", 5)] == [
        ("a/2", "a")]


async def test_queue_head_shows_what_pull_would_take(store: QueueStore) -> None:
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


async def test_cancel_running_request_flags_it_for_its_worker(
    store: QueueStore, clock: FakeClock
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


async def test_evicting_a_cancel_requested_request_cancels_it(store: QueueStore) -> None:
    request = make_request("r1")
    await store.enqueue(request)
    await store.set_virtual_queue("w1", [group_of(request)])
    await store.pull("w1", "llama-8b", 1)
    await store.cancel("r1")

    assert await store.requeue("w1", "r1") is RequestState.CANCELLED
    assert (await store.snapshot()).groups == ()


async def test_reject_fails_a_queued_request_only(store: QueueStore) -> None:
    queued, running = make_request("q", arrival_at=T0 + 1), make_request("r")
    await store.enqueue(queued)
    await store.enqueue(running)
    await store.set_virtual_queue("w1", [group_of(queued)])
    await store.pull("w1", "llama-8b", 1)

    assert await store.reject("q", "cannot meet its SLO") is RequestState.FAILED
    assert (await store.get("q")).error == "cannot meet its SLO"
    assert await store.reject("r", "cannot meet its SLO") is RequestState.RUNNING
    assert not (await store.get("r")).cancel_requested


async def test_claim_takes_named_queued_requests(store: QueueStore) -> None:
    for k in range(3):
        await store.enqueue(make_request(f"r{k}", arrival_at=T0 + k))

    claimed = await store.claim("w1", ["r2", "r0", "missing"])
    assert [r.id for r in claimed] == ["r2", "r0"]
    assert await store.claim("w2", ["r2"]) == ()  # already running on w1
    snap = await store.snapshot()
    assert [r.id for r in snap.groups[0].requests] == ["r1"]
    assert sorted(r.request.id for r in snap.running["w1"]) == ["r0", "r2"]
