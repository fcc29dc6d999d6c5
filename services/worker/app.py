"""The worker process: one or more :class:`~services.worker.worker.Worker` sharing Redis,
Kafka, one ``qlm.lso`` reader, one Prometheus endpoint and one gRPC health endpoint.

Start-up: connect to Redis and Kafka (create the topics if missing), build each
worker's engine, subscribe to queue notifications (``wake_on_enqueue``, see
:mod:`services.worker.wakeup`; idle workers then poll only every ``WATCHED_POLL_S``
as a fallback), start the workers, the LSO reader, metrics and health; health turns
SERVING once all of that runs (and stays so while Redis answers).

LSO commands are read by a consumer group of this process (``lso_group``, default
``<topic prefix>qlm-worker-<worker ids>``) and queued per worker: each worker carries
out its commands one at a time, in order, so a slow swap never delays another
worker's commands. Commands issued before the process started (older than
``STALE_COMMAND_S`` before it) are stale decisions and are ignored, and so is every
command whose fencing token (``<fence>-<seq>`` in its ``command_id``) is not the current
term's in Redis (``scheduler:fence``): a deposed leader's late command or a forged one.

Shutdown on SIGTERM / SIGINT: health NOT_SERVING, stop reading commands, drain every
worker (``shutdown_grace_s`` to finish, then requeue with progress), close clients.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from aiokafka import ConsumerRecord
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import start_http_server

from qlm import roster
from qlm.aio import cancel_and_wait, watch_loop_lag
from qlm.bus.consumer import BusConsumer
from qlm.bus.producer import BusProducer
from qlm.bus.records import LsoCommand
from qlm.bus.topics import TopicNames, ensure_topics, topic_specs
from qlm.core.errors import InvalidInput
from qlm.core.perf import PROFILE_DIR, ProfileBook
from qlm.engine.base import Engine
from qlm.engine.factory import make_engine
from qlm.log import get_logger
from qlm.store.store import RedisQueueStore
from services.common.entrypoint import stop_on_signals
from services.common.tls import add_listener
from services.worker.metrics import WorkerMetrics
from services.worker.settings import WorkerSettings
from services.worker.wakeup import QueueWatcher
from services.worker.worker import Worker, WorkerOptions

log = get_logger("services.worker.app")

HEALTH_SERVICE = "qlm.worker"
#: Commands issued this long before the process started are ignored as stale.
STALE_COMMAND_S = 5.0
#: Fallback poll period of an idle worker when queue notifications wake it.
WATCHED_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Who a worker is: its id, GPU type and the models it holds (first awake), with
    their checkpoints and engine arguments where the workers file names them."""

    id: str
    gpu: str
    models: tuple[str, ...]
    entries: tuple[roster.ModelEntry, ...] = ()


def worker_specs(settings: WorkerSettings) -> tuple[WorkerSpec, ...]:
    """The workers named by the flags, or by ``workers_file`` (only ``worker_id``'s when
    given; the vLLM engine runs one worker per process)."""
    if settings.workers_file is None:
        assert settings.worker_id and settings.gpu
        return (WorkerSpec(settings.worker_id, settings.gpu, tuple(settings.models)),)
    specs = read_workers_file(settings.workers_file)
    ids = [s.id for s in specs]
    if settings.worker_id is not None:
        specs = tuple(s for s in specs if s.id == settings.worker_id)
        if not specs:
            raise InvalidInput("worker_id", f"{settings.worker_id!r} is not in "
                               f"{settings.workers_file.name} (workers {ids})")
    if settings.engine == "vllm" and len(specs) != 1:
        raise InvalidInput("worker_id", f"the vLLM engine runs one worker per process: pick "
                           f"one of {ids} of {settings.workers_file.name}")
    return specs


def read_workers_file(path: Path) -> tuple[WorkerSpec, ...]:
    """``{"workers": [{"id": str, "gpu": str, "models": [...]}, ...]}`` (YAML), read by
    the one parser the scheduler and estimator use too (:func:`qlm.roster.read_workers_file`)."""
    return tuple(WorkerSpec(w.id, w.gpu, w.models, w.model_entries)
                 for w in roster.read_workers_file(path))


