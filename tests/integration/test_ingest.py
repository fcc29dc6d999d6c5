"""The ingest service on real Redis and real Kafka: gRPC submits, validation, idempotency,
health, batch ingestion through Kafka (exactly once across a killed consumer), the DLQ,
and a Redis restart.

The gRPC server runs in process on a free port; the batch consumer of the kill test
runs as a subprocess (``python -m services.ingest``) so that it can be SIGKILLed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from qlm.api.v1 import qlm_pb2 as pb
from qlm.api.v1 import qlm_pb2_grpc
from qlm.bus.producer import BusProducer
from qlm.bus.records import DeadLetter, Event
from qlm.bus.topics import TopicNames, ensure_topics, topic_specs
from qlm.client import QlmClient
from qlm.core.errors import InvalidInput, NotFound
from qlm.localstack import RedisServer
from qlm.store.keys import Keys
from qlm.submission import ModelLimits
from services.ingest.app import IngestApp
from services.ingest.settings import IngestSettings

pytestmark = [pytest.mark.redis, pytest.mark.kafka]

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"m7b": ModelLimits("m7b", max_model_len=2048, gpus=("H100-80GB",))}
MAX_PROMPT_BYTES = 4096
MAX_MESSAGE_BYTES = 64 * 1024
KEYS = Keys()


def _settings(redis_url: str, kafka: str, topic_prefix: str, **changes: Any) -> IngestSettings:
    values: dict[str, Any] = {
        "redis_url": redis_url, "kafka_bootstrap": kafka, "topic_prefix": topic_prefix,
        "host": "127.0.0.1", "port": 0, "batch_consumer": False,
        "consumer_group": f"{topic_prefix}ingest", "shutdown_grace_s": 1.0,
        "max_prompt_bytes": MAX_PROMPT_BYTES, "max_message_bytes": MAX_MESSAGE_BYTES,
        "log_json": False, "auth": "off",  # tenants and keys: test_tenants.py
        "served_models_timeout_s": 0.0,  # no workers here
    }
    values.update(changes)
    return IngestSettings(**values)


@pytest.fixture
async def ingest(
    redis_url: str, kafka_bootstrap: str, topic_prefix: str
) -> AsyncIterator[IngestApp]:
    app = IngestApp(_settings(redis_url, kafka_bootstrap, topic_prefix), models=MODELS)
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def client(ingest: IngestApp) -> AsyncIterator[QlmClient]:
    async with QlmClient(f"127.0.0.1:{ingest.port}", timeout_s=10) as qlm_client:
        yield qlm_client


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def redis_dump(client: aioredis.Redis) -> dict[bytes, bytes | None]:
    """Every key and its DUMP serialisation: equal dumps mean nothing was written."""
    return {key: await client.dump(key) async for key in client.scan_iter(count=1000)}


async def read_topic(
    bootstrap: str, topic: str, until: Callable[[list[Any]], bool], timeout_s: float = 20.0
) -> list[Any]:
    """Records of ``topic`` from the beginning until ``until(records)`` or the timeout."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"reader-{uuid.uuid4().hex}",
        auto_offset_reset="earliest", enable_auto_commit=False,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not until(records):
            batches = await consumer.getmany(timeout_ms=300)
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


def good(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"model": "m7b", "prompt": "Tell me a story.", "max_tokens": 64}
    record.update(changes)
    return record


# ------------------------------------------------------------------ submit
async def test_submit_writes_record_group_entry_and_admitted_event(
    client: QlmClient, raw_redis: aioredis.Redis, kafka_bootstrap: str, ingest: IngestApp
) -> None:
    reply = await client.submit(good(request_id="req-1", slo_class="batch-1", tenant="t1"))
    assert reply.request_id == "req-1"
    assert reply.state == pb.REQUEST_STATE_QUEUED and not reply.duplicate

    record = await raw_redis.hgetall(KEYS.request("req-1"))
    assert record[b"state"] == b"queued" and record[b"model"] == b"m7b"
    assert record[b"tenant"] == b"t1" and record[b"slo_class"] == b"batch-1"
    group = record[b"group"].decode()
    assert await raw_redis.zscore(KEYS.group(group), "req-1") == pytest.approx(reply.deadline_at)
    assert await raw_redis.zscore(KEYS.groups, group) is not None

    events = await read_topic(
        kafka_bootstrap, ingest.topics.events, lambda rs: len(rs) >= 1
    )
    assert len(events) == 1 and events[0].key == b"req-1"
    event = Event.from_json(events[0].value)
    assert (event.type, event.request_id, event.model, event.slo_class) == (
        "admitted", "req-1", "m7b", "batch-1"
    )

    info = await client.get("req-1")
    assert info.state == pb.REQUEST_STATE_QUEUED and info.group == group
    assert info.slo_class == pb.SLO_CLASS_BATCH_1 and info.ttft_slo_s == 60.0


