"""Where the predicted wait's error lies: the cases predict_check reads off the records."""

from __future__ import annotations

import pytest

from loadgen.predict_check import ERROR_CASES, error_cases
from qlm.sim.metrics import RequestRecord


def record(rid: str, arrival: float, told_at: float, predicted: float, start: float,
           first: float, worker: str = "w") -> RequestRecord:
    return RequestRecord(rid, "m", "batch-1", arrival, arrival + 60.0, 100, 10, start, first,
                         first + 1.0, worker, 0, False, predicted_at=told_at,
                         predicted_first_token_at=predicted, last_predicted_at=told_at,
                         last_predicted_first_token_at=predicted)


def test_each_request_falls_in_the_first_case_its_worker_shows() -> None:
    records = [
        # a and b start together; c arrives after a's last prediction and starts before
        # a's first token (it shares a's prefill steps): a's error is the later arrival's
        record("a", 0.0, 0.1, 0.5, 0.2, 0.9),
        record("b", 0.0, 0.1, 0.3, 0.2, 0.3),
        record("c", 0.4, 0.45, 0.9, 0.5, 0.9),
        # d starts while c is still prefilling (c started before d was last told, too)
        record("d", 0.3, 0.45, 1.0, 0.6, 1.2),
        # e is alone on its worker
        record("e", 0.0, 0.1, 0.2, 0.1, 0.25, worker="x"),
        # f was last told while g was prefilling, and starts once g has its first token
        record("g", 0.0, 0.05, 0.5, 0.1, 0.5, worker="y"),
        record("f", 0.15, 0.2, 0.7, 0.5, 0.7, worker="y"),
    ]
    got = error_cases(records)
    assert tuple(got) == ERROR_CASES
    assert {k: v["n"] for k, v in got.items()} == {
        "later_arrivals": 1, "behind_prefill": 3, "co_admitted": 1, "alone": 2}
    errors = {"later_arrivals": -0.4, "behind_prefill": (0.0 - 0.2 + 0.0) / 3, "co_admitted": 0.0,
              "alone": -0.05 / 2}
    for name, mean in errors.items():
        assert got[name]["mean_error_s"] == pytest.approx(mean, abs=1e-4)
    assert sum(v["sse_share"] for v in got.values()) == pytest.approx(1.0, abs=1e-3)
    assert got["later_arrivals"]["sse_share"] == pytest.approx(0.16 / (0.16 + 0.04 + 0.0025),
                                                               abs=1e-3)
