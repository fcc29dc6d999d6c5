"""The SLO report of an experiment: ``summary.json`` entries, the table, the plots.

One format for every runner (the simulator's ``loadgen.sim`` and the stack's
``loadgen.demo``), so that their tables can be laid side by side. ``summary.json``::

    {"workload": str, "rates": [..], "policies": {name: {
        "slo_attainment": [per rate], "slo_attainment_by_class": {cls: [..]},
        "throughput_rps": [..], "throughput_tok_s": [..], "ttft_p50_s": [..], "ttft_p99_s": [..],
        "tpot_p50_s": [..], "tpot_p99_s": [..], "gpu_util": [..], "swaps": [..],
        "evictions": [..], "decision_ms_p50": [..], "decision_ms_p99": [..],
        "num_decisions": [..], "invalid_actions": [..], "num_refused": [..],
        "num_refused_by_class": {cls: [..]}, "wait_r2": [..], "wall_s": [..],
        "tpot_attainment": [..], "combined_attainment": [..],
        "tpot_attainment_by_class": {cls: [..]}, "combined_attainment_by_class": {cls: [..]}}},
     ... extra keys of the runner}

A value that was not measured is ``null`` (shown as ``—``). ``num_refused``: requests
refused at admission because they fit no worker (:mod:`qlm.core.fit`); SLO attainment
is over the other requests (``refused`` column of the table, per class in brackets).
TPOT attainment is over the requests with a TPOT target (``null`` when none has one);
combined attainment (TTFT and TPOT both met) over every admitted request. The table shows
them (``TPOT``, per class ``TPOT <cls>``, ``TTFT+TPOT``) when some request had a target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qlm.sim.metrics import RunMetrics

PER_RATE_KEYS = (
    "slo_attainment", "throughput_rps", "throughput_tok_s", "ttft_p50_s", "ttft_p99_s",
    "tpot_p50_s", "tpot_p99_s", "gpu_util", "swaps", "evictions", "decision_ms_p50",
    "decision_ms_p99", "num_decisions", "invalid_actions", "num_refused", "tpot_attainment",
    "combined_attainment",
)
#: Per-class attainments of an entry (``{cls: [per rate]}``).
BY_CLASS_KEYS = ("slo_attainment_by_class", "tpot_attainment_by_class",
                 "combined_attainment_by_class")


#: The keys of one policy's entry in ``summary.json``.
ENTRY_KEYS = frozenset({*PER_RATE_KEYS, *BY_CLASS_KEYS, "num_refused_by_class",
                        "slo_attainment_by_tenant", "wait_r2", "wall_s"})


def num(x: float | None) -> float | None:
    """A JSON number: None for NaN (not measured), else rounded to 6 decimals."""
    if x is None:
        return None
    x = float(x)
    return None if np.isnan(x) else round(x, 6)


def policy_entry(runs: Sequence[tuple[RunMetrics, float, float]]) -> dict[str, Any]:
    """One policy's entry: per-rate lists from ``(metrics, wait_r2, wall_s)`` of each rate."""
    metrics = [m for m, _, _ in runs]
    entry: dict[str, Any] = {k: [num(getattr(m, k)) for m in metrics] for k in PER_RATE_KEYS}
    for key in BY_CLASS_KEYS:
        values = [getattr(m, key) for m in metrics]
        classes = sorted({c for v in values for c in v})
        entry[key] = {c: [num(v.get(c, float("nan"))) for v in values] for c in classes}
    refused_classes = sorted({c for m in metrics for c in m.num_refused_by_class})
    entry["num_refused_by_class"] = {
        c: [m.num_refused_by_class.get(c, 0) for m in metrics] for c in refused_classes
    }
    tenants = sorted({t for m in metrics for t in m.slo_attainment_by_tenant})
    if tenants:
        entry["slo_attainment_by_tenant"] = {
            t: [num(m.slo_attainment_by_tenant.get(t, float("nan"))) for m in metrics]
            for t in tenants
        }
    entry["wait_r2"] = [num(r2) for _, r2, _ in runs]
    entry["wall_s"] = [round(wall, 3) for _, _, wall in runs]
    return entry


def fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _count(x: float | None) -> str:
    return "—" if x is None else str(int(x))


