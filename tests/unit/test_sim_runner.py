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


@pytest.mark.parametrize(("text", "named"), [
    ("[1]", "policy-options"), ("{nope", "policy-options"),
    ('{"no_such_option": 1}', "no_such_option")])
def test_bad_policy_options_exit_2_naming_the_problem(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, named: str) -> None:
    rc = main(["--workload", "WA", "--policies", "qlm", "--policy-options", text,
               "--out", str(tmp_path / "out")])
    assert rc == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_policy_options_reach_the_policy_and_the_summary(tmp_path: Path) -> None:
    rc = main(["--workload", "WB", "--policies", "qlm", "--rates", "8",
               "--num-requests", "60", "--jobs", "1", "--no-records",
               "--policy-options", '{"evict": false}', "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["policy_options"] == {"evict": False}
    assert summary["policies"]["qlm"]["evictions"] == [0.0]


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
