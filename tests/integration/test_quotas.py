"""Per-tenant quotas over gRPC and HTTP on real Redis and Kafka (services/ingest/quotas.py):
over a limit → RESOURCE_EXHAUSTED / 429 with a retry-after, nothing queued; another
tenant is not affected."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from qlm.core.errors import Overloaded
from qlm.localstack import free_loopback_port
from qlm.tenants import TenantLimits, TenantRegistry
from services.ingest.app import IngestApp
from services.ingest.settings import IngestSettings
from tests.integration.test_tenants import (  # noqa: F401
    MODELS,
    good,
    openai_client,
    redis_strings,
    tenants,
)

pytestmark = [pytest.mark.redis, pytest.mark.kafka]


@pytest.fixture
async def ingest(redis_url: str, kafka_bootstrap: str,
                 topic_prefix: str) -> AsyncIterator[IngestApp]:
    settings = IngestSettings(
        redis_url=redis_url, kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix,
        host="127.0.0.1", port=0, batch_consumer=False, shutdown_grace_s=0.5, log_json=False,
        auth="required", auth_cache_s=0.0, http_host="127.0.0.1",
        http_port=free_loopback_port(),
    )  # fmt: skip
    app = IngestApp(settings, models=MODELS)
    await app.start()
    yield app
    await app.stop()


def grpc_client(app: IngestApp, key: str) -> Any:
    from qlm.client import QlmClient

    return QlmClient(f"127.0.0.1:{app.port}", timeout_s=10, api_key=key)


async def test_max_queued_refuses_until_a_request_ends(
    ingest: IngestApp, tenants: TenantRegistry  # noqa: F811
) -> None:
    key, other = await tenants.add("small"), await tenants.add("other")
    await tenants.set_limits("small", TenantLimits(max_queued=2))
    async with grpc_client(ingest, key) as small, grpc_client(ingest, other) as big:
        await small.submit(good(request_id="q1"))
        await small.submit(good(request_id="q2"))
        assert (await small.submit(good(request_id="q1"))).duplicate  # a retry is no new request
        with pytest.raises(Overloaded) as caught:
            await small.submit(good(request_id="q3"))
        assert "limit is 2" in str(caught.value) and caught.value.retry_after_s > 0
        assert caught.value.details.get("quota") == "max_queued"
        for i in range(3):  # no limit for the other tenant
            await big.submit(good(request_id=f"o{i}"))
        assert (await small.cancel("q1")).cancelled
        await small.submit(good(request_id="q3"))  # one ended: room again


async def test_tokens_per_minute_refuses_with_the_seconds_to_the_next_minute(
    ingest: IngestApp, tenants: TenantRegistry  # noqa: F811
) -> None:
    import openai

    key = await tenants.add("metered")
    await tenants.set_limits("metered", TenantLimits(tokens_per_minute=300))
    async with grpc_client(ingest, key) as client:
        await client.submit(good(request_id="t1", max_tokens=200))  # ~205 tokens
        with pytest.raises(Overloaded) as caught:
            await client.submit(good(request_id="t2", max_tokens=200))
        assert 0 < caught.value.retry_after_s <= 60
        assert caught.value.details.get("quota") == "tokens_per_minute"
        await client.submit(good(request_id="t3", max_tokens=50))  # still fits
    http = openai_client(ingest, key)
    with pytest.raises(openai.RateLimitError) as limited:
        await http.chat.completions.create(
            model="m7b", max_tokens=200, messages=[{"role": "user", "content": "hi"}],
            extra_body={"background": True, "slo_class": "batch-1"})
    assert limited.value.status_code == 429
    assert limited.value.body["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.value.response.headers["retry-after"]) <= 60