def refused_cell(p: Mapping[str, Any], i: int) -> str:
    """Requests refused at admission at rate index ``i``, per class in brackets when any
    (``—`` in a summary written before refusals were counted)."""
    counts = p.get("num_refused")
    if counts is None:
        return "—"
    by_class = {c: v[i] for c, v in p.get("num_refused_by_class", {}).items() if v[i]}
    if not counts[i] or not by_class:
        return _count(counts[i])
    return f"{int(counts[i])} ({', '.join(f'{c} {n}' for c, n in by_class.items())})"


HEADER = ("rate", "policy", "SLO", "refused", "req/s", "tok/s", "TTFT p99", "util", "swaps",
          "evict", "dec p99 ms", "R²")


def _classes(summary: Mapping[str, Any]) -> list[str]:
    return sorted({c for p in summary["policies"].values() for c in p["slo_attainment_by_class"]})


def _tpot_classes(summary: Mapping[str, Any]) -> list[str] | None:
    """The classes with TPOT targets, or None when no request had one (no TPOT columns)."""
    entries = summary["policies"].values()
    if not any(v is not None for p in entries for v in p.get("tpot_attainment") or ()):
        return None
    return sorted({c for p in entries for c, v in p.get("tpot_attainment_by_class", {}).items()
                   if any(x is not None for x in v)})


def _head(classes: Sequence[str], tpot_classes: Sequence[str] | None = None) -> list[str]:
    """The columns: HEADER with one attainment column per class after ``SLO``, then
    with TPOT targets TPOT attainment (overall, per class) and TTFT+TPOT."""
    tpot = [] if tpot_classes is None else ["TPOT", *(f"TPOT {c}" for c in tpot_classes),
                                            "TTFT+TPOT"]
    return [*HEADER[:3], *classes, *tpot, *HEADER[3:]]


def _at(p: Mapping[str, Any], key: str, i: int, cls: str | None = None) -> float | None:
    values = p.get(key) if cls is None else p.get(key, {}).get(cls)
    return None if values is None else values[i]


def _row(rate: float, name: str, p: Mapping[str, Any], i: int, classes: Sequence[str],
         tpot_classes: Sequence[str] | None = None) -> list[str]:
    """One row of the table (policy ``name`` at rate index ``i``)."""
    tpot = [] if tpot_classes is None else [
        fmt(_at(p, "tpot_attainment", i)),
        *(fmt(_at(p, "tpot_attainment_by_class", i, c)) for c in tpot_classes),
        fmt(_at(p, "combined_attainment", i))]
    return [
        f"{rate:g}", name, fmt(p["slo_attainment"][i]),
        *(fmt(p["slo_attainment_by_class"].get(c, [None] * (i + 1))[i]) for c in classes),
        *tpot, refused_cell(p, i), fmt(p["throughput_rps"][i], 1), fmt(p["throughput_tok_s"][i], 0),
        fmt(p["ttft_p99_s"][i], 1), fmt(p["gpu_util"][i], 2),
        _count(p["swaps"][i]), _count(p["evictions"][i]),
        fmt(p["decision_ms_p99"][i], 2), fmt(p["wait_r2"][i], 2),
    ]


def print_table(summary: Mapping[str, Any], title: str | None = None) -> None:
    """The report table: one row per rate and policy, SLO attainment overall and per
    class, requests refused at admission."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or f"{summary['workload']} on {summary['cluster']} "
                                 f"({summary['num_requests']} requests, seed {summary['seed']})")
    classes, tpot_classes = _classes(summary), _tpot_classes(summary)
    for col in _head(classes, tpot_classes):
        table.add_column(col, justify="right")
    for i, rate in enumerate(summary["rates"]):
        for name, p in summary["policies"].items():
            table.add_row(*_row(rate, name, p, i, classes, tpot_classes))
        if i < len(summary["rates"]) - 1:
            table.add_section()
    Console(width=200).print(table)


def markdown_table(summary: Mapping[str, Any]) -> str:
    """The same table as Markdown (for docs/results)."""
    classes, tpot_classes = _classes(summary), _tpot_classes(summary)
    head = _head(classes, tpot_classes)
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for i, rate in enumerate(summary["rates"]):
        for name, p in summary["policies"].items():
            lines.append("| " + " | ".join(_row(rate, name, p, i, classes, tpot_classes))
                         + " |")
    return "\n".join(lines) + "\n"
