"""Every measured JSON in docs/results/ holds only keys its writer produces.

The writer of a JSON is the program its ``command`` names (``python -m loadgen.X`` or a
test file); each writer declares the top-level keys it writes (``RESULT_KEYS``), and
loadgen.results refuses to write an undeclared one. A key added to a committed JSON by
hand (a note, a corrected value's explanation, a summary) fails here: such commentary
belongs in docs/results/README.md.
"""

from __future__ import annotations

import gzip
import importlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from loadgen.report import ENTRY_KEYS
from loadgen.results import emit, undeclared, write_json

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"
#: JSONs whose writer records no command line, and their writer: the demo's report
#: (``python -m loadgen.demo --out DIR`` writes DIR/summary.json; DIR is demo or demo_*).
WRITTEN_WITHOUT_COMMAND = {
    str(p.relative_to(RESULTS)): "loadgen.demo"
    for p in RESULTS.rglob("summary.json") if re.fullmatch(r"demo(_\w+)?", p.parent.name)
}


def _load(path: Path) -> Any:
    if path.suffix == ".gz":
        with gzip.open(path, "rt") as f:
            return json.load(f)
    return json.loads(path.read_text())


def _writer(relative: str, data: dict[str, Any]) -> str:
    command = data.get("command", "")
    found = (re.search(r"python3? -m (loadgen\.[\w.]+)", command)
             or re.search(r"(tests/[\w/]+)\.py", command))
    if found:
        return found.group(1).replace("/", ".")
    assert relative in WRITTEN_WITHOUT_COMMAND, (
        f"{relative}: no command names the program that wrote it")
    return WRITTEN_WITHOUT_COMMAND[relative]


RESULT_FILES = sorted(
    str(p.relative_to(RESULTS)) for p in RESULTS.rglob("*")
    if p.name.endswith((".json", ".json.gz"))
)


def test_results_are_found() -> None:
    assert len(RESULT_FILES) > 50 and "bench_decide.json" in RESULT_FILES


@pytest.mark.parametrize("relative", RESULT_FILES)
def test_committed_json_holds_only_keys_its_writer_declares(relative: str) -> None:
    data = _load(RESULTS / relative)
    assert isinstance(data, dict), f"{relative}: not a JSON object"
    writer = _writer(relative, data)
    declared = importlib.import_module(writer).RESULT_KEYS
    assert undeclared(data, declared) == [], f"{relative}: keys {writer} does not write"
    summaries = ([data] if writer == "loadgen.sim" else
                 [data[k] for k in ("sim", "stack") if k in data] if writer == "loadgen.demo"
                 else [])
    entry_keys = getattr(importlib.import_module(writer), "ENTRY_KEYS", ENTRY_KEYS)
    for summary in summaries:  # one entry per policy, each with the report's keys
        for name, entry in summary["policies"].items():
            assert undeclared(entry, entry_keys) == [], f"{relative}: policies.{name}"


def test_a_writer_cannot_write_a_key_it_did_not_declare(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    out = tmp_path / "r.json"
    with pytest.raises(ValueError, match="not declared by the writer: summary"):
        emit({"command": "x", "summary": "by hand"}, out, keys={"command"})
    assert not out.exists()
    assert '"summary": "by hand"' in capsys.readouterr().out  # printed: nothing measured lost
    write_json(out, {"command": "x"}, {"command", "p99_ms"})
    assert json.loads(out.read_text()) == {"command": "x"}


def test_bench_decide_writes_exactly_its_declared_keys(tmp_path: Path) -> None:
    """The writer run at a tiny size: what it writes is what it declares."""
    from loadgen import bench_decide

    out = tmp_path / "decide.json"
    assert bench_decide.main(["--queued", "300", "--workers", "4", "--policies", "fcfs,edf",
                              "--iterations", "3", "--reference-iterations", "2",
                              "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())) == bench_decide.RESULT_KEYS
