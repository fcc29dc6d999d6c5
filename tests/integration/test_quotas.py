"""Per-tenant quotas on every admission line, on real Redis and Kafka
(services/ingest/quotas.py): gRPC and HTTP over a limit → RESOURCE_EXHAUSTED / 429 with a
retry-after, nothing queued; ``qlm.batch.requests`` records and Batch API lines over a
limit wait (parked in Redis / the batch's cursor held: no dead letter, no error line,
nothing lost) and are queued when they fit; another tenant is not held up."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from qlm.bus.producer import BusProducer
from qlm.core.errors import Overloaded
from qlm.localstack import free_loopback_port
from qlm.tenants import (
    SIGNATURE_HEADER,
    TenantLimits,
    TenantRegistry,
    scoped_id,
    sign_record,
    signing_key,
)
from services.ingest.app import IngestApp
from services.ingest.openai.batches import request_id_for
from services.ingest.quotas import QuotaGate
from services.ingest.settings import IngestSettings
from tests.integration.test_ingest import read_topic
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


def mid_minute(app: IngestApp) -> float:
    """Pin ``app``'s quota clock 20 s into the current minute, so that a test of the
    tokens-per-minute window (a wall-clock minute) never straddles two of them however
    slow the machine; returns the pinned time."""
    gate = app.plane.quotas
    assert isinstance(gate, QuotaGate)
    pinned = time.time() // 60 * 60 + 20.0
    gate.clock = lambda: pinned
    return pinned


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


async def test_concurrent_submits_cannot_overrun_max_queued(
    ingest: IngestApp, tenants: TenantRegistry  # noqa: F811
) -> None:
    """Bookings whose enqueue is still in flight count: 20 submits at once, 3 admitted."""
    key = await tenants.add("burst")
    await tenants.set_limits("burst", TenantLimits(max_queued=3))
    async with grpc_client(ingest, key) as client:
        results = await asyncio.gather(*(client.submit(good(request_id=f"b{i}"))
                                         for i in range(20)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(results) - len(refused) == 3
    assert all(isinstance(r, Overloaded) for r in refused), refused


async def test_tokens_per_minute_refuses_with_the_seconds_to_the_next_minute(
    ingest: IngestApp, tenants: TenantRegistry  # noqa: F811
) -> None:
    import openai

    pinned = mid_minute(ingest)
    key = await tenants.add("metered")
    await tenants.set_limits("metered", TenantLimits(tokens_per_minute=300))
    async with grpc_client(ingest, key) as client:
        await client.submit(good(request_id="t1", max_tokens=200))  # ~205 tokens
        with pytest.raises(Overloaded) as caught:
            await client.submit(good(request_id="t2", max_tokens=200))
        assert caught.value.retry_after_s == pytest.approx(60 - pinned % 60)  # to the next minute
        assert caught.value.details.get("quota") == "tokens_per_minute"
        await client.submit(good(request_id="t3", max_tokens=50))  # still fits
    http = openai_client(ingest, key)
    with pytest.raises(openai.RateLimitError) as limited:
        await http.chat.completions.create(
            model="m7b", max_tokens=200, messages=[{"role": "user", "content": "hi"}],
            extra_body={"background": True, "slo_class": "batch-1"})
    assert limited.value.status_code == 429
    assert limited.value.body["code"] == "rate_limit_exceeded"
    assert limited.value.response.headers["retry-after"] == "40"


# ------------------------------------------------------------------ batch lines
def _batch_settings(redis_url: str, kafka_bootstrap: str, topic_prefix: str,
                    **changes: Any) -> IngestSettings:
    return IngestSettings(**{
        "redis_url": redis_url, "kafka_bootstrap": kafka_bootstrap,
        "topic_prefix": topic_prefix, "host": "127.0.0.1", "port": 0, "batch_consumer": True,
        "consumer_group": f"{topic_prefix}ingest", "shutdown_grace_s": 0.5, "log_json": False,
        "auth": "required", "auth_cache_s": 0.0, "http_host": "127.0.0.1",
        "http_port": free_loopback_port(), "batch_poll_interval_s": 0.1,
        "served_models_timeout_s": 0, **changes})


@pytest.fixture
async def batch_ingest(redis_url: str, kafka_bootstrap: str,
                       topic_prefix: str) -> AsyncIterator[IngestApp]:
    """Ingest with the qlm.batch.requests consumer and a fast Batch API driver."""
    app = IngestApp(_batch_settings(redis_url, kafka_bootstrap, topic_prefix), models=MODELS)
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def still_ingest(redis_url: str, kafka_bootstrap: str,
                       topic_prefix: str) -> AsyncIterator[IngestApp]:
    """As batch_ingest, but its parked records move only when a test calls drain()."""
    app = IngestApp(_batch_settings(redis_url, kafka_bootstrap, topic_prefix,
                                    parked_retry_s=3600.0), models=MODELS)
    await app.start()
    yield app
    await app.stop()


async def _produce_signed(app: IngestApp, api_key: str, tenant: str,
                          records: list[dict[str, Any]]) -> None:
    s = app.settings
    async with BusProducer(s.kafka_bootstrap, client_id=f"t-{uuid.uuid4().hex[:6]}") as producer:
        for record in records:
            value = json.dumps({**record, "tenant": tenant}).encode()
            await producer.publish_raw(
                app.topics.batch_requests, value, record["request_id"].encode(),
                [(SIGNATURE_HEADER, sign_record(value, signing_key(api_key)).encode())])


async def _stored(app: IngestApp, stored_ids: list[str]) -> set[str]:
    states = await app.store.states(stored_ids)
    return {i for i, state in states.items() if state is not None}


async def _until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(0.1)
    return await condition()


async def test_kafka_batch_records_over_quota_wait_parked_and_hold_up_no_one(
    batch_ingest: IngestApp, tenants: TenantRegistry  # noqa: F811
) -> None:
    """Over max_queued: the records wait, parked in Redis (no dead letter, nothing lost),
    while another tenant's records behind them on the same partitions are queued at once;
    they are queued in order as the tenant's requests end. Over tokens per minute
    likewise, once the limit is raised."""
    app = batch_ingest
    assert app.consumer is not None and app.consumer.parking is not None
    key = await tenants.add("kq")
    other = await tenants.add("kfree")
    await tenants.set_limits("kq", TenantLimits(max_queued=2))
    ids = [f"k{i}" for i in range(6)]
    await _produce_signed(app, key, "kq", [good(request_id=i) for i in ids])
    await _produce_signed(app, other, "kfree", [good(request_id=f"f{i}") for i in range(4)])
    stored = [scoped_id("kq", i) for i in ids]
    free = [scoped_id("kfree", f"f{i}") for i in range(4)]
    assert await _until(lambda: _has(app, free, 4))  # not held up by kq's waiting records
    assert await _until(lambda: _has(app, stored, 2))
    assert await app.consumer.parking.count("kq") == 4
    await asyncio.sleep(1.5)
    assert len(await _stored(app, stored)) == 2  # still two: the limit holds
    assert app.consumer.num_dead_letters == 0
    for admitted in (3, 4):  # one ends: the oldest parked one gets in, in order
        (oldest,) = await app.consumer.parking.oldest("kq", 1)
        before = await _stored(app, stored)
        await app.plane.cancel(min(await _live(app, stored)))
        assert await _until(lambda n=admitted: _has(app, stored, n))
        assert await _stored(app, stored) == before | {oldest.stored_id}
    # the drain queues a parked record, then unparks it (queueing is idempotent by id, so
    # a crash in between queues it once): the count follows a moment after
    assert await _until(lambda: _parked(app, "kq", 2))
    for request_id in await _live(app, stored):
        await app.plane.cancel(request_id)
    assert await _until(lambda: _has(app, stored, 6)), await _stored(app, stored)
    assert await app.consumer.parking.count("kq") == 0
    assert "kq" not in await app.consumer.parking.tenants()

    await tenants.set_limits("kq", TenantLimits(tokens_per_minute=300))
    mid_minute(app)
    await _produce_signed(app, key, "kq", [good(request_id="t1", max_tokens=200),
                                           good(request_id="t2", max_tokens=200)])
    tokens = [scoped_id("kq", "t1"), scoped_id("kq", "t2")]
    assert await _until(lambda: _has(app, tokens, 1))
    await asyncio.sleep(1.5)
    assert await _stored(app, tokens) == {tokens[0]}  # t2 waits for the next minute ...
    await tenants.set_limits("kq", TenantLimits(tokens_per_minute=10_000))
    assert await _until(lambda: _has(app, tokens, 2), timeout_s=15)  # ... or a higher limit
    assert app.consumer.num_dead_letters == 0
    letters = await read_topic(app.settings.kafka_bootstrap, app.topics.dlq,
                               lambda r: len(r) > 0, timeout_s=2.0)
    assert letters == []


async def test_a_record_parked_twice_is_parked_once_and_its_tenant_leaves_with_the_last(
    still_ingest: IngestApp,
) -> None:
    from services.ingest.parking import ParkedRecord

    assert still_ingest.consumer is not None and still_ingest.consumer.parking is not None
    parking = still_ingest.consumer.parking
    record = ParkedRecord("p/r1", b'{"x": 1}', b"r1", "topic", 3, 42)
    assert await parking.park("p", record)
    assert not await parking.park("p", record)  # delivered again after a restart
    assert await parking.count("p") == 1 and await parking.holds("p")
    assert await parking.oldest("p", 10) == [record]
    await parking.remove("p", "p/r1")
    assert not await parking.holds("p") and "p" not in await parking.tenants()


async def _live(app: IngestApp, stored_ids: list[str]) -> set[str]:
    """The ids queued or running (stored and not ended)."""
    states = await app.store.states(stored_ids)
    return {i for i, state in states.items() if state is not None and not state.is_terminal}


async def _has(app: IngestApp, stored_ids: list[str], count: int) -> bool:
    return len(await _stored(app, stored_ids)) >= count


async def _parked(app: IngestApp, tenant: str, count: int) -> bool:
    assert app.consumer is not None and app.consumer.parking is not None
    return await app.consumer.parking.count(tenant) == count


async def test_batch_api_lines_over_quota_wait_and_every_line_runs_once(
    batch_ingest: IngestApp, tenants: TenantRegistry  # noqa: F811
) -> None:
    """A Batch API batch of a tenant limited to 2 queued requests: never more than 2 of
    its lines queued at once, the others wait (no error line for them), and every line
    gets in as earlier ones end; the batch completes with one result per line."""
    app = batch_ingest
    key = await tenants.add("bq")
    await tenants.set_limits("bq", TenantLimits(max_queued=2))
    client = openai_client(app, key)
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "m7b", "max_tokens": 4,
                       "messages": [{"role": "user", "content": f"hi {i}"}]}}
             for i in range(5)]
    uploaded = await client.files.create(
        file=("in.jsonl", "\n".join(json.dumps(line) for line in lines).encode()),
        purpose="batch")
    batch = await client.batches.create(input_file_id=uploaded.id,
                                        endpoint="/v1/chat/completions", completion_window="24h")
    ids = [request_id_for(batch.id, f"c{i}") for i in range(5)]
    seen: set[str] = set()
    most_live = 0
    deadline = time.monotonic() + 40
    while len(seen) < 5 and time.monotonic() < deadline:
        states = await app.store.states(ids)
        live = [i for i, state in states.items() if state is not None and not state.is_terminal]
        most_live = max(most_live, len(live))
        seen |= {i for i, state in states.items() if state is not None}
        for request_id in live[:1]:  # as a worker would: one ends, room for the next
            await asyncio.sleep(0.3)
            await app.plane.cancel(request_id)
        await asyncio.sleep(0.1)
    assert seen == set(ids)
    assert most_live == 2
    for _ in range(100):
        done = await client.batches.retrieve(batch.id)
        if done.status == "completed":
            break
        await asyncio.sleep(0.2)
    assert done.status == "completed" and done.request_counts is not None
    assert done.request_counts.total == 5
    assert done.error_file_id is not None
    errors = [json.loads(line) for line in
              (await client.files.content(done.error_file_id)).text.splitlines()]
    assert sorted(e["custom_id"] for e in errors) == [f"c{i}" for i in range(5)]
    assert not any("quota" in json.dumps(e) or "rate_limit" in json.dumps(e) for e in errors)


async def test_a_parked_record_no_longer_valid_goes_to_the_dlq_with_its_origin(
    still_ingest: IngestApp,
) -> None:
    from qlm.bus.records import DeadLetter
    from services.ingest.parking import ParkedRecord

    assert still_ingest.consumer is not None and still_ingest.consumer.parking is not None
    parking = still_ingest.consumer.parking
    value = json.dumps(good(request_id="gone", model="no-such-model", tenant="z")).encode()
    await parking.park("z", ParkedRecord("z/gone", value, b"gone", "the-topic", 2, 17))
    await still_ingest.consumer.drain()
    assert not await parking.holds("z")
    letters = await read_topic(still_ingest.settings.kafka_bootstrap, still_ingest.topics.dlq,
                               lambda r: len(r) > 0)
    (letter,) = [DeadLetter.from_json(r.value) for r in letters]
    assert (letter.topic, letter.partition, letter.offset) == ("the-topic", 2, 17)
    assert letter.field == "model" and letter.original_value() == value
