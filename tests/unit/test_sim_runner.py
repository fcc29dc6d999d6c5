"""loadgen.sim end to end on a tiny run: the summary schema, and unknown policies named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadgen.sim import check_policies, main, parse_rates
from qlm.core.errors import InvalidInput

SCHEMA_LISTS = ("slo_attainment", "throughput_rps", "throughput_tok_s", "ttft_p99_s",
                "gpu_util", "swaps", "evictions", "decision_ms_p99")


def test_unregistered_policies_are_named() -> None:
    with pytest.raises(InvalidInput) as err:
        check_policies("fcfs,nosuch,other")
    assert "nosuch" in err.value.problem and "other" in err.value.problem
    assert "fcfs," not in err.value.problem.split("(")[0]


def test_bad_rates() -> None:
    with pytest.raises(InvalidInput):
        parse_rates("5,x")
    with pytest.raises(InvalidInput):
        parse_rates("0")


def test_unknown_policy_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workload", "WA", "--policies", "nosuch", "--out", str(tmp_path)]) == 2
    assert "nosuch" in capsys.readouterr().err


def test_tiny_run_writes_the_summary_schema(tmp_path: Path) -> None:
    rc = main(["--workload", "WB", "--policies", "fcfs,edf", "--rates", "2,8",
               "--num-requests", "80", "--jobs", "1", "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["workload"] == "WB"
    assert summary["rates"] == [2.0, 8.0]
    assert set(summary["policies"]) == {"fcfs", "edf"}
    for entry in summary["policies"].values():
        for key in SCHEMA_LISTS:
            assert len(entry[key]) == 2, key
        assert set(entry["slo_attainment_by_class"]) == {"batch-1", "batch-2"}
        assert all(0.0 <= a <= 1.0 for a in entry["slo_attainment"])
    assert (tmp_path / "attainment.png").stat().st_size > 0
    assert (tmp_path / "records.csv.gz").stat().st_size > 0
