"""make results: the step table (loadgen.regenerate) and the headline table built from
the simulator summaries (loadgen.headline)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from loadgen import headline, regenerate


def test_every_step_runs_a_module_that_exists_and_quick_writes_outside_docs() -> None:
    names = [s.name for s in regenerate.STEPS]
    assert len(names) == len(set(names))
    for step in regenerate.STEPS:
        for quick, out in ((False, regenerate.RESULTS), (True, regenerate.QUICK_OUT)):
            command = regenerate._command(step, quick, out, 2)
            module = re.match(r"python -m ([\w.]+)", command)
            assert module, command
            importlib.import_module(module.group(1))
            if quick:
                assert "docs/results" not in command, command
    # every JSON a step writes comes from a writer that declares its keys
    for step in regenerate.STEPS:
        command = regenerate._command(step, False, regenerate.RESULTS, 2)
        if ".json" in command or "loadgen.sim" in command:
            module = re.match(r"python -m ([\w.]+)", command)
            assert module and importlib.import_module(module.group(1)).RESULT_KEYS


def test_only_names_known_steps() -> None:
    assert [s.name for s in regenerate.selected("bench-decide")] == ["bench-decide"]
    with pytest.raises(SystemExit, match="unknown step"):
        regenerate.selected("bench-nope")


def _entry(slo: list[float], rps: list[float], refused: list[int] | None = None) -> dict:
    entry: dict = {"slo_attainment": slo, "throughput_rps": rps}
    if refused is not None:
        entry["num_refused"] = refused
    return entry


def test_headline_row_uses_only_the_loaded_rates() -> None:
    summary = {"rates": [10, 20, 40], "policies": {
        "qlm": _entry([1.0, 0.9, 0.8], [10, 18, 22], [0, 3, 5]),
        "fcfs": _entry([1.0, 0.6, 0.4], [10, 20, 20], [0, 3, 5]),
        "edf": _entry([1.0, 0.9, 0.5], [10, 19, 21], [0, 3, 5]),
    }}
    row = headline.row("WX", summary)
    assert row == ["WX", "20, 40", "0.80–0.90", "1.50–2.00", "1.00–1.60",
                   "1.00–1.60 (fcfs, edf)", "0.90–1.10", "5"]
    summary["policies"]["fcfs"]["slo_attainment"] = [1.0, 0.9, 0.8]
    assert "none" in headline.row("WX", summary)[1]


def test_headline_replaces_only_what_lies_between_its_markers(tmp_path: Path) -> None:
    text = f"intro\n{headline.BEGIN}\nold table\n{headline.END}\nrest\n"
    out = headline.replace_between_markers(text, "new table\n")
    assert out == f"intro\n{headline.BEGIN}\nnew table\n{headline.END}\nrest\n"
    with pytest.raises(SystemExit, match="no headline markers"):
        headline.replace_between_markers("no markers", "x")


def test_the_committed_headline_is_the_one_the_summaries_give() -> None:
    results = Path(__file__).resolve().parents[2] / "docs" / "results"
    readme = (results / "README.md").read_text()
    assert headline.replace_between_markers(readme, headline.table(results)) == readme
