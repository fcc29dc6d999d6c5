"""A Kafka consumer that commits a record only after its effect is durable.

For each record, in partition order:

1. ``decode(value)`` turns the bytes into a value or raises :class:`InvalidInput`;
2. ``handler(value, record)`` makes the effect durable (a Redis write, say) and returns;
3. the offset after the record is committed (per fetched batch, after all its handlers
   returned).

No record can stop the consumer. A record whose decode fails in any way (InvalidInput,
RecursionError, ValueError, MemoryError: every exception but cancellation and exit),
or whose handler raises InvalidInput, goes to the dead-letter topic at once; one whose
handler keeps failing with anything else ``max_attempts`` times goes there too. The
dead letter names the reason, the field, the origin (topic / partition / offset) and
carries the raw bytes in base64, truncated with their size and sha256 when they would
not fit a Kafka record (:class:`qlm.bus.records.DeadLetter`). The consumer commits past
the record only after the dead letter is acknowledged by the broker.

An outage is not a poisoned record: a handler (or the dead-letter write) failing with
:func:`is_outage` (Unavailable, a connection or timeout error, a retriable Kafka error)
is retried with capped exponential backoff for as long as the outage lasts, without
committing; :meth:`BusConsumer.stop` interrupts the wait. Delivery is at least once:
handlers must be idempotent (qlm's are, by request id).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from qlm.aio import wait_event
from qlm.bus.producer import BusProducer, connect
from qlm.bus.records import DeadLetter
from qlm.bus.security import PLAINTEXT, KafkaAuth
from qlm.core.errors import InvalidInput, Unavailable

T = TypeVar("T")
Decode = Callable[[bytes | None], T]
Handler = Callable[[T, ConsumerRecord[Any, Any]], Awaitable[None]]

log = structlog.get_logger("qlm.bus")


#: What ends the consumer instead of failing one record: cancellation and exit.
NOT_A_RECORD_FAILURE: Final = (asyncio.CancelledError, KeyboardInterrupt, SystemExit,
                               GeneratorExit)


#: The shortest wait between two attempts, whatever the options say.
MIN_BACKOFF_S: Final = 0.01


def is_outage(error: BaseException) -> bool:
    """Whether ``error`` says a dependency is away (retry), not that the record is bad."""
    if isinstance(error, KafkaError):
        return bool(getattr(error, "retriable", False)) or type(error) is KafkaError
    return isinstance(error, Unavailable | OSError | RedisConnectionError | RedisTimeoutError)


def _reraise_if_not_a_record_failure(error: BaseException) -> None:
    if isinstance(error, NOT_A_RECORD_FAILURE):
        raise error


class _CommitOnRevoke(ConsumerRebalanceListener):
    """Before partitions move to another member, commit what was handled on them."""

    def __init__(self, consumer: BusConsumer[Any]) -> None:
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._consumer._commit_handled(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None


class _StopRequested(Exception):
    """Raised inside the loop when stop() interrupts a retry."""


@dataclass(frozen=True, slots=True)
class ConsumerOptions:
    """Tuning: attempts of a handler failing on a record before it is a dead letter, the
    backoff between attempts (doubling, up to ``max_backoff_s`` while an outage lasts),
    batch size and poll timeout."""

    max_attempts: int = 5
    retry_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    max_records: int = 200
    poll_timeout_ms: int = 200
    session_timeout_ms: int = 10_000

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidInput("max_attempts", f"must be >= 1, got {self.max_attempts}")
        if self.retry_backoff_s < 0:
            raise InvalidInput("retry_backoff_s", f"must be >= 0, got {self.retry_backoff_s}")
        if self.max_backoff_s < self.retry_backoff_s:
            raise InvalidInput("max_backoff_s", f"must be >= retry_backoff_s, got "
                               f"{self.max_backoff_s}")


class BusConsumer(Generic[T]):
    """Consume ``topics`` in consumer group ``group_id``; dead letters go to ``dlq_topic``.

    Lifecycle: ``await start()``; ``await run()`` (returns after ``stop()``; no record
    ends it, see the module docstring); ``await stop()`` from another task
    ends the loop after the record in hand, commits what was handled and leaves the group.
    ``producer`` (started by the caller) writes the dead letters.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topics: Sequence[str],
        group_id: str,
        decode: Decode[T],
        handler: Handler[T],
        dlq_topic: str,
        producer: BusProducer,
        options: ConsumerOptions | None = None,
        clock: Callable[[], float] = time.time,
        client_id: str = "qlm",
        auth: KafkaAuth = PLAINTEXT,
    ) -> None:
        if not topics:
            raise InvalidInput("topics", "must name at least one topic")
        self.group_id = group_id
        self.dlq_topic = dlq_topic
        self.options = options or ConsumerOptions()
        self.num_handled = 0
        self.num_dead_letters = 0
        self._decode = decode
        self._handler = handler
        self._producer = producer
        self._clock = clock
        self._stopping = asyncio.Event()
        self._running: asyncio.Future[None] | None = None
        self._closed = False
        #: Next offset to commit per partition: records handled but not committed yet.
        self._handled: dict[TopicPartition, int] = {}
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers,
            group_id=group_id,
            client_id=client_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            session_timeout_ms=self.options.session_timeout_ms,
            **auth.client_options(),
        )
        self._consumer.subscribe(list(topics), listener=_CommitOnRevoke(self))

    async def start(self) -> None:
        """Connect and join the group; raises Unavailable when no broker answers."""
        await connect(self._consumer, "consumer")

    async def run(self) -> None:
        """Consume until stop(); leaves the group when it returns."""
        self._running = asyncio.get_running_loop().create_future()
        try:
            while not self._stopping.is_set():
                try:
                    batches = await self._consumer.getmany(
                        timeout_ms=self.options.poll_timeout_ms,
                        max_records=self.options.max_records,
                    )
                except KafkaError as error:  # broker away: aiokafka reconnects by itself
                    log.warning("kafka_poll_failed", error=repr(error))
                    await self._backoff(1)
                    continue
                for partition, records in batches.items():
                    await self._consume_partition(partition, records)
                    if self._stopping.is_set():
                        break
        except _StopRequested:
            pass
        finally:
            await self._close()
            self._running.set_result(None)

    async def stop(self) -> None:
        """Finish the record in hand, commit, leave the group. Safe to call more than once."""
        self._stopping.set()
        if self._running is not None:
            await asyncio.shield(self._running)
        else:
            await self._close()

    async def _close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._consumer.stop()

    async def _consume_partition(
        self, partition: TopicPartition, records: Sequence[ConsumerRecord[Any, Any]]
    ) -> None:
        """Handle records in order; commit the offset after the last one handled.

        Stops early when the partition was revoked meanwhile (its new owner takes over).
        """
        try:
            for record in records:
                if self._stopping.is_set() or partition not in self._consumer.assignment():
                    break
                await self._consume_one(record)
                self._handled[partition] = record.offset + 1
        finally:
            await self._commit_handled({partition})

    async def _consume_one(self, record: ConsumerRecord[Any, Any]) -> None:
        """Handle one record, or dead-letter it; returns when it may be committed."""
        try:
            value = self._decode(record.value)
        except BaseException as error:
            _reraise_if_not_a_record_failure(error)
            await self._dead_letter(record, error)
            return
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._handler(value, record)
            except BaseException as error:
                _reraise_if_not_a_record_failure(error)
                if isinstance(error, InvalidInput):
                    await self._dead_letter(record, error)
                    return
                outage = is_outage(error)
                log.warning(
                    "kafka_handler_failed", topic=record.topic, partition=record.partition,
                    offset=record.offset, attempt=attempt, outage=outage, error=repr(error),
                )  # fmt: skip
                if not outage and attempt >= self.options.max_attempts:
                    await self._dead_letter(record, error)
                    return
                if attempt == 1:  # what came before on this partition is done: say so now
                    await self._commit_handled({TopicPartition(record.topic, record.partition)})
                await self._backoff(attempt)
            else:
                self.num_handled += 1
                return

    async def _backoff(self, attempt: int) -> None:
        """Sleep the backoff of ``attempt`` (capped); raises _StopRequested on stop()."""
        delay_s = min(self.options.max_backoff_s,
                      self.options.retry_backoff_s * 2 ** min(attempt - 1, 30))
        delay_s = max(delay_s, MIN_BACKOFF_S)  # a zero timeout would not yield
        if await wait_event(self._stopping, delay_s):
            raise _StopRequested

    async def _dead_letter(self, record: ConsumerRecord[Any, Any], error: BaseException) -> None:
        """Write the record's dead letter and wait for the broker's acknowledgement.

        While Kafka is away this retries (module docstring). Should the broker refuse the
        letter itself (a DLQ topic with a smaller record limit), it is written again
        without the payload: size, sha256 and origin still identify the record.
        """
        letter = DeadLetter.of(
            error, record.topic, record.partition, record.offset, record.key, record.value,
            self.group_id, self._clock(),
        )  # fmt: skip
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._producer.publish(self.dlq_topic, letter)
                break
            except BaseException as publish_error:
                _reraise_if_not_a_record_failure(publish_error)
                log.warning("kafka_dead_letter_failed", topic=record.topic,
                            partition=record.partition, offset=record.offset,
                            attempt=attempt, error=repr(publish_error))
                if not is_outage(publish_error) and letter.value_b64:
                    letter = DeadLetter.of(
                        error, record.topic, record.partition, record.offset, record.key,
                        record.value, self.group_id, self._clock(), max_value_bytes=0,
                    )  # fmt: skip
                    continue
                await self._backoff(attempt)
        self.num_dead_letters += 1
        log.warning(
            "kafka_dead_letter", topic=record.topic, partition=record.partition,
            offset=record.offset, field=letter.field, reason=letter.reason[:300],
            truncated=bool(letter.truncated),
        )  # fmt: skip

    async def _commit_handled(self, partitions: set[TopicPartition]) -> None:
        """Commit the handled offsets of ``partitions`` (those with anything handled)."""
        offsets = {tp: self._handled.pop(tp) for tp in partitions if tp in self._handled}
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as error:  # moved to another member
            log.warning("kafka_commit_failed", offsets=str(offsets), error=str(error))
        except KafkaError as error:  # broker away: the records may be read again (idempotent)
            log.warning("kafka_commit_failed", offsets=str(offsets), error=repr(error))
