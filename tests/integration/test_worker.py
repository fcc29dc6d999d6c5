"""The worker service as a process on real Redis and real Kafka, with the simulated engine.

Each test starts ``python -m services.worker`` (simulated engine, time-scaled), enqueues
requests through the store, points the worker's virtual queue at their groups and
watches Redis (records, token streams) and Kafka (``qlm.events``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiokafka import AIOKafkaConsumer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qlm.bus.producer import BusProducer
from qlm.bus.records import BatchResult, Event, LsoCommand
from qlm.bus.topics import TopicNames
from qlm.core.types import SLO, Request, RequestState, SLOClass
from qlm.localstack import free_loopback_port
from qlm.store import RedisQueueStore
from qlm.store.records import RequestRecord

pytestmark = [pytest.mark.redis, pytest.mark.kafka, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MODEL, GPU = "mistral-7b", "A100-80GB"


@dataclass
class WorkerProc:
    process: subprocess.Popen[bytes]
    log_path: Path
    health_port: int
    metrics_port: int
    worker_ids: tuple[str, ...]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as reply:
            return str(reply.read().decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def wait_serving(proc: WorkerProc, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{proc.health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.process.poll() is not None:
                raise AssertionError(f"worker exited {proc.process.returncode}:\n{proc.log()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="qlm.worker"), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError(f"worker not serving after {timeout_s}s:\n{proc.log()}")


@pytest.fixture
def start_worker(
    redis_url: str, kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> Iterator[Callable[..., WorkerProc]]:
    started: list[WorkerProc] = []

    def start(*args: str, worker_ids: Sequence[str] = ("w1",)) -> WorkerProc:
        health_port, metrics_port = free_loopback_port(), free_loopback_port()
        log_path = tmp_path / f"worker-{len(started)}.log"
        command = [
            sys.executable, "-m", "services.worker", "--engine", "sim",
            "--redis-url", redis_url, "--kafka-bootstrap", kafka_bootstrap,
            "--topic-prefix", topic_prefix, "--host", "127.0.0.1",
            "--health-port", str(health_port), "--metrics-port", str(metrics_port),
            "--telemetry-interval-s", "0.5", "--log-json", "true", *args,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file,
                                       stderr=subprocess.STDOUT)
        proc = WorkerProc(process, log_path, health_port, metrics_port, tuple(worker_ids))
        started.append(proc)
        wait_serving(proc)
        return proc

    yield start
    for proc in started:
        if proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait(10)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisQueueStore]:
    store = RedisQueueStore.from_url(redis_url, group_window_s=60.0)
    yield store
    await store.aclose()


def make_request(rid: str, max_tokens: int, slo_class: SLOClass = SLOClass.INTERACTIVE,
                 model: str = MODEL, prompt_tokens: int = 200) -> Request:
    return Request(rid, model, prompt_tokens, max_tokens, slo_class, SLO.for_class(slo_class),
                   arrival_at=time.time())


async def enqueue(store: RedisQueueStore, worker_id: str, requests: Sequence[Request]) -> None:
    for request in requests:
        prompt = list(range(1, request.prompt_tokens + 1))
        await store.enqueue(request, prompt=prompt, params={"ignore_eos": True})
    groups = sorted({store.group_of(r) for r in requests})
    snapshot = await store.snapshot()
    order = [*snapshot.virtual_queues.get(worker_id, ()), *groups]
    await store.set_virtual_queue(worker_id, list(dict.fromkeys(order)))


async def wait_for(
    check: Callable[[], Any], timeout_s: float = 30.0, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def stream_tokens(store: RedisQueueStore, rid: str) -> tuple[list[int], RequestState | None]:
    tokens: list[int] = []
    final = None
    async for chunk in store.read_tokens(rid, block_ms=200):
        tokens.extend(chunk.token_ids)
        final = chunk.final_state
    return tokens, final


class EventLog:
    """Reads a topic from the beginning in the background."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.records: list[bytes] = []
        self._consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
            group_id=f"test-{uuid.uuid4().hex[:8]}",
        )
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventLog:
        await self._consumer.start()
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        async for message in self._consumer:
            self.records.append(message.value)

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await self._consumer.stop()

    def events(self) -> list[Event]:
        return [Event.from_json(raw) for raw in self.records]

    async def wait(self, predicate: Callable[[list[Event]], bool], what: str,
                   timeout_s: float = 30.0) -> list[Event]:
        async def check() -> list[Event] | None:
            events = self.events()
            return events if predicate(events) else None

        result: list[Event] = await wait_for(check, timeout_s, what)
        return result


