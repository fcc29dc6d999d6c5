"""Workload generators and trace replay: rates, lengths, order, and bad input."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from qlm.core.errors import InvalidInput
from qlm.core.types import SLOClass
from qlm.traces import load_trace, parse_trace
from qlm.workloads import (
    CLUSTERS,
    LLAMA,
    SHAREGPT,
    cluster_for,
    gamma_arrivals,
    plan_requests,
    poisson_arrivals,
    sample_lengths,
)

TRACE = Path(__file__).resolve().parents[2] / "loadgen" / "traces" / "azure_llm_2023_conv.csv"


def rows(*lines: tuple[str, str, str]) -> list[dict[str, str]]:
    return [{"TIMESTAMP": t, "ContextTokens": c, "GeneratedTokens": g} for t, c, g in lines]


GOOD = ("2023-11-16 18:15:46.6805900", "374", "44")


# ------------------------------------------------------------- bad input
def test_missing_column_is_named() -> None:
    with pytest.raises(InvalidInput) as err:
        parse_trace([{"TIMESTAMP": GOOD[0], "GeneratedTokens": "3"}])
    assert "ContextTokens" in err.value.field
    assert "missing" in err.value.problem


def test_missing_column_in_csv_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:15:46,10\n")
    with pytest.raises(InvalidInput) as err:
        load_trace(path)
    assert "GeneratedTokens" in err.value.field


@pytest.mark.parametrize(
    "bad, column",
    [
        (("2023-11-16 18:15:47", "-5", "10"), "ContextTokens"),
        (("2023-11-16 18:15:47", "10", "-1"), "GeneratedTokens"),
        (("2023-11-16 18:15:47", "12.5", "10"), "ContextTokens"),
        (("2023-11-16 18:15:47", "10", "many"), "GeneratedTokens"),
        (("2023-11-16 18:15:47", "0", "10"), "ContextTokens"),
        (("yesterday", "10", "10"), "TIMESTAMP"),
        (("2023-11-16 18:15:47.12ab", "10", "10"), "TIMESTAMP"),
    ],
)
def test_bad_values_name_column_and_line(bad: tuple[str, str, str], column: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_trace(rows(GOOD, bad))
    assert column in err.value.field
    assert "line 3" in err.value.field


def test_unreadable_file_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        load_trace(tmp_path / "absent.csv")


def test_bad_rate_and_workload() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(InvalidInput):
        poisson_arrivals(rng, 10, 0.0)
    with pytest.raises(InvalidInput):
        plan_requests("WZ", 10, rng)


# ------------------------------------------------------------- arrivals
def test_poisson_mean_rate_and_exponential_gaps() -> None:
    times = poisson_arrivals(np.random.default_rng(1), 40_000, 5.0)
    gaps = np.diff(np.concatenate(([0.0], times)))
    assert len(times) / times[-1] == pytest.approx(5.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # CV of an exponential
    assert (gaps > 0).all()


def test_gamma_arrivals_are_bursty_with_the_asked_cv() -> None:
    times = gamma_arrivals(np.random.default_rng(2), 40_000, 5.0, cv=3.0)
    gaps = np.diff(np.concatenate(([0.0], times)))
    assert len(times) / times[-1] == pytest.approx(5.0, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.1)


def test_sharegpt_like_lengths_have_the_stated_means() -> None:
    prompts, outputs = sample_lengths(np.random.default_rng(3), 200_000)
    assert prompts.mean() == pytest.approx(161, rel=0.05)
    assert outputs.mean() == pytest.approx(336, rel=0.05)
    assert prompts.min() >= SHAREGPT.prompt_min and outputs.max() <= SHAREGPT.output_max


def test_jobs_at_scales_time_only() -> None:
    plan = plan_requests("WA", 2000, np.random.default_rng(4))
    slow, fast = plan.jobs_at(2.0), plan.jobs_at(8.0)
    assert [j.request.id for j in slow] == [j.request.id for j in fast]
    assert [j.output_tokens for j in slow] == [j.output_tokens for j in fast]
    assert fast[-1].request.arrival_at == pytest.approx(slow[-1].request.arrival_at / 4)
    assert len(fast) / fast[-1].request.arrival_at == pytest.approx(8.0, rel=0.1)
    # the scheduler never learns the true length from max_tokens
    assert all(j.request.max_tokens >= 2048 for j in fast)


# ---------------------------------------------------------------- mixes
def test_workload_mixes() -> None:
    rng = np.random.default_rng(6)
    wa = plan_requests("WA", 4000, rng)
    assert set(wa.models) == {"mistral-7b"}
    assert wa.classes.count(SLOClass.INTERACTIVE) / 4000 == pytest.approx(0.5, abs=0.03)
    wb = plan_requests("WB", 3000, rng)
    assert set(wb.models) == {"mistral-7b", "vicuna-13b", "llama-70b"}
    assert SLOClass.INTERACTIVE not in wb.classes
    first_phase = wb.models[:1000]
    assert first_phase.count(LLAMA) / 1000 == pytest.approx(0.6, abs=0.05)
    wc = plan_requests("WC", 1000, rng)
    assert wc.prompts.min() >= 3000 and wc.prompts.max() <= 4000


def test_wb_cluster_forces_swaps() -> None:
    for cluster in CLUSTERS:
        workers = cluster_for("WB", cluster)
        resident_everywhere = set.intersection(*(set(w.models) for w in workers))
        assert not resident_everywhere
        assert any(w.num_gpus == 4 for w in workers)
        assert not any(LLAMA in w.models for w in workers)  # llama-70b needs a cold load
    paper = cluster_for("WA", "paper")
    assert sum(w.gpu == "A10-24GB" for w in paper) == 30
    assert sum(w.gpu == "A100-80GB" for w in paper) == 50


# --------------------------------------------------------------- replay
def test_trace_replay_length_order_and_rate() -> None:
    trace = parse_trace(rows(
        ("2023-11-16 18:15:50.0000000", "20", "2"),
        ("2023-11-16 18:15:46.5000000", "10", "1"),
        ("2023-11-16 18:15:52.5", "30", "3"),
        ("2023-11-16 18:15:56", "40", "4"),
    ))
    assert [r.context_tokens for r in trace] == [10, 20, 30, 40]  # sorted by time
    assert [r.arrival_s for r in trace] == pytest.approx([0.0, 3.5, 6.0, 9.5])
    plan = plan_requests("WA", 3, np.random.default_rng(0), trace=trace)
    jobs = plan.jobs_at(1.0)
    assert len(jobs) == 3
    assert [j.request.prompt_tokens for j in jobs] == [10, 20, 30]
    assert [j.output_tokens for j in jobs] == [1, 2, 3]
    # time-scaled to 1 req/s: n arrivals spread over n - 1 seconds, shape kept
    assert [j.request.arrival_at for j in jobs] == pytest.approx([0.0, 2 * 3.5 / 6, 2.0])


def test_the_azure_trace_loads() -> None:
    trace = load_trace(TRACE)
    assert len(trace) == 19_366
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(trace))
    plan = plan_requests("WA", 500, np.random.default_rng(0), trace=trace)
    assert len(plan.jobs_at(10.0)) == 500
