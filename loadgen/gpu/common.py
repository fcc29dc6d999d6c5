"""Shared pieces of the GPU scripts: model shapes (from :mod:`qlm.engine.shapes`), the trace
slice, latency statistics.

Nothing here imports vLLM or touches a GPU, so the simulator side of the fidelity
harness and the unit tests can use it on any machine.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from qlm.core.errors import InvalidInput
from qlm.engine.shapes import MODEL_SHAPES

# Engine settings used for every measurement and replay (the profile describes this config).
ENGINE_SETTINGS: dict[str, Any] = {
    "max_num_seqs": 256,
    "max_num_batched_tokens": 8192,
    "gpu_memory_utilization": 0.90,
    "enable_prefix_caching": True,
    "enforce_eager": False,
    "enable_sleep_mode": True,
}

#: The ``device`` of the replays' workers: every engine of a replay runs on the host's one
#: GPU (:attr:`qlm.core.types.WorkerView.device`).
HOST_DEVICE = "gpu0"


def max_model_len_for(model: str) -> int:
    """The context limit used for ``model``: its positions, capped at 16k tokens."""
    return min(16384, int(MODEL_SHAPES[model]["max_position_embeddings"]))


def write_model_dir(model: str, root: Path) -> Path:
    """Write ``root/<model>/config.json`` of the model's shape and return the directory."""
    if model not in MODEL_SHAPES:
        raise InvalidInput("model", f"unknown shape {model!r}; known: {sorted(MODEL_SHAPES)}")
    path = root / model
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(MODEL_SHAPES[model], indent=1))
    return path


# ------------------------------------------------------------------ trace slice
@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a replay: when it arrives (s after the first) and its token counts."""

    arrival_s: float
    prompt_tokens: int
    output_tokens: int


def _parse_timestamp(text: str) -> float:
    # "2023-11-16 18:15:46.6805900": seven fractional digits, more than strptime's %f takes.
    head, _, frac = text.strip().partition(".")
    whole = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
    return whole + (float("0." + frac) if frac else 0.0)


def load_trace_slice(path: Path, start: int, count: int, speedup: float,
                     max_model_len: int) -> list[TraceRequest]:
    """Rows ``start .. start+count`` of an Azure LLM trace CSV as a replay.

    Arrivals are relative to the slice's first row and divided by ``speedup``.
    Output lengths are at least 1; prompts are clipped so that prompt + output fits
    ``max_model_len`` (the clip count is visible by comparing with the CSV).
    """
    if start < 0 or count <= 0:
        raise InvalidInput("trace slice", f"start must be >= 0 and count > 0, got {start}, {count}")
    if speedup <= 0:
        raise InvalidInput("speedup", f"must be > 0, got {speedup}")
    rows: list[tuple[float, int, int]] = []
    with path.open(newline="") as handle:
        for i, row in enumerate(csv.DictReader(handle)):
            if i < start:
                continue
            if len(rows) == count:
                break
            try:
                rows.append((_parse_timestamp(row["TIMESTAMP"]), int(row["ContextTokens"]),
                             int(row["GeneratedTokens"])))
            except (KeyError, ValueError) as exc:
                raise InvalidInput(f"{path.name} row {i + 2}", f"malformed: {exc}") from None
    if len(rows) < count:
        raise InvalidInput("trace slice", f"{path.name} has only {len(rows)} rows after {start}")
    first_at = rows[0][0]
    out = []
    for at, prompt, gen in rows:
        gen = max(1, min(gen, max_model_len - 1))
        prompt = max(1, min(prompt, max_model_len - gen))
        out.append(TraceRequest(round((at - first_at) / speedup, 6), prompt, gen))
    return out


def write_slice_csv(requests: Sequence[TraceRequest], path: Path) -> None:
    """Write a replay as ``arrival_s,prompt_tokens,output_tokens`` rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arrival_s", "prompt_tokens", "output_tokens"])
        for r in requests:
            writer.writerow([f"{r.arrival_s:.6f}", r.prompt_tokens, r.output_tokens])


def read_slice_csv(path: Path) -> list[TraceRequest]:
    """Read what :func:`write_slice_csv` wrote."""
    with path.open(newline="") as handle:
        return [TraceRequest(float(r["arrival_s"]), int(r["prompt_tokens"]),
                             int(r["output_tokens"])) for r in csv.DictReader(handle)]


