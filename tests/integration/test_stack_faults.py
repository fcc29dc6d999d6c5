"""The stack under faults: the four services as processes on real Redis and real Kafka,
simulated workers of two models, 20× faster than their GPUs.

* the qlm scheduler evicts running batch work for late interactive requests and swaps
  a worker's model for a model nobody serves, both visible on ``qlm.events``, while
  every request still finishes exactly once;
* a worker killed with SIGKILL loses its leases: the scheduler returns its requests to
  the queue and another worker finishes them;
* a scheduler leader killed with SIGKILL hands over to a standby replica, which keeps
  giving new requests virtual queues;
* a scheduler killed with SIGKILL and started again goes on from the fair-share counters
  it had saved in Redis, and counts on from them;
* each service killed with SIGKILL under load is started again by the supervisor
  (:mod:`qlm.localstack.supervisor`), and every request still finishes exactly once.

Short leases and ticks (``QLM_*`` variables the service processes inherit) keep each
test within seconds. Cancelling a running request through gRPC is shown by
``test_stack_e2e.py::test_mixed_traffic_finishes_exactly_once_and_cancel_stops``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from loadgen.results import write_json
from qlm.bus.topics import TopicNames
from qlm.client import QlmClient
from qlm.core.errors import InvalidInput
from qlm.localstack.process import free_loopback_port
from qlm.localstack.services import REPO_ROOT, ServiceOptions, ServiceStack
from qlm.localstack.supervisor import Backoff, Supervisor, read_state
from qlm.store.keys import Keys
from tests.integration.event_log import EventLog
from tests.integration.stack_helpers import running_stack

pytestmark = [pytest.mark.redis, pytest.mark.kafka, pytest.mark.slow]

TIME_SCALE = 20.0
#: The top-level keys the kill test writes into its result JSON (loadgen.results).
RESULT_KEYS = frozenset({
    "command", "killed_with_sigkill_under_load", "restarts", "last_exit",
    "restarted_within_s", "requests", "finished_once", "lost", "finished_twice",
})
#: Short leases and liveness (seconds) for every service process of these tests.
FAST_FAILOVER = {
    "QLM_LEASE_S": "2",              # worker: a pulled request's lease
    "QLM_RENEW_INTERVAL_S": "0.5",   # worker: lease renewal
    "QLM_TELEMETRY_INTERVAL_S": "0.5",
    "QLM_WORKER_TIMEOUT_S": "3",     # scheduler, estimator: a silent worker is gone
    "QLM_LEASE_TTL_S": "2",          # scheduler: leader lease
    "QLM_LEASE_RENEW_S": "0.5",
    "QLM_LEASE_MARGIN_S": "0.3",
    "QLM_QUEUE_DEPTH_INTERVAL_S": "0.5",  # ingest: queue-depth gauge refresh
}
LEADER_KEY = Keys().scheduler_leader
STATE_KEY = Keys().scheduler_state
Spawn = Callable[[str, list[str]], "subprocess.Popen[bytes]"]
MakeStack = Callable[..., ServiceStack]


# ------------------------------------------------------------------ stack and processes
@pytest.fixture
def make_stack(tmp_path: Path, redis_url: str, kafka_bootstrap: str, topic_prefix: str,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeStack]:
    """``make_stack(workers_yaml, time_scale=20)`` starts the four services (qlm policy)."""
    for name, value in FAST_FAILOVER.items():
        monkeypatch.setenv(name, value)
    with contextlib.ExitStack() as stacks:
        def make(workers_yaml: str, time_scale: float = TIME_SCALE) -> ServiceStack:
            return stacks.enter_context(running_stack(
                tmp_path, redis_url, kafka_bootstrap, workers_yaml, policy="qlm",
                time_scale=time_scale, admission="interactive=queue", group_window_s=0.2,
                tick_s=0.25, shutdown_grace_s=0.5, topic_prefix=topic_prefix))

        yield make


@pytest.fixture
def extra_processes(tmp_path: Path) -> Iterator[Spawn]:
    """``spawn(name, argv)`` runs one more service process (log in ``tmp_path``); all are
    killed at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with (tmp_path / f"{name}.log").open("wb") as log_file:
            process = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log_file,
                                       stderr=subprocess.STDOUT)
        started.append(process)
        return process

    yield spawn
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def worker_argv(stack: ServiceStack, worker_id: str, gpu: str, models: list[str],
                metrics_port: int) -> list[str]:
    """A worker process of one worker on ``stack``'s Redis, Kafka and topics."""
    return [sys.executable, "-m", "services.worker", "--engine", "sim",
            "--redis-url", stack.redis_url, "--kafka-bootstrap", stack.kafka_bootstrap,
            "--topic-prefix", stack.options.topic_prefix, "--worker-id", worker_id,
            "--gpu", gpu, *(a for m in models for a in ("--models", m)),
            "--time-scale", str(TIME_SCALE), "--host", "127.0.0.1",
            "--health-port", str(free_loopback_port()), "--metrics-port", str(metrics_port)]


