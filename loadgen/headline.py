"""The headline table of docs/results/README.md, from the simulator summaries.

    python -m loadgen.headline [--results docs/results] [--write FILE]

For each sweep in ``qlm/{WA,WB,WC,WB_paper}/summary.json``: at the rates where fcfs
attains less than 0.7 (the loaded rates), qlm's SLO attainment over fcfs's, over edf's
and over the best baseline's at that rate, qlm's throughput over fcfs's, and the
requests refused at admission (they fit no worker). Ranges are over those rates. The
table replaces what lies between the two headline markers of the README (``--write``:
writes the table to FILE instead); it is printed too. Run by ``make results``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

SWEEPS = (("WA", "qlm/WA"), ("WB", "qlm/WB"), ("WB, paper cluster", "qlm/WB_paper"),
          ("WC", "qlm/WC"))
BEGIN = "<!-- headline: python -m loadgen.headline writes this table; do not edit -->"
END = "<!-- /headline -->"
LOADED_BELOW = 0.7


def _span(values: Sequence[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.2f}" if round(lo, 2) == round(hi, 2) else f"{lo:.2f}–{hi:.2f}"


def row(label: str, summary: Mapping[str, Any]) -> list[str]:
    """One table row of a sweep (module docstring); ``—`` where a policy is missing."""
    policies = summary["policies"]
    rates = summary["rates"]
    qlm, fcfs = policies.get("qlm"), policies.get("fcfs")
    if qlm is None or fcfs is None:
        return [label, "needs qlm and fcfs", "", "", "", "", "", ""]
    loaded = [i for i, a in enumerate(fcfs["slo_attainment"]) if a is not None and a < LOADED_BELOW]
    if not loaded:
        return [label, f"none (fcfs ≥ {LOADED_BELOW} at every rate)", "", "", "", "", "", ""]

    def ratios(of: str, key: str = "slo_attainment") -> str:
        other = policies.get(of)
        if other is None:
            return "—"
        return _span([qlm[key][i] / other[key][i] for i in loaded if other[key][i]])

    baselines = [name for name in policies if name != "qlm"]
    best = [qlm["slo_attainment"][i] / max(policies[b]["slo_attainment"][i] for b in baselines)
            for i in loaded]
    refused = qlm.get("num_refused")
    return [
        label, ", ".join(f"{rates[i]:g}" for i in loaded),
        _span([qlm["slo_attainment"][i] for i in loaded]),
        ratios("fcfs"), ratios("edf"),
        f"{_span(best)} ({', '.join(baselines)})",
        ratios("fcfs", "throughput_rps"),
        "—" if refused is None else str(max(refused[i] for i in loaded)),
    ]


def table(results: Path) -> str:
    head = ["workload", "loaded rates (fcfs < 0.7)", "qlm SLO", "qlm ÷ fcfs", "qlm ÷ edf",
            "qlm ÷ best baseline", "throughput qlm ÷ fcfs", "refused"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    commits = []
    for label, folder in SWEEPS:
        path = results / folder / "summary.json"
        if not path.exists():
            continue
        summary = json.loads(path.read_text())
        lines.append("| " + " | ".join(row(label, summary)) + " |")
        commits.append(f"`{folder}/summary.json`: `{summary.get('command', '?')}`")
    return ("\n".join(lines) + "\n\nFrom " + "; ".join(commits) + ".\n") if commits else (
        "No simulator summaries found.\n")


def replace_between_markers(text: str, block: str) -> str:
    """``text`` with what lies between the headline markers replaced by ``block``."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"the README has no headline markers ({BEGIN} … {END})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen.headline",
                                description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=Path("docs/results"))
    p.add_argument("--write", type=Path, help="write the table here, not into the README")
    args = p.parse_args(argv)
    block = table(args.results)
    print(block)
    if args.write is not None:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(block)
    else:
        readme = args.results / "README.md"
        readme.write_text(replace_between_markers(readme.read_text(), block))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
