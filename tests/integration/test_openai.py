"""The OpenAI-compatible front door, driven by the official ``openai`` package.

One stack for the module: real Redis, real Kafka, the four services as processes (the
ingest process serves gRPC and HTTP), two simulated workers 20x faster than their GPUs;
admission control on for interactive requests (a TTFT SLO nobody can meet is refused
with 429 and Retry-After).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import openai
import pytest
import redis
import schemathesis
from schemathesis import GenerationMode
from schemathesis.core.parameters import ParameterLocation

from qlm.client import SyncQlmClient
from qlm.core.errors import InvalidInput, NotFound
from qlm.localstack import RedisServer
from qlm.localstack.services import ServiceOptions, ServiceStack

pytestmark = [pytest.mark.redis, pytest.mark.kafka, pytest.mark.slow]

WORKERS = """
workers:
  - {id: w-a100, gpu: A100-80GB, models: [mistral-7b, vicuna-13b]}
  - {id: w-a10, gpu: A10-24GB, models: [mistral-7b]}
"""
MODEL = "mistral-7b"


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, kafka_bootstrap: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceStack]:
    if not redis_server.is_running():
        redis_server.start()
    redis.Redis.from_url(redis_server.url).flushall()
    tmp = tmp_path_factory.mktemp("openai")
    workers = tmp / "workers.yaml"
    workers.write_text(WORKERS)
    options = ServiceOptions(policy="qlm", workers_file=workers, time_scale=20.0,
                             admission="interactive=reject", group_window_s=0.2, tick_s=0.25,
                             shutdown_grace_s=0.5, topic_prefix=f"openai.{uuid.uuid4().hex[:8]}.")
    stack = ServiceStack(tmp / "stack", redis_server.url, kafka_bootstrap, options)
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


@pytest.fixture(scope="module")
def client(stack: ServiceStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.openai_base_url, api_key="unused", max_retries=0,
                         timeout=60)


def _wait_for_models(client: openai.OpenAI, timeout_s: float = 30.0) -> list[openai.types.Model]:
    deadline = time.monotonic() + timeout_s
    while True:
        models = client.models.list().data
        if {m.id for m in models} >= {"mistral-7b", "vicuna-13b"} or time.monotonic() > deadline:
            return models
        time.sleep(0.2)


def test_models_lists_what_live_workers_serve_with_state(client: openai.OpenAI) -> None:
    deadline = time.monotonic() + 30  # each worker is a process of its own: wait for both
    while True:
        models = {m.id: m for m in _wait_for_models(client)}
        holders = (models["mistral-7b"].model_extra or {}).get("workers", []) if (
            "mistral-7b" in models) else []
        if len(holders) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # the profiles know llama-70b too, but no worker holds it
    assert set(models) == {"mistral-7b", "vicuna-13b"}
    extra = {name: m.model_extra or {} for name, m in models.items()}
    assert extra["mistral-7b"]["state"] == "awake"
    assert extra["vicuna-13b"]["state"] == "asleep"
    assert sorted(extra["mistral-7b"]["workers"]) == ["w-a10", "w-a100"]
    assert client.models.retrieve("mistral-7b").id == "mistral-7b"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("llama-70b")


def test_chat_completion_returns_text_usage_and_headers(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Say hello."}],
        max_tokens=12, temperature=0.5, top_p=0.9, seed=7, user="alice")
    completion = raw.parse()
    assert completion.object == "chat.completion"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert len(choice.message.content.split()) == 12  # the simulated engine: one word a token
    assert choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 12
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12
    request_id = raw.headers["x-request-id"]
    assert completion.id == f"chatcmpl-{request_id}"
    assert float(raw.headers["x-qlm-predicted-wait-s"]) >= 0
    assert raw.headers["x-qlm-slo-class"] == "interactive"
    # the same queue as gRPC: the request is there, with its tenant
    with SyncQlmClient(client.base_url.host + f":{_grpc_port(client)}") as grpc_client:
        info = grpc_client.get(request_id)
    assert info.tenant == "alice" and info.num_generated == 12


def _grpc_port(client: openai.OpenAI) -> int:
    services = json.loads(Path(STACK_DIR[0]).read_text())
    return int(services["ports"]["ingest"])


STACK_DIR: list[str] = []


@pytest.fixture(autouse=True, scope="module")
def _remember_stack(stack: ServiceStack) -> None:
    STACK_DIR[:] = [str(stack.run_dir / "services.json")]


def test_completion_streams_and_ends_with_done_and_usage(client: openai.OpenAI,
                                                         stack: ServiceStack) -> None:
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=20,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert len(text.split()) == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    # the wire itself ends with data: [DONE]
    request = urllib.request.Request(
        f"{stack.openai_base_url}/chat/completions", method="POST",
        headers={"content-type": "application/json"},
        data=json.dumps({"model": MODEL, "max_tokens": 3, "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]}).encode())
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line for line in reply.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0].removeprefix("data: "))
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_chat_stream_and_slo_class_from_extra_body_and_headers(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "a batch job"}], max_tokens=5,
        stream=True, extra_body={"slo_class": "batch-1", "ttft_slo_s": 30})
    assert raw.headers["x-qlm-slo-class"] == "batch-1"
    assert raw.headers["x-qlm-ttft-slo-s"] == "30"
    deltas = [c.choices[0].delta.content or "" for c in raw.parse() if c.choices]
    assert len("".join(deltas).split()) == 5
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
        extra_headers={"x-qlm-slo-class": "batch-2"})
    assert raw.headers["x-qlm-slo-class"] == "batch-2"
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2,
        service_tier="flex")
    assert raw.headers["x-qlm-slo-class"] == "batch-1"


def test_invalid_requests_get_400_naming_the_parameter(client: openai.OpenAI) -> None:
    cases = [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"messages": []}, "messages"),
        ({"extra_body": {"slo_class": "urgent"}}, "slo_class"),
        ({"extra_body": {"bogus_field": 1}}, "bogus_field"),
        ({"extra_headers": {"x-qlm-ttft-slo-s": "soon"}}, "x-qlm-ttft-slo-s"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0].type"),
    ]
    for change, param in cases:
        kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 4, **change}
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(**kwargs)
        error = caught.value.body
        assert isinstance(error, dict), change
        assert error["param"] == param, (change, error)
        assert error["type"] == "invalid_request_error"
        assert param.split("[")[0] in error["message"], error


def test_a_request_too_long_for_every_worker_is_400_on_http_and_invalid_on_grpc(
        client: openai.OpenAI) -> None:
    """vicuna-13b is held only by the A100 worker (max_model_len 4,096 in its profile): a
    prompt + max_tokens beyond it is refused at admission on both transports, naming the
    field, the model and the limit (qlm.core.fit, the simulator's check too); nothing is
    queued."""
    _wait_for_models(client)
    prompt = "word " * 2400  # 12,000 bytes, sized as 3,000 tokens before tokenization
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="vicuna-13b", prompt=prompt, max_tokens=2000,
                                  extra_body={"slo_class": "batch-1"})
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "max_tokens"
    assert ("prompt + max_tokens too long for every worker serving model 'vicuna-13b': "
            "3000 + 2000 = 5000 tokens > max_model_len 4096") in error["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="vicuna-13b", max_tokens=16,
                                       messages=[{"role": "user", "content": prompt * 2}])
    assert caught.value.body["param"] == "messages"
    assert "prompt too long for every worker serving model 'vicuna-13b'" in (
        caught.value.body["message"])
    with SyncQlmClient(client.base_url.host + f":{_grpc_port(client)}") as grpc_client:
        with pytest.raises(InvalidInput) as refused:
            grpc_client.submit({"request_id": "too-long-grpc", "model": "vicuna-13b",
                                "prompt": prompt, "max_tokens": 2000, "slo_class": "batch-1"})
        assert refused.value.field == "max_tokens"
        assert "3000 + 2000 = 5000 tokens > max_model_len 4096" in refused.value.problem
        with pytest.raises(NotFound):
            grpc_client.get("too-long-grpc")


def test_unknown_model_is_404_and_unmeetable_slo_is_429_with_retry_after(
        client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-17", max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=MODEL, max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"ttft_slo_s": 1e-6})
    response = refused.value.response
    assert int(response.headers["retry-after"]) >= 1
    assert float(response.headers["x-qlm-p-meet-slo"]) < 0.05  # the admission threshold
    assert "x-qlm-predicted-wait-s" in response.headers
    assert refused.value.body["type"] == "rate_limit_error"


def test_background_request_answers_when_queued_and_is_fetched_later(
        client: openai.OpenAI) -> None:
    queued = client.post("/chat/completions", cast_to=object, body={
        "model": MODEL, "max_tokens": 6, "background": True,
        "messages": [{"role": "user", "content": "later"}]})
    assert isinstance(queued, dict) and queued["status"] in ("queued", "running")
    deadline = time.monotonic() + 30
    while True:
        done = client.get(f"/chat/completions/{queued['id']}", cast_to=object)
        assert isinstance(done, dict)
        if done.get("choices") or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(done["choices"][0]["message"]["content"].split()) == 6
    assert done["usage"]["completion_tokens"] == 6


def test_openapi_schema_is_served(stack: ServiceStack) -> None:
    url = stack.openai_base_url.removesuffix("/v1") + "/openapi.json"
    with urllib.request.urlopen(url, timeout=10) as reply:
        schema = json.loads(reply.read())
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(schema["paths"])


# ------------------------------------------------------------------ Batch API
def _batch_file(num_lines: int, max_tokens: int = 4) -> bytes:
    lines = [{"custom_id": f"job-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "max_tokens": max_tokens + i % 3,
                       "messages": [{"role": "user", "content": f"question {i}"}]}}
             for i in range(num_lines)]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _wait_batch(client: openai.OpenAI, batch_id: str, statuses: set[str],
                timeout_s: float = 90.0) -> openai.types.Batch:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses or time.monotonic() > deadline:
            return batch
        time.sleep(0.2)


def test_a_whole_batch_through_files(client: openai.OpenAI) -> None:
    bad = {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": MODEL, "max_tokens": 0,
                    "messages": [{"role": "user", "content": "x"}]}}
    content = _batch_file(20) + (json.dumps(bad) + "\n").encode()
    uploaded = client.files.create(file=("jobs.jsonl", content), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(content)
    assert client.files.content(uploaded.id).content == content
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "test"})
    assert batch.status == "in_progress" and batch.request_counts.total == 21
    batch = _wait_batch(client, batch.id, {"completed", "failed"})
    assert batch.status == "completed", batch
    assert batch.request_counts.completed == 20 and batch.request_counts.failed == 1
    assert batch.metadata == {"job": "test"}
    output = [json.loads(line) for line in
              client.files.content(batch.output_file_id).text.splitlines()]
    assert [line["custom_id"] for line in output] == [f"job-{i}" for i in range(20)]
    for i, line in enumerate(output):
        response = line["response"]
        assert response["status_code"] == 200
        body = response["body"]
        assert body["object"] == "chat.completion"
        assert len(body["choices"][0]["message"]["content"].split()) == 4 + i % 3
        assert body["usage"]["completion_tokens"] == 4 + i % 3
    errors = [json.loads(line) for line in
              client.files.content(batch.error_file_id).text.splitlines()]
    assert [e["custom_id"] for e in errors] == ["bad"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["param"] == "max_tokens"
    assert batch.id in {b.id for b in client.batches.list()}
    # the same file again is a new batch; a batch whose file cannot run fails with errors
    broken = client.files.create(file=("broken.jsonl", b'{"custom_id": "a"}\nnot json\n'),
                                 purpose="batch")
    failed = client.batches.create(input_file_id=broken.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
    assert failed.status == "failed"
    assert [e.line for e in failed.errors.data] == [1, 1, 2]


def test_batch_cancel_ends_every_line_once(client: openai.OpenAI) -> None:
    uploaded = client.files.create(file=("long.jsonl", _batch_file(60, max_tokens=3000)),
                                   purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    time.sleep(1.0)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = _wait_batch(client, batch.id, {"cancelled"})
    assert batch.status == "cancelled", batch
    ids: list[str] = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            ids += [json.loads(line)["custom_id"]
                    for line in client.files.content(file_id).text.splitlines()]
    assert sorted(ids) == sorted(f"job-{i}" for i in range(60))
    counts = batch.request_counts
    assert counts.completed + counts.failed == counts.total == 60


def test_batch_api_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert caught.value.body["param"] == "input_file_id"
    uploaded = client.files.create(file=("x.jsonl", _batch_file(1)), purpose="batch")
    with pytest.raises(openai.BadRequestError) as caught:
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                              completion_window="soon")  # type: ignore[arg-type]
    assert caught.value.body["param"] == "completion_window"
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("x.jsonl", b"{}"), purpose="fine-tune")
    assert caught.value.body["param"] == "purpose"


# ------------------------------------------------------------------ schema fuzzing
#: Examples per operation and generation mode (CI runs this small size; raise it locally).
FUZZ_EXAMPLES = int(os.environ.get("QLM_FUZZ_EXAMPLES", "15"))


def test_schema_fuzzing_finds_no_5xx_and_every_invalid_body_is_a_4xx_naming_it(
        stack: ServiceStack) -> None:
    """Property-based (schemathesis over /openapi.json): no request gets a 5xx; a body
    invalid against the schema gets a 4xx; every 4xx is OpenAI's error shape, and one
    about a JSON object body names the parameter (``param``)."""
    root = stack.openai_base_url.removesuffix("/v1")
    schema = schemathesis.openapi.from_url(f"{root}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    failures: list[str] = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                                 suppress_health_check=list(hypothesis.HealthCheck))
            def run(case: Any) -> None:
                try:
                    response = case.call(base_url=root, timeout=60)
                except Exception as error:  # the server closed, hung or broke the protocol
                    failures.append(f"{case.method} {case.formatted_path}: {error!r}; "
                                    f"body {case.body!r:.200}")
                    return
                problem = _fuzz_problem(case, response)
                if problem:
                    failures.append(f"{case.method} {case.formatted_path}: {problem}; "
                                    f"body {case.body!r:.200}")

            try:
                run()
            except hypothesis.errors.Unsatisfiable:  # nothing to make invalid (no input)
                assert mode is GenerationMode.NEGATIVE, operation.label
    assert not failures, "\n".join(failures[:20])


def _fuzz_problem(case: Any, response: Any) -> str | None:
    status = response.status_code
    if status >= 500:
        return f"server error {status}: {response.text[:200]}"
    body_mode = case.meta.components.get(ParameterLocation.BODY)
    body_negative = body_mode is not None and body_mode.mode is GenerationMode.NEGATIVE
    if body_negative and status < 400:
        return f"invalid body accepted with {status}"
    if status < 400:
        return None
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"{status} without an OpenAI error body: {response.text[:200]}"
    if not {"message", "type", "param", "code"} <= set(error):
        return f"{status} error body lacks fields: {error}"
    if status == 400 and isinstance(case.body, dict) and case.media_type == "application/json":
        if not error["param"]:
            return f"400 that names no parameter: {error}"
        if str(error["param"]).split("[")[0].split(".")[0] not in error["message"]:
            return f"400 whose message does not name {error['param']}: {error}"
    return None


# ------------------------------------------------------------------ status page
def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "chromium is not installed (apt-get install -y chromium; make setup does)"
        if os.environ.get("CI", "").lower() in {"true", "1", "yes"}:
            pytest.fail(message)
        pytest.skip(message)
    return found


def _page_numbers(chromium: str, url: str, screenshot: Path | None = None) -> dict[str, str]:
    """Load the page in headless chromium, let its script run, return the text of every
    element with an id (``num-admitted``, ``attainment-interactive``, ...)."""
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--virtual-time-budget=4000", "--window-size=1400,1000"]
    done = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    if screenshot is not None:
        shot = subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True,
                              text=True, timeout=120)
        assert shot.returncode == 0, shot.stderr[-2000:]
    return {m.group(1): re.sub(r"<[^>]+>", "", m.group(2)).strip()
            for m in re.finditer(r'<(?:span|td)[^>]* id="([^"]+)"[^>]*>(.*?)</(?:span|td)>',
                                 done.stdout)}


def test_status_page_in_a_real_browser_changes_as_requests_flow(
        client: openai.OpenAI, stack: ServiceStack, tmp_path: Path) -> None:
    chromium = _chromium()
    root = stack.openai_base_url.removesuffix("/v1")
    _wait_for_models(client)
    before = _page_numbers(chromium, f"{root}/status")
    assert before["updated"] not in ("", "–") and "unreachable" not in before["updated"]
    assert before["kv-w-a100"] and before["batch-w-a10"]  # both workers, from telemetry
    for i in range(6):
        client.chat.completions.create(model=MODEL, max_tokens=4,
                                       messages=[{"role": "user", "content": f"q{i}"}])
    client.completions.create(model=MODEL, prompt="b", max_tokens=3,
                              extra_body={"slo_class": "batch-2"})
    time.sleep(2.0)  # first tokens are judged at the board's next refresh (1 s)
    after = _page_numbers(chromium, f"{root}/status", screenshot=tmp_path / "status.png")
    assert int(after["num-admitted"]) >= int(before["num-admitted"]) + 7
    assert int(after["num-finished"]) >= int(before["num-finished"]) + 7
    assert int(after["met-interactive"]) + int(after["missed-interactive"]) >= 6
    assert after["attainment-interactive"].endswith("%")
    assert "met-batch-2" in after
    assert after["realised-interactive"].endswith(" s")
    assert (tmp_path / "status.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
