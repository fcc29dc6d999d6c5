"""The scheduler service on real Redis and real Kafka: leader election and takeover,
virtual queues from a snapshot, LSO commands on ``qlm.lso``, rejections, expired leases.

Replicas run in process (:class:`SchedulerApp`); a crash is :meth:`SchedulerApp.halt`
(tasks cancelled, lease not released), so the standby must wait for the lease to expire.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer

from qlm.bus.records import LsoCommand
from qlm.bus.topics import TopicNames
from qlm.core.policies.base import PolicyContext
from qlm.core.policies.qlm import QlmPolicy
from qlm.core.types import (
    SLO,
    Decision,
    Evict,
    Place,
    QueueSnapshot,
    Reject,
    Request,
    RequestState,
    SLOClass,
    Swap,
)
from qlm.store.keys import Keys
from qlm.store.store import RedisQueueStore
from services.scheduler.app import SchedulerApp
from services.scheduler.settings import SchedulerSettings

pytestmark = [pytest.mark.redis, pytest.mark.kafka]

WORKERS_YAML = """
workers:
  - {id: w-mistral, gpu: A100-80GB, models: [mistral-7b, vicuna-13b]}
  - {id: w-vicuna, gpu: A100-80GB, models: [vicuna-13b, mistral-7b]}
