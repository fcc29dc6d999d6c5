"""The one way qlm writes to Kafka: acks=all with idempotence, records from :mod:`qlm.bus.records`.

``publish`` returns once the broker has the record on every in-sync replica.
``publish_soon`` only queues it (the returned future resolves the same way), for
callers that write many records and await them together; ``publish_raw_soon`` does the
same for bytes the caller encoded.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata

from qlm.bus.records import BusRecord
from qlm.core.errors import Unavailable


async def connect(client: AIOKafkaProducer | AIOKafkaConsumer, what: str) -> None:
    """Start an aiokafka client; when no broker answers, close it and raise Unavailable."""
    try:
        await client.start()
    except KafkaError as error:
        await client.stop()
        raise Unavailable(f"Kafka {what} could not connect: {error}") from error

#: Largest record qlm writes (the broker's default message.max.bytes is ~1 MiB).
MAX_RECORD_BYTES = 1024 * 1024


class BusProducer:
    """An idempotent Kafka producer (acks=all). Use ``async with`` or start()/stop()."""

    def __init__(
        self,
        bootstrap_servers: str,
        client_id: str = "qlm",
        linger_ms: int = 5,
        **options: Any,
    ) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            max_request_size=MAX_RECORD_BYTES + 64 * 1024,
            **options,
        )

    async def start(self) -> None:
        """Connect; raises Unavailable when no broker answers."""
        await connect(self._producer, "producer")

    async def stop(self) -> None:
        """Send what is queued, then disconnect."""
        await self._producer.stop()

    async def __aenter__(self) -> BusProducer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def publish(self, topic: str, record: BusRecord) -> RecordMetadata:
        """Write ``record`` (keyed by ``record.key()``); wait for the broker's acknowledgement."""
        return await self.publish_raw(topic, record.to_json(), record.key())

    async def publish_soon(self, topic: str, record: BusRecord) -> asyncio.Future[RecordMetadata]:
        """Queue ``record``; the returned future resolves when the broker acknowledges it."""
        future: asyncio.Future[RecordMetadata] = await self._producer.send(
            topic, record.to_json(), key=record.key()
        )
        return future

    async def publish_raw_soon(
        self, topic: str, value: bytes, key: bytes | None = None
    ) -> asyncio.Future[RecordMetadata]:
        """Queue bytes encoded by the caller (e.g. :func:`qlm.bus.records.admitted_event_json`);
        the returned future resolves when the broker acknowledges them."""
        future: asyncio.Future[RecordMetadata] = await self._producer.send(topic, value, key=key)
        return future

    async def publish_raw(
        self, topic: str, value: bytes, key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
    ) -> RecordMetadata:
        """Write bytes as they are (batch request records, tests); waits for the acknowledgement."""
        metadata: RecordMetadata = await self._producer.send_and_wait(
            topic, value, key=key, headers=list(headers) if headers else None)
        return metadata