async def test_submit_without_id_gets_a_generated_one(client: QlmClient) -> None:
    first = await client.submit(good())
    second = await client.submit(good())
    assert first.request_id and second.request_id and first.request_id != second.request_id


def _bad_messages() -> list[tuple[str, pb.SubmitRequest, str]]:
    """(case, message, expected "field: problem" prefix)."""
    def msg(**fields: Any) -> pb.SubmitRequest:
        base: dict[str, Any] = {"model": "m7b", "prompt_text": "hello", "max_tokens": 16}
        base.update(fields)
        return pb.SubmitRequest(**{k: v for k, v in base.items() if v is not None})

    return [
        ("unknown model", msg(model="gpt-9"), "model: unknown model 'gpt-9'"),
        ("missing model", msg(model=None), "model: is required"),
        ("empty prompt", msg(prompt_text=""), "prompt: must not be empty"),
        ("no prompt", msg(prompt_text=None), "prompt: must not be empty"),
        ("empty token ids", msg(prompt_text=None, prompt_token_ids=pb.TokenIds(ids=[])),
         "prompt_token_ids: must not be empty"),
        ("negative token id", msg(prompt_text=None, prompt_token_ids=pb.TokenIds(ids=[5, -1])),
         "prompt_token_ids[1]: must be >= 0"),
        ("max_tokens zero", msg(max_tokens=0), "max_tokens: must be > 0, got 0"),
        ("max_tokens negative", msg(max_tokens=-7), "max_tokens: must be > 0, got -7"),
        # an int64 on the wire: once truncated to int32 (2**32 + 5 read as 5), now refused
        ("max_tokens over int32", msg(max_tokens=2**32 + 5),
         "max_tokens: must be <= 2147483647, got 4294967301"),
        ("token id over int32", msg(prompt_text=None,
                                    prompt_token_ids=pb.TokenIds(ids=[5, 2**31])),
         "prompt_token_ids[1]: must be <= 2147483647"),
        ("top_k over int32", msg(sampling=pb.SamplingParams(top_k=2**40)),
         "sampling.top_k: must be <= 2147483647"),
        ("max_tokens over the model limit", msg(max_tokens=5000),
         "max_tokens: prompt + max_tokens too long for every worker serving model 'm7b': "
         "2 + 5000 = 5002 tokens > max_model_len 2048"),
        ("prompt ids over the model limit",
         msg(prompt_text=None, prompt_token_ids=pb.TokenIds(ids=[1] * 2040), max_tokens=16),
         "max_tokens: prompt + max_tokens too long for every worker serving model 'm7b': "
         "2040 + 16 = 2056"),
        ("prompt alone over the model limit",
         msg(prompt_text=None, prompt_token_ids=pb.TokenIds(ids=[1] * 2048), max_tokens=1),
         "prompt: prompt too long for every worker serving model 'm7b': 2048 prompt tokens"),
        ("custom class without SLO", msg(slo_class=pb.SLO_CLASS_CUSTOM),
         "ttft_slo_s: is required for slo_class 'custom'"),
        ("negative SLO", msg(slo_class=pb.SLO_CLASS_CUSTOM, ttft_slo_s=-2.0),
         "ttft_slo_s: must be > 0, got -2.0"),
        ("zero SLO override", msg(ttft_slo_s=0.0), "ttft_slo_s: must be > 0, got 0.0"),
        ("negative TPOT", msg(tpot_slo_s=-0.1), "tpot_slo_s: must be > 0 when set"),
        ("unknown enum value", msg(slo_class=42), "slo_class: must be one of"),
        ("bad sampling", msg(sampling=pb.SamplingParams(top_p=1.5)),
         "sampling.top_p: must be in (0, 1]"),
        ("bad request id", msg(request_id="has space"), "request_id: must be 1..128 characters"),
        ("oversized prompt", msg(prompt_text="x" * (MAX_PROMPT_BYTES + 1)),
         f"prompt: is {MAX_PROMPT_BYTES + 1} bytes, over the limit of {MAX_PROMPT_BYTES} bytes"),
    ]