"""
TAKEOVER_TIMEOUT_S = 20.0  # generous: the lease is 1.5 s (2 s for processes)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workers_file(tmp_path: Path) -> Path:
    path = tmp_path / "workers.yaml"
    path.write_text(WORKERS_YAML)
    return path


def _settings(redis_url: str, kafka: str, topics: TopicNames, workers_file: Path,
              **changes: Any) -> SchedulerSettings:
    values: dict[str, Any] = {
        "redis_url": redis_url, "kafka_bootstrap": kafka, "topic_prefix": topics.prefix,
        "workers_file": workers_file, "serve_metrics": False, "log_json": False,
        "lease_ttl_s": 1.5, "lease_renew_s": 0.3, "lease_margin_s": 0.3, "tick_s": 0.2,
        "worker_timeout_s": 0, "policy": "fcfs",
    }
    values.update(changes)
    return SchedulerSettings(**values)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisQueueStore]:
    queue_store = RedisQueueStore.from_url(redis_url, group_window_s=5.0)
    yield queue_store
    await queue_store.aclose()


@pytest.fixture
async def start_scheduler(
    redis_url: str, kafka_bootstrap: str, kafka_topics: TopicNames, workers_file: Path
) -> AsyncIterator[Callable[..., Awaitable[SchedulerApp]]]:
    apps: list[SchedulerApp] = []

    async def start(instance_id: str, **changes: Any) -> SchedulerApp:
        policy = changes.pop("policy_object", None)
        workers = changes.pop("workers_file", workers_file)
        settings = _settings(redis_url, kafka_bootstrap, kafka_topics, workers,
                             instance_id=instance_id, **changes)
        app = SchedulerApp(settings, policy=policy)
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop()


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0,
                     what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


def _request(model: str, slo_class: SLOClass = SLOClass.BATCH_1, *, prompt: int = 200,
             max_tokens: int = 100, at: float | None = None) -> Request:
    return Request(uuid.uuid4().hex, model, prompt, max_tokens, slo_class,
                   SLO.for_class(slo_class), time.time() if at is None else at)


async def _leader(apps: list[SchedulerApp]) -> SchedulerApp:
    async def one_leads() -> bool:
        return sum(a.is_leader() for a in apps) == 1

    await eventually(one_leads, what="one leader")
    return next(a for a in apps if a.is_leader())


# ------------------------------------------------------------------ leader election
async def test_one_replica_leads_and_the_standby_takes_over_when_it_dies(
    start_scheduler: Callable[..., Awaitable[SchedulerApp]], store: RedisQueueStore
) -> None:
    await store.enqueue(_request("mistral-7b"))
    a = await start_scheduler("replica-a")
    b = await start_scheduler("replica-b")
    leader = await _leader([a, b])
    standby = b if leader is a else a
    assert await leader.lease.owner() == leader.instance_id
    await eventually(lambda: _true(leader.num_steps > 0), what="leader steps")
    await asyncio.sleep(0.5)
    assert standby.num_steps == 0  # the standby never applied a decision
    first_fence = leader.lease.fence

    await leader.halt()  # crash: the lease is not released
    assert await standby.lease.owner() == leader.instance_id

    async def taken_over() -> bool:
        return standby.is_leader() and await standby.lease.owner() == standby.instance_id

    await eventually(taken_over, TAKEOVER_TIMEOUT_S, "standby takeover")
    assert standby.lease.fence > first_fence  # a new term
    await eventually(lambda: _true(standby.num_steps > 0), what="new leader steps")
    assert not leader.is_leader()  # its own deadline passed: it would not write any more


async def test_graceful_stop_hands_over_at_once(
    start_scheduler: Callable[..., Awaitable[SchedulerApp]],
) -> None:
    a = await start_scheduler("replica-a")
    b = await start_scheduler("replica-b")
    leader = await _leader([a, b])
    standby = b if leader is a else a
    await leader.stop()
    assert await standby.lease.owner() in (None, standby.instance_id)  # released, not expired
    await eventually(lambda: _true(standby.is_leader()), TAKEOVER_TIMEOUT_S, "takeover")


async def _true(value: bool) -> bool:
    return value


# ------------------------------------------------------------------ decisions applied
async def test_queued_groups_get_virtual_queues_on_workers_that_serve_them(
    start_scheduler: Callable[..., Awaitable[SchedulerApp]], store: RedisQueueStore
) -> None:
    for model in ("mistral-7b", "vicuna-13b"):
        for slo_class in (SLOClass.INTERACTIVE, SLOClass.BATCH_1):
            for _ in range(3):
                await store.enqueue(_request(model, slo_class))
    app = await start_scheduler("solo", policy="qlm")
    await app.loop.lease.try_acquire()
    report = await app.loop.step()
    assert report.applied and report.num_queued == 12 and report.num_groups == 4

    snapshot = await store.snapshot()
    placed = [key for order in snapshot.virtual_queues.values() for key in order]
    assert sorted(placed) == sorted(g.key for g in snapshot.groups)  # each group exactly once
    assert set(snapshot.virtual_queues) == {"w-mistral", "w-vicuna"}
    # Each worker's head group is of its awake model (no swap needed to start).
    assert snapshot.virtual_queues["w-mistral"][0].model == "mistral-7b"
    assert snapshot.virtual_queues["w-vicuna"][0].model == "vicuna-13b"
    depth = app.metrics.queue_depth.labels("interactive", "vicuna-13b")._value.get()
    assert depth == 3


class ScriptedPolicy:
    """A policy that returns one fixed decision (to drive the apply path)."""

    name: ClassVar[str] = "scripted"

    def __init__(self) -> None:
        self.decision = Decision()

    def decide(self, snapshot: QueueSnapshot, ctx: PolicyContext) -> Decision:
        return self.decision


async def _lso_records(kafka: str, topic: str, count: int, timeout_s: float = 15.0
                       ) -> list[LsoCommand]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    records: list[LsoCommand] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                records += [LsoCommand.from_json(r.value) for r in batch]
    finally:
        await consumer.stop()
    return records


async def _rpush_calls(store: RedisQueueStore) -> int:
    """How many RPUSH Redis ran so far (set_virtual_queues writes each queue with them)."""
    stats = await store.client.info("commandstats")
    return int(stats.get("cmdstat_rpush", {}).get("calls", 0))


async def test_evict_swap_and_reject_decisions_are_applied(
    start_scheduler: Callable[..., Awaitable[SchedulerApp]], store: RedisQueueStore,
    kafka_bootstrap: str, kafka_topics: TopicNames,
) -> None:
    running = [_request("mistral-7b") for _ in range(2)]
    for request in running:
        await store.enqueue(request)
    await store.claim("w-mistral", [r.id for r in running], lease_s=60)
    doomed = _request("vicuna-13b", SLOClass.INTERACTIVE)
    await store.enqueue(doomed)
    group = store.group_of(doomed)

    policy = ScriptedPolicy()
    policy.decision = Decision(
        placements=(Place("w-vicuna", (group,)), Place("w-mistral", ())),
        evictions=tuple(Evict("w-mistral", r.id, "make room", state_swap=True)
                        for r in running),
        swaps=(Swap("w-mistral", "vicuna-13b"),),
        rejections=(Reject(doomed.id, "deadline passed"),),
    )
    app = await start_scheduler("solo", policy_object=policy, tick_s=60.0)
    await app.loop.lease.try_acquire()
    fence = app.lease.fence
    report = await app.loop.step()
    assert report.applied and report.num_commands == 2
    pushes = await _rpush_calls(store)
    again = await app.loop.step()  # within the cooldown: not sent twice
    assert again.num_commands == 0
    assert await _rpush_calls(store) == pushes  # the same queues: none written again

    commands = await _lso_records(kafka_bootstrap, kafka_topics.lso, 2)
    evicts = [c for c in commands if c.type == "evict"]
    swaps = [c for c in commands if c.type == "swap"]
    assert len(evicts) == 1 and len(swaps) == 1, commands
    assert evicts[0].worker == "w-mistral" and evicts[0].keep_kv
    assert sorted(evicts[0].request_ids) == sorted(r.id for r in running)
    assert swaps[0].worker == "w-mistral" and swaps[0].to_model == "vicuna-13b"
    assert all(c.command_id.startswith(f"{fence}-") for c in commands)

    assert (await store.get(doomed.id)).state is RequestState.FAILED
    snapshot = await store.snapshot()
    assert snapshot.virtual_queues["w-vicuna"] == (group,)
    assert app.metrics.evictions.labels("w-mistral")._value.get() == 2


async def test_a_standby_applies_nothing(
    start_scheduler: Callable[..., Awaitable[SchedulerApp]], store: RedisQueueStore
) -> None:
    await store.enqueue(_request("mistral-7b"))
    leader = await start_scheduler("leader", tick_s=60.0)
    await eventually(lambda: _true(leader.is_leader()), what="leader")
    policy = ScriptedPolicy()
    policy.decision = Decision(placements=(Place("w-mistral", ()),),
                               swaps=(Swap("w-mistral", "vicuna-13b"),))
    standby = await start_scheduler("standby", policy_object=policy)
    report = await standby.loop.step()
    assert not report.applied
    assert await standby.lease.owner() == "leader"


async def test_expired_leases_go_back_to_the_queue(
    start_scheduler: Callable[..., Awaitable[SchedulerApp]], store: RedisQueueStore
) -> None:
    requests = [_request("mistral-7b") for _ in range(3)]
    for request in requests:
        await store.enqueue(request)
    claimed = await store.claim("w-gone", [r.id for r in requests], lease_s=0.2)
    assert len(claimed) == 3
    await asyncio.sleep(0.3)
    app = await start_scheduler("solo", tick_s=60.0)
    await app.loop.lease.try_acquire()
    report = await app.loop.step()
    assert report.num_requeued == 3
    for request in requests:
        assert (await store.get(request.id)).state is RequestState.QUEUED
    snapshot = await store.snapshot()
    assert sorted(r.id for g in snapshot.groups for r in g.requests) == sorted(
        r.id for r in requests)
    assert snapshot.virtual_queues.get("w-gone", ()) == ()  # not a live worker: no queue
    assert app.metrics.requeued.labels("queued")._value.get() == 3


# ------------------------------------------------------------------ real processes
def _spawn(instance_id: str, redis_url: str, kafka: str, topics: TopicNames,
           workers_file: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start a scheduler process logging to ``log``: a pipe nobody reads would fill
    (64 KiB) and block the process on its next log line, shutdown included."""
    argv = [sys.executable, "-m", "services.scheduler", "--instance-id", instance_id,
            "--redis-url", redis_url, "--kafka-bootstrap", kafka,
            "--topic-prefix", topics.prefix, "--workers-file", str(workers_file),
            "--policy", "fcfs", "--metrics-port", "0", "--host", "127.0.0.1",
            "--lease-ttl-s", "2", "--lease-renew-s", "0.5", "--lease-margin-s", "0.3",
            "--log-json", "false"]
    with log.open("wb") as sink:
        return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=sink)


