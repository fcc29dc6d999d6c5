"""The scheduler service assembled: lease, event tail, scheduling loop, metrics.

Tasks of one replica (:class:`SchedulerApp`):

* **lease**: a standby tries to acquire every ``lease_ttl_s / 4``; the leader renews
  every ``lease_renew_s`` (:mod:`services.scheduler.lease`);
* **tail**: follows ``qlm.events`` and ``qlm.telemetry`` from their end (no consumer
  group: every replica sees every record; they are hints, nothing is committed). Events
  of a new, finished, evicted, cancelled or failed request and a finished model swap
  wake the loop; telemetry and worker events keep the :class:`~qlm.roster.WorkerRoster`
  current;
* **loop**: a step (:mod:`services.scheduler.loop`) on every wake-up (after
  ``debounce_s`` to gather a burst) and at least every ``tick_s``.

Stop (SIGTERM): the loop and the tail stop, the lease is released at once (a standby
takes over on its next try), the producer flushes, the clients close.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable

from aiokafka.errors import KafkaError
from prometheus_client import start_http_server

from qlm.aio import cancel_and_wait, wait_event, watch_loop_lag
from qlm.bus.producer import BusProducer
from qlm.bus.records import Event, Telemetry
from qlm.bus.tail import TopicTail
from qlm.bus.topics import TopicNames, ensure_topics, topic_specs
from qlm.core.corrections import CorrectedProfiles
from qlm.core.errors import InvalidInput, QlmError, Unavailable
from qlm.core.estimator import RWTEstimator
from qlm.core.forecast import Forecaster
from qlm.core.perf import PROFILE_DIR, ProfileBook
from qlm.core.policies.base import Policy, PolicyContext, make_policy
from qlm.core.types import DEFAULT_TENANT, QueueSnapshot, SLOClass
from qlm.log import get_logger
from qlm.roster import WorkerRoster, read_workers_file
from qlm.store.client import redis_client
from qlm.store.store import RedisQueueStore
from services.common.entrypoint import run_until_signal
from services.scheduler.lease import LeaderLease, LeaseKeys
from services.scheduler.loop import COMMAND_LINGER_MS, SchedulingLoop, StepReport
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.settings import SchedulerSettings

log = get_logger("services.scheduler.app")

#: Event types after which the queue changed enough to decide again at once.
WAKING_EVENTS = frozenset({"admitted", "finished", "evicted", "cancelled", "failed",
                           "swapped"})


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class SchedulerApp:
    """One scheduler replica. ``await app.start()``, then ``await app.stop()``."""

    def __init__(self, settings: SchedulerSettings, clock: Callable[[], float] = time.time,
                 profiles: ProfileBook | None = None, policy: Policy | None = None) -> None:
        self.settings = s = settings
        self.clock = clock
        self.topics = TopicNames(s.topic_prefix)
        self.instance_id = s.instance_id or default_instance_id()
        self.profiles = profiles or ProfileBook.load(s.profiles_dir or PROFILE_DIR)
        self.policy = policy or make_policy(s.policy)
        context = PolicyContext(self.profiles, dict(s.policy_options))
        self.policy.decide(QueueSnapshot(clock(), (), ()), context)  # bad options fail now
        declared = read_workers_file(s.workers_file) if s.workers_file else ()
        self.roster = WorkerRoster(declared, timeout_s=s.worker_timeout_s, started_at=clock())
        self.redis = redis_client(s.redis_url, decode_responses=True)
        self.store = RedisQueueStore(self.redis, prefix=s.key_prefix, clock=clock)
        self.lease = LeaderLease(self.redis, LeaseKeys.under(s.key_prefix), self.instance_id,
                                 ttl_s=s.lease_ttl_s, margin_s=s.lease_margin_s)
        self.producer = BusProducer(s.kafka_bootstrap, client_id="qlm-scheduler",
                                    linger_ms=COMMAND_LINGER_MS,
                                    **s.kafka_auth().client_options())
        self.metrics = SchedulerMetrics()
        self.corrections = (CorrectedProfiles(self.profiles, s.correction_min_change)
                            if s.online_correction else None)
        self.loop = SchedulingLoop(
            self.store, self.producer, self.topics.lso, self.policy, context, self.roster,
            self.lease, self.metrics, command_cooldown_s=s.command_cooldown_s, clock=clock,
            gc_freeze_records=s.gc_freeze_records, state_interval_s=s.policy_state_interval_s,
            log_worker_state=s.log_worker_state,
            profiles_source=self.corrections.book if self.corrections else None,
            forecaster=Forecaster(RWTEstimator(self.profiles)))
        self.tail = TopicTail(s.kafka_bootstrap, [self.topics.events, self.topics.telemetry],
                              self._on_record, client_id=f"qlm-scheduler-{self.instance_id}",
                              auth=s.kafka_auth())
        self.metrics_port: int | None = None
        self.last_report: StepReport | None = None
        self.num_steps = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        s = self.settings
        await ensure_topics(s.kafka_bootstrap, topic_specs(self.topics, s.topic_layout()),
                            s.kafka_auth())
        await self.producer.start()
        await self.tail.start()
        if s.serve_metrics:
            server, _ = start_http_server(s.metrics_port, s.host, registry=self.metrics.registry)
            self.metrics_port = server.server_port
            self._metrics_server = server
        for name, job in (("lease", self._lease_loop), ("tail", self.tail.run),
                          ("decide", self._decide_loop),
                          ("loop-lag", lambda: watch_loop_lag(self.metrics.loop_lag.observe,
                                                             "scheduler"))):
            self._tasks.append(asyncio.create_task(job(), name=f"scheduler-{name}"))
        log.info("scheduler_started", instance=self.instance_id, policy=self.policy.name,
                 workers=sorted(self.roster.workers), metrics_port=self.metrics_port)

    async def stop(self) -> None:
        """Stop deciding, release the lease (hand over now), flush and close."""
        await self.halt()
        was_leader = self.lease.fence > 0
        try:  # the successor goes on from the counters as they are now
            await self.loop.save_state(force=True)
        except (QlmError, OSError) as error:
            log.warning("policy_state_not_saved", error=repr(error))
        await self.lease.release()
        self.metrics.is_leader.set(0)
        await self.tail.stop()
        try:  # the last step's commands: acknowledged before the producer closes
            await self.loop.settle_commands()
        except (QlmError, OSError, KafkaError) as error:
            log.warning("commands_not_acknowledged", error=repr(error))
        await self.producer.stop()
        await self.redis.aclose()
        if self.metrics_port is not None:
            self._metrics_server.shutdown()
        log.info("scheduler_stopped", instance=self.instance_id, released=was_leader)

    async def halt(self) -> None:
        """Stop every task *without* releasing the lease: what a crashed replica looks like
        to the others (the lease expires on its own). :meth:`stop` still closes."""
        await cancel_and_wait(self._tasks)
        self._tasks.clear()

    def is_leader(self) -> bool:
        return self.lease.is_held()

    def wake(self) -> None:
        """Decide again soon (an event changed the queue)."""
        self._wake.set()

    # ------------------------------------------------------------ tasks
    async def _lease_loop(self) -> None:
        s = self.settings
        while True:
            try:
                if self.lease.fence > 0:
                    held = await self.lease.renew()
                    if not held:
                        log.warning("lease_lost", instance=self.instance_id)
                else:
                    held = await self.lease.try_acquire()
                    if held:
                        log.info("lease_acquired", instance=self.instance_id,
                                 fence=self.lease.fence)
                        self.wake()
            except Unavailable as error:
                held = False
                log.warning("lease_unavailable", instance=self.instance_id, error=str(error))
            except Exception as error:  # never let the lease task die: log and try again
                held = False
                log.exception("lease_error", instance=self.instance_id, error=repr(error))
            self.metrics.is_leader.set(1 if self.lease.is_held() else 0)
            self.metrics.fence.set(self.lease.fence)
            await asyncio.sleep(s.lease_renew_s if held else s.lease_ttl_s / 4)

    async def _decide_loop(self) -> None:
        s = self.settings
        while True:
            if await wait_event(self._wake, s.tick_s) and s.debounce_s > 0:
                await asyncio.sleep(s.debounce_s)
            self._wake.clear()
            if not self.lease.is_held():
                continue
            try:
                self.last_report = await self.loop.step()
                self.num_steps += 1
                if self.corrections is not None:
                    for (model, gpu), factor in self.corrections.factors.items():
                        self.metrics.correction.labels(model, gpu).set(factor)
            except (QlmError, OSError, KafkaError) as error:  # Redis or Kafka away: retry
                self.metrics.decisions.labels(self.policy.name, "failed").inc()
                log.warning("step_failed", error=repr(error))
                await asyncio.sleep(min(1.0, s.tick_s))
            except Exception as error:  # a bug in a policy must not stop the leader deciding
                self.metrics.decisions.labels(self.policy.name, "failed").inc()
                log.exception("step_error", error=repr(error))
                await asyncio.sleep(min(1.0, s.tick_s))

    def _on_record(self, topic: str, value: bytes | None) -> None:
        if value is None:
            return
        try:
            if topic == self.topics.telemetry:
                telemetry = Telemetry.from_json(value)
                self.roster.on_telemetry(telemetry)
                if self.corrections is not None:
                    self.corrections.on_telemetry(telemetry)
            elif topic == self.topics.events:
                event = Event.from_json(value)
                self.roster.on_event(event)
                if event.type == "finished" and event.slo_class is not None:
                    slo_class = SLOClass(event.slo_class)
                    if event.num_output_tokens and self.loop.forecaster is not None:
                        self.loop.forecaster.on_finished(event.model, slo_class,
                                                         event.num_output_tokens)
                    if event.request_id is not None:
                        self.loop.note_finished(
                            event.request_id, slo_class, event.tenant or DEFAULT_TENANT,
                            event.num_prompt_tokens or 0, event.num_output_tokens or 0)
                if event.type in WAKING_EVENTS:
                    self.wake()
        except InvalidInput as error:
            log.warning("record_ignored", topic=topic, error=str(error))


async def serve(settings: SchedulerSettings) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    await run_until_signal(SchedulerApp(settings))
