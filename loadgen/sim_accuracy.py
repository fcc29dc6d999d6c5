"""Estimator accuracy from a simulator run: predicted vs realised wait to first token.

    python -m loadgen.sim_accuracy DIR/records.csv.gz [--policy fcfs]

For every (policy, rate) of the records written by ``python -m loadgen.sim``, the
R² of the wait predicted at the first decision after a request arrived
(``predicted_first_token_at - predicted_at``) against the realised wait
(``first_token_at - predicted_at``), with n and the mean absolute error.
"""

from __future__ import annotations

import argparse
import csv
import gzip
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def accuracy(path: Path, policy: str | None = None) -> list[tuple[str, float, int, float, float]]:
    pairs: dict[tuple[str, float], list[tuple[float, float]]] = defaultdict(list)
    with gzip.open(path, "rt", newline="") as f:
        for row in csv.DictReader(f):
            if policy and row["policy"] != policy:
                continue
            needed = ("predicted_at", "predicted_first_token_at", "first_token_at")
            if not all(row[k] for k in needed):
                continue
            at = float(row["predicted_at"])
            pairs[(row["policy"], float(row["rate"]))].append(
                (float(row["predicted_first_token_at"]) - at, float(row["first_token_at"]) - at)
            )
    out = []
    for (name, rate), values in sorted(pairs.items()):
        pred = np.array([p for p, _ in values])
        real = np.array([r for _, r in values])
        ss_tot = float(np.sum((real - real.mean()) ** 2))
        r2 = 1 - float(np.sum((real - pred) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
        out.append((name, rate, len(values), r2, float(np.mean(np.abs(real - pred)))))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadgen.sim_accuracy")
    p.add_argument("records", type=Path)
    p.add_argument("--policy")
    args = p.parse_args(argv)
    print(f"{'policy':<10} {'rate':>8} {'n':>6} {'R2':>7} {'MAE s':>8}")
    for name, rate, n, r2, mae in accuracy(args.records, args.policy):
        print(f"{name:<10} {rate:>8g} {n:>6} {r2:>7.3f} {mae:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