async def test_killing_the_leader_process_hands_over_to_the_standby_process(
    redis_url: str, kafka_bootstrap: str, kafka_topics: TopicNames, workers_file: Path,
    tmp_path: Path,
) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    logs = {name: tmp_path / f"{name}.log" for name in ("proc-a", "proc-b")}
    processes = {name: _spawn(name, redis_url, kafka_bootstrap, kafka_topics, workers_file,
                              logs[name])
                 for name in ("proc-a", "proc-b")}
    try:
        async def owner() -> str | None:
            value = await client.get(Keys().scheduler_leader)
            return None if value is None else str(value)

        await eventually(lambda: _is_in(owner(), processes), 60.0, "a leader process")
        leader = await owner()
        assert leader is not None
        standby = next(name for name in processes if name != leader)
        processes[leader].send_signal(signal.SIGKILL)  # no release: the lease must expire
        processes[leader].wait(timeout=10)

        async def standby_leads() -> bool:
            return await owner() == standby

        await eventually(standby_leads, TAKEOVER_TIMEOUT_S, "standby process takeover")
        processes[standby].send_signal(signal.SIGTERM)  # graceful: releases the lease
        assert processes[standby].wait(timeout=30) == 0, logs[standby].read_text()[-4000:]
        assert await owner() is None
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        await client.aclose()