async def test_every_bad_input_is_invalid_argument_and_writes_nothing(
    ingest: IngestApp, raw_redis: aioredis.Redis
) -> None:
    await QlmClient(f"127.0.0.1:{ingest.port}").submit(good(request_id="existing"))
    before = await redis_dump(raw_redis)
    assert before, "the store must hold something for the comparison to mean anything"
    failures = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ingest.port}") as channel:
        submit = channel.unary_unary(
            "/qlm.v1.QueueManager/Submit", response_deserializer=pb.SubmitResponse.FromString
        )
        cases = [(name, m.SerializeToString(), want) for name, m, want in _bad_messages()]
        cases += [
            # max_tokens (field 6) sent as a string: wrong type on the wire
            ("wrong wire type", b"\x1a\x03m7b\x22\x02hi\x32\x03ten",
             "max_tokens: has the wrong type on the wire"),
            ("not protobuf", b"\xff\xff\xff\xff", "request: is not a valid protobuf message"),
        ]
        for name, payload, want in cases:
            try:
                await submit(payload, timeout=10)
                failures.append(f"{name}: accepted")
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.INVALID_ARGUMENT or not (
                    error.details() or ""
                ).startswith(want):
                    failures.append(f"{name}: {error.code()} {error.details()!r}")
    assert not failures, "\n".join(failures)
    assert await redis_dump(raw_redis) == before


async def test_message_over_the_transport_limit_is_refused_and_writes_nothing(
    ingest: IngestApp, raw_redis: aioredis.Redis
) -> None:
    before = await redis_dump(raw_redis)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ingest.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await qlm_pb2_grpc.QueueManagerStub(channel).Submit(pb.SubmitRequest(
                model="m7b", prompt_text="y" * (MAX_MESSAGE_BYTES + 10), max_tokens=4
            ))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await redis_dump(raw_redis) == before


async def test_client_raises_invalid_input_naming_the_field(client: QlmClient) -> None:
    with pytest.raises(InvalidInput) as info:
        await client.submit(good(max_tokens=0))
    assert (info.value.field, info.value.problem) == ("max_tokens", "must be > 0, got 0")


async def test_duplicate_submit_is_idempotent(
    client: QlmClient, raw_redis: aioredis.Redis, kafka_bootstrap: str, ingest: IngestApp
) -> None:
    first = await client.submit(good(request_id="dup-1"))
    after_first = await redis_dump(raw_redis)
    again = await client.submit(good(request_id="dup-1"))
    assert again.duplicate and not first.duplicate
    assert (again.request_id, again.state, again.deadline_at) == (
        first.request_id, first.state, first.deadline_at
    )
    assert await redis_dump(raw_redis) == after_first
    with pytest.raises(InvalidInput) as info:  # same id, different payload
        await client.submit(good(request_id="dup-1", max_tokens=65))
    assert info.value.field == "max_tokens"
    assert await redis_dump(raw_redis) == after_first
    events = await read_topic(kafka_bootstrap, ingest.topics.events, lambda rs: False, 3.0)
    assert [r.key for r in events] == [b"dup-1"]


async def test_get_cancel_and_stream_of_a_cancelled_request(client: QlmClient) -> None:
    await client.submit(good(request_id="c-1"))
    cancelled = await client.cancel("c-1")
    assert cancelled.cancelled and cancelled.state == pb.REQUEST_STATE_CANCELLED
    again = await client.cancel("c-1")
    assert not again.cancelled and again.state == pb.REQUEST_STATE_CANCELLED
    chunks = [c async for c in client.stream_tokens("c-1")]
    assert len(chunks) == 1 and chunks[0].final.state == pb.REQUEST_STATE_CANCELLED
    for call in (client.get("nope"), client.cancel("nope")):
        with pytest.raises(NotFound):
            await call
    with pytest.raises(NotFound):
        _ = [c async for c in client.stream_tokens("nope")]


async def test_list_models(client: QlmClient) -> None:
    models = await client.list_models()
    assert [(m.name, m.max_model_len, list(m.gpus)) for m in models] == [
        ("m7b", 2048, ["H100-80GB"])
    ]


