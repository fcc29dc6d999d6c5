"""The ``swapped`` worker event shares ``qlm.events`` (and the Event model) with request events."""

from __future__ import annotations

import json

import pytest

from qlm.bus.records import Event
from qlm.core.errors import InvalidInput


def swapped(**fields: object) -> dict[str, object]:
    return {"v": 1, "type": "swapped", "model": "vicuna-13b", "from_model": "mistral-7b",
            "worker": "w1", "at": 10.0, "duration_s": 0.5, "reason": "lso", **fields}


def test_swapped_round_trips_without_request_fields_and_is_keyed_by_worker() -> None:
    event = Event.from_json(json.dumps(swapped()))
    assert event.is_worker_event and event.request_id is None
    assert (event.model, event.from_model, event.duration_s) == ("vicuna-13b", "mistral-7b", 0.5)
    assert event.key() == b"w1"
    assert Event.from_json(event.to_json()) == event
    assert "request_id" not in json.loads(event.to_json())


@pytest.mark.parametrize(("field", "value"), [("worker", None), ("duration_s", None),
                                              ("request_id", "r1"), ("slo_class", "batch-1"),
                                              ("arrival_at", 1.0)])
def test_swapped_needs_worker_and_duration_and_no_request_fields(field: str,
                                                                  value: object) -> None:
    record = swapped(**{field: value})
    if value is None:
        del record[field]
    with pytest.raises(InvalidInput) as error:
        Event.from_json(json.dumps(record))
    assert error.value.field == field


def test_request_events_still_require_their_request_fields() -> None:
    base = {"v": 1, "type": "finished", "request_id": "r1", "model": "m", "worker": "w1",
            "slo_class": "interactive", "at": 2.0, "arrival_at": 1.0}
    event = Event.from_json(json.dumps(base))
    assert not event.is_worker_event and event.key() == b"r1"
    for field in ("request_id", "slo_class", "arrival_at"):
        with pytest.raises(InvalidInput) as error:
            Event.from_json(json.dumps({k: v for k, v in base.items() if k != field}))
        assert (error.value.field, error.value.problem) == (field, "is required")
    with pytest.raises(InvalidInput) as error:
        Event.from_json(json.dumps({**base, "duration_s": 1.0}))
    assert error.value.field == "duration_s"