def scheduler_argv(stack: ServiceStack, instance_id: str, metrics_port: int) -> list[str]:
    """A second scheduler replica of ``stack`` (same flags, its own id and metrics port)."""
    argv = stack.argv("scheduler")
    argv[argv.index("--metrics-port") + 1] = str(metrics_port)
    return [*argv, "--instance-id", instance_id]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
        return str(reply.read().decode())


def samples(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of one Prometheus endpoint: name → [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(scrape(port)):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def total(found: dict[str, list[tuple[dict[str, str], float]]], name: str,
          **labels: str) -> float:
    """Sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for have, v in found.get(name, ()) if labels.items() <= have.items())


def leader_of(redis_url: str) -> str | None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        value = client.get(LEADER_KEY)
        return None if value is None else str(value)
    finally:
        client.close()


# ------------------------------------------------------------------ traffic and events
@pytest.fixture
async def event_log(kafka_bootstrap: str, kafka_topics: TopicNames,
                    tmp_path: Path) -> AsyncIterator[EventLog]:
    """The test's ``qlm.events``; kept in ``tmp_path/events.jsonl`` for a failure's post-mortem."""
    log = EventLog(kafka_bootstrap, kafka_topics.events)
    await log.start()
    yield log
    await log.stop()
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log.events))


def record(request_id: str, model: str, slo_class: str, prompt_tokens: int, max_tokens: int,
           ttft_slo_s: float | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "request_id": request_id, "model": model, "slo_class": slo_class,
        "prompt_token_ids": [1 + i % 1000 for i in range(prompt_tokens)],
        "max_tokens": max_tokens, "sampling": {"ignore_eos": True}}
    if ttft_slo_s is not None:
        out["ttft_slo_s"] = ttft_slo_s
    return out


async def send_batch(bootstrap: str, topics: TopicNames, records: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await asyncio.gather(*(
            producer.send_and_wait(topics.batch_requests, json.dumps(r).encode(),
                                   key=r["request_id"].encode()) for r in records))
    finally:
        await producer.stop()


async def eventually(condition: Callable[[], bool], timeout_s: float, what: str,
                     detail: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        await asyncio.sleep(0.2)
    assert condition(), f"timed out after {timeout_s} s waiting for {what}: {detail()}"


def summary(log: EventLog, ids: set[str]) -> str:
    """What the event log says, for a failure message."""
    kinds = Counter(e["type"] for e in log.events)
    missing = sorted(ids - set(log.count("finished")))
    return f"events {dict(kinds)}; not finished: {missing}"


def assert_finished_exactly_once(log: EventLog, ids: set[str]) -> None:
    finished = log.count("finished")
    assert {rid: n for rid, n in finished.items() if n != 1} == {}
    assert set(finished) == ids


# ------------------------------------------------------------------ tests
async def test_scheduler_evicts_and_swaps_visibly_and_every_request_finishes_once(
    make_stack: MakeStack, event_log: EventLog, kafka_bootstrap: str,
    kafka_topics: TopicNames,
) -> None:
    # Two A100s (10x faster), both with vicuna-13b awake and mistral-7b asleep:
    # 2,000-token prompts fill their KV caches (60k tokens) with 25 requests each.
    stack = make_stack(
        "workers:\n"
        "  - {id: f-0, gpu: A100-80GB, models: [vicuna-13b, mistral-7b]}\n"
        "  - {id: f-1, gpu: A100-80GB, models: [vicuna-13b, mistral-7b]}\n", time_scale=10.0)
    batch = [record(f"b{i:02d}", "vicuna-13b", "batch-2", 2000, 2000) for i in range(60)]
    for wave in range(2):  # two groups (0.2 s windows), one per worker
        await send_batch(kafka_bootstrap, kafka_topics, batch[wave * 30:(wave + 1) * 30])
        await asyncio.sleep(0.3)

    def both_full() -> bool:  # 25 reservations of 2,338 tokens fill 60,311; one more slot
        # left would let the interactive group in without an eviction (workers fill in
        # steps under the prefill cap, so wait for the last one)
        started = Counter(e["worker"] for e in event_log.of_type("started"))
        return min(started["f-0"], started["f-1"]) >= 25

    await eventually(both_full, 60, "both workers full", lambda: summary(event_log, set()))

    # Interactive requests that cannot wait for ~1,800 more tokens of the running batch
    # work (about 9 s): the qlm policy evicts some of it.
    interactive = [record(f"i{i}", "vicuna-13b", "interactive", 2000, 30, ttft_slo_s=4.0)
                   for i in range(6)]
    async with QlmClient(stack.ingest_addr) as client:
        for r in interactive:
            await client.submit(r)
    # A model nobody has awake: some worker must swap to it.
    other = [record(f"m{i}", "mistral-7b", "batch-1", 500, 100, ttft_slo_s=15.0)
             for i in range(6)]
    await send_batch(kafka_bootstrap, kafka_topics, other)

    everything = {r["request_id"] for r in batch + interactive + other}
    await eventually(lambda: set(event_log.count("finished")) >= everything, 90,
                     "every request finished", lambda: summary(event_log, everything))
    await asyncio.sleep(1.0)  # a duplicate would show up by now
    assert_finished_exactly_once(event_log, everything)

    evicted = event_log.of_type("evicted")
    assert any(e["reason"].startswith("slo:") for e in evicted), evicted
    assert all(e["request_id"].startswith("b") for e in evicted)  # only batch work yields
    swaps = event_log.of_type("swapped")
    assert any(e["model"] == "mistral-7b" and e["from_model"] == "vicuna-13b"
               and e["worker"] in ("f-0", "f-1") and e["duration_s"] >= 0 for e in swaps), swaps
    for rid in (r["request_id"] for r in other):  # served after the swap, by the swapper
        (worker,) = event_log.workers_of("finished", rid)
        assert any(s["worker"] == worker and s["model"] == "mistral-7b" for s in swaps)
    async with QlmClient(stack.ingest_addr) as client:  # two more submit results
        await client.submit(interactive[0])  # the same again: a duplicate
        with pytest.raises(InvalidInput):
            await client.submit({**interactive[1], "request_id": "bad", "max_tokens": 0})
    assert_metrics_show_the_run(stack, event_log, interactive, batch + other)


def assert_metrics_show_the_run(stack: ServiceStack, log: EventLog,
                                interactive: list[dict[str, Any]],
                                batch: list[dict[str, Any]]) -> None:
    """One scrape of each service: queue depth, submits, predicted and realised waits,
    SLO attainment, decisions and their time, evictions, swaps, batch size and KV use."""
    p = stack.ports
    ingest, estimator = samples(p.ingest_metrics), samples(p.estimator_metrics)
    scheduler = samples(p.scheduler_metrics)
    worker: dict[str, list[tuple[dict[str, str], float]]] = {}
    for _, _, metrics_port in p.workers:  # one process per worker
        for name, found in samples(metrics_port).items():
            worker.setdefault(name, []).extend(found)

    submits = "qlm_ingest_submits_total"
    assert total(ingest, submits, result="admitted", source="grpc",
                 slo_class="interactive", model="vicuna-13b") == len(interactive)
    assert total(ingest, submits, result="admitted", source="kafka") == len(batch)
    assert total(ingest, submits, result="duplicate", source="grpc") == 1
    assert total(ingest, submits, result="rejected-invalid", source="grpc",
                 slo_class="unknown", model="unknown") == 1
    assert total(ingest, "qlm_ingest_submit_seconds_count") == len(interactive) + len(batch) + 2
    assert total(ingest, "qlm_ingest_predicted_wait_seconds_count") > 0
    assert "qlm_ingest_queue_depth" in ingest  # seen non-empty while the batch waited
    assert total(ingest, "qlm_ingest_queue_depth") == 0  # and refreshed since

    assert total(estimator, "qlm_estimator_wait_seconds_count", kind="realised") > 0
    assert total(estimator, "qlm_estimator_predictions_total") > 0

    assert total(scheduler, "qlm_scheduler_decisions_total", outcome="applied") > 0
    assert total(scheduler, "qlm_scheduler_decision_seconds_count", phase="decide") > 0
    assert "qlm_scheduler_queue_depth" in scheduler
    assert total(scheduler, "qlm_scheduler_evictions_total") >= len(log.of_type("evicted"))
    assert total(scheduler, "qlm_scheduler_swaps_total") >= 1

    assert total(worker, "qlm_worker_model_swaps_total") == len(log.of_type("swapped"))
    assert total(worker, "qlm_worker_requests_total", outcome="evicted") == len(
        log.of_type("evicted"))
    first_tokens = total(worker, "qlm_worker_first_tokens_total")
    assert first_tokens == len(interactive) + len(batch)
    assert {labels["slo"] for labels, _ in worker["qlm_worker_first_tokens_total"]} <= {
        "met", "missed"}
    for name in ("qlm_worker_batch_size", "qlm_worker_kv_used_fraction"):
        assert {labels["worker"] for labels, _ in worker[name]} == {"f-0", "f-1"}


async def test_killed_worker_requests_return_to_the_queue_and_finish_elsewhere(
    make_stack: MakeStack, event_log: EventLog, kafka_bootstrap: str,
    kafka_topics: TopicNames,
    extra_processes: Spawn,
) -> None:
    stack = make_stack("workers:\n  - {id: f-stay, gpu: A10-24GB, models: [mistral-7b]}\n")
    victim_metrics = free_loopback_port()
    victim = extra_processes("f-victim", worker_argv(stack, "f-victim", "A10-24GB",
                                                     ["mistral-7b"], victim_metrics))
    await eventually(lambda: "qlm_worker_batch_size" in _try_scrape(victim_metrics), 60,
                     "second worker up")
    # Several groups (0.2 s windows), so that the scheduler spreads them over both workers.
    requests = [record(f"k{i:02d}", "mistral-7b", "batch-1", 1000, 1500, ttft_slo_s=30.0)
                for i in range(30)]
    for wave in range(6):
        await send_batch(kafka_bootstrap, kafka_topics, requests[wave * 5:(wave + 1) * 5])
        await asyncio.sleep(0.3)

    def victim_busy() -> bool:
        on_victim = {e["request_id"] for e in event_log.of_type("first_token")
                     if e["worker"] == "f-victim"}
        return len(on_victim - set(event_log.count("finished"))) >= 2

    await eventually(victim_busy, 60, "requests in progress on the second worker")
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    unfinished_on_victim = (
        {e["request_id"] for e in event_log.of_type("started") if e["worker"] == "f-victim"}
        - set(event_log.count("finished")))
    assert unfinished_on_victim

    ids = {r["request_id"] for r in requests}
    await eventually(lambda: set(event_log.count("finished")) >= ids, 90,
                     "every request finished", lambda: summary(event_log, ids))
    await asyncio.sleep(1.0)
    assert_finished_exactly_once(event_log, ids)
    for rid in unfinished_on_victim:  # lease expired, requeued by the scheduler, resumed
        assert event_log.workers_of("finished", rid) == ["f-stay"], rid
        assert event_log.workers_of("started", rid)[-1] == "f-stay", rid
    assert "qlm_scheduler_requeued_total{state=\"queued\"}" in scrape(
        stack.ports.scheduler_metrics)


async def test_killed_scheduler_leader_hands_over_to_the_standby(
    make_stack: MakeStack, event_log: EventLog, kafka_bootstrap: str,
    kafka_topics: TopicNames, redis_url: str,
    extra_processes: Spawn,
) -> None:
    stack = make_stack(
        "workers:\n"
        "  - {id: f-0, gpu: A100-80GB, models: [mistral-7b, vicuna-13b]}\n"
        "  - {id: f-1, gpu: A100-80GB, models: [vicuna-13b, mistral-7b]}\n")
    leader = leader_of(redis_url)
    assert leader is not None
    standby_metrics = free_loopback_port()
    standby = extra_processes("scheduler-standby",
                              scheduler_argv(stack, "standby", standby_metrics))
    await eventually(lambda: "qlm_scheduler_is_leader 0.0" in _try_scrape(standby_metrics),
                     60, "standby replica up")

    async def serve_wave(prefix: str) -> set[str]:
        wave = [record(f"{prefix}{i}", ("mistral-7b", "vicuna-13b")[i % 2],
                       "batch-1" if i % 3 else "interactive", 100, 40) for i in range(8)]
        await send_batch(kafka_bootstrap, kafka_topics, wave[:4])
        async with QlmClient(stack.ingest_addr) as client:
            for r in wave[4:]:
                await client.submit(r)
        ids = {r["request_id"] for r in wave}
        await eventually(lambda: set(event_log.count("finished")) >= ids, 60,
                         f"wave {prefix} finished", lambda: summary(event_log, ids))
        return ids

    before = await serve_wave("pre")
    os.kill(stack.processes["scheduler"].running_pid() or 0, signal.SIGKILL)
    killed_at = time.monotonic()
    await eventually(lambda: leader_of(redis_url) == "standby", 20, "standby takes over")
    takeover_s = time.monotonic() - killed_at
    assert "qlm_scheduler_is_leader 1.0" in scrape(standby_metrics)
    after = await serve_wave("post")  # queued after the takeover: only the standby decides

    await asyncio.sleep(1.0)
    assert_finished_exactly_once(event_log, before | after)
    applied = [line for line in scrape(standby_metrics).splitlines()
               if line.startswith("qlm_scheduler_decisions_total") and 'outcome="applied"' in line]
    assert applied and float(applied[0].split()[-1]) > 0
    assert takeover_s < 20
    assert standby.poll() is None


def saved_policy_state(redis_url: str) -> dict[str, Any] | None:
    """What the scheduler last saved for the qlm policy: {fence, saved_at, state}."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        text = client.hget(STATE_KEY, "qlm")
        return None if text is None else dict(json.loads(str(text)))
    finally:
        client.close()


def fair_counters(saved: dict[str, Any] | None) -> dict[str, float]:
    """The interactive class's counter of each tenant in a saved state."""
    if saved is None:
        return {}
    return dict(saved["state"]["fair_share"]["counters"].get("interactive", {}))


async def test_a_restarted_scheduler_goes_on_from_the_saved_fair_share_counters(
    make_stack: MakeStack, event_log: EventLog, kafka_bootstrap: str,
    kafka_topics: TopicNames, redis_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QLM_POLICY_STATE_INTERVAL_S", "0.3")
    stack = make_stack("workers:\n  - {id: t-0, gpu: A100-80GB, models: [mistral-7b]}\n")

    async def serve(prefix: str, tenants: dict[str, int]) -> None:
        wave = [{**record(f"{prefix}-{tenant}-{i}", "mistral-7b", "interactive", 200, 30),
                 "tenant": tenant} for tenant, n in tenants.items() for i in range(n)]
        await send_batch(kafka_bootstrap, kafka_topics, wave)
        ids = {r["request_id"] for r in wave}
        await eventually(lambda: set(event_log.count("finished")) >= ids, 60,
                         f"{prefix} finished", lambda: summary(event_log, ids))

    async def settled() -> dict[str, Any]:
        """The saved state once two saves in a row agree (nothing left to count)."""
        last: dict[str, Any] | None = None
        for _ in range(100):
            now = saved_policy_state(redis_url)
            if (now is not None and last is not None and now["saved_at"] > last["saved_at"]
                    and now["state"] == last["state"]):
                return now
            last = now
            await asyncio.sleep(0.4)
        raise AssertionError(f"the saved state did not settle: {last}")

    await serve("pre", {"heavy": 12, "light": 2})
    before = await settled()
    counters = fair_counters(before)
    # every request is charged, also one that started and ended between two decisions
    # (by its finished event); light may have been lifted to heavy's counter on arrival
    assert counters["heavy"] > counters["light"] > 0, counters

    scheduler = stack.processes["scheduler"]
    os.kill(scheduler.running_pid() or 0, signal.SIGKILL)
    await eventually(lambda: scheduler.running_pid() is None, 10, "the scheduler is dead")
    stack.start_one("scheduler")  # ready: it holds the lease (a new term)
    await eventually(lambda: (saved_policy_state(redis_url) or before)["fence"]
                     > before["fence"], 20, "the restarted scheduler saves")
    after = saved_policy_state(redis_url)
    assert after is not None
    assert after["state"] == before["state"]  # restored whole, then saved unchanged
    restores = samples(stack.ports.scheduler_metrics)
    assert total(restores, "qlm_scheduler_policy_state_restores_total", outcome="restored") == 1

    await serve("post", {"light": 1})  # counted on from the restored counters
    grown = fair_counters(await settled())
    assert grown["heavy"] == counters["heavy"]
    assert grown["light"] > counters["light"]


def _try_scrape(port: int) -> str:
    try:
        return scrape(port)
    except OSError:
        return ""


async def test_each_killed_service_is_restarted_by_the_supervisor_and_nothing_is_lost(
    tmp_path: Path, redis_url: str, kafka_bootstrap: str, kafka_topics: TopicNames,
    event_log: EventLog, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in FAST_FAILOVER.items():
        monkeypatch.setenv(name, value)
    workers = tmp_path / "workers.yaml"
    workers.write_text("workers:\n  - {id: s-0, gpu: A10-24GB, models: [mistral-7b]}\n"
                       "  - {id: s-1, gpu: A10-24GB, models: [mistral-7b]}\n")
    options = ServiceOptions(policy="qlm", workers_file=workers, time_scale=TIME_SCALE,
                             admission="interactive=queue", group_window_s=0.2, tick_s=0.25,
                             shutdown_grace_s=0.5, topic_prefix=kafka_topics.prefix)
    stack = ServiceStack(tmp_path / "stack", redis_url, kafka_bootstrap, options)
    supervisor = Supervisor(stack, Backoff(base_s=0.5, max_s=2.0), poll_s=0.2)
    await asyncio.to_thread(supervisor.start)
    watching = threading.Thread(target=supervisor.run, name="supervisor", daemon=True)
    watching.start()
    ids: set[str] = set()
    restart_s: dict[str, float] = {}
    try:
        victims = stack.process_names()  # each service and the worker of one GPU
        assert victims == ("estimator", "ingest", "scheduler", "worker-s-0", "worker-s-1")
        for wave, victim in enumerate(victims[:4]):  # each service killed under load
            requests = [record(f"v{wave}-{i}", "mistral-7b", "batch-1", 300, 300,
                               ttft_slo_s=120.0) for i in range(8)]
            await send_batch(kafka_bootstrap, kafka_topics, requests)
            ids |= {r["request_id"] for r in requests}
            await asyncio.sleep(1.0)
            old_pid = stack.processes[victim].running_pid()
            assert old_pid is not None
            os.kill(old_pid, signal.SIGKILL)

            def restarted(victim: str = victim, old_pid: int = old_pid) -> bool:
                pid = stack.processes[victim].running_pid()
                return supervisor.records[victim].restarts == 1 and pid not in (None, old_pid)

            killed_at = time.monotonic()
            await eventually(restarted, 120, f"{victim} restarted by the supervisor",
                             lambda: str(supervisor.records))
            restart_s[victim] = time.monotonic() - killed_at
            assert supervisor.records[victim].last_exit == -signal.SIGKILL
        await eventually(lambda: set(event_log.count("finished")) >= ids, 180,
                         "every request finished", lambda: summary(event_log, ids))
        await asyncio.sleep(1.0)
        assert_finished_exactly_once(event_log, ids)  # 0 lost, 0 finished twice
        state = read_state(stack.run_dir)
        assert state is not None
        restarts = {n: r["restarts"] for n, r in state["services"].items()}
        assert restarts == {**{n: 1 for n in victims[:4]}, "worker-s-1": 0}
        assert supervisor.records["worker-s-1"].last_exit is None  # the other GPU went on
        result_path = os.environ.get("QLM_KILL_RESULT")
        if result_path:
            finished = event_log.count("finished")
            write_json(Path(result_path), {
                "command": f"QLM_KILL_RESULT={result_path} python -m pytest -q tests/"
                           "integration/test_stack_faults.py::test_each_killed_service_is_"
                           "restarted_by_the_supervisor_and_nothing_is_lost",
                "killed_with_sigkill_under_load": list(victims[:4]),
                "restarts": restarts,
                "last_exit": {n: supervisor.records[n].last_exit for n in victims},
                "restarted_within_s": {n: round(s, 1) for n, s in restart_s.items()},
                "requests": len(ids), "finished_once": sum(finished[i] == 1 for i in ids),
                "lost": len(ids - set(finished)), "finished_twice": sum(
                    finished[i] > 1 for i in ids),
            }, RESULT_KEYS)
    finally:
        supervisor.stop()
        await asyncio.to_thread(watching.join, 10)
        stack.down()
