"""The bounds of loadgen.wb_bound hold against simulated runs: no policy's attainment
above the attainment bound, no makespan below the makespan bound."""

from __future__ import annotations

import numpy as np
import pytest

from loadgen.wb_bound import bound, work_s
from qlm.core.perf import ProfileBook
from qlm.core.policies import make_policy
from qlm.sim import simulate
from qlm.workloads import cluster_for, plan_requests


@pytest.mark.parametrize("policy", ["fcfs", "qlm"])
def test_simulated_runs_stay_within_the_bounds(policy: str) -> None:
    profiles = ProfileBook.load()
    jobs = plan_requests("WB", 400, np.random.default_rng(3)).jobs_at(40.0)
    workers = cluster_for("WB")
    found = bound(jobs, workers, profiles, slot_s=2.0)
    metrics = simulate(jobs, workers, profiles, make_policy(policy)).metrics
    assert found["surely_missed"]["llama-70b"] > 0  # llama's cold load loses its first requests
    assert metrics.slo_attainment <= found["attainment_bound"] + 1e-9
    assert metrics.throughput_rps <= found["throughput_bound_rps"] + 1e-9
    assert found["makespan_bound_s"] >= found["ready_at_s"]["llama-70b@a100x4-00"]


def test_work_grows_with_output_and_prompt() -> None:
    p = ProfileBook.load().get("mistral-7b", "A10-24GB")
    assert 0 < work_s(p, 100, 100) < work_s(p, 100, 200) < work_s(p, 1000, 200)
