"""Pure parts of the OpenAI front door: body → submission record, SLO mapping, batch files.

What the HTTP API does end to end (the openai package against a real stack) is in
``tests/integration/test_openai.py``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from qlm.core.errors import InvalidInput
from qlm.submission import ModelLimits, parse_submission
from services.ingest.openai import translate
from services.ingest.openai.app import FrontDoor, _param_of, make_app
from services.ingest.openai.batches import (
    BatchFileInvalid,
    parse_batch_file,
    request_id_for,
    slo_of_window,
    window_seconds,
)

MODELS = {"m": ModelLimits("m", 4096)}


def record(body: dict[str, Any], headers: dict[str, str] | None = None,
           chat: bool = True) -> dict[str, Any]:
    return translate.submission_record({"model": "m", **body}, headers or {}, chat=chat,
                                       default_max_tokens=16)


def test_chat_becomes_one_prompt_and_the_submission_validates() -> None:
    rec = record({"messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                            {"type": "text", "text": "there"}]}],
                  "max_completion_tokens": 5, "temperature": 0.2, "stop": "\n", "user": "u1"})
    assert rec["prompt"] == "system: Be brief.\nuser: Hi there\nassistant:"
    sub = parse_submission(rec, MODELS)
    assert sub.max_tokens == 5 and sub.tenant == "u1"
    assert sub.sampling == {"temperature": 0.2, "stop": ["\n"]}
    assert sub.slo_class.value == "interactive"


def test_max_tokens_defaults_and_completion_prompts() -> None:
    assert record({"prompt": "x"}, chat=False)["max_tokens"] == 16
    assert record({"prompt": [1, 2, 3]}, chat=False)["prompt_token_ids"] == [1, 2, 3]
    assert record({"prompt": ["only one"]}, chat=False)["prompt"] == "only one"
    with pytest.raises(InvalidInput) as caught:
        record({"prompt": ["a", "b"]}, chat=False)
    assert caught.value.field == "prompt"


@pytest.mark.parametrize(("body", "headers", "expected"), [
    ({}, {}, {}),
    ({"service_tier": "flex"}, {}, {"slo_class": "batch-1"}),
    ({"service_tier": "default"}, {}, {"slo_class": "interactive"}),
    ({}, {"x-qlm-slo-class": "batch-2", "x-qlm-ttft-slo-s": "90"},
     {"slo_class": "batch-2", "ttft_slo_s": 90.0}),
    ({"slo_class": "batch-1", "service_tier": "priority"}, {"x-qlm-slo-class": "batch-2"},
     {"slo_class": "batch-1"}),  # the body wins over the header, the header over the tier
    ({"slo_class": "custom", "ttft_slo_s": 5}, {}, {"slo_class": "custom", "ttft_slo_s": 5}),
])
def test_slo_class_comes_from_body_then_header_then_service_tier(
        body: dict[str, Any], headers: dict[str, str], expected: dict[str, Any]) -> None:
    assert translate.slo_fields(body, headers) == expected


@pytest.mark.parametrize(("body", "headers", "param"), [
    ({"service_tier": "turbo"}, {}, "service_tier"),
    ({}, {"x-qlm-slo-class": "vip"}, "x-qlm-slo-class"),
    ({}, {"x-qlm-ttft-slo-s": "-1"}, "x-qlm-ttft-slo-s"),
    ({"n": 3}, {}, "n"),
    ({"logprobs": True}, {}, "logprobs"),
    ({"tools": [{"type": "function"}]}, {}, "tools"),
    ({"presence_penalty": 0.5}, {}, "presence_penalty"),
    ({"temperature": 2.5}, {}, "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, {}, "stop"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, {}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, {},
     "messages[0].content[0].type"),
])
def test_what_qlm_cannot_do_is_refused_naming_the_parameter(
        body: dict[str, Any], headers: dict[str, str], param: str) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], **body}
    with pytest.raises(InvalidInput) as caught:
        record(body, headers)
    assert caught.value.field == param


def test_neutral_values_of_unsupported_parameters_pass() -> None:
    rec = record({"messages": [{"role": "user", "content": "x"}], "n": 1, "logprobs": False,
                  "presence_penalty": 0, "frequency_penalty": 0.0, "tool_choice": "none"})
    assert rec["prompt"] == "user: x\nassistant:"


def test_submission_fields_map_back_to_openai_parameters() -> None:
    assert translate.openai_param(InvalidInput("prompt", "too long"), chat=True) == "messages"
    assert translate.openai_param(InvalidInput("prompt", "too long"), chat=False) == "prompt"
    assert translate.openai_param(InvalidInput("sampling.top_p", "bad")) == "top_p"
    assert translate.openai_param(InvalidInput("tenant", "bad")) == "user"


def test_validation_error_locations_become_parameter_names() -> None:
    assert _param_of(("body", "messages", 0, "content", "str")) == "messages[0].content"
    assert _param_of(("body", "max_tokens")) == "max_tokens"
    assert _param_of(("body", "bogus"), unknown=True) == "bogus"
    assert _param_of(("query", "limit")) == "limit"
    assert _param_of(("body", ""), unknown=True) == '""'


def test_a_field_named_by_the_empty_string_is_refused_by_name() -> None:
    app = make_app(FrontDoor(plane=None, fleet=None))  # type: ignore[arg-type]
    body = {"": 1, "model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(app) as client:
        refused = client.post("/v1/chat/completions", json=body)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["param"] == '""' and '""' in error["message"]
    assert error["code"] == "unknown_parameter"


def test_api_key_when_set_is_required_as_a_bearer_token() -> None:
    app = make_app(FrontDoor(plane=None, fleet=None, api_key="s3cret"))  # type: ignore[arg-type]
    with TestClient(app) as client:
        refused = client.get("/v1/models")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models", headers={"authorization": "Bearer nope"}).status_code \
            == 401
        ok = client.get("/v1/models", headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json() == {"object": "list", "data": []}
        missing = client.get("/v1/nothing", headers={"authorization": "Bearer s3cret"})
        assert missing.status_code == 404 and "error" in missing.json()


# ------------------------------------------------------------------ batch files
def line(custom_id: Any, **extra: Any) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                       "body": {"model": "m", "prompt": "x"}, **extra})


def test_batch_file_lines_and_what_makes_a_file_unrunnable() -> None:
    lines = parse_batch_file("\n".join([line("a"), "", line("b")]), "/v1/completions")
    assert [(x.index, x.custom_id) for x in lines] == [(0, "a"), (1, "b")]
    with pytest.raises(BatchFileInvalid) as caught:
        parse_batch_file("\n".join([line("a"), line("a"), "{oops", line("c", url="/v1/x"),
                                    line("")]), "/v1/completions")
    assert [(e["line"], e["param"]) for e in caught.value.errors] == [
        (2, "custom_id"), (3, None), (4, "url"), (5, "custom_id")]
    with pytest.raises(BatchFileInvalid):
        parse_batch_file("\n\n", "/v1/completions")


def test_completion_window_maps_to_a_batch_slo_and_ids_are_deterministic() -> None:
    assert window_seconds("24h") == 86400 and window_seconds("90s") == 90
    assert slo_of_window(86400)[0].value == "batch-2"
    assert slo_of_window(600) [0].value == "batch-1"
    for bad in ("", "24", "0h", "1d", "-5m"):
        with pytest.raises(InvalidInput):
            window_seconds(bad)
    rid = request_id_for("batch_abc", "row/1 with spaces")
    assert rid == request_id_for("batch_abc", "row/1 with spaces")
    assert rid != request_id_for("batch_abc", "row/2")
    assert parse_submission({"request_id": rid, "model": "m", "prompt": "x",
                             "max_tokens": 1}, MODELS).request_id == rid


# ------------------------------------------------------------------ status board
def test_status_board_counts_attainment_waits_swaps_and_evictions() -> None:
    from qlm.bus.records import Event
    from services.ingest.plane import Prediction
    from services.ingest.status import StatusBoard

    board = StatusBoard(store=None, fleet=None, clock=lambda: 100.0)  # type: ignore[arg-type]
    board.on_submit("http", "admitted", "interactive", "m", 0.001, Prediction(wait_mean_s=2.0))
    board.on_submit("grpc", "rejected-capacity", "interactive", "m", 0.001, Prediction())
    base = {"model": "m", "slo_class": "interactive", "arrival_at": 10.0, "worker": "w"}
    board.on_event(Event(type="started", request_id="a", at=13.0, **base))
    board.on_event(Event(type="first_token", request_id="a", at=14.0, **base))
    board.on_event(Event(type="first_token", request_id="b", at=40.0, **base))
    board.on_event(Event(type="evicted", request_id="b", at=41.0, reason="evict",
                         num_output_tokens=3, **base))
    board.on_event(Event(type="swapped", model="m2", from_model="m", worker="w", at=42.0,
                         duration_s=0.5))
    board.judge({"a": (30.0, 13.5), "b": (30.0, None)})  # b started before any forecast
    snap = board.snapshot()
    interactive = snap["classes"]["interactive"]
    assert (interactive["met"], interactive["missed"], interactive["attainment"]) == (1, 1, 0.5)
    assert (interactive["predicted_wait_s"], interactive["realised_wait_s"]) == (2.0, 3.0)
    # a's last forecast before it started: first token 3.5 s after arrival, 0.5 s early
    assert (interactive["forecast_wait_s"], interactive["forecast_error_s"]) == (3.5, 0.5)
    assert interactive["forecast_samples"] == 1
    assert snap["num_admitted"] == 1
    assert snap["swaps"][0]["model"] == "m2" and snap["evictions"][0]["request_id"] == "b"
