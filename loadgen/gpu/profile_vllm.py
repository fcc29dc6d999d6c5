"""Measure a model's performance profile on real vLLM (one GPU) and optionally replay a trace.

For each model shape (random weights of the real shape, ``load_format="dummy"``, token-id
prompts, ``ignore_eos``) on one AsyncLLM engine:

* engine start time (the first start on a fresh host pays compilation);
* KV capacity: the engine's ``num_gpu_blocks × block_size``;
* prefill: one request of ``n`` prompt tokens, ``max_tokens=1``, submit → first token;
* decode: ``batch`` requests of ``prompt`` tokens started together; the step time is read
  from the streamed token times while all of them are decoding (after the last first token,
  before the first finish), with the KV tokens held at that time as the context;
* optional: replays of a trace slice (``replay_vllm.replay``) on the same engine;
* sleep(level=1) / wake_up twice (the first sleep allocates pinned CPU buffers), level 2 once;
* restart: shut down and start the same config again (compile caches warm).

Raw results go to ``$OUT/profile_raw_<model>.json`` after every phase (a timeout still leaves
data), the qlm profile to ``$OUT/<model>@<gpu>.json``. Run on the GPU host from the repo root::

    python3 -m loadgen.gpu.profile_vllm --models mistral-7b --budget 540 \
        --replay-slice .stage/azure_conv_0_400.csv --replay-speedups 2,4 --out $OUT
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import numpy as np

from .common import (
    ENGINE_SETTINGS,
    MODEL_SHAPES,
    device_facts,
    gpu_used_gib,
    max_model_len_for,
    read_slice_csv,
    write_json,
    write_model_dir,
)
from .replay_vllm import replay, replay_result, scaled

#: The top-level keys this program writes into its JSON (checked against the committed
#: results by tests/unit/test_results_keys.py).
RESULT_KEYS: Final = frozenset({
    "command", "decode", "device", "engine_settings", "engine_start_s", "env", "errors",
    "import_s", "kv", "max_model_len", "model", "model_config", "phase_s", "prefill", "python",
    "replay_summaries", "replays", "restart", "skipped", "sleep", "stop", "torch_version",
    "vllm_version",
})

PREFILL_TOKENS = (16, 128, 256, 512, 1024, 2048, 4096, 8192)
DECODE_PROMPTS = (512, 2048, 128)
DECODE_BATCHES = (1, 4, 8, 16, 32, 64, 128, 256)
WINDOW_STEPS = 48  # decode steps wanted while the whole batch decodes


class Clock:
    """The script's time budget."""

    def __init__(self, budget_s: float) -> None:
        self.started_at = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started_at

    def left(self) -> float:
        return self.budget_s - self.elapsed()


CLOCK = Clock(540.0)


def log(*parts: object) -> None:
    print(f"[profile {CLOCK.elapsed():7.1f}s]", *parts, flush=True)