def finished(records: Sequence[RequestRecord]) -> bool:
    return all(r.state is RequestState.FINISHED for r in records)


async def records_of(store: RedisQueueStore, ids: Sequence[str]) -> list[RequestRecord]:
    return [await store.get(i) for i in ids]


# ---------------------------------------------------------------------------- tests
async def test_worker_finishes_each_request_once_streams_tokens_and_reports_events(
    start_worker: Callable[..., WorkerProc], store: RedisQueueStore, kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    proc = start_worker("--worker-id", "w1", "--gpu", GPU, "--models", MODEL,
                        "--time-scale", "20")
    topics = TopicNames(topic_prefix)
    async with EventLog(kafka_bootstrap, topics.events) as events, \
            EventLog(kafka_bootstrap, topics.batch_results) as results, \
            EventLog(kafka_bootstrap, topics.telemetry) as telemetry:
        requests = [make_request(f"r{i}", 20 + 7 * i) for i in range(12)]
        requests += [make_request(f"b{i}", 30, SLOClass.BATCH_1) for i in range(4)]
        await enqueue(store, "w1", requests)
        ids = [r.id for r in requests]

        async def all_finished() -> bool:
            return finished(await records_of(store, ids))

        await wait_for(all_finished, 60, "every request finished")
        for request in requests:
            tokens, final = await stream_tokens(store, request.id)
            assert final is RequestState.FINISHED
            assert len(tokens) == request.max_tokens
            record = await store.get(request.id)
            assert record.request.num_generated == request.max_tokens
            assert record.num_pulls == 1 and record.worker_id == "w1"
            assert record.first_token_at is not None

        got = await events.wait(
            lambda evs: sum(e.type == "finished" for e in evs) >= len(ids), "finished events"
        )
        for rid in ids:
            mine = [e for e in got if e.request_id == rid]
            kinds = [e.type for e in mine]
            assert kinds.count("finished") == 1, kinds
            assert kinds.count("started") == 1 and kinds.count("first_token") == 1, kinds
            assert kinds.index("started") < kinds.index("first_token") < kinds.index("finished")
            done = next(e for e in mine if e.type == "finished")
            assert done.worker == "w1" and done.num_output_tokens == next(
                r.max_tokens for r in requests if r.id == rid
            )

        async def four_results() -> bool:
            return len(results.records) >= 4

        await wait_for(four_results, 20, "batch results")
        batch = [BatchResult.from_json(raw) for raw in results.records]
        assert sorted(b.request_id for b in batch) == [f"b{i}" for i in range(4)]
        assert all(b.status == "finished" and b.num_output_tokens == 30 for b in batch)

        def busy_windows() -> list[dict[str, Any]]:
            samples = [json.loads(raw) for raw in telemetry.records]
            return [t for t in samples if t.get("num_steps", 1) > 0]

        async def some_telemetry() -> bool:
            return bool(busy_windows())

        await wait_for(some_telemetry, 20, "telemetry of a busy window")
        sample = busy_windows()[0]
        assert sample["worker"] == "w1" and sample["gpu"] == GPU and sample["model"] == MODEL
        assert sample["models"] == [MODEL]
        assert sample["step_time_predicted_s"] > 0 and sample["step_time_observed_s"] > 0

    metrics = proc.metrics()
    total = sum(r.max_tokens for r in requests)
    assert f'qlm_worker_output_tokens_total{{model="{MODEL}",worker="w1"}} {total}.0' in metrics
    assert f'qlm_worker_requests_total{{outcome="finished",worker="w1"}} {len(ids)}.0' in metrics
    proc.process.send_signal(signal.SIGTERM)
    assert proc.process.wait(30) == 0, proc.log()


async def test_evict_command_requeues_with_progress_and_the_request_resumes(
    start_worker: Callable[..., WorkerProc], store: RedisQueueStore, kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    start_worker("--worker-id", "w1", "--gpu", GPU, "--models", MODEL, "--time-scale", "2")
    topics = TopicNames(topic_prefix)
    request = make_request("long", 1000, SLOClass.BATCH_1)
    async with EventLog(kafka_bootstrap, topics.events) as events:
        await enqueue(store, "w1", [request])

        async def progressed() -> bool:
            record = await store.get("long")
            return record.state is RequestState.RUNNING and record.request.num_generated >= 30

        await wait_for(progressed, 30, "tokens streamed")
        await store.client.set(store.keys.scheduler_fence, 3)  # the current term is 3
        async with BusProducer(kafka_bootstrap) as producer:
            # a deposed leader's late command (term 2), a forged one (term 4, or no term):
            # dropped; the current term's command is obeyed (same partition: in order)
            for command_id in ("2-9", "4-1", "c1"):
                await producer.publish(topics.lso, LsoCommand(
                    type="evict", command_id=command_id, worker="w1", issued_at=time.time(),
                    request_ids=("long",), reason=f"fenced {command_id}",
                ))
            await producer.publish(topics.lso, LsoCommand(
                type="evict", command_id="3-1", worker="w1", issued_at=time.time(),
                request_ids=("long",), reason="test",
            ))
        got = await events.wait(lambda evs: any(e.type == "evicted" for e in evs), "evicted")
        evicted = next(e for e in got if e.type == "evicted")
        assert evicted.worker == "w1" and evicted.reason == "test"
        kept = evicted.num_output_tokens
        assert kept is not None and 30 <= kept < 1000

        async def done() -> RequestRecord | None:
            record = await store.get("long")
            return record if record.state is RequestState.FINISHED else None

        record = await wait_for(done, 60, "resumed request finished")
        assert record.num_evictions == 1 and record.num_pulls == 2
        tokens, final = await stream_tokens(store, "long")
        assert final is RequestState.FINISHED
        assert len(tokens) == 1000  # the kept tokens were not generated again
        got = await events.wait(lambda evs: any(e.type == "finished" for e in evs), "finished")
        kinds = [e.type for e in got if e.request_id == "long"]
        assert kinds.count("started") == 2 and kinds.count("finished") == 1
        assert kinds.count("first_token") == 1  # the resumed run had its first token already


async def test_killed_worker_leaves_leases_that_requeue_expired_returns(
    start_worker: Callable[..., WorkerProc], store: RedisQueueStore,
) -> None:
    proc = start_worker("--worker-id", "w1", "--gpu", GPU, "--models", MODEL,
                        "--lease-s", "1.5", "--renew-interval-s", "0.3")
    requests = [make_request(f"k{i}", 3000) for i in range(3)]
    await enqueue(store, "w1", requests)
    ids = [r.id for r in requests]

    async def all_progressing() -> bool:
        return all(r.state is RequestState.RUNNING and r.request.num_generated > 5
                   for r in await records_of(store, ids))

    await wait_for(all_progressing, 30, "requests running")
    assert await store.requeue_expired() == {}  # leases are renewed while it lives
    proc.process.send_signal(signal.SIGKILL)
    proc.process.wait(10)
    progress = {r.id: r.request.num_generated for r in await records_of(store, ids)}
    await asyncio.sleep(2.0)
    assert await store.requeue_expired() == {i: RequestState.QUEUED for i in ids}
    for record in await records_of(store, ids):
        assert record.state is RequestState.QUEUED
        assert record.request.num_generated == progress[record.id] > 5


async def test_restarted_worker_requeues_what_its_killed_life_held(
    start_worker: Callable[..., WorkerProc], store: RedisQueueStore,
) -> None:
    args = ("--worker-id", "w1", "--gpu", GPU, "--models", MODEL, "--time-scale", "4")
    proc = start_worker(*args)
    requests = [make_request(f"o{i}", 600) for i in range(2)]
    await enqueue(store, "w1", requests)
    ids = [r.id for r in requests]

    async def progressing() -> bool:
        return all(r.request.num_generated > 5 for r in await records_of(store, ids))

    await wait_for(progressing, 30, "requests running")
    proc.process.send_signal(signal.SIGKILL)
    proc.process.wait(10)
    start_worker(*args)  # same id, long before the 15 s leases expire

    async def all_finished() -> bool:
        return finished(await records_of(store, ids))

    await wait_for(all_finished, 30, "requests finished by the new life")
    for record in await records_of(store, ids):
        assert record.num_evictions == 1 and record.num_pulls == 2
        tokens, final = await stream_tokens(store, record.id)
        assert final is RequestState.FINISHED and len(tokens) == 600


async def test_sigterm_requeues_running_work_with_progress(
    start_worker: Callable[..., WorkerProc], store: RedisQueueStore,
) -> None:
    proc = start_worker("--worker-id", "w1", "--gpu", GPU, "--models", MODEL,
                        "--shutdown-grace-s", "0.2")
    await enqueue(store, "w1", [make_request("t0", 5000)])

    async def running() -> bool:
        record = await store.get("t0")
        return record.request.num_generated > 5

    await wait_for(running, 30, "request running")
    proc.process.send_signal(signal.SIGTERM)
    assert proc.process.wait(30) == 0, proc.log()
    record = await store.get("t0")
    assert record.state is RequestState.QUEUED and record.num_evictions == 1
    assert 5 < record.request.num_generated < 5000
    tokens, _ = await _tokens_so_far(store, "t0")
    assert len(tokens) == record.request.num_generated


async def test_cancel_stops_a_running_request(
    start_worker: Callable[..., WorkerProc], store: RedisQueueStore,
) -> None:
    start_worker("--worker-id", "w1", "--gpu", GPU, "--models", MODEL,
                 "--renew-interval-s", "0.2")
    await enqueue(store, "w1", [make_request("c0", 5000)])

    async def running() -> bool:
        return (await store.get("c0")).request.num_generated > 5

    await wait_for(running, 30, "request running")
    assert await store.cancel("c0") is RequestState.RUNNING

    async def cancelled() -> bool:
        return (await store.get("c0")).state is RequestState.CANCELLED

    await wait_for(cancelled, 10, "request cancelled")
    tokens, final = await stream_tokens(store, "c0")
    assert final is RequestState.CANCELLED and 5 < len(tokens) < 5000


async def test_workers_file_runs_several_workers_and_a_swap_command_changes_model(
    start_worker: Callable[..., WorkerProc], store: RedisQueueStore, kafka_bootstrap: str,
    topic_prefix: str, tmp_path: Path,
) -> None:
    workers_file = tmp_path / "workers.yaml"
    workers_file.write_text(
        "workers:\n"
        f"  - {{id: wa, gpu: {GPU}, models: [mistral-7b, vicuna-13b]}}\n"
        f"  - {{id: wb, gpu: {GPU}, models: [vicuna-13b]}}\n"
    )
    proc = start_worker("--workers-file", str(workers_file), "--time-scale", "20",
                        worker_ids=("wa", "wb"))
    a = [make_request(f"a{i}", 40) for i in range(3)]
    b = [make_request(f"b{i}", 40, model="vicuna-13b") for i in range(3)]
    await enqueue(store, "wa", a)
    await enqueue(store, "wb", b)

    async def all_finished() -> bool:
        return finished(await records_of(store, [r.id for r in a + b]))

    await wait_for(all_finished, 60, "both workers finished their queues")
    assert {(await store.get(r.id)).worker_id for r in a} == {"wa"}
    assert {(await store.get(r.id)).worker_id for r in b} == {"wb"}

    # wa holds vicuna-13b asleep: swap to it, then it serves vicuna requests.
    topics = TopicNames(topic_prefix)
    async with BusProducer(kafka_bootstrap) as producer:
        await store.client.set(store.keys.scheduler_fence, 1)
        await producer.publish(topics.lso, LsoCommand(
            type="swap", command_id="1-1", worker="wa", issued_at=time.time(),
            to_model="vicuna-13b",
        ))
    c = [make_request(f"c{i}", 20, SLOClass.BATCH_1, model="vicuna-13b") for i in range(2)]
    await enqueue(store, "wa", c)

    async def swapped_and_served() -> bool:
        return finished(await records_of(store, [r.id for r in c]))

    try:
        await wait_for(swapped_and_served, 60, "wa swapped to vicuna-13b and served")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{proc.log()}") from None
    assert {(await store.get(r.id)).worker_id for r in c} == {"wa"}


async def _tokens_so_far(store: RedisQueueStore, rid: str) -> tuple[list[int], int]:
    """Tokens in the stream of a request that has not ended (no final entry)."""
    tokens: list[int] = []
    count = 0
    reader = store.read_tokens(rid, block_ms=100)
    try:
        while True:
            chunk = await asyncio.wait_for(reader.__anext__(), timeout=0.5)
            tokens.extend(chunk.token_ids)
            count += 1
    except (TimeoutError, StopAsyncIteration):
        pass
    finally:
        await reader.aclose()  # type: ignore[attr-defined]
    return tokens, count


# ---------------------------------------------------------------------------- real text
async def stream_text(store: RedisQueueStore,
                      rid: str) -> tuple[list[int], str, RequestState | None]:
    tokens: list[int] = []
    texts: list[str] = []
    final = None
    async for chunk in store.read_tokens(rid, block_ms=200):
        tokens.extend(chunk.token_ids)
        texts.append(chunk.text)
        final = chunk.final_state
    return tokens, "".join(texts), final


async def test_worker_serves_real_text_from_a_checkpoint(
    start_worker: Callable[..., WorkerProc], store: RedisQueueStore, kafka_bootstrap: str,
    topic_prefix: str, tmp_path: Path, tiny_checkpoint: Path,
) -> None:
    """A workers-file model that names a checkpoint: the simulated engine encodes text and
    chat prompts with its tokenizer and chat template and "answers" with the prompt's own
    tokens then EOS (qlm.engine.simulated), so every expected text is known exactly."""
    from qlm.engine.text import TextModel

    text_model = TextModel.load(tiny_checkpoint)
    workers_file = tmp_path / "workers.yaml"
    workers_file.write_text(
        "workers:\n"
        f"  - {{id: wt, gpu: {GPU}, models: [{{name: {MODEL}, path: '{tiny_checkpoint}'}}]}}\n")
    start_worker("--workers-file", str(workers_file), "--time-scale", "20", worker_ids=("wt",))
    greeting = "Grüße aus Köln — 日本語 🙂 qlm keeps the SLO."
    chat = [{"role": "system", "content": "Antworte kurz."},
            {"role": "user", "content": "Wie spät ist es? ⏰"}]
    cases: dict[str, tuple[Any, dict[str, Any], int]] = {
        "eos": (greeting, {}, 500),  # ends at EOS: the echo, then stop
        "chat": ({"messages": chat}, {"temperature": 0.7, "seed": 3}, 500),
        "stop": ("alpha beta gamma STOP delta", {"stop": ["STOP", "never"]}, 500),
        "len": (greeting, {}, 4),  # ends at max_tokens
        "ignore": ("ab", {"ignore_eos": True}, 9),  # EOS ignored: the echo repeats
    }
    topics = TopicNames(topic_prefix)
    async with EventLog(kafka_bootstrap, topics.batch_results) as results:
        requests = [make_request(rid, max_tokens, SLOClass.BATCH_1, prompt_tokens=8)
                    for rid, (_, _, max_tokens) in cases.items()]
        for request in requests:
            prompt, params, _ = cases[request.id]
            await store.enqueue(request, prompt=prompt, params=params)
        await store.set_virtual_queue("wt", sorted({store.group_of(r) for r in requests}))

        async def all_finished() -> bool:
            return finished(await records_of(store, list(cases)))

        await wait_for(all_finished, 60, "every text request finished")
        await wait_for(lambda: _count(results, len(cases)), 20, "batch results")
    reasons = {r.request_id: r for r in (BatchResult.from_json(raw) for raw in results.records)}
    streamed = {rid: await stream_text(store, rid) for rid in cases}
    eos = min(text_model.eos_token_ids)

    body = [t for t in text_model.encode(greeting) if t not in text_model.special_ids]
    tokens, text, final = streamed["eos"]
    assert final is RequestState.FINISHED
    assert text == greeting and tokens == [*body, eos]  # EOS counted, its text not shown
    assert reasons["eos"].finish_reason == "stop" and reasons["eos"].output_text == greeting

    chat_ids = text_model.encode_chat(chat)
    tokens, text, _ = streamed["chat"]
    assert text == text_model.decode(chat_ids)
    assert text == "system\nAntworte kurz.\nuser\nWie spät ist es? ⏰\nassistant\n"
    assert reasons["chat"].finish_reason == "stop"

    tokens, text, _ = streamed["stop"]
    assert text == "alpha beta gamma "  # the stop string and what follows are cut
    assert "STOP" in text_model.decode(tokens) and reasons["stop"].finish_reason == "stop"
    assert "STOP" not in text_model.decode(tokens[:-1])  # the last token completed it

    tokens, text, _ = streamed["len"]
    assert tokens == body[:4] and text == text_model.decode(body[:4])
    assert reasons["len"].finish_reason == "length"

    ab = [t for t in text_model.encode("ab") if t not in text_model.special_ids]
    tokens, text, _ = streamed["ignore"]
    assert len(tokens) == 9 and eos not in tokens
    assert text == text_model.decode((ab * 9)[:9])
    assert reasons["ignore"].finish_reason == "length"


async def _count(log: EventLog, n: int) -> bool:
    return len(log.records) >= n


async def test_evicted_text_request_resumes_where_its_text_stopped(
    start_worker: Callable[..., WorkerProc], store: RedisQueueStore, kafka_bootstrap: str,
    topic_prefix: str, tmp_path: Path, tiny_checkpoint: Path,
) -> None:
    workers_file = tmp_path / "workers.yaml"
    workers_file.write_text(
        "workers:\n"
        f"  - {{id: wt, gpu: {GPU}, models: [{{name: {MODEL}, path: '{tiny_checkpoint}'}}]}}\n")
    start_worker("--workers-file", str(workers_file), "--time-scale", "2", worker_ids=("wt",))
    prompt = " ".join(f"Satz {i}: Grüße 🙂 aus Köln." for i in range(40))
    request = make_request("long-text", 2000, SLOClass.BATCH_1, prompt_tokens=100)
    topics = TopicNames(topic_prefix)
    async with EventLog(kafka_bootstrap, topics.events) as events:
        await store.enqueue(request, prompt=prompt, params={"stop": ["never there"]})
        await store.set_virtual_queue("wt", [store.group_of(request)])

        async def progressed() -> bool:
            record = await store.get(request.id)
            return record.state is RequestState.RUNNING and record.request.num_generated >= 30

        await wait_for(progressed, 30, "tokens streamed")
        await store.client.set(store.keys.scheduler_fence, 1)  # the scheduler's current term
        async with BusProducer(kafka_bootstrap) as producer:
            await producer.publish(topics.lso, LsoCommand(
                type="evict", command_id="1-1", worker="wt", issued_at=time.time(),
                request_ids=(request.id,), reason="test",
            ))
        await events.wait(lambda evs: any(e.type == "evicted" for e in evs), "evicted")

        async def done() -> RequestRecord | None:
            record = await store.get(request.id)
            return record if record.state is RequestState.FINISHED else None

        record = await wait_for(done, 60, "resumed request finished")
    assert record.num_evictions == 1
    tokens, text, final = await stream_text(store, request.id)
    assert final is RequestState.FINISHED
    assert text == prompt  # nothing lost or repeated across the eviction
    assert len(tokens) == record.request.num_generated


class _BreaksAfterFirstChunk:
    """A simulated engine whose output stream raises after its first chunk, as vLLM's
    does when its engine process dies mid-request."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def add(self, request: Any) -> AsyncIterator[Any]:
        async for chunk in self._engine.add(request):
            yield chunk
            raise RuntimeError("engine core died")


async def test_an_engine_stream_that_breaks_fails_its_request_and_the_worker_goes_on(
    store: RedisQueueStore, kafka_bootstrap: str, topic_prefix: str
) -> None:
    """The request whose stream raised is failed (not left running forever under a lease
    the worker keeps renewing), and the worker still drains and stops."""
    from qlm.bus.topics import ensure_topics, topic_specs
    from qlm.core.perf import PROFILE_DIR, ProfileBook
    from qlm.engine.simulated import SimulatedEngine
    from services.worker.metrics import WorkerMetrics
    from services.worker.worker import Worker, WorkerOptions

    topics = TopicNames(topic_prefix)
    await ensure_topics(kafka_bootstrap, topic_specs(topics))
    profile = ProfileBook.load(PROFILE_DIR).get(MODEL, GPU)
    engine = _BreaksAfterFirstChunk(SimulatedEngine([profile], time_scale=0.05))
    async with BusProducer(kafka_bootstrap, client_id="t-broken") as producer:
        worker = Worker("w1", engine, store, producer, topics,  # type: ignore[arg-type]
                        {MODEL: profile}, WorkerMetrics(),
                        WorkerOptions(pull_interval_s=0.05))
        await worker.start()
        try:
            await enqueue(store, "w1", [make_request("broken", max_tokens=50)])

            async def ended() -> RequestRecord | None:
                record = await store.get("broken")
                return record if record.state.is_terminal else None

            record = await wait_for(ended, timeout_s=20, what="the request to end")
        finally:
            await worker.drain(grace_s=1.0)
    assert record.state is RequestState.FAILED
    assert "engine core died" in record.error
    assert not worker.running