async def test_health_serving_and_reflection(ingest: IngestApp) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ingest.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "qlm.v1.QueueManager"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name async for r in responses for s in r.list_services_response.service}
        assert {"qlm.v1.QueueManager", "grpc.health.v1.Health"} <= names


async def test_health_not_serving_when_kafka_does_not_answer(
    redis_url: str, topic_prefix: str, ingest: IngestApp
) -> None:
    ingest.server.probes = (ingest.store.ping, _never)  # type: ignore[union-attr]
    assert not await ingest.server.refresh_health()  # type: ignore[union-attr]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ingest.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def _never() -> bool:
    return False


# ------------------------------------------------------------------ Redis restart
@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
async def test_queue_survives_a_redis_restart(
    client: QlmClient, redis_server: RedisServer, raw_redis: aioredis.Redis, kill: bool
) -> None:
    ids = [f"aof-{i}" for i in range(5)]
    for request_id in ids:
        await client.submit(good(request_id=request_id, slo_class="batch-2"))
    before = await redis_dump(raw_redis)
    if kill:  # appendfsync everysec: what is older than a second is on disk
        await asyncio.sleep(1.5)
    await asyncio.to_thread(redis_server.restart, kill)
    fresh = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await redis_dump(fresh) == before
    finally:
        await fresh.aclose()
    for request_id in ids:  # the running ingest reconnects by itself
        assert (await client.get(request_id)).state == pb.REQUEST_STATE_QUEUED


# ------------------------------------------------------------------ Kafka batch
def _write_batch(path: Path, num_lines: int) -> None:
    with path.open("w") as handle:
        for i in range(num_lines):
            handle.write(json.dumps({"model": "m7b", "prompt": f"item {i}", "max_tokens": 32,
                                     "slo_class": "batch-2"}) + "\n")


def _cli(args: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qlm.cli", *args], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=120,
    )


def _consumer_process(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "services.ingest", "--serve-grpc", "false", "--auth", "off"],
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )


async def _num_queued(client: aioredis.Redis) -> int:
    total = 0
    async for key in client.scan_iter(match=KEYS.group("*"), count=1000):
        total += await client.zcard(key)
    return total


@pytest.mark.slow
async def test_batch_lands_exactly_once_across_a_killed_consumer(
    redis_url: str, kafka_bootstrap: str, topic_prefix: str, raw_redis: aioredis.Redis,
    tmp_path: Path,
) -> None:
    num_lines = 4000
    batch = tmp_path / "jobs.jsonl"
    _write_batch(batch, num_lines)
    models_file = tmp_path / "models.yaml"
    models_file.write_text("models:\n  - {name: m7b, max_model_len: 2048}\n")
    env = {
        **os.environ, "QLM_REDIS_URL": redis_url, "QLM_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "QLM_TOPIC_PREFIX": topic_prefix, "QLM_MODELS_FILE": str(models_file),
        "QLM_CONSUMER_GROUP": f"{topic_prefix}ingest", "QLM_LOG_LEVEL": "warning",
        "PYTHONPATH": str(ROOT), "QLM_SERVED_MODELS_TIMEOUT_S": "0",  # no workers here
    }
    await ensure_topics(kafka_bootstrap, topic_specs(TopicNames(topic_prefix)))
    sent = _cli(["batch", "submit", str(batch)], env)
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["num_sent"] == num_lines

    log_path = tmp_path / "consumer.log"
    first = _consumer_process(env, log_path)
    try:
        deadline = time.monotonic() + 60
        while (queued := await _num_queued(raw_redis)) < num_lines // 10:
            assert first.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"consumer too slow: {queued} queued"
            await asyncio.sleep(0.02)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    at_kill = await _num_queued(raw_redis)
    assert 0 < at_kill < num_lines, f"the kill must land mid-batch, got {at_kill}"

    second = _consumer_process(env, log_path)
    try:
        deadline = time.monotonic() + 90
        while await _num_queued(raw_redis) < num_lines:
            assert second.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "batch did not finish after the restart"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # anything redelivered has been handled by now
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, log_path.read_text()

    assert await _num_queued(raw_redis) == num_lines
    ids = {f"jobs-{n}" for n in range(1, num_lines + 1)}
    records = [key async for key in raw_redis.scan_iter(match=KEYS.request("*"), count=1000)]
    assert {key.decode().removeprefix(KEYS.request("")) for key in records} == ids
    events = await read_topic(
        kafka_bootstrap, TopicNames(topic_prefix).events, lambda rs: len(rs) >= at_kill, 20.0
    )
    keys = [r.key for r in events]
    assert len(keys) == len(set(keys)), "a request was announced twice"

    resent = _cli(["batch", "submit", str(batch)], env)  # re-running the file is a no-op
    assert resent.returncode == 0, resent.stderr


