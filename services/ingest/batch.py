"""The ``qlm.batch.requests`` consumer of ingest: each record is a submission.

Records are validated exactly like ``Submit`` (:meth:`IngestPlane.decode_batch_record`);
an invalid one, or any record that fails in any other way, goes to ``qlm.dlq`` with the
reason naming the field, and the consumer carries on; while Redis or Kafka is away the
record in hand is retried until they are back (:mod:`qlm.bus.consumer`). With
authentication on, a record must carry a ``qlm-signature`` header made with its tenant's
signing key (:mod:`qlm.tenants`), else it goes to the DLQ; its id is then scoped to that
tenant and it counts against that tenant's quotas like a submit
(:meth:`IngestPlane.book_quota`): a record over quota is not lost and is no dead letter,
it waits, parked in Redis behind the tenant's other waiting records
(:mod:`services.ingest.parking`), so that it holds up nothing on its partition; every
``parked_retry_s`` the parked records of each tenant are validated again and queued,
oldest first, while the quota lets them in (one that is no longer valid, e.g. its model
is no longer served, goes to the DLQ with its Kafka origin). A valid record is enqueued
(or parked) before its offset is committed, so a consumer killed mid-batch re-reads at
most the uncommitted records on restart, and handling them again is a no-op (idempotent
by request id; a stored id books no quota again).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from aiokafka import ConsumerRecord

from qlm.aio import cancel_and_wait
from qlm.bus.consumer import BusConsumer
from qlm.bus.producer import BusProducer
from qlm.bus.records import DeadLetter
from qlm.bus.topics import TopicNames
from qlm.core.errors import InvalidInput, QuotaExceeded
from qlm.log import get_logger
from qlm.submission import Submission
from qlm.tenants import SIGNATURE_HEADER, TenantRegistry, scoped_id, signature_matches
from services.ingest.parking import ParkedRecord, Parking
from services.ingest.plane import IngestPlane
from services.ingest.settings import IngestSettings

log = get_logger("services.ingest.batch")

#: Parked records of one tenant read at a time by the drain.
DRAIN_CHUNK = 100


class BatchIngest:
    """Runs the consumer loop as a task between :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        plane: IngestPlane,
        settings: IngestSettings,
        topics: TopicNames,
        producer: BusProducer,
        clock: Callable[[], float],
        tenants: TenantRegistry | None = None,
    ) -> None:
        self.plane = plane
        self.tenants = tenants
        self.producer = producer
        self.clock = clock
        self.dlq_topic = topics.dlq
        self.drain_interval_s = settings.parked_retry_s
        #: Where records over quota wait (authentication and quotas on), else None.
        self.parking = (Parking(plane.store.client, settings.key_prefix, clock)
                        if tenants is not None and plane.quotas is not None else None)
        self.num_parked = 0
        self.num_unparked = 0
        self._drainer: asyncio.Task[None] | None = None
        self._draining = asyncio.Lock()
        self.consumer: BusConsumer[Submission] = BusConsumer(
            settings.kafka_bootstrap,
            [topics.batch_requests],
            settings.consumer_group,
            decode=plane.decode_batch_record,
            handler=self.on_record,
            dlq_topic=topics.dlq,
            producer=producer,
            clock=clock,
            client_id="qlm-ingest-batch",
            auth=settings.kafka_auth(),
        )
        self._task: asyncio.Task[None] | None = None

    async def on_record(self, submission: Submission, record: ConsumerRecord[Any, Any]) -> None:
        """Check the signature (authentication on), then enqueue under the id scoped to the
        record's tenant, or park it when the tenant is over its quota (or has records
        parked already); returns once the record is durable in Redis (then committed)."""
        if self.tenants is not None:
            await self.check_signature(submission, record)
            submission = submission.with_id(scoped_id(submission.tenant,
                                                      submission.request_id))
            if self.parking is not None and not await self._booked(submission):
                await self.park(submission.tenant, submission.request_id, record)
                return
        await self.plane.enqueue(submission)

    async def _booked(self, submission: Submission) -> bool:
        """Booked against its tenant's quotas; False when the tenant has records parked
        (this one goes behind them) or is over a quota (nothing booked)."""
        assert self.parking is not None
        if await self.parking.holds(submission.tenant):
            return False
        try:
            await self.plane.book_quota(submission.tenant, submission, "kafka")
        except QuotaExceeded:
            return False
        return True

    async def park(self, tenant: str, stored_id: str, record: ConsumerRecord[Any, Any]) -> None:
        assert self.parking is not None
        await self.parking.park(tenant, ParkedRecord(
            stored_id, bytes(record.value or b""), record.key, record.topic, record.partition,
            record.offset))
        self.num_parked += 1
        log.info("batch_record_parked", tenant=tenant, request_id=stored_id,
                 partition=record.partition, offset=record.offset)

    async def drain(self) -> None:
        """Queue every tenant's parked records that its quota lets in now (module
        docstring); a tenant another process drains is left to it, and one drain runs
        at a time in this process."""
        assert self.parking is not None
        async with self._draining:
            for tenant in await self.parking.tenants():
                if await self.parking.lock(tenant):
                    await self._drain_tenant(tenant)

    async def _drain_tenant(self, tenant: str) -> None:
        assert self.parking is not None
        while parked := await self.parking.oldest(tenant, DRAIN_CHUNK):
            for waiting in parked:
                try:
                    submission = self.plane.decode_batch_record(waiting.value)
                    submission = submission.with_id(waiting.stored_id)
                    await self.plane.book_quota(tenant, submission, "kafka", report=False)
                except QuotaExceeded:
                    return
                except InvalidInput as error:  # no longer valid: a dead letter after all
                    await self._dead_letter(waiting, error)
                else:
                    await self.plane.enqueue(submission)
                    self.num_unparked += 1
                await self.parking.remove(tenant, waiting.stored_id)

    async def _dead_letter(self, waiting: ParkedRecord, error: InvalidInput) -> None:
        letter = DeadLetter.of(error, waiting.topic, waiting.partition, waiting.offset,
                               waiting.key, waiting.value, self.consumer.group_id, self.clock())
        await self.producer.publish(self.dlq_topic, letter)
        log.warning("kafka_dead_letter", topic=waiting.topic, partition=waiting.partition,
                    offset=waiting.offset, field=letter.field, reason=letter.reason[:300],
                    parked=True)

    async def _drain_forever(self) -> None:
        while True:
            try:
                await self.drain()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis or Kafka away: the records stay parked
                log.warning("parked_drain_failed", error=repr(error))
            await asyncio.sleep(self.drain_interval_s)

    async def check_signature(self, submission: Submission,
                              record: ConsumerRecord[Any, Any]) -> None:
        """InvalidInput (→ DLQ) unless the ``qlm-signature`` header is the HMAC of the
        value with the signing key of the record's (active) tenant (qlm.tenants)."""
        signature = next((bytes(v).decode("ascii", "replace") for k, v in record.headers or ()
                          if k == SIGNATURE_HEADER), None)
        if signature is None:
            raise InvalidInput(SIGNATURE_HEADER, "header is required (records are signed "
                               "with the tenant's signing key)")
        key = await self.tenants.signing_key_of(submission.tenant) if self.tenants else None
        if key is None or not signature_matches(bytes(record.value or b""), key, signature):
            raise InvalidInput(SIGNATURE_HEADER, "does not match the record and its tenant")

    async def start(self) -> None:
        await self.consumer.start()
        self._task = asyncio.create_task(self._run(), name="ingest-batch-consumer")
        if self.parking is not None:
            self._drainer = asyncio.create_task(self._drain_forever(), name="ingest-parked")

    async def _run(self) -> None:
        try:
            await self.consumer.run()
        except Exception as error:  # a bug in the loop itself: exit, the supervisor restarts
            log.error("batch_consumer_stopped", error=repr(error))
            raise

    @property
    def is_running(self) -> bool:
        """Whether the consumer loop is running."""
        return self._task is not None and not self._task.done()

    async def wait_stopped(self) -> None:
        """Returns when the consumer loop has ended (stop(), or it gave up)."""
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._task)

    async def stop(self) -> None:
        if self._drainer is not None:
            await cancel_and_wait([self._drainer])
        await self.consumer.stop()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task

    @property
    def num_handled(self) -> int:
        return self.consumer.num_handled

    @property
    def num_dead_letters(self) -> int:
        return self.consumer.num_dead_letters
