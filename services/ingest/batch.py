"""The ``qlm.batch.requests`` consumer of ingest: each record is a submission.

Records are validated exactly like ``Submit`` (:meth:`IngestPlane.decode_batch_record`);
an invalid one, or any record that fails in any other way, goes to ``qlm.dlq`` with the
reason naming the field, and the consumer carries on; while Redis or Kafka is away the
record in hand is retried until they are back (:mod:`qlm.bus.consumer`). With
authentication on, a record must carry a ``qlm-signature`` header made with its tenant's
signing key (:mod:`qlm.tenants`), else it goes to the DLQ; its id is then scoped to that
tenant and it counts against that tenant's quotas like a submit
(:meth:`IngestPlane.book_quota`): a record over quota is not lost and is no dead letter,
it waits — its partition is paused and the record read again after the retry-after
(:class:`qlm.bus.consumer.BusConsumer`, at most its ``max_backoff_s``, 5 s) until it fits.
A valid one is enqueued (idempotent by its request id) and its offset is committed only
after that, so a consumer killed mid-batch re-reads at most the uncommitted records on
restart, and re-enqueuing them is a no-op (and books no quota again).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from aiokafka import ConsumerRecord

from qlm.bus.consumer import BusConsumer
from qlm.bus.producer import BusProducer
from qlm.bus.topics import TopicNames
from qlm.core.errors import InvalidInput
from qlm.log import get_logger
from qlm.submission import Submission
from qlm.tenants import SIGNATURE_HEADER, TenantRegistry, scoped_id, signature_matches
from services.ingest.plane import IngestPlane
from services.ingest.settings import IngestSettings

log = get_logger("services.ingest.batch")


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
        record's tenant; returns once the record is durable in Redis (then committed)."""
        if self.tenants is not None:
            await self.check_signature(submission, record)
            submission = submission.with_id(scoped_id(submission.tenant,
                                                      submission.request_id))
            await self.plane.book_quota(submission.tenant, submission, "kafka")
        await self.plane.enqueue(submission)

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
