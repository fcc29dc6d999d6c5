"""parse_submission: every bad field is named, good records round-trip."""

from __future__ import annotations

from typing import Any

import pytest

from qlm.core.errors import InvalidInput
from qlm.core.types import SLOClass
from qlm.submission import ModelLimits, SubmissionLimits, parse_submission

MODELS = {"m7b": ModelLimits("m7b", max_model_len=100)}
LIMITS = SubmissionLimits(max_prompt_bytes=64)


def _record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"model": "m7b", "prompt": "hello", "max_tokens": 10}
    record.update(changes)
    return {k: v for k, v in record.items() if v is not ...}


BAD = [
    (_record(model="nope"), "model", "unknown model 'nope'"),
    (_record(model=...), "model", "is required"),
    (_record(model=7), "model", "must be a string, got int"),
    (_record(prompt=""), "prompt", "must not be empty"),
    (_record(prompt=...), "prompt", "must not be empty"),
    (_record(prompt=..., prompt_token_ids=[]), "prompt_token_ids", "must not be empty"),
    (_record(prompt=..., prompt_token_ids=[1, "a"]), "prompt_token_ids[1]", "must be an integer"),
    (_record(prompt=..., prompt_token_ids=[1, -2]), "prompt_token_ids[1]", "must be >= 0"),
    (_record(prompt_token_ids=[1]), "prompt", "not both"),
    (_record(messages=[{"role": "user", "content": "hi"}]), "prompt", "not both"),
    (_record(prompt=..., messages=[]), "messages", "must be a non-empty list"),
    (_record(prompt=..., messages=[{"role": "user"}]), "messages[0].content", "must be a string"),
    (_record(prompt=..., messages=[{"role": "user", "content": "x" * 65}]), "messages",
     "over the limit of 64 bytes"),
    (_record(prompt="x" * 65), "prompt", "over the limit of 64 bytes"),
    (_record(max_tokens=0), "max_tokens", "must be > 0, got 0"),
    (_record(max_tokens=-3), "max_tokens", "must be > 0, got -3"),
    (_record(max_tokens=99), "max_tokens", "too long for every worker serving model 'm7b': "
     "2 + 99 = 101 tokens > max_model_len 100"),
    (_record(max_tokens="10"), "max_tokens", "must be an integer, got str"),
    (_record(max_tokens=2**31), "max_tokens", "must be <= 2147483647, got 2147483648"),
    (_record(max_tokens=10**4000), "max_tokens", "got an integer of about 4001 digits"),
    (_record(prompt=..., prompt_token_ids=[1, 2**31]), "prompt_token_ids[1]",
     "must be <= 2147483647"),
    (_record(sampling={"top_k": 2**31}), "sampling.top_k", "must be <= 2147483647"),
    (_record(sampling={"seed": 2**63}), "sampling.seed", "must be <= 9223372036854775807"),
    (_record(max_tokens=True), "max_tokens", "must be an integer, got bool"),
    (_record(max_tokens=...), "max_tokens", "is required"),
    (_record(slo_class="gold"), "slo_class", "must be one of"),
    (_record(slo_class=99), "slo_class", "must be one of"),
    (_record(slo_class="custom"), "ttft_slo_s", "is required for slo_class 'custom'"),
    (_record(slo_class="custom", ttft_slo_s=-1), "ttft_slo_s", "must be > 0, got -1.0"),
    (_record(ttft_slo_s="fast"), "ttft_slo_s", "must be a number, got str"),
    (_record(ttft_slo_s=float("nan")), "ttft_slo_s", "must be finite"),
    (_record(tpot_slo_s=0), "tpot_slo_s", "must be > 0"),
    (_record(request_id="a b"), "request_id", "characters of"),
    (_record(max_token=5), "max_token", "unknown field"),
    (_record(sampling={"top_p": 2}), "sampling.top_p", "must be in (0, 1]"),
    (_record(sampling={"temp": 1}), "sampling.temp", "unknown field"),
    (_record(sampling=[1]), "sampling", "must be an object"),
    ([1, 2], "record", "must be a JSON object"),
]


@pytest.mark.parametrize(("record", "field", "problem"), BAD)
def test_bad_field_is_named(record: Any, field: str, problem: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_submission(record, MODELS, LIMITS)
    assert info.value.field == field
    assert problem in info.value.problem


def test_defaults_and_round_trip() -> None:
    sub = parse_submission(_record(), MODELS, LIMITS)
    assert sub.slo_class is SLOClass.INTERACTIVE and sub.slo.ttft_s == 20.0
    assert sub.tenant == "default" and sub.request_id == "" and sub.num_prompt_tokens == 2
    full = _record(request_id="r-1", slo_class="custom", ttft_slo_s=3, tpot_slo_s=0.1,
                   sampling={"temperature": 0, "stop": ["\n"], "ignore_eos": True})
    sub = parse_submission(full, MODELS, LIMITS)
    assert parse_submission(sub.to_record(), MODELS, LIMITS) == sub
    assert sub.to_request(arrival_at=5.0).deadline_at == 8.0


def test_chat_messages_are_kept_for_the_worker_and_round_trip() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    sub = parse_submission(_record(prompt=..., messages=messages), MODELS, LIMITS)
    assert sub.prompt_text is None and sub.prompt_token_ids is None
    assert sub.num_prompt_tokens == 3  # 11 bytes of content, ~4 per token until tokenized
    assert sub.stored_prompt() == {"messages": messages}
    assert parse_submission(sub.to_record(), MODELS, LIMITS) == sub
    assert parse_submission(_record(), MODELS, LIMITS).stored_prompt() == "hello"


def test_token_ids_count_as_prompt_tokens() -> None:
    sub = parse_submission(_record(prompt=..., prompt_token_ids=[3] * 90), MODELS, LIMITS)
    assert sub.num_prompt_tokens == 90 and sub.prompt_text is None
    with pytest.raises(InvalidInput, match="max_tokens"):
        parse_submission(_record(prompt=..., prompt_token_ids=[3] * 91), MODELS, LIMITS)


def test_without_a_catalogue_any_model_passes() -> None:
    assert parse_submission(_record(model="anything", max_tokens=10**6), None).model == "anything"


def test_an_unknown_field_with_an_empty_or_unprintable_name_is_named_quoted() -> None:
    with pytest.raises(InvalidInput) as empty:
        parse_submission({**_record(), "": 1}, MODELS, LIMITS)
    assert (empty.value.field, empty.value.problem) == ("''", "unknown field")
    with pytest.raises(InvalidInput) as control:
        parse_submission({**_record(), "a\nb": 1}, MODELS, LIMITS)
    assert control.value.field == "'a\\nb'"
