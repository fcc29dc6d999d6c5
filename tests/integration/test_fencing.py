"""The scheduler's fencing token, checked where its writes land: inside Redis for the
virtual queues, by the worker for LSO commands (tests/integration/test_worker.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from qlm.core.errors import InvalidInput
from qlm.core.types import GroupKey, SLOClass
from qlm.store.errors import FenceLost
from qlm.store.store import RedisQueueStore
from services.scheduler.lease import LeaderLease, LeaseKeys

pytestmark = [pytest.mark.redis]


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisQueueStore]:
    queue = RedisQueueStore.from_url(redis_url)
    yield queue
    await queue.aclose()


async def test_a_deposed_leader_cannot_overwrite_the_virtual_queues(
    store: RedisQueueStore,
) -> None:
    keys = LeaseKeys.under(store.keys.name)
    old = LeaderLease(store.client, keys, "old", ttl_s=0.2, margin_s=0.05)
    new = LeaderLease(store.client, keys, "new", ttl_s=30)
    assert await old.try_acquire()
    stale_fence = old.fence
    mine, theirs = GroupKey("m", SLOClass.BATCH_1, 1), GroupKey("m", SLOClass.BATCH_1, 2)
    await store.set_virtual_queues({"w1": [mine]}, fence=stale_fence)
    while not await new.try_acquire():  # the old lease expires, a new term begins
        await asyncio.sleep(0.05)
    assert new.fence == stale_fence + 1 == await store.scheduler_fence()
    await store.set_virtual_queues({"w1": [theirs]}, fence=new.fence)
    with pytest.raises(FenceLost):
        await store.set_virtual_queues({"w1": [mine], "w2": [mine]}, fence=stale_fence)
    with pytest.raises(FenceLost):  # nothing to write (no queue changed): still checked
        await store.set_virtual_queues({}, fence=stale_fence)
    await store.set_virtual_queues({}, fence=new.fence)
    assert (await store.snapshot()).virtual_queues == {"w1": (theirs,)}


async def test_a_deposed_leader_cannot_overwrite_the_saved_policy_state(
    store: RedisQueueStore,
) -> None:
    keys = LeaseKeys.under(store.keys.name)
    old = LeaderLease(store.client, keys, "old", ttl_s=0.2, margin_s=0.05)
    new = LeaderLease(store.client, keys, "new", ttl_s=30)
    assert await old.try_acquire()
    await store.save_policy_state("qlm", {"n": 1}, fence=old.fence)
    while not await new.try_acquire():
        await asyncio.sleep(0.05)
    await store.save_policy_state("qlm", {"n": 2}, fence=new.fence)
    with pytest.raises(FenceLost):
        await store.save_policy_state("qlm", {"n": 1}, fence=old.fence)
    assert await store.policy_state("qlm") == {"n": 2}


async def test_a_malformed_saved_state_is_named_on_read(store: RedisQueueStore) -> None:
    for text, problem in (("{not json", "not JSON"), ("[1, 2]", "must be a JSON object")):
        await store.client.hset(store.keys.scheduler_state, "qlm", text)
        with pytest.raises(InvalidInput, match=problem) as raised:
            await store.policy_state("qlm")
        assert raised.value.field == "scheduler:state.qlm"
