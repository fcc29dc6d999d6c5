"""Moving a queue kept in Redis from the key layout before hash tags to the tagged one."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from queue_helpers import WINDOW_S, FakeClock, group_of, make_request

from qlm.core.types import RequestState
from qlm.store import RedisQueueStore
from qlm.store.keys import Keys

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


def run_migration(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qlm.store.migrate", "--redis-url", redis_url, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


async def untag(raw: aioredis.Redis, keys: Keys) -> None:
    """Rename the queue's keys to the layout before hash tags (what an old store wrote;
    it kept no queue log)."""
    await raw.delete(keys.queue_log)
    async for key in raw.scan_iter(match="{*", count=1000):
        await raw.rename(key, keys.name + key.removeprefix(keys.prefix))


async def test_an_old_queue_moves_to_the_tagged_layout_and_serves_on(
    redis_url: str, raw: aioredis.Redis
) -> None:
    clock = FakeClock()
    keys = Keys()
    store = RedisQueueStore.from_url(redis_url, group_window_s=WINDOW_S, clock=clock)
    try:
        queued, running, done = (make_request(i) for i in ("queued", "running", "done"))
        for request in (queued, running, done):
            await store.enqueue(request, prompt="hi")
        await store.set_virtual_queue("w1", [group_of(queued)])
        await store.claim("w1", ["running", "done"])
        await store.append_tokens("w1", "running", token_ids=(1, 2))
        await store.ack("w1", "done")
        ttl_before = await raw.ttl(keys.request("done"))
        await untag(raw, keys)
        await raw.set("qlm:not-ours", "x")  # other keys under the prefix stay as they are
        await raw.set("other:req:x", "x")
        assert not [k async for k in raw.scan_iter(match="{*")]

        migrated = run_migration(redis_url, "--key-prefix", "qlm:")
        assert migrated.returncode == 0, migrated.stderr
        assert "moved 11 keys" in migrated.stdout

        assert set(await raw.keys("qlm:*")) == {"qlm:not-ours"}
        assert await raw.exists("other:req:x")
        assert 0 < await raw.ttl(keys.request("done")) <= ttl_before
        snap = await store.snapshot()
        assert [r.id for g in snap.groups for r in g.requests] == ["queued"]
        assert [r.request.id for r in snap.running["w1"]] == ["running"]
        assert [c.token_ids for c in await store.token_chunks("running")] == [(1, 2)]
        (pulled,) = await store.pull("w1", queued.model, 5)
        assert pulled.id == "queued" and pulled.state is RequestState.RUNNING
    finally:
        await store.aclose()

    again = run_migration(redis_url)
    assert again.returncode == 0 and "moved 0 keys" in again.stdout


async def test_a_key_under_both_names_stops_the_migration_naming_it(
    redis_url: str, raw: aioredis.Redis
) -> None:
    await raw.hset("qlm:req:r1", "state", "queued")
    await raw.hset(Keys().request("r1"), "state", "finished")
    refused = run_migration(redis_url)
    assert refused.returncode == 1
    assert "qlm:req:r1" in refused.stderr and "both exist" in refused.stderr
    assert await raw.hget("qlm:req:r1", "state") == "queued"  # nothing overwritten
    assert await raw.hget(Keys().request("r1"), "state") == "finished"
