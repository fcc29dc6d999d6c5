"""The ingest service assembled: store + producer + plane + gRPC server + batch consumer.

:class:`IngestApp` is what ``python -m services.ingest`` runs and what the tests start
in process. Start order: Redis store, Kafka topics and producer, the plane, the gRPC
server, the batch consumer, the queue-depth gauge's refresh (metrics:
:mod:`services.ingest.metrics`; :func:`serve` also serves them over HTTP). Stop order
(graceful, on SIGTERM): health NOT_SERVING, consumer stops (its last records are
committed only after their enqueue), the gRPC server stops taking calls and drains for
``shutdown_grace_s``, then the producer flushes and the store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import start_http_server
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from qlm.aio import cancel_and_wait
from qlm.bus.producer import BusProducer
from qlm.bus.records import admitted_event_json
from qlm.bus.topics import TopicNames, ensure_topics, topic_specs
from qlm.core.errors import Unavailable
from qlm.log import configure, get_logger
from qlm.roster import read_workers_file
from qlm.store.client import RedisClient, redis_client
from qlm.store.records import RequestRecord
from qlm.store.store import RedisQueueStore
from qlm.submission import ModelLimits, SubmissionLimits
from qlm.tenants import TenantRegistry
from services.common.auth import Authenticator
from services.common.entrypoint import stop_on_signals
from services.common.probes import kafka_answers
from services.common.tls import http_ssl_context
from services.ingest.batch import BatchIngest
from services.ingest.fleet import Fleet
from services.ingest.metrics import IngestMetrics
from services.ingest.plane import AdmissionRules, IngestPlane, Prediction, load_models
from services.ingest.predictors import close_predictor, make_predictor
from services.ingest.quotas import QuotaGate
from services.ingest.served import ServedModels
from services.ingest.server import IngestServer
from services.ingest.settings import IngestSettings
from services.ingest.status import Observers, StatusBoard

if TYPE_CHECKING:  # the HTTP stack (FastAPI, uvicorn) loads only when --http-port is set
    from services.ingest.openai.batches import BatchDriver
    from services.ingest.openai.server import HttpServer

log = get_logger("services.ingest.app")


@dataclass(frozen=True, slots=True)
class BusEvents:
    """Publishes ``admitted`` events on ``qlm.events`` (:class:`qlm.bus.records.Event`,
    encoded by :func:`~qlm.bus.records.admitted_event_json`: the same bytes, cheaper).

    Returns once the event is queued in the producer (acks=all, idempotent; sent within
    its linger time, flushed on shutdown), without waiting for the broker: events are
    hints next to the durable queue in Redis, and waiting would put a broker round trip
    on every submit. A failed delivery is logged.
    """

    producer: BusProducer
    topic: str
    clock: Callable[[], float]

    async def admitted(self, record: RequestRecord, prediction: Prediction) -> None:
        request = record.request
        value = admitted_event_json(
            request_id=request.id, model=request.model, slo_class=request.slo_class.value,
            at=self.clock(), arrival_at=request.arrival_at, tenant=request.tenant,
            num_prompt_tokens=request.prompt_tokens,
            predicted_wait_s=prediction.wait_mean_s if prediction.known else None,
        )
        acknowledged = await self.producer.publish_raw_soon(self.topic, value,
                                                            request.id.encode())
        acknowledged.add_done_callback(_log_if_lost)


def _log_if_lost(acknowledged: asyncio.Future[Any]) -> None:
    if not acknowledged.cancelled() and acknowledged.exception() is not None:
        log.warning("admitted_event_lost", error=repr(acknowledged.exception()))


#: Connections of ingest's Redis pool: every open StreamTokens call holds one while it
#: waits for output (redis-py's default of 100 would refuse the 101st stream).
REDIS_MAX_CONNECTIONS = 4096


def ingest_redis_client(url: str) -> RedisClient:
    """A client that reconnects by itself: a command that finds its connection closed
    (Redis restarted) is retried with backoff for about six seconds before it fails."""
    return redis_client(
        url,
        decode_responses=True,
        max_connections=REDIS_MAX_CONNECTIONS,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), retries=16),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=10,
    )


class IngestApp:
    """One ingest process. ``await app.start()``, then ``await app.stop()``."""

    def __init__(
        self,
        settings: IngestSettings,
        models: Mapping[str, ModelLimits] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.topics = TopicNames(settings.topic_prefix)
        self.models = dict(models) if models is not None else load_models(
            settings.models_file, settings.profiles_dir
        )
        self.redis = ingest_redis_client(settings.redis_url)
        self.store = RedisQueueStore(
            self.redis, prefix=settings.key_prefix,
            group_window_s=settings.group_window_s, clock=clock,
        )
        self.producer = BusProducer(
            settings.kafka_bootstrap, client_id="qlm-ingest", linger_ms=settings.event_linger_ms,
            **settings.kafka_auth().client_options()
        )
        self.metrics = IngestMetrics()
        #: The live workers and the models they hold (worker telemetry): what the served
        #: check, ListModels and the HTTP front door's /v1/models read.
        self.fleet: Fleet | None = None
        if settings.served_models_timeout_s > 0 or settings.http_port is not None:
            declared = (read_workers_file(settings.workers_file)
                        if settings.workers_file is not None else ())
            self.fleet = Fleet(settings.kafka_bootstrap, self.topics, self.models,
                               declared=declared, timeout_s=settings.worker_timeout_s,
                               clock=clock, auth=settings.kafka_auth())
        self.served = ServedModels(self.fleet, settings.served_models_timeout_s, clock)
        self.plane = IngestPlane(
            self.store,
            BusEvents(self.producer, self.topics.events, clock),
            self.models,
            clock,
            SubmissionLimits(max_prompt_bytes=settings.max_prompt_bytes),
            predictor=make_predictor(settings, self.store, clock),
            admission=AdmissionRules.parse(settings.admission),
            observer=self.metrics,
            served=self.served if self.served.checking else None,
        )
        self.tenants = TenantRegistry(self.store.client, settings.key_prefix)
        self.authenticator = (Authenticator(self.tenants, settings.auth_cache_s)
                              if settings.auth == "required" else None)
        if settings.auth == "required":
            self.plane.quotas = QuotaGate(self.store.client, self.tenants, settings.key_prefix,
                                          clock, cache_s=settings.auth_cache_s)
        self.server: IngestServer | None = None
        self.http: HttpServer | None = None
        self.batch_driver: BatchDriver | None = None
        self.status: StatusBoard | None = None
        self.consumer: BatchIngest | None = None
        self._depth_task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        if self.server is None:
            raise RuntimeError("not started")
        return self.server.port

    @property
    def http_port(self) -> int:
        if self.http is None:
            raise RuntimeError("no HTTP front door (http_port unset)")
        return self.http.port

    async def start(self) -> None:
        s = self.settings
        await ensure_topics(s.kafka_bootstrap, topic_specs(self.topics, s.topic_layout()),
                            s.kafka_auth())
        await self.producer.start()
        if self.fleet is not None:
            await self.fleet.start()
        if s.http_port is not None:
            await self._start_http()
        if s.serve_grpc:
            self.server = IngestServer(
                self.plane,
                f"{s.host}:{s.port}",
                probes=[self.store.ping, lambda: kafka_answers(s.kafka_bootstrap, s.kafka_auth())],
                max_message_bytes=s.max_message_bytes,
                reuse_port=s.processes > 1,
                settings=s,
                authenticator=self.authenticator,
            )
            await self.server.start()
        if s.batch_consumer:
            self.consumer = BatchIngest(self.plane, s, self.topics, self.producer, self.clock,
                                        self.tenants if s.auth == "required" else None)
            await self.consumer.start()
        self._depth_task = asyncio.create_task(self._refresh_queue_depth(), name="ingest-depth")
        log.info("ingest_started", models=sorted(self.models), grpc=s.serve_grpc,
                 http=self.http.port if self.http is not None else None,
                 batch_consumer=s.batch_consumer)

    async def _start_http(self) -> None:
        """The OpenAI-compatible front door: the fleet view, then the HTTP server.

        Imported here, not at the top: a gRPC-only ingest (the GPU host's stack, a
        batch-consumer replica) runs without FastAPI and uvicorn installed.
        """
        from services.ingest.openai.app import FrontDoor, make_app
        from services.ingest.openai.batches import BatchDriver, BatchStore
        from services.ingest.openai.server import HttpServer

        s = self.settings
        ssl_context = http_ssl_context(s) if s.http_tls else None
        assert self.fleet is not None  # created with the app when http_port is set
        batches = BatchStore(self.redis, s.key_prefix, self.clock)
        self.status = StatusBoard(self.store, self.fleet, clock=self.clock)
        self.fleet.listen(self.status)
        self.plane.observer = Observers(self.metrics, self.status)
        await self.status.start()
        door = FrontDoor(self.plane, self.fleet, default_max_tokens=s.http_default_max_tokens,
                         api_key=s.http_api_key, authenticator=self.authenticator,
                         clock=self.clock, batches=batches,
                         max_file_bytes=s.http_max_file_bytes, status=self.status)
        assert s.http_port is not None
        self.http = HttpServer(make_app(door), s.http_host, s.http_port,
                               reuse_port=s.processes > 1, ssl_context=ssl_context)
        await self.http.start()
        self.batch_driver = BatchDriver(batches, self.plane,
                                        default_max_tokens=s.http_default_max_tokens,
                                        poll_interval_s=s.batch_poll_interval_s, clock=self.clock)
        await self.batch_driver.start()

    async def _refresh_queue_depth(self) -> None:
        """Re-read queued requests per class and model every ``queue_depth_interval_s``."""
        while True:
            try:
                self.metrics.refresh_queue_depth(await self.store.queue_depths())
            except Exception as error:  # Redis away: the gauge keeps its last values
                log.warning("queue_depth_failed", error=repr(error))
            await asyncio.sleep(self.settings.queue_depth_interval_s)

    async def stop(self) -> None:
        """Graceful: stop taking work, drain, close (module docstring)."""
        if self._depth_task is not None:
            await cancel_and_wait([self._depth_task])
        if self.server is not None:
            await self.server.stop(self.settings.shutdown_grace_s)
        if self.batch_driver is not None:
            await self.batch_driver.stop()
        if self.http is not None:
            await self.http.stop(self.settings.shutdown_grace_s)
        if self.fleet is not None:
            await self.fleet.stop()
        if self.status is not None:
            await self.status.stop()
        if self.consumer is not None:
            await self.consumer.stop()
        await self.producer.stop()
        await close_predictor(self.plane.predictor)
        await self.store.aclose()
        log.info("ingest_stopped")


async def serve(settings: IngestSettings) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully.

    The batch consumer outlives outages and poisoned records (:mod:`qlm.bus.consumer`);
    should its loop still end by itself (a bug), this raises Unavailable after a graceful
    stop: the process exits non-zero, its supervisor restarts it, and the records it did
    not commit are read again.
    """
    app = IngestApp(settings)
    await app.start()
    if settings.serve_metrics:
        serve_metrics(app, settings)
    stop = stop_on_signals()
    waiters: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait(), name="ingest-signal")]
    if app.consumer is not None:
        waiters.append(asyncio.create_task(app.consumer.wait_stopped(), name="ingest-batch"))
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    consumer_failed = not stop.is_set()
    log.info("signal_received" if not consumer_failed else "batch_consumer_gave_up")
    with contextlib.suppress(asyncio.CancelledError):
        await app.stop()
    if consumer_failed:
        raise Unavailable("the batch consumer stopped; restart the ingest service")


def serve_metrics(app: IngestApp, settings: IngestSettings) -> None:
    """Serve ``app``'s metrics over HTTP. A port that is taken is logged as an error and
    the front door keeps serving (metrics must not take submits down with them)."""
    try:
        server, _ = start_http_server(settings.metrics_port, settings.host,
                                      registry=app.metrics.registry)
    except OSError as error:
        log.error("metrics_unavailable", port=settings.metrics_port, error=repr(error))
        return
    log.info("metrics_serving", port=server.server_port)


def run_one(settings: IngestSettings) -> int:
    """One ingest process until SIGTERM/SIGINT; 1 when it stopped because of a failure."""
    configure(settings.log_level, settings.log_json, service="ingest")
    try:
        run_on_fastest_loop(serve(settings))
    except Unavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def run_on_fastest_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when it is installed, else on asyncio's own loop.

    uvloop takes about a fifth less CPU per submit (gRPC, Redis and Kafka clients all
    run on the loop); behaviour is the same on both.
    """
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def run_child(settings: IngestSettings) -> None:
    """Entry of the extra processes of ``--processes`` (importable for spawn)."""
    sys.exit(run_one(settings))
