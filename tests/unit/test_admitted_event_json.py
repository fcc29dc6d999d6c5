"""The submit path's encoder of ``admitted`` events writes exactly what Event would."""

from __future__ import annotations

from typing import Any

import pytest

from qlm.bus.records import Event, admitted_event_json

CASES: list[dict[str, Any]] = [
    dict(request_id="r1", model="m", slo_class="batch-1", at=1732240000.123456,
         arrival_at=1732240000.1, tenant="bench", num_prompt_tokens=60, predicted_wait_s=3.5),
    # small and large floats: pydantic writes 0.00001 and 1.5e-7 where json.dumps would not
    dict(request_id="r-2", model="llama-3-8b", slo_class="interactive", at=1e-05,
         arrival_at=0.0, tenant="t", num_prompt_tokens=0, predicted_wait_s=1.5e-07),
    dict(request_id="r.3:x", model="m", slo_class="custom", at=1e16, arrival_at=5.0,
         tenant="Zürich ✓ \"quoted\"\n", num_prompt_tokens=8191, predicted_wait_s=None),
    # integers where the schema has floats are written as floats, as Event does
    dict(request_id="r4", model="m", slo_class="batch-2", at=7, arrival_at=3,
         tenant=None, num_prompt_tokens=1, predicted_wait_s=0),
]


@pytest.mark.parametrize("fields", CASES)
def test_same_bytes_as_the_event_record(fields: dict[str, Any]) -> None:
    as_float: dict[str, Any] = {
        k: float(v) if k in ("at", "arrival_at", "predicted_wait_s") and v is not None else v
        for k, v in fields.items()
    }
    event = Event.model_validate({"type": "admitted", **as_float})
    assert admitted_event_json(**fields) == event.to_json()
    assert Event.from_json(admitted_event_json(**fields)) == event


def test_a_known_encoding() -> None:
    """Guards the comparison above against both sides changing together."""
    assert admitted_event_json(
        request_id="r1", model="m", slo_class="batch-1", at=2.0, arrival_at=1.0, tenant="t",
        num_prompt_tokens=3, predicted_wait_s=None,
    ) == (b'{"v":1,"type":"admitted","request_id":"r1","model":"m","slo_class":"batch-1",'
          b'"at":2.0,"arrival_at":1.0,"tenant":"t","num_prompt_tokens":3}')