async def _is_in(value: Awaitable[str | None], names: dict[str, Any]) -> bool:
    return await value in names


async def test_lease_fencing_and_a_leader_that_cannot_renew_stops_in_time(redis_url: str) -> None:
    from services.scheduler.lease import LeaderLease, LeaseKeys

    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    clock = [100.0]
    keys = LeaseKeys.under("qlm:")
    a = LeaderLease(client, keys, "a", ttl_s=10.0, margin_s=1.0, monotonic=lambda: clock[0])
    b = LeaderLease(client, keys, "b", ttl_s=10.0, margin_s=1.0, monotonic=lambda: clock[0])
    try:
        assert await a.try_acquire() and a.fence == 1 and a.is_held()
        assert not await b.try_acquire() and not b.is_held()
        assert await a.try_acquire() and a.fence == 1  # re-acquiring extends the same term
        clock[0] += 9.5  # no renew for longer than ttl − margin: stop applying
        assert not a.is_held()
        assert await a.renew() and a.is_held()  # the key was still ours: renewed
        await client.delete(keys.leader)  # the key expires (a paused leader, say)
        assert await b.try_acquire() and b.fence == 2  # a new term
        assert not await a.renew() and not a.is_held() and a.fence == 0
        await a.release()  # not ours: the new leader keeps its lease
        assert await b.owner() == "b"
        await b.release()
        assert await b.owner() is None
    finally:
        await client.aclose()


class FlakyPolicy(ScriptedPolicy):
    """Fails on its first decision with work to do, then decides (a policy bug must not
    stop the leader). The start-up check on an empty snapshot passes."""

    def __init__(self) -> None:
        super().__init__()
        self.num_failures = 0

    def decide(self, snapshot: QueueSnapshot, ctx: PolicyContext) -> Decision:
        if snapshot.workers and self.num_failures == 0:
            self.num_failures += 1
            raise ValueError("a policy bug")
        return self.decision


async def test_a_failing_decision_does_not_stop_the_leader(
    start_scheduler: Callable[..., Awaitable[SchedulerApp]],
) -> None:
    policy = FlakyPolicy()
    app = await start_scheduler("solo", policy_object=policy, tick_s=0.1)
    await eventually(lambda: _true(app.num_steps >= 2), what="steps after a failure")
    assert app.metrics.decisions.labels("scripted", "failed")._value.get() == 1
    assert app.is_leader()


# ------------------------------------------------------------------ policy state
SAVED_COUNTERS = {"fair_share": {"counters": {"interactive": {"heavy": 9000.0, "light": 10.0}},
                                 "last_left": {"interactive": 10.0}}}


def _counters(app: SchedulerApp) -> dict[Any, float]:
    policy = app.policy
    assert isinstance(policy, QlmPolicy)
    return policy.counters.counters()


async def test_a_graceful_handover_carries_the_fair_share_counters(
    start_scheduler: Callable[..., Awaitable[SchedulerApp]], store: RedisQueueStore
) -> None:
    await store.save_policy_state("qlm", {"fence": 0, "saved_at": 0.0, "state": SAVED_COUNTERS})
    first = await start_scheduler("first", policy="qlm")
    await eventually(lambda: _true(first.num_steps >= 1), what="a first decision")
    expected = {(SLOClass.INTERACTIVE, "heavy"): 9000.0, (SLOClass.INTERACTIVE, "light"): 10.0}
    assert _counters(first) == expected  # restored before its first decision
    assert first.metrics.state_restores.labels("restored")._value.get() == 1
    second = await start_scheduler("second", policy="qlm")
    await first.stop()  # saves once more, then hands the lease over at once
    await eventually(lambda: _true(second.num_steps >= 1), what="the standby decides")
    assert _counters(second) == expected
    saved = await store.policy_state("qlm")
    assert saved is not None and saved["fence"] == second.lease.fence