async def stream(engine: Any, request_id: str, prompt_ids: list[int], max_tokens: int,
                 samples: list[tuple[float, int]] | None = None) -> dict[str, float]:
    """Run one request; return submit / first-token / finish times (perf_counter s)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.DELTA)
    submit_at = time.perf_counter()
    first_at = math.nan
    num_out = 0
    async for out in engine.generate({"prompt_token_ids": prompt_ids}, params,
                                     request_id=request_id):
        now = time.perf_counter()
        num_out += len(out.outputs[0].token_ids)
        if math.isnan(first_at) and num_out > 0:
            first_at = now
        if samples is not None:
            samples.append((now, num_out))
    return {"submit": submit_at, "first": first_at, "finish": time.perf_counter(),
            "n": float(num_out)}


class Profiler:
    """Measures one model on one engine and keeps the raw results."""

    def __init__(self, model: str, engine: Any, raw: dict[str, Any], out_dir: Path) -> None:
        self.model = model
        self.engine = engine
        self.raw = raw
        self.out_dir = out_dir
        self.vocab = int(MODEL_SHAPES[model]["vocab_size"])
        self.rng = np.random.default_rng(0)
        self.seq = 0

    def save(self) -> None:
        write_json(self.out_dir / f"profile_raw_{self.model}.json", self.raw)

    def prompt(self, n: int) -> list[int]:
        ids: list[int] = self.rng.integers(100, self.vocab - 100, size=n).tolist()
        return ids

    def rid(self, kind: str) -> str:
        self.seq += 1
        return f"{kind}-{self.seq}"

    async def phase(self, name: str, need_s: float, body: Callable[[], Awaitable[None]]) -> None:
        """Run ``body`` if ``need_s`` seconds are left; record errors; save either way."""
        if CLOCK.left() < need_s:
            self.raw["skipped"].append(f"{name}: {CLOCK.left():.0f}s left, needs ~{need_s:.0f}s")
            log("SKIP", name)
            self.save()
            return
        log("=== phase", name, "gpu_used_GiB", gpu_used_gib())
        started = time.perf_counter()
        try:
            await body()
        except Exception as exc:
            self.raw["errors"][name] = "".join(traceback.format_exception(exc))[-3000:]
            log("FAILED", name, repr(exc))
        self.raw["phase_s"][name] = round(time.perf_counter() - started, 2)
        self.save()

    # ---------------------------------------------------------------- phases
    async def kv(self) -> None:
        cache = self.engine.vllm_config.cache_config
        blocks, block_size = cache.num_gpu_blocks, cache.block_size
        self.raw["kv"] = {"num_gpu_blocks": blocks, "block_size": block_size,
                          "kv_capacity_tokens": int(blocks) * int(block_size),
                          "gpu_used_GiB": gpu_used_gib()}
        log("kv", self.raw["kv"])

    async def warm_up(self) -> None:
        await asyncio.gather(*(stream(self.engine, self.rid("warm"), self.prompt(256), 32)
                               for _ in range(8)))

    async def prefill(self) -> None:
        rows = self.raw["prefill"] = []
        limit = int(self.raw["max_model_len"]) - 1
        for n in (t for t in PREFILL_TOKENS if t <= limit):
            await stream(self.engine, self.rid("pw"), self.prompt(n), 1)
            runs = []
            for _ in range(3):
                r = await stream(self.engine, self.rid("p"), self.prompt(n), 1)
                runs.append(r["first"] - r["submit"])
            rows.append({"prompt_tokens": n, "runs_s": [round(x, 5) for x in runs],
                         "median_s": round(statistics.median(runs), 6)})
            log("prefill", rows[-1])
            self.save()

    async def decode_point(self, batch: int, prompt_len: int) -> dict[str, Any] | None:
        budget = int(ENGINE_SETTINGS["max_num_batched_tokens"])
        max_tokens = math.ceil(batch * prompt_len / budget) + WINDOW_STEPS + 8
        kv_tokens = int(self.raw.get("kv", {}).get("kv_capacity_tokens") or 10**9)
        if batch * (prompt_len + max_tokens + 16) > 0.9 * kv_tokens:
            return None
        prompts = [self.prompt(prompt_len) for _ in range(batch)]
        samples: list[list[tuple[float, int]]] = [[] for _ in range(batch)]
        started = time.perf_counter()
        results = await asyncio.gather(*(
            stream(self.engine, self.rid(f"d{batch}x{prompt_len}"), prompts[i], max_tokens,
                   samples[i]) for i in range(batch)))
        full_from = max(r["first"] for r in results)  # every request is decoding from here
        full_until = min(s[-1][0] for s in samples)   # until the first one finishes
        rates, gen_mid, steps = [], [], []
        for s in samples:
            inside = [(t, n) for t, n in s if full_from <= t <= full_until]
            if len(inside) < 2 or inside[-1][1] - inside[0][1] < 8:
                continue
            (t0, n0), (t1, n1) = inside[0], inside[-1]
            rates.append((t1 - t0) / (n1 - n0))
            gen_mid.append((n0 + n1) / 2)
            steps.append(n1 - n0)
        row: dict[str, Any] = {
            "batch": batch, "prompt_tokens": prompt_len, "max_tokens": max_tokens,
            "all_first_tokens_s": round(full_from - started, 4),
            "total_s": round(max(r["finish"] for r in results) - started, 4),
            "requests_in_window": len(rates)}
        if len(rates) >= max(1, batch // 2):
            mean_gen = statistics.fmean(gen_mid)
            row.update(step_s=round(statistics.median(rates), 7),
                       step_s_p10=round(float(np.percentile(rates, 10)), 7),
                       step_s_p90=round(float(np.percentile(rates, 90)), 7),
                       window_steps=int(statistics.median(steps)),
                       context_tokens=int(batch * (prompt_len + mean_gen)))
        return row

    async def decode(self, reserve_s: float) -> None:
        """The (batch, prompt) grid, while more than ``reserve_s`` seconds are left."""
        rows = self.raw["decode"] = []
        for prompt_len in DECODE_PROMPTS:
            for batch in DECODE_BATCHES:
                if CLOCK.left() < reserve_s:
                    self.raw["skipped"].append(f"decode {batch}x{prompt_len}: out of time")
                    continue
                row = await self.decode_point(batch, prompt_len)
                if row is None:
                    continue
                rows.append(row)
                log("decode", row)
                self.save()

    async def replays(self, slice_path: Path, speedups: list[float]) -> None:
        requests = read_slice_csv(slice_path)
        results: list[dict[str, Any]] = []
        summaries = self.raw["replay_summaries"] = []
        for speedup in speedups:
            span = requests[-1].arrival_s / speedup
            if CLOCK.left() < span + 90:
                self.raw["skipped"].append(f"replay x{speedup}: {CLOCK.left():.0f}s left")
                continue
            records = await replay(self.engine, scaled(requests, speedup), self.vocab,
                                   seed=int(speedup * 1000), tag=f"x{speedup}-")
            results.append(replay_result(records, speedup, slice_path.name))
            summaries.append({"speedup": speedup, **results[-1]["summary"]})
            log("replay", speedup, results[-1]["summary"])
            write_json(self.out_dir / f"replay_{self.model}.json", {
                **{k: self.raw[k] for k in ("model", "device", "vllm_version", "command",
                                            "engine_settings", "max_model_len")},
                "replays": results})

    async def sleep_wake(self) -> None:
        out = self.raw["sleep"] = {}
        for key, level in (("level1_first", 1), ("level1_second", 1), ("level2", 2)):
            started = time.perf_counter()
            await self.engine.sleep(level=level)
            slept = time.perf_counter() - started
            asleep_gib = gpu_used_gib()
            started = time.perf_counter()
            await self.engine.wake_up()
            woke = time.perf_counter() - started
            check = await stream(self.engine, self.rid("wake"), self.prompt(256), 16)
            out[key] = {"sleep_s": round(slept, 4), "wake_s": round(woke, 4),
                        "gpu_used_GiB_asleep": asleep_gib, "gpu_used_GiB_awake": gpu_used_gib(),
                        "generate_after_wake_ok": check["n"] == 16}
            log("sleep", key, out[key])
            self.save()


def engine_args(model: str) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    model_dir = write_model_dir(model, Path("/tmp/qlm-models"))
    return AsyncEngineArgs(model=str(model_dir), load_format="dummy", skip_tokenizer_init=True,
                           seed=0, max_model_len=max_model_len_for(model), **ENGINE_SETTINGS)


def start_engine(model: str) -> tuple[Any, float]:
    from vllm.v1.engine.async_llm import AsyncLLM

    started = time.perf_counter()
    engine = AsyncLLM.from_engine_args(engine_args(model))
    return engine, time.perf_counter() - started


async def stop_engine(engine: Any) -> dict[str, Any]:
    started = time.perf_counter()
    engine.shutdown()
    stopped = time.perf_counter() - started
    waited = time.perf_counter()
    used = gpu_used_gib()
    while used is not None and used > 3 and time.perf_counter() - waited < 30:
        await asyncio.sleep(0.2)
        used = gpu_used_gib()
    return {"shutdown_s": round(stopped, 3), "gpu_used_GiB_after": used,
            "release_wait_s": round(time.perf_counter() - waited, 3)}


async def profile_model(model: str, args: argparse.Namespace, env: dict[str, Any],
                        with_replay: bool) -> None:
    out_dir = Path(args.out)
    raw: dict[str, Any] = {
        "model": model, **env, "engine_settings": ENGINE_SETTINGS,
        "max_model_len": max_model_len_for(model), "model_config": MODEL_SHAPES[model],
        "errors": {}, "skipped": [], "phase_s": {}}
    log("start engine", model)
    engine, start_s = start_engine(model)
    raw["engine_start_s"] = round(start_s, 2)
    log("engine started", model, start_s)
    prof = Profiler(model, engine, raw, out_dir)
    await prof.phase("kv", 0, prof.kv)
    await prof.phase("warm_up", 20, prof.warm_up)
    await prof.phase("prefill", 25, prof.prefill)
    speedups = [float(s) for s in args.replay_speedups.split(",")] if with_replay else []
    if with_replay and args.replay_slice:
        last_arrival = read_slice_csv(Path(args.replay_slice))[-1].arrival_s
        replay_s = sum(last_arrival / x + 15 for x in speedups)
    else:
        replay_s = 0.0
    await prof.phase("decode", 60, lambda: prof.decode(reserve_s=replay_s + 60))
    if speedups and args.replay_slice:
        await prof.phase("replay", 60, lambda: prof.replays(Path(args.replay_slice), speedups))
    await prof.phase("sleep", 30, prof.sleep_wake)
    raw["stop"] = await stop_engine(engine)
    prof.save()
    if args.restart and CLOCK.left() > 60:
        engine, restart_s = start_engine(model)
        raw["restart"] = {"start_s": round(restart_s, 2), "gpu_used_GiB": gpu_used_gib()}
        log("restart", raw["restart"])
        raw["restart"]["stop"] = await stop_engine(engine)
    prof.save()
    try:
        from loadgen.gpu.profile_fit import profile_from_raw
        from qlm.core.perf import save_profile

        profile, fit = profile_from_raw(raw)
        log("profile written", save_profile(profile, out_dir), "fit rms",
            fit["rms_rel_residual"], "max", fit["max_abs_rel_residual"])
    except Exception as exc:
        raw["errors"]["fit"] = repr(exc)
        prof.save()


async def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    import torch
    import vllm

    env = {"device": device_facts(), "vllm_version": vllm.__version__,
           "torch_version": torch.__version__, "python": sys.version.split()[0],
           "import_s": round(time.perf_counter() - started, 2),
           "command": " ".join([os.path.basename(sys.executable), "-m",
                                "loadgen.gpu.profile_vllm", *sys.argv[1:]]),
           "env": {k: os.environ.get(k) for k in ("VLLM_USE_FLASHINFER_SAMPLER",
                                                  "VLLM_NO_USAGE_STATS", "HF_HUB_OFFLINE")}}
    log("env", env)
    for i, model in enumerate(args.models.split(",")):
        if i > 0 and CLOCK.left() < args.min_model_s:
            log("SKIP model", model, "left", CLOCK.left())
            continue
        await profile_model(model, args, env, with_replay=(i == 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mistral-7b", help=f"of {sorted(MODEL_SHAPES)}")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for everything")
    parser.add_argument("--min-model-s", type=float, default=170.0,
                        help="seconds a further model needs to be started at all")
    parser.add_argument("--replay-slice", default="", help="slice CSV replayed on the first model")
    parser.add_argument("--replay-speedups", default="2,4")
    parser.add_argument("--no-restart", dest="restart", action="store_false")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    args = parser.parse_args()
    for model in args.models.split(","):
        if model not in MODEL_SHAPES:
            parser.error(f"unknown model {model!r}; known: {sorted(MODEL_SHAPES)}")
    CLOCK.budget_s = args.budget
    Path(args.out).mkdir(parents=True, exist_ok=True)
    asyncio.run(run(args))
    sys.stdout.flush()
    os._exit(0)  # engine-core processes and threads must not hold the exit


if __name__ == "__main__":
    main()
