"""The estimator service over real gRPC, Redis and Kafka, and ingest's admission control.

* PredictWait and EstimateBatch answer what the core :class:`RWTEstimator` computes on the
  same queue (read from Redis);
* telemetry on ``qlm.telemetry`` moves the (model, GPU) correction and the predictions;
* an ingest configured with the estimator's address rejects an interactive request with
  RESOURCE_EXHAUSTED + retry-after when its queue is hopeless, and queues batch requests.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qlm.api.v1 import estimator_pb2 as epb
from qlm.api.v1 import estimator_pb2_grpc
from qlm.api.v1 import qlm_pb2 as pb
from qlm.bus.producer import BusProducer
from qlm.bus.records import Telemetry
from qlm.bus.topics import TopicNames
from qlm.client import QlmClient
from qlm.core.errors import Overloaded
from qlm.core.estimator import RWTEstimator
from qlm.core.perf import ProfileBook
from qlm.core.types import (
    SLO,
    GroupKey,
    Request,
    RequestGroup,
    RequestState,
    SLOClass,
)
from qlm.roster import WorkerInfo, view_of
from qlm.store.store import RedisQueueStore
from qlm.submission import ModelLimits
from services.estimator.app import EstimatorApp
from services.estimator.settings import EstimatorSettings
from services.ingest.app import IngestApp
from services.ingest.settings import IngestSettings

pytestmark = [pytest.mark.redis, pytest.mark.kafka]

MODEL, GPU, WORKER = "mistral-7b", "A100-80GB", "w0"
WORKERS_YAML = f"workers:\n  - {{id: {WORKER}, gpu: {GPU}, models: [{MODEL}, vicuna-13b]}}\n"
PROFILES = ProfileBook.load()


@pytest.fixture
def workers_file(tmp_path: Path) -> Path:
    path = tmp_path / "workers.yaml"
    path.write_text(WORKERS_YAML)
    return path


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisQueueStore]:
    queue_store = RedisQueueStore.from_url(redis_url, group_window_s=5.0)
    yield queue_store
    await queue_store.aclose()


@pytest.fixture
async def estimator(redis_url: str, kafka_bootstrap: str, kafka_topics: TopicNames,
                    workers_file: Path) -> AsyncIterator[EstimatorApp]:
    values: dict[str, Any] = {
        "redis_url": redis_url, "kafka_bootstrap": kafka_bootstrap,
        "topic_prefix": kafka_topics.prefix, "host": "127.0.0.1", "port": 0,
        "serve_metrics": False, "workers_file": workers_file, "worker_timeout_s": 0,
        "refresh_interval_s": 3600.0, "log_json": False, "shutdown_grace_s": 0.5}
    settings = EstimatorSettings(**values)
    app = EstimatorApp(settings, profiles=PROFILES)
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def stub(estimator: EstimatorApp) -> AsyncIterator[estimator_pb2_grpc.EstimatorStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{estimator.port}") as channel:
        yield estimator_pb2_grpc.EstimatorStub(channel)


def _request(slo_class: SLOClass = SLOClass.INTERACTIVE, *, prompt: int = 500,
             max_tokens: int = 400, model: str = MODEL) -> Request:
    return Request(uuid.uuid4().hex, model, prompt, max_tokens, slo_class,
                   SLO.for_class(slo_class), time.time())


async def _queue_on_worker(store: RedisQueueStore, requests: list[Request],
                           estimator: EstimatorApp) -> None:
    """Enqueue ``requests``, put their groups on the worker's virtual queue and have the
    estimator read the queue now (its background refresh is hourly in these tests)."""
    for request in requests:
        await store.enqueue(request)
    groups = sorted({store.group_of(r) for r in requests})
    await store.set_virtual_queue(WORKER, groups)
    await estimator.plane.refresh()


def _worker_view() -> Any:
    return view_of(WorkerInfo(WORKER, GPU, (MODEL, "vicuna-13b"), MODEL), PROFILES)


async def test_health_and_predict_wait_agree_with_the_core_estimator(
    estimator: EstimatorApp, stub: estimator_pb2_grpc.EstimatorStub, store: RedisQueueStore
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{estimator.port}") as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="qlm.v1.Estimator"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    queued = [_request() for _ in range(600)]
    await _queue_on_worker(store, queued, estimator)
    answer = await stub.PredictWait(epb.PredictWaitRequest(
        model=MODEL, slo_class=pb.SLO_CLASS_INTERACTIVE, prompt_tokens=300, max_tokens=200))

    snapshot = await store.snapshot()
    now = time.time()
    new = Request("predict", MODEL, 300, 200, SLOClass.INTERACTIVE,
                  SLO.for_class(SLOClass.INTERACTIVE), now)
    own = RequestGroup(GroupKey(MODEL, SLOClass.INTERACTIVE, -1), (new,))
    core = RWTEstimator(PROFILES)
    expected = core.queue_waits(_worker_view(), [*snapshot.groups, own], now)[-1]
    assert answer.best_worker_id == WORKER
    assert answer.wait_mean_s == pytest.approx(expected.mean_s, rel=1e-9)
    assert answer.wait_std_s == pytest.approx(expected.std_s, rel=1e-9)
    assert answer.wait_p90_s == pytest.approx(expected.mean_s + 1.2815515655 * expected.std_s)
    assert answer.p_meet_slo == pytest.approx(core.p_meet_slo(own, expected, now), abs=1e-3)
    assert answer.wait_mean_s > 1.0  # the 600 requests ahead are counted
    assert not answer.admit  # 20 s SLO behind ~30 s of work
    expected_retry = expected.mean_s - 1.6448536 * expected.std_s - 20.0  # Φ⁻¹(0.05)
    assert answer.retry_after_s == pytest.approx(expected_retry, rel=1e-6)


async def test_predict_wait_names_bad_input(stub: estimator_pb2_grpc.EstimatorStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.PredictWait(epb.PredictWaitRequest(model=MODEL, prompt_tokens=0,
                                                      max_tokens=10))
    assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt_tokens" in (bad.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.PredictWait(epb.PredictWaitRequest(model="nope", prompt_tokens=5,
                                                      max_tokens=10))
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND


async def test_estimate_batch_agrees_with_the_core_estimator(
    stub: estimator_pb2_grpc.EstimatorStub,
) -> None:
    shapes = [(MODEL, 50, 300, 500), ("vicuna-13b", 7, 1200, 256), (MODEL, 1, 5000, 100)]
    groups = [RequestGroup(GroupKey(m, SLOClass.BATCH_1, i), tuple(
        Request(f"g{i}-{j}", m, p, o, SLOClass.BATCH_1, SLO.for_class(SLOClass.BATCH_1), 0.0)
        for j in range(n))) for i, (m, n, p, o) in enumerate(shapes)]
    reply = await stub.EstimateBatch(epb.EstimateBatchRequest(
        groups=[epb.GroupSpec(key=str(g.key), model=g.model, num_requests=g.size,
                              prefill_tokens=g.total_prompt_tokens,
                              max_output_tokens=sum(r.max_tokens for r in g.requests))
                for g in groups],
        workers=[epb.WorkerSpec(id=WORKER, gpu=GPU, active_model=MODEL,
                                resident_models=[MODEL, "vicuna-13b"]),
                 epb.WorkerSpec(id="other", gpu="no-such-gpu", active_model=MODEL)],
        now=0.0))
    assert (reply.num_groups, reply.num_workers) == (3, 2)
    core = RWTEstimator(PROFILES)
    worker = _worker_view()
    for i, group in enumerate(groups):
        service = core.group_service(worker, group)
        swap = 0.0 if group.model == MODEL else (
            PROFILES.get(MODEL, GPU).sleep_s + PROFILES.get(group.model, GPU).wake_s)
        head = core.queue_waits(worker, [group], 0.0)[0]
        assert reply.service_mean_s[2 * i] == pytest.approx(service.mean_s + swap, rel=1e-9)
        assert reply.service_std_s[2 * i] == pytest.approx(service.std_s, rel=1e-9)
        assert reply.head_wait_mean_s[2 * i] == pytest.approx(head.mean_s, rel=1e-9)
        assert reply.service_mean_s[2 * i + 1] == float("inf")  # no profile on that GPU


async def _eventually(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str,
                      between: Callable[[], Awaitable[None]] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        if between is not None:
            await between()
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what} not reached within {timeout_s} s")


async def test_telemetry_moves_the_correction_and_the_predictions(
    estimator: EstimatorApp, stub: estimator_pb2_grpc.EstimatorStub, store: RedisQueueStore,
    kafka_bootstrap: str, kafka_topics: TopicNames,
) -> None:
    await _queue_on_worker(store, [_request() for _ in range(600)], estimator)
    query = epb.PredictWaitRequest(model=MODEL, slo_class=pb.SLO_CLASS_INTERACTIVE,
                                   prompt_tokens=300, max_tokens=200)
    before = await stub.PredictWait(query)
    slow = Telemetry(worker=WORKER, gpu=GPU, at=time.time(), model=MODEL, batch_size=8,
                     kv_used_fraction=0.3, step_time_predicted_s=0.02,
                     step_time_observed_s=0.04, num_steps=50)

    async with BusProducer(kafka_bootstrap) as producer:
        async def publish() -> None:  # the tail starts at the end: send until it sees one
            await producer.publish(kafka_topics.telemetry, slow)

        async def corrected() -> bool:
            return estimator.plane.estimator.correction(MODEL, GPU) > 1.0

        await publish()
        await _eventually(corrected, 45.0, "a correction", between=publish)

    factor = estimator.plane.estimator.correction(MODEL, GPU)
    assert 1.0 < factor <= 2.0  # moves toward observed/predicted = 2, never past it
    after = await stub.PredictWait(query)
    assert after.wait_mean_s > before.wait_mean_s  # decode is slower than the profile says
    assert estimator.metrics.corrections.labels(MODEL, GPU)._value.get() >= 1


# ------------------------------------------------------------------ admission control
@pytest.fixture
async def ingest(redis_url: str, kafka_bootstrap: str, kafka_topics: TopicNames,
                 estimator: EstimatorApp) -> AsyncIterator[IngestApp]:
    values: dict[str, Any] = {
        "redis_url": redis_url, "kafka_bootstrap": kafka_bootstrap,
        "topic_prefix": kafka_topics.prefix, "host": "127.0.0.1", "port": 0,
        "batch_consumer": False, "log_json": False, "shutdown_grace_s": 0.5, "auth": "off",
        "estimator_addr": f"127.0.0.1:{estimator.port}", "estimator_timeout_s": 5.0,
        "group_window_s": 5.0, "served_models_timeout_s": 0.0}
    settings = IngestSettings(**values)
    app = IngestApp(settings, models={MODEL: ModelLimits(MODEL, 32768, (GPU,))})
    await app.start()
    yield app
    await app.stop()


def _submit(slo_class: str, request_id: str | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"model": MODEL, "prompt_token_ids": list(range(1, 401)),
                              "max_tokens": 300, "slo_class": slo_class}
    if request_id:
        record["request_id"] = request_id
    return record


async def test_admission_rejects_hopeless_interactive_requests_and_queues_batch(
    ingest: IngestApp, store: RedisQueueStore, estimator: EstimatorApp
) -> None:
    async with QlmClient(f"127.0.0.1:{ingest.port}", timeout_s=10) as client:
        light = await client.submit(_submit("interactive"))  # empty queue: admitted
        assert light.state == pb.REQUEST_STATE_QUEUED

        hopeless = [_request(prompt=2000, max_tokens=2000) for _ in range(3000)]
        await _queue_on_worker(store, hopeless, estimator)
        refused_id = uuid.uuid4().hex
        with pytest.raises(Overloaded) as refused:
            await client.submit(_submit("interactive", refused_id))
        assert refused.value.retry_after_s > 0
        predicted = float(refused.value.details["predicted-wait-s"])
        assert predicted > 20.0  # far beyond the interactive SLO
        assert float(refused.value.details["p-meet-slo"]) < 0.05
        with pytest.raises(Exception, match="not found"):
            await store.get(refused_id)  # nothing was written

        late = await client.submit(_submit("batch-1"))  # 60 s SLO: it will likely miss ...
        assert late.p_meet_slo < 0.05 and late.predicted_wait_mean_s > 60.0
        relaxed = await client.submit(_submit("batch-2"))  # 1 h SLO: fine
        assert relaxed.p_meet_slo > 0.95
        for queued in (late, relaxed):  # ... and both are queued: batch is never refused
            assert queued.state == pb.REQUEST_STATE_QUEUED
            assert (await store.get(queued.request_id)).state is RequestState.QUEUED


async def test_the_status_carries_retry_after_as_trailing_metadata(
    ingest: IngestApp, store: RedisQueueStore, estimator: EstimatorApp
) -> None:
    hopeless = [_request(prompt=2000, max_tokens=2000) for _ in range(3000)]
    await _queue_on_worker(store, hopeless, estimator)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ingest.port}") as channel:
        from qlm.api.v1 import qlm_pb2_grpc
        from qlm.client import submit_request

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await qlm_pb2_grpc.QueueManagerStub(channel).Submit(
                submit_request(_submit("interactive")))
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    metadata = dict(refused.value.trailing_metadata() or ())
    assert float(metadata["retry-after-s"]) > 0
    assert "retry after" in (refused.value.details() or "")


async def test_ingest_admits_when_the_estimator_does_not_answer(
    redis_url: str, kafka_bootstrap: str, kafka_topics: TopicNames
) -> None:
    from aiokafka import AIOKafkaConsumer

    from qlm.bus.records import Event
    from qlm.localstack import free_loopback_port

    values: dict[str, Any] = {
        "redis_url": redis_url, "kafka_bootstrap": kafka_bootstrap,
        "topic_prefix": kafka_topics.prefix, "host": "127.0.0.1", "port": 0,
        "batch_consumer": False, "log_json": False, "shutdown_grace_s": 0.5, "auth": "off",
        "estimator_addr": f"127.0.0.1:{free_loopback_port()}", "estimator_timeout_s": 0.2,
        "served_models_timeout_s": 0.0}
    app = IngestApp(IngestSettings(**values), models={MODEL: ModelLimits(MODEL, 32768, (GPU,))})
    await app.start()
    try:
        async with QlmClient(f"127.0.0.1:{app.port}", timeout_s=10) as client:
            reply = await client.submit(_submit("interactive"))  # fail open: queued
        assert reply.state == pb.REQUEST_STATE_QUEUED
    finally:
        await app.stop()
    consumer = AIOKafkaConsumer(kafka_topics.events, bootstrap_servers=kafka_bootstrap,
                                group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    try:
        events: list[Event] = []
        deadline = time.monotonic() + 15
        while not events and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                events += [Event.from_json(r.value) for r in batch]
    finally:
        await consumer.stop()
    (admitted,) = [e for e in events if e.request_id == reply.request_id]
    assert admitted.type == "admitted" and admitted.predicted_wait_s is None  # not a guess
