"""Follow topics from their end, without a consumer group: for hints, not for work.

Every process that tails sees every record written after it started; nothing is
committed and nothing is replayed after a restart. The scheduler and the estimator use
it for ``qlm.events`` and ``qlm.telemetry`` (wake-ups, worker liveness, corrections),
where a missed record costs at most one tick.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from qlm.bus.producer import connect
from qlm.bus.security import PLAINTEXT, KafkaAuth
from qlm.log import get_logger

log = get_logger("qlm.bus.tail")

#: Topic metadata is refreshed this often, so that a partition whose leader was not yet
#: known when the tail started (a topic created just before) is followed soon after.
METADATA_MAX_AGE_MS = 5000


class TopicTail:
    """``await start()``; ``await run()`` calls ``on_record(topic, value)`` per record until
    ``stop()``. ``on_record`` must not block (it runs on the event loop)."""

    def __init__(self, bootstrap_servers: str, topics: Sequence[str],
                 on_record: Callable[[str, bytes | None], None], client_id: str = "qlm",
                 auth: KafkaAuth = PLAINTEXT) -> None:
        self._consumer = AIOKafkaConsumer(
            *topics, bootstrap_servers=bootstrap_servers, group_id=None, client_id=client_id,
            enable_auto_commit=False, auto_offset_reset="latest",
            metadata_max_age_ms=METADATA_MAX_AGE_MS, **auth.client_options())
        self._on_record = on_record
        self._stopping = False

    async def start(self) -> None:
        """Connect; raises Unavailable when no broker answers."""
        await connect(self._consumer, "consumer")

    async def run(self) -> None:
        """Follow until :meth:`stop`; a broker error is logged and the tail carries on."""
        while not self._stopping:
            try:
                async for record in self._consumer:
                    self._handle(record.topic, record.value, record.offset)
            except KafkaError as error:
                log.warning("tail_error", error=repr(error))
            if not self._stopping:
                await asyncio.sleep(1.0)

    def _handle(self, topic: str, value: bytes | None, offset: int) -> None:
        try:
            self._on_record(topic, value)
        except Exception as error:  # a bad record must not end the tail
            log.warning("tail_record_failed", topic=topic, offset=offset, error=repr(error))

    async def stop(self) -> None:
        self._stopping = True
        await self._consumer.stop()