async def test_bad_batch_file_line_is_reported_and_nothing_is_sent(
    tmp_path: Path, kafka_bootstrap: str, topic_prefix: str
) -> None:
    batch = tmp_path / "bad.jsonl"
    batch.write_text(
        json.dumps(good()) + "\n\n" + json.dumps(good(max_tokens="many")) + "\n"
    )
    env = {**os.environ, "QLM_KAFKA_BOOTSTRAP": kafka_bootstrap,
           "QLM_TOPIC_PREFIX": topic_prefix, "PYTHONPATH": str(ROOT)}
    result = _cli(["batch", "submit", str(batch)], env)
    assert result.returncode == 2
    assert f"{batch}:3: max_tokens: must be an integer, got str" in result.stderr
    await ensure_topics(kafka_bootstrap, topic_specs(TopicNames(topic_prefix)))
    sent = await read_topic(
        kafka_bootstrap, TopicNames(topic_prefix).batch_requests, lambda rs: False, 2.0
    )
    assert sent == []


async def test_malformed_batch_records_go_to_the_dlq_and_the_consumer_carries_on(
    redis_url: str, kafka_bootstrap: str, topic_prefix: str, raw_redis: aioredis.Redis
) -> None:
    app = IngestApp(
        _settings(redis_url, kafka_bootstrap, topic_prefix, batch_consumer=True, serve_grpc=False),
        models=MODELS,
    )
    await app.start()
    try:
        before = await redis_dump(raw_redis)
        topics = app.topics
        bad = [
            (b"b-1", json.dumps({"request_id": "b-1", **good(max_tokens="ten")}).encode(),
             "max_tokens"),
            (b"b-2", b"{not json", "record"),
            (b"b-3", json.dumps(good()).encode(), "request_id"),
            (b"b-4", json.dumps({"request_id": "b-4", **good(model="nope")}).encode(), "model"),
            (b"b-5", json.dumps({"v": 9, "request_id": "b-5", **good()}).encode(), "v"),
        ]
        async with BusProducer(kafka_bootstrap) as producer:
            for key, value, _ in bad:
                await producer.publish_raw(topics.batch_requests, value, key)
            await producer.publish_raw(
                topics.batch_requests,
                json.dumps({"request_id": "ok-1", **good()}).encode(), b"ok-1",
            )
        letters = await read_topic(
            kafka_bootstrap, topics.dlq, lambda rs: len(rs) >= len(bad), 30.0
        )
        decoded = {
            base64.b64decode(d.key_b64 or ""): d
            for d in (DeadLetter.from_json(r.value) for r in letters)
        }
        assert {k: d.field for k, d in decoded.items()} == {k: f for k, _, f in bad}
        assert {k: d.original_value() for k, d in decoded.items()} == {k: v for k, v, _ in bad}
        assert "must be an integer, got str" in decoded[b"b-1"].reason
        deadline = time.monotonic() + 20
        while not await raw_redis.exists(KEYS.request("ok-1")):
            assert time.monotonic() < deadline, "the good record after the bad ones never landed"
            await asyncio.sleep(0.05)
        after = await redis_dump(raw_redis)
        assert set(after) - set(before) == {
            KEYS.request("ok-1").encode(),
            *[k for k in after if k.startswith(KEYS.group("").encode())],
            KEYS.groups.encode(),
            KEYS.queue_log.encode(),
        }
        assert await _num_queued(raw_redis) == 1
    finally:
        await app.stop()


