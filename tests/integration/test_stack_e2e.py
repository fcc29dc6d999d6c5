"""The whole stack end to end: the four services as processes on real Redis and real Kafka.

Two simulated workers (A100s holding mistral-7b and vicuna-13b, 20× faster than the
GPUs) serve mixed traffic: interactive requests through gRPC (Submit + StreamTokens)
and batch requests as records on ``qlm.batch.requests``. Every request must finish
exactly once (one ``finished`` event per id on ``qlm.events``), every interactive one
must stream all its tokens to the client, and a cancelled running request must stop.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from event_log import EventLog

from qlm.api.v1 import qlm_pb2 as pb
from qlm.bus.topics import TopicNames
from qlm.client import QlmClient
from qlm.localstack.services import ServiceStack
from qlm.tenants import SIGNATURE_HEADER, scoped_id, sign_record, signing_key
from tests.integration.stack_helpers import running_stack

pytestmark = [pytest.mark.redis, pytest.mark.kafka, pytest.mark.slow]

MODELS = ("mistral-7b", "vicuna-13b")
NUM_INTERACTIVE = 12
NUM_BATCH = 24
TIME_SCALE = 20.0
WAIT_S = 40.0


@pytest.fixture
def services(tmp_path: Path, redis_url: str, kafka_bootstrap: str,
             topic_prefix: str) -> Iterator[ServiceStack]:
    workers = ("workers:\n"
               "  - {id: e2e-0, gpu: A100-80GB, models: [mistral-7b, vicuna-13b]}\n"
               "  - {id: e2e-1, gpu: A100-80GB, models: [vicuna-13b, mistral-7b]}\n")
    with running_stack(tmp_path, redis_url, kafka_bootstrap, workers, policy="qlm",
                       time_scale=TIME_SCALE, admission="interactive=queue", group_window_s=0.2,
                       tick_s=0.25, topic_prefix=topic_prefix, secure=True) as stack:
        yield stack


@pytest.fixture
async def event_log(services: ServiceStack, kafka_bootstrap: str,
                    topic_prefix: str) -> AsyncIterator[EventLog]:
    log = EventLog(kafka_bootstrap, TopicNames(topic_prefix).events)
    await log.start()
    yield log
    await log.stop()


def record(request_id: str, i: int, slo_class: str, max_tokens: int) -> dict[str, Any]:
    return {"request_id": request_id, "model": MODELS[i % 2],
            "prompt_token_ids": list(range(1, 40 + 7 * i)), "max_tokens": max_tokens,
            "slo_class": slo_class, "sampling": {"ignore_eos": True}}


async def stream_all(client: QlmClient, request_id: str) -> tuple[int, int]:
    """(tokens received, final state) of one request's stream."""
    num_tokens, state = 0, -1
    async for chunk in client.stream_tokens(request_id):
        num_tokens += len(chunk.token_ids)
        if chunk.HasField("final"):
            state = chunk.final.state
    return num_tokens, state


async def wait_for(condition: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.2)
    return condition()


async def test_mixed_traffic_finishes_exactly_once_and_cancel_stops(
    services: ServiceStack, event_log: EventLog, kafka_bootstrap: str, topic_prefix: str,
) -> None:
    interactive = {f"i{i:03d}": record(f"i{i:03d}", i, "interactive", 20 + 5 * i)
                   for i in range(NUM_INTERACTIVE)}
    batch = {f"b{i:03d}": record(f"b{i:03d}", i, "batch-1" if i % 2 else "batch-2", 30 + 3 * i)
             for i in range(NUM_BATCH)}
    env = services.client_environment()  # TLS, and the development tenant's API key
    tenant, api_key = env["QLM_TENANT"], env["QLM_API_KEY"]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        values = {rid: json.dumps({**r, "tenant": tenant}).encode() for rid, r in batch.items()}
        await asyncio.gather(*(
            producer.send_and_wait(TopicNames(topic_prefix).batch_requests, value,
                                   key=rid.encode(), headers=[(
                                       SIGNATURE_HEADER,
                                       sign_record(value, signing_key(api_key)).encode())])
            for rid, value in values.items()))
    finally:
        await producer.stop()

    def stored(request_id: str) -> str:  # events name requests by their stored id
        return scoped_id(tenant, request_id)

    async with QlmClient(services.ingest_addr, api_key=api_key,
                         tls_ca=env["QLM_TLS_CA"]) as client:
        for r in interactive.values():
            await client.submit(r)
        streamed = dict(zip(interactive, await asyncio.gather(
            *(stream_all(client, rid) for rid in interactive)), strict=True))

        # a long request, cancelled once it runs: it must stop short of max_tokens
        long = record("long", 1, "interactive", 3800)
        await client.submit(long)
        async for chunk in client.stream_tokens("long"):
            if chunk.token_ids:
                break
        await client.cancel("long")
        assert await wait_for(lambda: event_log.count("cancelled")[stored("long")] == 1, 15)
        info = await client.get("long")

        everything = {stored(rid) for rid in (*interactive, *batch)}
        assert await wait_for(lambda: set(event_log.count("finished")) >= everything,
                              WAIT_S), sorted(everything - set(event_log.count("finished")))
        await asyncio.sleep(1.0)  # a duplicate would show up by now
        long_after = await client.get("long")

    finished = event_log.count("finished")
    assert {rid: n for rid, n in finished.items() if n != 1} == {}
    assert set(finished) == everything  # "long" never finished
    for rid, r in interactive.items():
        assert streamed[rid] == (r["max_tokens"], pb.REQUEST_STATE_FINISHED), rid
    assert info.state == pb.REQUEST_STATE_CANCELLED
    assert 0 < info.num_generated < long["max_tokens"]
    assert long_after.num_generated == info.num_generated  # nothing ran after the cancel
    workers_used = {e.get("worker") for e in event_log.events if e["type"] == "finished"}
    assert workers_used == {"e2e-0", "e2e-1"}

    # The OpenAI front door of the secure stack: HTTPS, trusted through QLM_TLS_CA.
    import openai

    assert services.openai_base_url.startswith("https://")
    http = openai.AsyncOpenAI(
        base_url=services.openai_base_url, api_key=api_key, max_retries=0, timeout=10,
        http_client=openai.DefaultAsyncHttpxClient(
            verify=ssl.create_default_context(cafile=env["QLM_TLS_CA"])))
    assert set(MODELS) <= {m.id for m in (await http.models.list()).data}
