"""Replicated Kafka: qlm's topics on a three-node KRaft cluster (three replicas, two in
sync required), and a batch flowing through the ingest batch consumer while the broker
leading most of its partitions is SIGKILLed — every request lands once in Redis and is
announced once on ``qlm.events``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from qlm.bus.producer import BusProducer
from qlm.bus.topics import TopicNames, ensure_topics, topic_specs, until_described
from qlm.localstack import KafkaCluster
from qlm.store.keys import Keys
from qlm.submission import ModelLimits
from services.ingest.app import IngestApp
from services.ingest.settings import IngestSettings

pytestmark = [pytest.mark.redis, pytest.mark.kafka, pytest.mark.slow]

MODELS = {"m7b": ModelLimits("m7b", max_model_len=2048, gpus=("H100-80GB",))}
NUM_RECORDS = 3000
KEYS = Keys()


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


async def describe(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """The partitions of ``topic`` as the cluster reports them (leader, replicas, ISR),
    once the broker that answers knows it (a topic just created reaches the brokers'
    metadata a moment later: :func:`until_described`)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await until_described(admin, [topic])
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    assert described["error_code"] == 0, described
    return list(described["partitions"])


async def topic_config(bootstrap: str, topic: str) -> set[tuple[str, str]]:
    """The (name, value) pairs of ``topic``'s configuration on the brokers."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic)
        (response,) = await admin.describe_configs([resource])
    finally:
        await admin.close()
    (described,) = response.to_object()["resources"]
    entries = described["config_entries"]
    return {(entry["config_names"], entry["config_value"]) for entry in entries}


async def read_to_end(bootstrap: str, topic: str) -> list[Any]:
    """Every record of ``topic`` up to its end offsets now."""
    partitions = [TopicPartition(topic, p["partition"]) for p in await describe(bootstrap, topic)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        records: list[Any] = []
        deadline = time.monotonic() + 30
        while [tp for tp in partitions if await consumer.position(tp) < end[tp]]:
            assert time.monotonic() < deadline, "could not read the topic to its end"
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                records.extend(batch)
        return records
    finally:
        await consumer.stop()


async def num_queued(client: aioredis.Redis) -> int:
    total = 0
    async for key in client.scan_iter(match=KEYS.group("*"), count=1000):
        total += await client.zcard(key)
    return total


def batch_record(n: int) -> tuple[bytes, bytes]:
    request_id = f"job-{n}"
    value = {"v": 1, "request_id": request_id, "model": "m7b", "prompt": f"item {n}",
             "max_tokens": 32, "slo_class": "batch-2"}  # fmt: skip
    return request_id.encode(), json.dumps(value).encode()


async def send(producer: BusProducer, topic: str, numbers: range) -> None:
    """Write records ``numbers`` (acks=all) and wait until the cluster has every one."""
    futures = []
    for n in numbers:
        key, value = batch_record(n)
        futures.append(await producer.publish_raw_soon(topic, value, key))
    await asyncio.gather(*futures)


async def test_broker_killed_mid_batch_loses_and_duplicates_nothing(
    kafka_cluster: KafkaCluster, redis_url: str, raw_redis: aioredis.Redis, topic_prefix: str
) -> None:
    bootstrap = kafka_cluster.bootstrap_servers
    names = TopicNames(topic_prefix)
    settings = IngestSettings(
        redis_url=redis_url, kafka_bootstrap=bootstrap, topic_prefix=topic_prefix,
        kafka_replication_factor=3, kafka_partitions={"qlm.batch.requests": 6},
        batch_consumer=True, serve_grpc=False,
        consumer_group=f"{topic_prefix}ingest", log_json=False, log_level="warning",
        served_models_timeout_s=0.0,  # no workers here: every catalogue model counts
        auth="off",
    )  # fmt: skip
    await ensure_topics(bootstrap, topic_specs(names, settings.topic_layout()))
    partitions = await describe(bootstrap, names.batch_requests)
    assert len(partitions) == 6
    assert all(sorted(p["replicas"]) == sorted(p["isr"]) == [1, 2, 3] for p in partitions)
    assert ("min.insync.replicas", "2") in await topic_config(bootstrap, names.batch_requests)

    half = NUM_RECORDS // 2
    async with BusProducer(bootstrap, client_id=f"test-{uuid.uuid4().hex[:6]}") as producer:
        await send(producer, names.batch_requests, range(half))

        app = IngestApp(settings, models=MODELS)
        await app.start()
        try:
            deadline = time.monotonic() + 60
            while (queued := await num_queued(raw_redis)) < NUM_RECORDS // 10:
                assert time.monotonic() < deadline, f"consumer too slow: {queued} queued"
                await asyncio.sleep(0.02)
            leaders = Counter(
                p["leader"] for p in await describe(bootstrap, names.batch_requests)
            )
            victim = kafka_cluster.nodes[leaders.most_common(1)[0][0] - 1]
            kafka_cluster.kill(victim)
            at_kill = await num_queued(raw_redis)
            assert at_kill < half, "the kill must land mid-batch"

            # The rest of the batch is written while the cluster elects new leaders.
            await send(producer, names.batch_requests, range(half, NUM_RECORDS))
            deadline = time.monotonic() + 90
            while (queued := await num_queued(raw_redis)) < NUM_RECORDS:
                assert time.monotonic() < deadline, f"only {queued} queued after the kill"
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # anything delivered twice has been handled by now
        finally:
            await app.stop()

    assert not victim.is_running()
    survivors = ",".join(n.bootstrap_servers for n in kafka_cluster.nodes if n is not victim)
    for partition in await describe(survivors, names.batch_requests):
        assert victim.node_id not in partition["isr"]
        assert partition["leader"] != victim.node_id

    expected = {f"job-{n}" for n in range(NUM_RECORDS)}
    stored = [key async for key in raw_redis.scan_iter(match=KEYS.request("*"), count=1000)]
    assert len(stored) == NUM_RECORDS
    assert {key.removeprefix(KEYS.request("")) for key in stored} == expected
    assert await num_queued(raw_redis) == NUM_RECORDS

    events = await read_to_end(survivors, names.events)
    announced = Counter(record.key.decode() for record in events)
    assert set(announced) == expected, "an admitted event was lost"
    assert max(announced.values()) == 1, "a request was announced twice"
