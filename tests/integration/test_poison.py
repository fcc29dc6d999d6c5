"""Poison records on ``qlm.batch.requests``, on real Kafka and real Redis: each one goes to
the DLQ, the consumer carries on with the good records behind it on its partition, and
the other partitions are not held up.

The four records are the ones that used to kill ingest: a JSON value nested 100,000
deep (RecursionError in ``json.loads``), ``max_tokens`` with 5,000 digits (ValueError
from Python's int-digit limit), and invalid records of 800 KB and 900 KB (their dead
letters, with the value in base64, are larger than a Kafka record may be).
``QLM_POISON_RESULT=docs/results/poison_records.json`` also writes what each run saw.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from loadgen.results import write_json
from qlm.bus.records import DeadLetter
from qlm.store.keys import Keys
from qlm.submission import ModelLimits
from services.ingest.app import IngestApp
from services.ingest.settings import IngestSettings

pytestmark = [pytest.mark.redis, pytest.mark.kafka]

MODELS = {"m7b": ModelLimits("m7b", max_model_len=2048, gpus=("H100-80GB",))}
KEYS = Keys()


def good(request_id: str) -> bytes:
    return json.dumps({"request_id": request_id, "model": "m7b", "prompt": "Tell me a story.",
                       "max_tokens": 16, "slo_class": "batch-1"}).encode()


DEPTH = 100_000
POISON: dict[str, tuple[bytes, str | None]] = {
    # name: (record value, the field its dead letter names)
    "nested-100k": (b'{"request_id":"p-deep","model":"m7b","prompt":' + b"[" * DEPTH
                    + b"]" * DEPTH + b',"max_tokens":1}', "record"),
    "max-tokens-5000-digits": (b'{"request_id":"p-digits","model":"m7b","prompt":"hi",'
                               b'"max_tokens":' + b"9" * 5000 + b"}", None),
    "invalid-800kb": (json.dumps({"request_id": "p-800k", "model": "m7b",
                                  "prompt": "x" * 800_000, "max_tokens": 8}).encode(), "prompt"),
    "invalid-900kb": (b'{"request_id":"p-900k",' + b" " * 900_000 + b"oops", "record"),
}


async def read_topic(bootstrap: str, topic: str, until: Callable[[list[Any]], bool],
                     timeout_s: float = 20.0) -> list[Any]:
    """Records of ``topic`` from the beginning until ``until(records)`` or the timeout."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"reader-{uuid.uuid4().hex}",
        auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not until(records):
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def wait_for_keys(client: aioredis.Redis, request_ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    missing = list(request_ids)
    while missing:
        missing = [r for r in missing if not await client.exists(KEYS.request(r))]
        if missing and time.monotonic() > deadline:
            pytest.fail(f"never enqueued: {missing}")
        await asyncio.sleep(0.1)


#: The top-level keys this test writes into its result JSON (loadgen.results).
RESULT_KEYS = frozenset({"command", "records"})


def record_result(name: str, outcome: dict[str, Any]) -> None:
    """With ``QLM_POISON_RESULT=<path>``, add this record's outcome to that JSON file
    (docs/results/poison_records.json is made this way, by the command it holds)."""
    path = os.environ.get("QLM_POISON_RESULT")
    if not path:
        return
    try:
        records = json.loads(Path(path).read_text())["records"]
    except (OSError, ValueError, KeyError):
        records = {}
    write_json(Path(path), {
        "command": f"QLM_POISON_RESULT={path} python -m pytest -q "
                   "tests/integration/test_poison.py",
        "records": {**records, name: outcome}}, RESULT_KEYS)


@pytest.mark.parametrize("name", list(POISON))
async def test_poison_record_goes_to_the_dlq_and_the_consumer_carries_on(
    name: str, redis_url: str, kafka_bootstrap: str, topic_prefix: str,
    raw_redis: aioredis.Redis,
) -> None:
    value, field = POISON[name]
    settings = IngestSettings(
        redis_url=redis_url, kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix,
        host="127.0.0.1", port=0, consumer_group=f"{topic_prefix}ingest", batch_consumer=True,
        serve_grpc=False, max_prompt_bytes=4096, shutdown_grace_s=1.0, log_json=False,
        served_models_timeout_s=0.0, auth="off",
    )
    app = IngestApp(settings, models=MODELS)
    await app.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=2**20)
    await producer.start()
    try:
        topic = app.topics.batch_requests
        poisoned = await producer.send_and_wait(topic, value, key=b"poison", partition=0)
        for partition in range(4):  # behind it on its partition, and on every other one
            await producer.send_and_wait(topic, good(f"ok-{partition}"), partition=partition)
        await wait_for_keys(raw_redis, [f"ok-{p}" for p in range(4)], timeout_s=60)

        letters = await read_topic(kafka_bootstrap, app.topics.dlq, lambda rs: len(rs) >= 1)
        assert len(letters) == 1
        letter = DeadLetter.from_json(letters[0].value)
        assert (letter.topic, letter.partition, letter.offset) == (topic, 0, poisoned.offset)
        if field is not None:
            assert letter.field == field
        else:  # the number is refused as a number, whichever check sees it first
            assert letter.field in ("record", "max_tokens")
        assert letter.value_size == len(value)
        assert letter.value_sha256 == hashlib.sha256(value).hexdigest()
        assert len(letters[0].value) < 1024 * 1024
        if len(value) > 500_000:
            assert letter.truncated
            assert value.startswith(letter.original_value())
        else:
            assert not letter.truncated
            assert letter.original_value() == value
        assert app.consumer is not None and app.consumer.is_running
        for poison_id in ("p-deep", "p-digits", "p-800k", "p-900k"):
            assert not await raw_redis.exists(KEYS.request(poison_id))
        record_result(name, {
            "value_bytes": len(value), "dead_letter_field": letter.field,
            "dead_letter_reason": letter.reason[:120], "dead_letter_bytes": len(letters[0].value),
            "truncated": bool(letter.truncated), "sha256_matches": True,
            "good_records_behind_it_enqueued": 4, "consumer_running_after": True})
    finally:
        await producer.stop()
        await app.stop()