# ------------------------------------------------------------------ store batch enqueue
async def test_enqueue_many_answers_like_one_enqueue_per_item(redis_url: str) -> None:
    from qlm.core.types import SLO, Request, SLOClass
    from qlm.store.store import RedisQueueStore

    store = RedisQueueStore.from_url(redis_url)
    try:
        def request(request_id: str, max_tokens: int = 8) -> Request:
            return Request(request_id, "m7b", 4, max_tokens, SLOClass.BATCH_1, SLO(60.0), 100.0)

        first = await store.enqueue(request("a"), prompt="p")
        flusher = aioredis.Redis.from_url(redis_url)
        await flusher.script_flush()  # the batch must load the script again by itself
        await flusher.aclose()
        results = await store.enqueue_many([
            (request("a"), "p", None),       # exists, same payload
            (request("b"), "p", {"seed": 1}),  # new
            (request("a", 9), "p", None),    # exists, different payload
            (request("c"), "p", []),         # params not a mapping
        ])
        assert [type(r).__name__ for r in results] == [
            "EnqueueResult", "EnqueueResult", "IdempotencyConflict", "InvalidInput"
        ]
        assert not results[0].created and results[0].record.id == first.record.id  # type: ignore[union-attr]
        assert results[1].created  # type: ignore[union-attr]
        assert (await store.get("b")).params == {"seed": 1}
        assert results[2].field == "max_tokens"  # type: ignore[union-attr]
        with pytest.raises(NotFound):
            await store.get("c")
    finally:
        await store.aclose()


# ------------------------------------------------------------------ the process
def _free_port() -> int:
    from qlm.localstack import free_loopback_port

    return free_loopback_port()


