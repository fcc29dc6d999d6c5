"""RedisQueueStore.append_tokens_many: one round trip, each append checked on its own."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from qlm.core.types import SLO, Request, RequestState, SLOClass
from qlm.store import LeaseLost, RedisQueueStore
from qlm.store.store import TokenAppend

pytestmark = pytest.mark.redis


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisQueueStore]:
    store = RedisQueueStore.from_url(redis_url, group_window_s=60.0)
    yield store
    await store.aclose()


async def test_appends_of_several_requests_in_one_call(store: RedisQueueStore) -> None:
    for rid in ("a", "b", "c"):
        request = Request(rid, "m", 10, 5, SLOClass.INTERACTIVE, SLO(20.0), time.time())
        await store.enqueue(request)
    await store.set_virtual_queue("w", [store.group_of(request)])
    pulled = await store.pull("w", "m", 2)
    held = sorted(r.id for r in pulled)
    assert held == ["a", "b"]
    results = await store.append_tokens_many("w", [
        TokenAppend("a", (1, 2)), TokenAppend("b", (3,), text="x"), TokenAppend("c", (4,)),
        TokenAppend("a", (5,)),
    ])
    assert results[0] == 2 and results[1] == 1 and results[3] == 3
    assert isinstance(results[2], LeaseLost)  # c is queued, not held by w: nothing written
    assert (await store.get("a")).request.num_generated == 3
    assert (await store.get("c")).request.num_generated == 0
    assert (await store.get("b")).first_token_at is not None
    await store.ack("w", "a", RequestState.FINISHED)
    tokens = [t async for chunk in store.read_tokens("a") for t in chunk.token_ids]
    assert tokens == [1, 2, 5]
    assert await store.append_tokens_many("w", []) == []
