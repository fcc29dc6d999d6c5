"""The Kafka bus on a real broker: round trip, commit only after the effect, dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient

from qlm.bus import (
    BusConsumer,
    BusProducer,
    ConsumerOptions,
    DeadLetter,
    Event,
    TopicNames,
    ensure_topics,
    topic_specs,
)
from qlm.core.errors import InvalidInput, Unavailable

pytestmark = pytest.mark.kafka

FAST = ConsumerOptions(max_attempts=2, retry_backoff_s=0.0, poll_timeout_ms=100)


def event(request_id: str, event_type: str = "admitted", **fields: Any) -> Event:
    return Event.model_validate(
        {"type": event_type, "request_id": request_id, "model": "m", "slo_class": "batch-1",
         "at": 2.0, "arrival_at": 1.0, **fields}
    )  # fmt: skip


@pytest.fixture
def topics(kafka_topics: TopicNames) -> TopicNames:
    return kafka_topics


@pytest.fixture
async def producer(kafka_bootstrap: str) -> AsyncIterator[BusProducer]:
    async with BusProducer(kafka_bootstrap) as bus_producer:
        yield bus_producer


def consumer_of(
    kafka_bootstrap: str,
    topics: TopicNames,
    producer: BusProducer,
    handler: Callable[[Event, ConsumerRecord[Any, Any]], Awaitable[None]],
    group_id: str,
) -> BusConsumer[Event]:
    return BusConsumer(
        kafka_bootstrap, [topics.events], group_id, Event.from_json, handler,
        topics.dlq, producer, FAST,
    )  # fmt: skip


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(poll(), timeout_s)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def committed_offset(kafka_bootstrap: str, group_id: str, topic: str) -> int | None:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group_id)
    finally:
        await admin.close()
    found = [meta.offset for tp, meta in offsets.items() if tp.topic == topic]
    return max(found) if found else None


async def read_all(kafka_bootstrap: str, topic: str, num_records: int) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        async with asyncio.timeout(30):
            while len(values) < num_records:
                values.append((await consumer.getone()).value)
    finally:
        await consumer.stop()
    return values


async def test_ensure_topics_creates_each_topic_once(kafka_bootstrap: str, topic_prefix: str):
    names = TopicNames(topic_prefix)

    created = await ensure_topics(kafka_bootstrap, topic_specs(names))
    created_again = await ensure_topics(kafka_bootstrap, topic_specs(names))

    assert sorted(created) == sorted(names.all())
    assert created_again == []
    assert names.events == f"{topic_prefix}qlm.events"


async def test_published_record_round_trips(
    kafka_bootstrap: str, topics: TopicNames, producer: BusProducer
) -> None:
    sent = event("r-1", "started", worker="w-0", num_prompt_tokens=12)
    received: list[tuple[Event, bytes]] = []

    async def handle(value: Event, record: ConsumerRecord[Any, Any]) -> None:
        received.append((value, record.key))

    consumer = consumer_of(kafka_bootstrap, topics, producer, handle, "round-trip")
    await consumer.start()
    running = asyncio.create_task(consumer.run())
    metadata = await producer.publish(topics.events, sent)
    await until(lambda: len(received) == 1, "the event")
    await consumer.stop()
    await running

    assert received == [(sent, b"r-1")]
    assert await committed_offset(kafka_bootstrap, "round-trip", topics.events) == (
        metadata.offset + 1
    )


async def test_an_outage_is_retried_without_committing_until_it_ends(
    kafka_bootstrap: str, topics: TopicNames, producer: BusProducer
) -> None:
    for request_id in ("a", "b", "c"):  # one key: one partition, in this order
        await producer.publish_raw(topics.events, event(request_id).to_json(), key=b"same")
    handled: list[str] = []
    attempts_on_b = 0
    redis_is_down = True

    async def fails_on_b_while_down(value: Event, record: ConsumerRecord[Any, Any]) -> None:
        nonlocal attempts_on_b
        if value.request_id == "b" and redis_is_down:
            attempts_on_b += 1
            raise ConnectionError("redis is down")
        handled.append(value.request_id)

    consumer = consumer_of(kafka_bootstrap, topics, producer, fails_on_b_while_down, "retry")
    await consumer.start()
    running = asyncio.create_task(consumer.run())
    # far more attempts than max_attempts (2): an outage never makes a dead letter
    await until(lambda: attempts_on_b >= 10, "b retried while the outage lasts")
    assert handled == ["a"]
    assert not running.done()
    assert await committed_offset(kafka_bootstrap, "retry", topics.events) == 1

    redis_is_down = False
    await until(lambda: handled == ["a", "b", "c"], "b and c once the outage ended")
    await consumer.stop()
    await running
    assert consumer.num_dead_letters == 0
    assert await committed_offset(kafka_bootstrap, "retry", topics.events) == 3


async def test_stop_during_an_outage_leaves_the_record_uncommitted_for_the_next_consumer(
    kafka_bootstrap: str, topics: TopicNames, producer: BusProducer
) -> None:
    for request_id in ("a", "b"):
        await producer.publish_raw(topics.events, event(request_id).to_json(), key=b"same")
    first_run: list[str] = []

    async def fails_on_b(value: Event, record: ConsumerRecord[Any, Any]) -> None:
        if value.request_id == "b":
            raise Unavailable("redis: connection refused")
        first_run.append(value.request_id)

    consumer = consumer_of(kafka_bootstrap, topics, producer, fails_on_b, "handover")
    await consumer.start()
    running = asyncio.create_task(consumer.run())
    await until(lambda: first_run == ["a"], "a")
    await asyncio.sleep(0.5)
    await consumer.stop()
    await running
    assert await committed_offset(kafka_bootstrap, "handover", topics.events) == 1

    second_run: list[str] = []

    async def works(value: Event, record: ConsumerRecord[Any, Any]) -> None:
        second_run.append(value.request_id)

    restarted = consumer_of(kafka_bootstrap, topics, producer, works, "handover")
    await restarted.start()
    running = asyncio.create_task(restarted.run())
    await until(lambda: second_run == ["b"], "b redelivered")
    await restarted.stop()
    await running
    assert await committed_offset(kafka_bootstrap, "handover", topics.events) == 2


async def test_any_failure_of_decode_or_handler_is_a_dead_letter_and_the_consumer_goes_on(
    kafka_bootstrap: str, topics: TopicNames, producer: BusProducer
) -> None:
    for request_id in ("recursion", "bug", "good"):  # one key: one partition, in order
        await producer.publish_raw(topics.events, event(request_id).to_json(), key=b"k")
    handled: list[str] = []
    calls: list[str] = []

    def decode(raw: bytes | None) -> Event:
        value = Event.from_json(raw)
        if value.request_id == "recursion":
            raise RecursionError("maximum recursion depth exceeded")
        return value

    async def handle(value: Event, record: ConsumerRecord[Any, Any]) -> None:
        calls.append(value.request_id or "")
        if value.request_id == "bug":
            raise KeyError("a bug that fails every time")
        handled.append(value.request_id or "")

    consumer = BusConsumer(
        kafka_bootstrap, [topics.events], "any-failure", decode, handle, topics.dlq, producer,
        FAST,
    )  # fmt: skip
    await consumer.start()
    running = asyncio.create_task(consumer.run())
    await until(lambda: handled == ["good"], "the good record after the failing ones")
    await consumer.stop()
    await running

    letters = [DeadLetter.from_json(raw) for raw in await read_all(kafka_bootstrap, topics.dlq, 2)]
    assert [(letter.offset, letter.field) for letter in letters] == [(0, None), (1, None)]
    assert letters[0].reason.startswith("RecursionError: ")
    assert letters[1].reason.startswith("KeyError: ")
    assert calls.count("bug") == FAST.max_attempts
    assert await committed_offset(kafka_bootstrap, "any-failure", topics.events) == 3


async def test_malformed_records_go_to_the_dlq_and_the_consumer_carries_on(
    kafka_bootstrap: str, topics: TopicNames, producer: BusProducer
) -> None:
    not_json = b"{not json"
    no_worker = b'{"v":1,"type":"started","request_id":"x","model":"m","slo_class":"batch-1",'
    no_worker += b'"at":1,"arrival_at":1}'
    future_version = b'{"v":7,"type":"admitted"}'
    valid = [event("rejected-by-handler").to_json(), event("good").to_json()]
    for raw in (not_json, no_worker, future_version, *valid):  # one key: one partition, in order
        await producer.publish_raw(topics.events, raw, key=b"k")
    handled: list[str] = []

    async def handle(value: Event, record: ConsumerRecord[Any, Any]) -> None:
        if value.request_id == "rejected-by-handler":
            raise InvalidInput("model", "unknown model 'm'")
        handled.append(value.request_id)

    consumer = consumer_of(kafka_bootstrap, topics, producer, handle, "dlq")
    await consumer.start()
    running = asyncio.create_task(consumer.run())
    await until(lambda: handled == ["good"], "the good record after the bad ones")
    await consumer.stop()
    await running

    letters = [DeadLetter.from_json(raw) for raw in await read_all(kafka_bootstrap, topics.dlq, 4)]
    assert [(letter.field, letter.offset) for letter in letters] == [
        ("record", 0), ("worker", 1), ("v", 2), ("model", 3)
    ]  # fmt: skip
    assert "not valid JSON" in letters[0].reason
    assert letters[1].reason == "worker: is required for started events"
    assert "unsupported schema version 7" in letters[2].reason
    assert [letter.original_value() for letter in letters[:3]] == [
        not_json, no_worker, future_version
    ]  # fmt: skip
    assert all(letter.topic == topics.events and letter.key_b64 for letter in letters)
    assert all(letter.consumer_group == "dlq" for letter in letters)
    assert consumer.num_dead_letters == 4
    assert await committed_offset(kafka_bootstrap, "dlq", topics.events) == 5


async def test_stop_while_idle_ends_the_run(
    kafka_bootstrap: str, topics: TopicNames, producer: BusProducer
) -> None:
    async def handle(value: Event, record: ConsumerRecord[Any, Any]) -> None:
        raise AssertionError("no record was published")

    consumer = consumer_of(kafka_bootstrap, topics, producer, handle, "idle")
    await consumer.start()
    running = asyncio.create_task(consumer.run())
    await asyncio.sleep(0.3)
    await asyncio.wait_for(consumer.stop(), 15)
    await asyncio.wait_for(running, 1)
    assert running.done() and running.exception() is None


async def test_a_rebalance_loses_no_record(
    kafka_bootstrap: str, topics: TopicNames, producer: BusProducer
) -> None:
    request_ids = [f"r{i}" for i in range(40)]  # keys spread over the 4 partitions
    for request_id in request_ids:
        await producer.publish(topics.events, event(request_id))
    handled: list[str] = []

    async def slow(value: Event, record: ConsumerRecord[Any, Any]) -> None:
        await asyncio.sleep(0.02)
        handled.append(value.request_id)

    first = consumer_of(kafka_bootstrap, topics, producer, slow, "rebalance")
    second = consumer_of(kafka_bootstrap, topics, producer, slow, "rebalance")
    await first.start()
    running = [asyncio.create_task(first.run())]
    await until(lambda: len(handled) >= 5, "the first records")
    await second.start()  # joining moves partitions away from the first consumer
    running.append(asyncio.create_task(second.run()))
    await until(lambda: set(handled) == set(request_ids), "every record")
    await asyncio.gather(first.stop(), second.stop())
    await asyncio.gather(*running)

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets("rebalance")
    finally:
        await admin.close()
    assert sum(meta.offset for tp, meta in offsets.items() if tp.topic == topics.events) == 40