async def test_ingest_process_serves_then_stops_gracefully_on_sigterm(
    redis_url: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps({"models": [{"name": "m7b", "max_model_len": 2048}]}))
    port = _free_port()
    log_path = tmp_path / "ingest.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.ingest", "--host", "127.0.0.1", "--port", str(port),
             "--redis-url", redis_url, "--kafka-bootstrap", kafka_bootstrap,
             "--topic-prefix", topic_prefix, "--models-file", str(models_file),
             "--batch-consumer", "false", "--shutdown-grace-s", "2", "--auth", "off",
             "--served-models-timeout-s", "0"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(
                health_pb2.HealthCheckRequest(), timeout=60, wait_for_ready=True
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with QlmClient(f"127.0.0.1:{port}") as qlm_client:
            assert (await qlm_client.submit(good(request_id="proc-1"))).request_id == "proc-1"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert events.index("signal_received") < events.index("ingest_stopping") < events.index(
        "ingest_stopped"
    )
    assert all(line.get("service") == "ingest" for line in lines)


def test_ingest_refuses_a_bad_flag_naming_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.ingest", "--port", "70000"], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "error: port: Input should be less than or equal to 65535" in result.stderr


# ------------------------------------------------------------------ token streaming
async def test_stream_tokens_follows_the_worker_from_an_index_to_the_end(
    client: QlmClient, ingest: IngestApp
) -> None:
    from qlm.core.types import RequestState

    await client.submit(good(request_id="s-1", max_tokens=8))
    store = ingest.store
    assert [r.id for r in await store.claim("w1", ["s-1"])] == ["s-1"]
    await store.append_tokens("w1", "s-1", text="ab", token_ids=[1, 2])

    async def follow(from_index: int) -> list[pb.TokenChunk]:
        return [c async for c in client.stream_tokens("s-1", from_index=from_index)]

    from_start = asyncio.create_task(follow(0))
    from_three = asyncio.create_task(follow(3))
    await asyncio.sleep(0.3)  # both are waiting on the stream now
    await store.append_tokens("w1", "s-1", text="cde", token_ids=[3, 4, 5])
    await store.ack("w1", "s-1", RequestState.FINISHED, num_generated=5)
    chunks = await asyncio.wait_for(from_start, 20)
    assert [(c.index, list(c.token_ids), c.text) for c in chunks[:-1]] == [
        (0, [1, 2], "ab"), (2, [3, 4, 5], "cde")
    ]
    final = chunks[-1].final
    assert (final.state, final.num_generated) == (pb.REQUEST_STATE_FINISHED, 5)
    later = await asyncio.wait_for(from_three, 20)
    assert [(c.index, list(c.token_ids)) for c in later[:-1]] == [(3, [4, 5])]
    assert later[-1].final.state == pb.REQUEST_STATE_FINISHED
    info = await client.get("s-1")
    assert (info.state, info.num_generated, info.worker_id) == (
        pb.REQUEST_STATE_FINISHED, 5, "w1"
    )
    assert info.first_token_at > 0 and info.finished_at >= info.first_token_at


# ------------------------------------------------------------------ CLI
async def test_cli_submit_status_cancel_and_models(ingest: IngestApp) -> None:
    env = {**os.environ, "QLM_TARGET": f"127.0.0.1:{ingest.port}", "PYTHONPATH": str(ROOT)}

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(_cli, args, env)

    submitted = await cli("submit", "--model", "m7b", "--prompt", "hi", "--max-tokens", "4",
                          "--slo-class", "custom", "--ttft-slo-s", "2.5", "--id", "cli-1")
    assert submitted.returncode == 0, submitted.stderr
    assert json.loads(submitted.stdout)["request_id"] == "cli-1"
    status = await cli("status", "cli-1")
    info = json.loads(status.stdout)
    assert (info["state"], info["slo_class"], info["ttft_slo_s"]) == (
        "REQUEST_STATE_QUEUED", "SLO_CLASS_CUSTOM", 2.5
    )
    cancelled = await cli("cancel", "cli-1")
    assert json.loads(cancelled.stdout)["state"] == "REQUEST_STATE_CANCELLED"
    models = await cli("models")
    assert [m["name"] for m in json.loads(models.stdout)] == ["m7b"]
    bad = await cli("submit", "--model", "m7b", "--prompt", "hi", "--max-tokens", "0")
    assert bad.returncode == 2 and "max_tokens: must be > 0, got 0" in bad.stderr
    missing = await cli("status", "nope")
    assert missing.returncode == 1 and "request 'nope' not found" in missing.stderr


@contextlib.asynccontextmanager
async def reporting_worker(app: IngestApp, producer: BusProducer, worker: str, gpu: str
                           ) -> AsyncIterator[None]:
    """A worker holding m7b alone, heard by ``app`` (telemetry every 0.5 s, as a worker
    reports) from entry until exit."""
    from qlm.bus.records import Telemetry

    async def heartbeat() -> None:
        while True:
            await producer.publish(app.topics.telemetry, Telemetry(
                worker=worker, gpu=gpu, at=time.time(), model="m7b", models=("m7b",),
                batch_size=0, kv_used_fraction=0.0, step_time_predicted_s=0.0,
                step_time_observed_s=0.0, num_steps=0))
            await asyncio.sleep(0.5)

    beating = asyncio.create_task(heartbeat())
    try:
        deadline = time.monotonic() + 30
        while not app.served.known():
            assert time.monotonic() < deadline, "no telemetry heard"
            await asyncio.sleep(0.1)
        yield
    finally:
        beating.cancel()


async def test_two_ingest_processes_share_a_port_and_stop_together(
    redis_url: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path,
    raw_redis: aioredis.Redis,
) -> None:
    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps({"models": [{"name": "m7b", "max_model_len": 2048}]}))
    port = _free_port()
    with (tmp_path / "ingest.log").open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.ingest", "--processes", "2", "--host", "127.0.0.1",
             "--port", str(port), "--redis-url", redis_url, "--kafka-bootstrap", kafka_bootstrap,
             "--topic-prefix", topic_prefix, "--models-file", str(models_file),
             "--batch-consumer", "false", "--shutdown-grace-s", "1", "--auth", "off",
             "--served-models-timeout-s", "0"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while (tmp_path / "ingest.log").read_text().count('"ingest_listening"') < 2:
            assert process.poll() is None and time.monotonic() < deadline, (
                tmp_path / "ingest.log"
            ).read_text()
            await asyncio.sleep(0.1)
        for i in range(8):  # a new channel each time: the kernel picks a process per connection
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=60, wait_for_ready=True
                )
            async with QlmClient(f"127.0.0.1:{port}") as qlm_client:
                await qlm_client.submit(good(request_id=f"mp-{i}"))
        assert await _num_queued(raw_redis) == 8
        children = _child_pids(process.pid)
        assert len(children) >= 1
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 60) == 0
        log_text = (tmp_path / "ingest.log").read_text()
        assert log_text.count('"ingest_listening"') == 2, log_text
        assert log_text.count('"ingest_stopped"') == 2, log_text
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children):  # the resource tracker exits after us
            assert time.monotonic() < deadline, "a child of the ingest process outlived it"
            await asyncio.sleep(0.1)
    finally:
        if process.poll() is None:
            process.kill()


def _child_pids(pid: int) -> list[int]:
    return [
        int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
        if _ppid(stat) == pid
    ]