def build_engine(spec: WorkerSpec, settings: WorkerSettings, profiles: ProfileBook) -> Engine:
    vllm_options = None
    entries = {e.name: e for e in spec.entries}
    if settings.engine == "vllm":
        from qlm.engine.vllm_engine import VllmOptions

        vllm_options = VllmOptions(
            model_dir=settings.vllm_model_dir,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            max_model_len=settings.vllm_max_model_len,
            enforce_eager=settings.vllm_enforce_eager,
            load_format=settings.vllm_load_format,
        )
    return make_engine(
        settings.engine,
        spec.gpu,
        spec.models,
        profiles,
        time_scale=settings.time_scale,
        max_prefill_tokens=settings.max_prefill_tokens,
        vllm_options=vllm_options,
        entries=entries,
    )


def decode_command(raw: bytes | None) -> LsoCommand:
    """A ``qlm.lso`` record, or InvalidInput naming the bad field (the record goes to the DLQ)."""
    if raw is None:
        raise InvalidInput("record", "has no value")
    return LsoCommand.from_json(raw)


class WorkerProcess:
    """Everything one ``python -m services.worker`` runs (see the module docstring)."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.specs = worker_specs(settings)
        profiles = ProfileBook.load(settings.profiles_dir or PROFILE_DIR)
        for spec in self.specs:
            for model in spec.models:
                profiles.get(model, spec.gpu)  # NotFound names the missing profile
        self.profiles = profiles
        self.topics = TopicNames(settings.topic_prefix)
        self.metrics = WorkerMetrics()
        self.started_at = time.time()
        self.store = RedisQueueStore.from_url(
            settings.redis_url, prefix=settings.key_prefix, lease_s=settings.lease_s
        )
        self.producer = BusProducer(settings.kafka_bootstrap, client_id="qlm-worker",
                                    **settings.kafka_auth().client_options())
        self.watcher = QueueWatcher(settings.redis_url, self.store.keys)
        self.workers: dict[str, Worker] = {}
        self.commands: dict[str, asyncio.Queue[LsoCommand]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.consumer: BusConsumer[LsoCommand] | None = None
        self.health = health_aio.HealthServicer()
        self.grpc_server: grpc.aio.Server | None = None
        self.health_port = 0
        self.metrics_port = 0
        self._metrics_server: Any = None

    @property
    def lso_group(self) -> str:
        ids = "+".join(s.id for s in self.specs)
        return self.settings.lso_group or f"{self.settings.topic_prefix}qlm-worker-{ids}"

    # ------------------------------------------------------------------ start
    async def start(self) -> None:
        s = self.settings
        await self.producer.start()
        await ensure_topics(s.kafka_bootstrap, topic_specs(self.topics, s.topic_layout()),
                            s.kafka_auth())
        options = WorkerOptions(
            lease_s=s.lease_s,
            renew_interval_s=s.renew_interval_s,
            pull_interval_s=s.pull_interval_s,
            telemetry_interval_s=s.telemetry_interval_s,
            expected_output_tokens=s.expected_output_tokens,
            prefill_cap_tokens=s.prefill_cap_tokens,
        )
        for spec in self.specs:
            engine = build_engine(spec, s, self.profiles)
            worker = Worker(
                spec.id, engine, self.store, self.producer, self.topics,
                {m: self.profiles.get(m, spec.gpu) for m in spec.models}, self.metrics, options,
            )  # fmt: skip
            self.workers[spec.id] = worker
            self.commands[spec.id] = asyncio.Queue()
        if s.wake_on_enqueue:
            for worker in self.workers.values():
                self.watcher.register(worker.wake)
            if await self.watcher.start():
                for worker in self.workers.values():
                    worker.poll_interval_s = max(s.pull_interval_s, WATCHED_POLL_S)
        await asyncio.gather(*(w.start() for w in self.workers.values()))
        for worker_id in self.workers:
            self._spawn(self._obey(worker_id), f"lso-{worker_id}")
        self.consumer = BusConsumer(
            s.kafka_bootstrap, [self.topics.lso], self.lso_group, decode_command,
            self._on_command, self.topics.dlq, self.producer, client_id="qlm-worker",
            auth=s.kafka_auth(),
        )  # fmt: skip
        await self.consumer.start()
        self._spawn(self._read_commands(), "lso-reader")
        self._spawn(watch_loop_lag(self.metrics.loop_lag.observe, "worker"), "loop-lag")
        self._start_metrics()
        await self._start_health()
        log.info("worker_process_ready", workers=list(self.workers), health_port=self.health_port,
                 metrics_port=self.metrics_port, lso_group=self.lso_group)

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    def _start_metrics(self) -> None:
        server, _thread = start_http_server(
            self.settings.metrics_port, addr=self.settings.host, registry=self.metrics.registry
        )
        self._metrics_server = server
        self.metrics_port = int(server.server_port)

    async def _start_health(self) -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"{self.settings.host}:{self.settings.health_port}"
        self.health_port = add_listener(server, address, self.settings)
        await server.start()
        self.grpc_server = server
        await self._set_health(True)
        self._spawn(self._watch_health(), "health")

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", HEALTH_SERVICE, *(f"{HEALTH_SERVICE}.{w}" for w in self.workers)):
            await self.health.set(name, status)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            await self._set_health(await self.store.ping())

    # ------------------------------------------------------------------ LSO
    async def _on_command(self, command: LsoCommand, record: ConsumerRecord[Any, Any]) -> None:
        queue = self.commands.get(command.worker)
        if queue is None:
            return  # another process's worker
        if command.issued_at < self.started_at - STALE_COMMAND_S:
            log.info("lso_stale_ignored", worker=command.worker, command_id=command.command_id)
            return
        if not await self._fence_is_current(command):
            return
        queue.put_nowait(command)

    async def _fence_is_current(self, command: LsoCommand) -> bool:
        """Whether ``command`` comes from the scheduler term that holds the lease now: its
        fencing token equals the current one in Redis. An older token (a deposed leader's
        late command) or any other (forged) is dropped and logged."""
        try:
            current = await self.store.scheduler_fence()
        except Exception as error:  # Redis away: a command is a hint; the scheduler re-decides
            log.warning("lso_fence_unchecked_dropped", command_id=command.command_id,
                        error=repr(error))
            return False
        if command.fence is None or command.fence != current:
            log.warning("lso_fence_rejected", worker=command.worker,
                        command_id=command.command_id, current_fence=current)
            self.metrics.lso_rejected.labels(command.worker).inc()
            return False
        return True

    async def _read_commands(self) -> None:
        assert self.consumer is not None
        try:
            await self.consumer.run()
        except Exception:
            log.exception("lso_reader_failed")

    async def _obey(self, worker_id: str) -> None:
        worker, queue = self.workers[worker_id], self.commands[worker_id]
        while True:
            command = await queue.get()
            try:
                await worker.on_lso(command)
            except Exception as error:
                log.warning("lso_failed", worker=worker_id, command_id=command.command_id,
                            error=str(error))

    # ------------------------------------------------------------------ stop
    async def stop(self) -> None:
        await self._set_health(False)
        if self.consumer is not None:
            await self.consumer.stop()
        await asyncio.gather(
            *(w.drain(self.settings.shutdown_grace_s) for w in self.workers.values())
        )
        await cancel_and_wait(self._tasks)
        await self.watcher.stop()
        await self.producer.stop()
        await self.store.aclose()
        if self.grpc_server is not None:
            await self.grpc_server.stop(1.0)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        log.info("worker_process_stopped")


async def serve(settings: WorkerSettings, stop_signals: Sequence[int] = (signal.SIGTERM,
                                                                          signal.SIGINT)) -> None:
    """Run the worker process until one of ``stop_signals``; then shut down gracefully."""
    process = WorkerProcess(settings)
    stop = stop_on_signals(stop_signals)
    try:
        await process.start()
        await stop.wait()
        log.info("worker_process_stopping", grace_s=settings.shutdown_grace_s)
    finally:
        await process.stop()
