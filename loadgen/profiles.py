"""Write the roofline performance profiles and print their calibration and summary tables.

Usage (from the repository root)::

    python -m loadgen.profiles                 # writes qlm/profiles/<model>@<gpu>.json
    python -m loadgen.profiles --out DIR --tables-only

Profiles whose ``source`` does not start with ``roofline`` (i.e. measured ones) are kept
unless ``--overwrite-measured`` is given. The tables printed are the ones in
docs/profiles.md.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from qlm.core import roofline
from qlm.core.perf import PROFILE_DIR, PerfProfile, profile_filename, save_profile


def calibration_table() -> list[str]:
    lines = ["| GPU | what | batch | measured | model | error |", "|---|---|---|---|---|---|"]
    for gpu, measured in ((roofline.GPUS["H100-80GB"], roofline.H100_MEASURED),
                          (roofline.H200, roofline.H200_MEASURED)):
        for row in roofline.calibration_rows(gpu, measured):
            lines.append(f"| {gpu.name} | {row.what} | {row.batch} "
                         f"| {row.measured_s * 1000:.2f} ms | {row.modelled_s * 1000:.2f} ms "
                         f"| {row.error * 100:+.1f} % |")
    for row in roofline.swap_calibration_rows():
        lines.append(f"| H100-80GB | {row.what} | – | {row.measured_s:.3f} s "
                     f"| {row.modelled_s:.3f} s | {row.error * 100:+.1f} % |")
    return lines


def _tok_s_cell(profile: PerfProfile, batch: int, mean_ctx: float) -> str:
    """Decode tok/s at ``batch`` sequences of ``mean_ctx`` tokens, capped by KV capacity."""
    fits = max(1, min(batch, int(profile.kv_capacity_tokens // mean_ctx)))
    text = f"{profile.decode_tokens_per_s(fits, mean_ctx):,.0f}"
    return text if fits == batch else f"{text} (B={fits})"


def profile_table(profiles: Sequence[PerfProfile], mean_ctx: float = 1024.0) -> list[str]:
    lines = [
        "| model | GPU | TP | KV tokens | decode tok/s B=1 | B=32 | B=128 | prefill 512 | "
        "prefill 4096 | sleep / wake / cold s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in profiles:
        cells = [_tok_s_cell(p, batch, mean_ctx) for batch in (1, 32, 128)]
        lines.append(
            f"| {p.model} | {p.gpu} | {p.num_gpus} | {p.kv_capacity_tokens:,} | "
            + " | ".join(cells)
            + f" | {p.prefill_s(512) * 1000:.0f} ms | {p.prefill_s(4096) * 1000:.0f} ms "
            f"| {p.sleep_s:.2f} / {p.wake_s:.2f} / {p.cold_load_s:.0f} |"
        )
    return lines


def _is_measured(path: Path) -> bool:
    try:
        source = str(json.loads(path.read_text()).get("source", ""))
    except (OSError, ValueError):
        return False
    return not source.startswith("roofline")


def write_profiles(out: Path, overwrite_measured: bool) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for profile in roofline.shipped_profiles():
        path = out / profile_filename(profile.model, profile.gpu)
        if path.exists() and _is_measured(path) and not overwrite_measured:
            print(f"kept measured {path}")
            continue
        written.append(save_profile(profile, out))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PROFILE_DIR,
                        help="directory (default qlm/profiles)")
    parser.add_argument("--overwrite-measured", action="store_true",
                        help="also replace profiles whose source is not the roofline model")
    parser.add_argument("--tables-only", action="store_true",
                        help="print the tables, write nothing")
    args = parser.parse_args(argv)
    if not args.tables_only:
        for path in write_profiles(args.out, args.overwrite_measured):
            print(f"wrote {path}")
    print("\nCalibration (Llama-3-8B shape, 512 in / 128 out, vLLM 0.25.0):")
    print("\n".join(calibration_table()))
    print("\nProfiles (decode at 1,024 KV tokens per sequence):")
    print("\n".join(profile_table(roofline.shipped_profiles())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