def _ppid(stat: Path) -> int:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# ------------------------------------------------------------------ models nobody serves
async def test_a_model_no_worker_serves_is_refused_and_not_listed(
    redis_url: str, kafka_bootstrap: str, topic_prefix: str, raw_redis: aioredis.Redis
) -> None:

    catalogue = {**MODELS, "m13b": ModelLimits("m13b", max_model_len=2048)}
    app = IngestApp(_settings(redis_url, kafka_bootstrap, topic_prefix, batch_consumer=True,
                              served_models_timeout_s=5.0), models=catalogue)
    await app.start()
    try:
        # one worker holding m7b only, as a worker reports
        async with (BusProducer(kafka_bootstrap) as producer,
                    reporting_worker(app, producer, "w-0", "H100-80GB")):
            async with QlmClient(f"127.0.0.1:{app.port}", timeout_s=10) as client:
                assert [m.name for m in await client.list_models()] == ["m7b"]
                assert (await client.submit(good(request_id="served-1"))).request_id
                async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                    stub = qlm_pb2_grpc.QueueManagerStub(channel)
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await stub.Submit(pb.SubmitRequest(
                            request_id="unserved-1", model="m13b", prompt_text="hi",
                            max_tokens=4))
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert (refused.value.details() or "").startswith(
                "model: no worker serves 'm13b' now; served models: m7b")
            await producer.publish_raw(app.topics.batch_requests, json.dumps(
                {"request_id": "unserved-2", **good(model="m13b")}).encode(), b"u")
            letters = await read_topic(kafka_bootstrap, app.topics.dlq,
                                       lambda rs: len(rs) >= 1, 30.0)
        letter = DeadLetter.from_json(letters[0].value)
        assert letter.field == "model" and "no worker serves 'm13b'" in letter.reason
        assert await raw_redis.exists(KEYS.request("served-1"))
        assert not await raw_redis.exists(KEYS.request("unserved-1"))
        assert not await raw_redis.exists(KEYS.request("unserved-2"))
    finally:
        await app.stop()


# ------------------------------------------------------------------ requests no worker fits
async def test_a_request_too_long_for_every_live_worker_is_refused_naming_the_field(
    redis_url: str, kafka_bootstrap: str, topic_prefix: str, raw_redis: aioredis.Redis
) -> None:
    """The catalogue knows m7b on two GPU types; only an A10 worker (KV cache of 3,000
    tokens) holds it: a 3,050-token request that an H100 could take is refused, on gRPC
    (INVALID_ARGUMENT naming max_tokens, the model and the limit) and on Kafka (a dead
    letter), and nothing is written (qlm.core.fit, the simulator's check too)."""
    from qlm.core.fit import SequenceLimit

    catalogue = {"m7b": ModelLimits("m7b", 32768, ("A10-24GB", "H100-80GB"),
                                    (SequenceLimit(32768, 3000), SequenceLimit(16384, 400_000)))}
    app = IngestApp(_settings(redis_url, kafka_bootstrap, topic_prefix, batch_consumer=True,
                              served_models_timeout_s=5.0), models=catalogue)
    await app.start()
    long_ids = [7] * 2950
    try:
        async with (BusProducer(kafka_bootstrap) as producer,
                    reporting_worker(app, producer, "w-a10", "A10-24GB")):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
                stub = qlm_pb2_grpc.QueueManagerStub(channel)
                fits = await stub.Submit(pb.SubmitRequest(
                    request_id="fits-1", model="m7b",
                    prompt_token_ids=pb.TokenIds(ids=[7] * 2900), max_tokens=100))
                assert fits.state == pb.REQUEST_STATE_QUEUED
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Submit(pb.SubmitRequest(
                        request_id="long-1", model="m7b",
                        prompt_token_ids=pb.TokenIds(ids=long_ids), max_tokens=100))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details() == (
                "max_tokens: prompt + max_tokens too long for every worker serving model "
                "'m7b': 2950 + 100 = 3050 tokens > KV capacity 3000")
            await producer.publish_raw(app.topics.batch_requests, json.dumps(
                {"request_id": "long-2", "model": "m7b", "prompt_token_ids": long_ids,
                 "max_tokens": 100}).encode(), b"l")
            letters = await read_topic(kafka_bootstrap, app.topics.dlq,
                                       lambda rs: len(rs) >= 1, 30.0)
        letter = DeadLetter.from_json(letters[0].value)
        assert letter.field == "max_tokens" and "> KV capacity 3000" in letter.reason
        assert await raw_redis.exists(KEYS.request("fits-1"))
        assert not await raw_redis.exists(KEYS.request("long-1"))
        assert not await raw_redis.exists(KEYS.request("long-2"))
    finally:
        await app.stop()
