"""The estimator service assembled: profiles, roster, plane, gRPC server, telemetry tail.

``python -m services.estimator --port N`` runs :func:`serve`. The gRPC server carries the
``qlm.v1.Estimator`` service, ``grpc.health.v1`` (SERVING while Redis and Kafka answer)
and reflection, behind the one error interceptor of qlm's servers. ``qlm.telemetry`` and
``qlm.events`` are tailed from their end (:mod:`qlm.bus.tail`): telemetry moves the
per-(model, GPU) correction and keeps the worker roster live; ``admitted`` and
``first_token`` events pair predicted with realised waits (Prometheus histograms). The
queue view is re-read in the background every ``refresh_interval_s``, so PredictWait on
ingest's submit path never waits for a snapshot.

Graceful shutdown (SIGTERM): health NOT_SERVING, the server stops taking calls and
drains for ``shutdown_grace_s``, then the tail and the clients close.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from qlm.aio import cancel_and_wait
from qlm.api.v1 import estimator_pb2, estimator_pb2_grpc
from qlm.bus.records import Event, Telemetry
from qlm.bus.tail import TopicTail
from qlm.bus.topics import TopicNames, ensure_topics, topic_specs
from qlm.core.estimator import RWTEstimator
from qlm.core.perf import PROFILE_DIR, ProfileBook
from qlm.estimator_plane import EstimatorPlane
from qlm.log import get_logger
from qlm.roster import WorkerRoster, read_workers_file
from qlm.store.client import redis_client
from qlm.store.store import RedisQueueStore
from services.common.entrypoint import run_until_signal
from services.common.errors import ErrorInterceptor
from services.common.probes import kafka_answers
from services.common.tls import add_listener
from services.estimator.metrics import EstimatorMetrics
from services.estimator.servicer import EstimatorServicer
from services.estimator.settings import EstimatorSettings

log = get_logger("services.estimator")

SERVICE_NAME = estimator_pb2.DESCRIPTOR.services_by_name["Estimator"].full_name
Probe = Callable[[], Awaitable[bool]]


class EstimatorApp:
    """One estimator process. ``await app.start()``, then ``await app.stop()``."""

    def __init__(self, settings: EstimatorSettings, clock: Callable[[], float] = time.time,
                 profiles: ProfileBook | None = None) -> None:
        self.settings = s = settings
        self.clock = clock
        self.topics = TopicNames(s.topic_prefix)
        self.metrics = EstimatorMetrics()
        self.profiles = profiles or ProfileBook.load(s.profiles_dir or PROFILE_DIR)
        declared = read_workers_file(s.workers_file) if s.workers_file else ()
        self.roster = WorkerRoster(declared, timeout_s=s.worker_timeout_s, started_at=clock())
        self.redis = redis_client(s.redis_url, decode_responses=True)
        self.store = RedisQueueStore(self.redis, prefix=s.key_prefix, clock=clock)
        self.plane = EstimatorPlane(
            RWTEstimator(self.profiles), self.roster, self.store,
            admission_min_p=s.admission_min_p, refresh_interval_s=s.refresh_interval_s,
            clock=clock, on_correction=self.metrics.on_correction,
            on_realised=self.metrics.on_realised, on_answer=self._count_answer,
            policy=s.policy)
        self.tail = TopicTail(s.kafka_bootstrap, [self.topics.telemetry, self.topics.events],
                              self._on_record, client_id="qlm-estimator",
                              auth=s.kafka_auth())
        self.health = health_aio.HealthServicer()
        self.server = grpc.aio.server(interceptors=[ErrorInterceptor()],
                                      options=[("grpc.so_reuseport", 0)])
        estimator_pb2_grpc.add_EstimatorServicer_to_server(EstimatorServicer(self.plane),
                                                           self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self.server)
        self.port = add_listener(self.server, f"{s.host}:{s.port}", s)
        self.metrics_port: int | None = None
        self._probes: Sequence[Probe] = (self.store.ping,
                                         lambda: kafka_answers(s.kafka_bootstrap, s.kafka_auth()))
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> None:
        s = self.settings
        await ensure_topics(s.kafka_bootstrap, topic_specs(self.topics, s.topic_layout()),
                            s.kafka_auth())
        await self.tail.start()
        await self.server.start()
        if s.serve_metrics:
            server, _ = start_http_server(s.metrics_port, s.host, registry=self.metrics.registry)
            self.metrics_port = server.server_port
            self._metrics_server = server
        await self.refresh_health()
        self._tasks = [asyncio.create_task(self.tail.run(), name="estimator-tail"),
                       asyncio.create_task(self._watch_health(), name="estimator-health"),
                       asyncio.create_task(self.plane.keep_fresh(), name="estimator-view")]
        log.info("estimator_listening", port=self.port, metrics_port=self.metrics_port,
                 profiles=len(self.profiles.profiles), workers=sorted(self.roster.workers))

    async def stop(self) -> None:
        """Health NOT_SERVING → stop taking calls → drain (grace) → close."""
        self._stopping = True
        await cancel_and_wait(self._tasks)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.shutdown_grace_s)
        await self.tail.stop()
        await self.redis.aclose()
        if self.metrics_port is not None:
            self._metrics_server.shutdown()
        log.info("estimator_stopped")

    async def refresh_health(self) -> bool:
        results = await asyncio.gather(*(_safe(p) for p in self._probes))
        healthy = all(results) and not self._stopping
        status = (health_pb2.HealthCheckResponse.SERVING if healthy
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
        return healthy

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            await self.refresh_health()

    def _on_record(self, topic: str, value: bytes | None) -> None:
        if value is None:
            return
        if topic == self.topics.telemetry:
            self.plane.on_telemetry(Telemetry.from_json(value))
        elif topic == self.topics.events:
            self.plane.on_event(Event.from_json(value))

    def _count_answer(self, slo_class: str, admit: bool) -> None:
        self.metrics.predictions.labels(slo_class, "true" if admit else "false").inc()


async def _safe(probe: Probe) -> bool:
    try:
        return bool(await asyncio.wait_for(probe(), timeout=2.0))
    except Exception:
        return False


async def serve(settings: EstimatorSettings) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    await run_until_signal(EstimatorApp(settings))
