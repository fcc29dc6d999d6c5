"""qlm batch submit's file reading: line-number ids, every line validated before sending."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlm.cli import main, read_batch_file
from qlm.core.errors import InvalidInput


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _line(**fields: object) -> str:
    return json.dumps({"model": "m", "prompt": "p", "max_tokens": 4, **fields})


def test_ids_come_from_line_numbers_unless_given(tmp_path: Path) -> None:
    path = _write(tmp_path / "jobs 1.jsonl", [_line(), "", _line(request_id="mine"), _line()])
    ids = [line.submission.request_id for line in read_batch_file(path)]
    assert ids == ["jobs_1-1", "mine", "jobs_1-4"]
    assert read_batch_file(path, "run7")[0].submission.request_id == "run7-1"
    assert read_batch_file(path) == read_batch_file(path)  # re-reading gives the same ids


@pytest.mark.parametrize(
    ("bad_line", "where", "problem"),
    [
        ("{oops", ":2", "not valid JSON"),
        (_line(max_tokens=0), ":2: max_tokens", "must be > 0, got 0"),
        (_line(prompt=""), ":2: prompt", "must not be empty"),
        (_line(slo_class="custom"), ":2: ttft_slo_s", "is required for slo_class 'custom'"),
        (_line(max_tokens="4"), ":2: max_tokens", "must be an integer, got str"),
        (_line(request_id="jobs-1"), ":2: request_id", "repeats line 1"),
        ("[1, 2]", ":2: record", "must be a JSON object"),
    ],
)
def test_first_bad_line_names_file_line_and_field(
    tmp_path: Path, bad_line: str, where: str, problem: str
) -> None:
    path = _write(tmp_path / "jobs.jsonl", [_line(), bad_line, _line()])
    with pytest.raises(InvalidInput) as info:
        read_batch_file(path)
    assert info.value.field == f"{path}{where}"
    assert problem in info.value.problem


def test_cli_exits_2_and_sends_nothing_on_a_bad_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "jobs.jsonl", [_line(), _line(max_tokens=-1)])
    # an unreachable broker proves nothing was attempted: validation fails first
    code = main(["batch", "submit", str(path), "--kafka-bootstrap", "127.0.0.1:1"])
    assert code == 2
    assert f"{path}:2: max_tokens: must be > 0, got -1" in capsys.readouterr().err