# ------------------------------------------------------------------ statistics
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True, slots=True)
class RequestTiming:
    """What one replayed request saw, in seconds on the replay's clock."""

    arrival_s: float
    first_token_s: float
    finish_s: float
    output_tokens: int

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for one-token outputs."""
        if self.output_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)


def latency_summary(timings: Sequence[RequestTiming]) -> dict[str, float]:
    """TTFT / TPOT p50 and p99, output tokens per second and request counts."""
    if not timings:
        raise InvalidInput("timings", "no requests to summarise")
    ttfts = [t.ttft_s for t in timings]
    tpots = [x for x in (t.tpot_s for t in timings) if x is not None]
    span = max(t.finish_s for t in timings) - min(t.arrival_s for t in timings)
    total_out = sum(t.output_tokens for t in timings)
    return {
        "num_requests": len(timings),
        "output_tokens": total_out,
        "span_s": round(span, 4),
        "ttft_p50_s": round(percentile(ttfts, 50), 5),
        "ttft_p99_s": round(percentile(ttfts, 99), 5),
        "ttft_mean_s": round(sum(ttfts) / len(ttfts), 5),
        "tpot_p50_s": round(percentile(tpots, 50), 6),
        "tpot_p99_s": round(percentile(tpots, 99), 6),
        "tpot_mean_s": round(sum(tpots) / len(tpots), 6) if tpots else math.nan,
        "output_tok_per_s": round(total_out / span, 2) if span > 0 else math.nan,
    }


# ------------------------------------------------------------------ host facts
def device_facts() -> dict[str, str]:
    """GPU name, memory and driver as nvidia-smi reports them (no CUDA context is made)."""
    try:
        line = subprocess.check_output(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
             "--format=csv,noheader"], text=True, timeout=20).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        return {"nvidia_smi": f"unavailable: {exc!r}"}
    name, memory, driver = (part.strip() for part in line.split(","))
    return {"name": name, "memory_total": memory, "driver": driver}


def gpu_used_gib() -> float | None:
    """GPU memory in use, GiB, from nvidia-smi; None where it cannot be read."""
    try:
        out = subprocess.check_output(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            text=True, timeout=20)
        return round(float(out.strip().splitlines()[0]) / 1024, 2)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def gpu_label(device_name: str) -> str:
    """The profile's ``gpu`` field for an nvidia-smi device name."""
    upper = device_name.upper()
    if "H200" in upper:
        return "H200-141GB"
    if "H100" in upper:
        return "H100-80GB"
    return device_name.replace(" ", "-")


def compact_json(data: Any) -> str:
    """JSON with every array or object that holds no array or object on one line (so
    per-request rows stay one line each)."""
    text = json.dumps(data, indent=1, default=str)
    return _FLAT.sub(lambda m: _LINE_BREAK.sub("", m.group(0)), text)


_FLAT = re.compile(r'[\[{][^\[\]{}"]*(?:"(?:[^"\\]|\\.)*"[^\[\]{}"]*)*[\]}]')
_LINE_BREAK = re.compile(r"\s*\n\s*")


def read_json(path: Path) -> Any:
    """A result file, gzipped (``.gz``: how results are kept, so the repository and the
    vLLM archive fit one device call) or not."""
    if path.suffix == ".gz":
        with gzip.open(path, "rt") as f:
            return json.load(f)
    return json.loads(path.read_text())


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(compact_json(data) + "\n")
    os.replace(tmp, path)


def main() -> None:
    """Write a trace slice as the CSV the GPU scripts replay."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--trace", type=Path,
                        default=Path("loadgen/traces/azure_llm_2023_conv.csv"))
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    requests = load_trace_slice(args.trace, args.start, args.count, 1.0, args.max_model_len)
    write_slice_csv(requests, args.out)
    print(f"{args.out}: {len(requests)} requests over {requests[-1].arrival_s:.1f} s")


if __name__ == "__main__":
    main()


class StepLog:
    """A GPU script's result, written whole after every step and check (a call cut short
    by its time limit still leaves what it measured). Subclasses set :attr:`result` (with
    ``steps`` and ``checks``) and :attr:`out`, and name the file in :meth:`result_file`."""

    result: dict[str, Any]
    out: Path

    def result_file(self) -> Path:
        raise NotImplementedError

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.result_file(), self.result)

    def step(self, name: str, seconds: float, **facts: Any) -> None:
        row = {"step": name, "s": round(seconds, 4), **facts}
        self.result["steps"].append(row)
        print("STEP", row, flush=True)
        self.save()

    def check(self, name: str, ok: bool, **facts: Any) -> None:
        self.result["checks"][name] = {"ok": bool(ok), **facts}
        print("CHECK", name, "ok" if ok else "FAILED", facts, flush=True)
        self.save()


async def stream_to_end(engine: Any, request: Any) -> tuple[list[Any], float | None, float]:
    """Stream ``request`` through ``engine`` (a :class:`qlm.engine.base.Engine`) to its
    end: its output chunks, seconds to the first token (None without one) and in all."""
    started = time.perf_counter()
    first: float | None = None
    chunks: list[Any] = []
    async for chunk in engine.add(request):
        if first is None and chunk.token_ids:
            first = time.perf_counter() - started
        chunks.append(chunk)
    return chunks, first, time.perf_counter() - started
