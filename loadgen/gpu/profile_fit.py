"""Turn raw vLLM measurements (``profile_vllm.py``'s JSON) into a qlm performance profile.

The decode model is ``step_s = base_s + per_seq_s·batch + per_ctx_token_s·context_tokens``,
fitted by non-negative least squares over every measured (batch, context) point; the
residuals of the fit go into the profile's notes.

Usage (from the repository root)::

    python3 -m loadgen.gpu.profile_fit docs/results/gpu/profile_raw_mistral-7b.json \
        --out qlm/profiles
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import lsq_linear

from qlm.core.errors import InvalidInput
from qlm.core.perf import PerfProfile, save_profile

from .common import gpu_label


def fit_decode(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Fit the linear decode model to points with ``batch``, ``context_tokens``, ``step_s``.

    Returns the coefficients and, per point, the fitted value and relative residual.
    """
    if len(points) < 3:
        raise InvalidInput("decode points", f"need >= 3 to fit 3 coefficients, got {len(points)}")
    design = np.array([[1.0, float(p["batch"]), float(p["context_tokens"])] for p in points])
    measured = np.array([float(p["step_s"]) for p in points])
    # Relative least squares: weight each point by 1/measured so small batches count as much
    # as large ones (a 1 ms miss at batch 1 matters as much as 3 ms at batch 256).
    weights = 1.0 / measured
    result = lsq_linear(design * weights[:, None], measured * weights, bounds=(0.0, np.inf))
    base, per_seq, per_ctx = (float(x) for x in result.x)
    base = max(base, 1e-6)
    fitted = design @ np.array([base, per_seq, per_ctx])
    rel = (fitted - measured) / measured
    rows = [
        {"batch": int(p["batch"]), "context_tokens": int(p["context_tokens"]),
         "measured_s": round(float(m), 6), "fitted_s": round(float(f), 6),
         "rel_residual": round(float(r), 4)}
        for p, m, f, r in zip(points, measured, fitted, rel, strict=True)
    ]
    return {
        "base_s": base, "per_seq_s": per_seq, "per_ctx_token_s": per_ctx,
        "rms_rel_residual": round(float(math.sqrt(float(np.mean(rel ** 2)))), 4),
        "max_abs_rel_residual": round(float(np.max(np.abs(rel))), 4),
        "points": rows,
    }


def profile_from_raw(raw: Mapping[str, Any]) -> tuple[PerfProfile, dict[str, Any]]:
    """Build the profile (and the decode fit) from one raw measurement file."""
    prefill = sorted((int(p["prompt_tokens"]), float(p["median_s"])) for p in raw["prefill"])
    decode_points = [p for p in raw["decode"] if p.get("step_s")]
    fit = fit_decode(decode_points)
    kv = raw["kv"]
    sleep = raw.get("sleep", {})
    steady = sleep.get("level1_second") or sleep.get("level1_first") or {}
    restart = raw.get("restart", {})
    cold_load_s = restart.get("start_s") or raw["engine_start_s"]
    device_name = raw["device"].get("name", "unknown")
    notes = {
        "device": device_name,
        "vllm": raw.get("vllm_version"),
        "engine": raw.get("engine_settings"),
        "decode_fit": {k: fit[k] for k in ("rms_rel_residual", "max_abs_rel_residual")},
        "decode_points": fit["points"],
        "prefill": "single request, max_tokens=1: time from submit to the first token",
        "first_engine_start_s": raw["engine_start_s"],
        "import_vllm_s": raw.get("import_s"),
        "cold_load": ("engine start with warm compile caches (same config restarted)"
                      if restart.get("start_s") else "first engine start on a fresh host"),
        "sleep_level1_first_s": (sleep.get("level1_first") or {}).get("sleep_s"),
        "sleep_level2": sleep.get("level2"),
        "kv": kv,
    }
    profile = PerfProfile(
        model=raw["model"],
        gpu=gpu_label(device_name),
        num_gpus=1,
        prefill_tokens=tuple(t for t, _ in prefill),
        prefill_seconds=tuple(round(s, 6) for _, s in prefill),
        decode_base_s=round(fit["base_s"], 7),
        decode_per_seq_s=round(fit["per_seq_s"], 9),
        decode_per_ctx_token_s=round(fit["per_ctx_token_s"], 12),
        kv_capacity_tokens=int(kv["kv_capacity_tokens"]),
        max_batch_size=int(raw["engine_settings"]["max_num_seqs"]),
        sleep_s=round(float(steady.get("sleep_s", 0.0)), 4),
        wake_s=round(float(steady.get("wake_s", 0.0)), 4),
        cold_load_s=round(float(cold_load_s), 3),
        max_model_len=int(raw["max_model_len"]),
        source=f"measured: vLLM {raw.get('vllm_version')} on {device_name}",
        notes=notes,
    )
    return profile, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", type=Path, nargs="+", help="raw measurement JSON files")
    parser.add_argument("--out", type=Path, default=Path("qlm/profiles"))
    args = parser.parse_args()
    for path in args.raw:
        profile, fit = profile_from_raw(json.loads(path.read_text()))
        written = save_profile(profile, args.out)
        print(f"{written}: decode base {fit['base_s'] * 1e3:.3f} ms + "
              f"{fit['per_seq_s'] * 1e6:.2f} us/seq + "
              f"{fit['per_ctx_token_s'] * 1e9:.3f} ns/ctx-token; "
              f"rms rel residual {fit['rms_rel_residual']}, max {fit['max_abs_rel_residual']}")


if __name__ == "__main__":
    main()