@pytest.mark.parametrize("stored", [
    "{not json",
    '["a list"]',
    '{"fence": "x", "state": {}}',
    '{"fence": 3}',
    '{"fence": 3, "state": {"fair_share": {"counters": {"interactive": {"a": "x"}}}}}',
])
async def test_a_malformed_saved_state_is_ignored_and_the_leader_decides(
    start_scheduler: Callable[..., Awaitable[SchedulerApp]], store: RedisQueueStore,
    stored: str,
) -> None:
    await store.client.hset(store.keys.scheduler_state, "qlm", stored)
    await store.enqueue(_request("mistral-7b"))
    app = await start_scheduler("solo", policy="qlm", policy_state_interval_s=0.1)
    await eventually(lambda: _true(app.num_steps >= 2), what="decisions")
    assert app.metrics.state_restores.labels("invalid")._value.get() == 1
    assert app.metrics.decisions.labels("qlm", "failed")._value.get() == 0
    assert (await store.snapshot()).virtual_queues  # it decided and wrote its queues
    saved = await store.policy_state("qlm")  # replaced by a good one under its fence
    assert saved is not None and saved["fence"] == app.lease.fence


async def test_a_real_policy_eviction_reaches_the_worker_on_kafka(
    start_scheduler: Callable[..., Awaitable[SchedulerApp]], store: RedisQueueStore,
    kafka_bootstrap: str, kafka_topics: TopicNames, tmp_path: Path,
) -> None:
    one_worker = tmp_path / "one.yaml"
    one_worker.write_text("workers:\n  - {id: w-mistral, gpu: A100-80GB, models: [mistral-7b]}\n")
    # 200 batch requests of 2,000 + 2,000 tokens fill the worker's KV cache (466k tokens).
    running = [_request("mistral-7b", prompt=2000, max_tokens=2000) for _ in range(200)]
    for request in running:
        await store.enqueue(request)
    assert len(await store.claim("w-mistral", [r.id for r in running], lease_s=60)) == 200
    await store.enqueue(_request("mistral-7b", SLOClass.INTERACTIVE))

    app = await start_scheduler("solo", policy="priority", workers_file=one_worker,
                                tick_s=60.0)
    await app.loop.lease.try_acquire()
    report = await app.loop.step()
    assert report.num_commands == 1
    (command,) = await _lso_records(kafka_bootstrap, kafka_topics.lso, 1)
    assert command.type == "evict" and command.worker == "w-mistral"
    assert command.reason == "priority"
    assert set(command.request_ids) <= {r.id for r in running} and command.request_ids


async def test_online_correction_feeds_the_policy_corrected_profiles(
    start_scheduler: Callable[..., Awaitable[SchedulerApp]], store: RedisQueueStore,
    kafka_bootstrap: str, kafka_topics: TopicNames,
) -> None:
    from qlm.bus.producer import BusProducer
    from qlm.bus.records import Telemetry

    await store.enqueue(_request("mistral-7b"))
    app = await start_scheduler("solo", policy="qlm", online_correction=True, tick_s=60.0)
    slow = Telemetry(worker="w-mistral", gpu="A100-80GB", at=time.time(), model="mistral-7b",
                     batch_size=8, kv_used_fraction=0.2, step_time_predicted_s=0.02,
                     step_time_observed_s=0.06, num_steps=40)
    assert app.corrections is not None
    async with BusProducer(kafka_bootstrap) as producer:
        async def corrected() -> bool:
            await producer.publish(kafka_topics.telemetry, slow)  # the tail starts at the end
            corrections = app.corrections
            return corrections is not None and corrections.estimator.correction(
                "mistral-7b", "A100-80GB") > 1.1  # enough to rebuild the book

        await eventually(corrected, 45.0, "a corrected profile book")
    await app.loop.lease.try_acquire()
    report = await app.loop.step()
    assert report.applied
    profiles = app.loop.ctx.profiles
    assert profiles is not app.profiles
    assert profiles.get("mistral-7b", "A100-80GB").decode_base_s > app.profiles.get(
        "mistral-7b", "A100-80GB").decode_base_s
    assert app.corrections.factors[("mistral-7b", "A100-80GB")] > 1.1
