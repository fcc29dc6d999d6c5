"""Redis ACL users per service (qlm.localstack.redis.RedisUsers) on the session's server:
each service does its work with its own user and cannot touch what is not its own."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from qlm.core.types import GroupKey, SLOClass
from qlm.localstack import RedisServer
from qlm.store.keys import Keys
from qlm.store.store import RedisQueueStore
from qlm.tenants import TenantRegistry
from tests.integration.test_store import make_request

pytestmark = [pytest.mark.redis]
KEYS = Keys()


async def test_each_service_user_is_confined_to_its_keys(
    redis_server: RedisServer, redis_url: str
) -> None:
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await TenantRegistry(admin).add("acme")
    await admin.set(KEYS.scheduler_fence, 1)
    ingest = RedisQueueStore.from_url(redis_server.url_for("qlm-ingest"))
    scheduler = RedisQueueStore.from_url(redis_server.url_for("qlm-scheduler"))
    worker_url = redis_server.url_for("qlm-worker")
    worker = RedisQueueStore.from_url(worker_url)
    raw_worker = aioredis.Redis.from_url(worker_url, decode_responses=True)
    try:
        request = make_request("r1")
        assert (await ingest.enqueue(request)).created
        assert await TenantRegistry(ingest.client).list()  # ingest reads the tenants
        snapshot = await scheduler.snapshot()
        group: GroupKey = snapshot.groups[0].key
        assert group.slo_class in SLOClass
        await scheduler.set_virtual_queues({"w1": [group]}, fence=1)
        assert [r.id for r in await worker.pull("w1", request.model, 4)] == ["r1"]
        assert await worker.scheduler_fence() == 1
        await scheduler.save_policy_state("qlm", {"fence": 1, "state": {}}, fence=1)
        assert await scheduler.policy_state("qlm") == {"fence": 1, "state": {}}

        for forbidden in (
            raw_worker.get(KEYS.tenant("acme")),  # the tenants are ingest's
            raw_worker.smembers(KEYS.tenants),
            raw_worker.set(KEYS.scheduler_fence, 99),  # the fence is the scheduler's
            raw_worker.hset(KEYS.scheduler_state, "qlm", "{}"),  # and the policy's state
            raw_worker.flushall(),
            raw_worker.config_set("notify-keyspace-events", ""),
            raw_worker.get("other-app:secret"),
        ):
            with pytest.raises(NoPermissionError):
                await forbidden
        with pytest.raises(NoPermissionError):
            await TenantRegistry(scheduler.client).list()
    finally:
        for store in (ingest, scheduler, worker):
            await store.aclose()
        await raw_worker.aclose()
        await admin.aclose()
