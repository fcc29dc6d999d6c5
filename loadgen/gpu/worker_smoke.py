"""GPU smoke test of the worker's vLLM engine (qlm.engine.vllm_engine), no Redis or Kafka.

Runs on the GPU host (vLLM unpacked as ../shared/gpu/README.md says)::

    python3 -m loadgen.gpu.worker_smoke --models mistral-7b,qwen2.5-1.5b --out $OUT

Steps, each timed and written to ``<out>/worker_smoke.json`` (device, vLLM version,
exact command): start both models on one GPU (the second asleep); stream a batch of
requests on model 1 and check every output has exactly ``max_tokens`` tokens; abort
one request halfway and check the kept progress, then resume it (re-prefill of prompt
+ kept tokens; prefix caching on) and check it ends with exactly ``max_tokens`` tokens
in total, timing its re-admission TTFT against a fresh request's; swap to model 2
(sleep + wake, timed), serve there; swap back (timed); engine stats. Exit status 0
only if every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from loadgen.gpu.common import MODEL_SHAPES, StepLog, device_facts, stream_to_end
from qlm.core.perf import PROFILE_DIR, ProfileBook
from qlm.engine.base import EngineRequest
from qlm.engine.vllm_engine import VllmEngine, VllmOptions


def prompt_ids(rng: np.random.Generator, model: str, n: int) -> tuple[int, ...]:
    vocab = int(MODEL_SHAPES[model]["vocab_size"])
    return tuple(int(x) for x in rng.integers(100, vocab - 100, size=n))


async def run_one(engine: VllmEngine, request: EngineRequest) -> dict[str, Any]:
    """Stream ``request`` to its end: token count, TTFT and total seconds."""
    chunks, first, total = await stream_to_end(engine, request)
    return {
        "request_id": request.request_id,
        "num_new_tokens": sum(len(c.token_ids) for c in chunks),
        "num_generated": chunks[-1].num_generated if chunks else request.num_generated,
        "finish_reason": chunks[-1].finish_reason if chunks else None,
        "ttft_s": round(first, 5) if first is not None else None,
        "total_s": round(total, 5),
    }


class Smoke(StepLog):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.models: list[str] = args.models.split(",")
        self.out = Path(args.out)
        self.rng = np.random.default_rng(0)
        self.result: dict[str, Any] = {
            "device": device_facts(),
            "command": " ".join(["python3 -m loadgen.gpu.worker_smoke", *sys.argv[1:]]),
            "models": self.models,
            "steps": [],
            "checks": {},
            "error": None,
        }

    def result_file(self) -> Path:
        return self.out / "worker_smoke.json"

    def request(self, rid: str, model: str, prompt: int, max_tokens: int) -> EngineRequest:
        ids = prompt_ids(self.rng, model, prompt)
        return EngineRequest(rid, model, prompt_tokens=prompt, max_tokens=max_tokens,
                             prompt_token_ids=ids, ignore_eos=True)

    async def run(self) -> None:
        import vllm

        self.result["vllm_version"] = vllm.__version__
        a = self.args
        book = ProfileBook.load(PROFILE_DIR)
        profiles = {m: book.get(m, a.gpu) for m in self.models if book.has(m, a.gpu)}
        options = VllmOptions(
            gpu_memory_utilization=a.gpu_memory_utilization, max_model_len=a.max_model_len,
            enforce_eager=a.enforce_eager, load_format="dummy",
        )
        engine = VllmEngine(a.gpu, self.models, options, profiles)
        started = time.perf_counter()
        await engine.start()
        self.step("start (all models, the first awake)", time.perf_counter() - started,
                  kv_capacity_tokens=engine.kv_capacity_tokens())
        first, second = self.models[0], self.models[-1]

        # A batch on model 1: every output has exactly max_tokens tokens.
        warm = [self.request(f"warm{i}", first, 256, 16) for i in range(4)]
        await asyncio.gather(*(run_one(engine, r) for r in warm))
        batch = [self.request(f"a{i}", first, a.prompt_tokens, a.max_tokens)
                 for i in range(a.batch)]
        started = time.perf_counter()
        outs = await asyncio.gather(*(run_one(engine, r) for r in batch))
        elapsed = time.perf_counter() - started
        self.step("batch on model 1", elapsed, batch=a.batch,
                  output_tok_s=round(sum(o["num_new_tokens"] for o in outs) / elapsed, 1),
                  ttft_p50_s=sorted(o["ttft_s"] or 0 for o in outs)[len(outs) // 2])
        self.check("batch lengths", all(o["num_generated"] == a.max_tokens for o in outs),
                   lengths=sorted({o["num_generated"] for o in outs}))

        # Abort halfway, keep progress, resume.
        long = self.request("evictee", first, a.prompt_tokens, a.max_tokens)
        stream = engine.add(long)
        seen = 0
        async for chunk in stream:
            seen = chunk.num_generated
            if seen >= a.max_tokens // 2:
                break
        started = time.perf_counter()
        progress = await engine.abort("evictee")
        self.step("abort", time.perf_counter() - started, num_generated=progress.num_generated)
        rest = [c async for c in stream]
        kept_ok = progress.num_generated >= seen
        kept_ok &= len(progress.token_ids) == progress.num_generated
        kept_ok &= not rest or rest[-1].finish_reason == "abort"
        self.check("abort keeps progress", kept_ok, num_generated=progress.num_generated,
                   seen=seen)
        fresh = await run_one(engine, self.request("fresh", first, a.prompt_tokens, 8))
        resumed = await run_one(engine, long.resumed(progress))
        self.step("resume after abort", resumed["total_s"], readmit_ttft_s=resumed["ttft_s"],
                  fresh_ttft_s=fresh["ttft_s"], kept=progress.num_generated)
        self.check("resume completes the output",
                   resumed["num_generated"] == a.max_tokens
                   and resumed["num_new_tokens"] == a.max_tokens - progress.num_generated,
                   resumed=resumed)

        # Model swap by sleep/wake, there and back.
        if second != first:
            started = time.perf_counter()
            await engine.swap(second)
            self.step(f"swap {first} -> {second}", time.perf_counter() - started)
            out = await run_one(engine, self.request("b0", second, 256, 32))
            self.check("serves after swap", out["num_generated"] == 32, out=out)
            started = time.perf_counter()
            await engine.swap(first)
            self.step(f"swap {second} -> {first}", time.perf_counter() - started)
            out = await run_one(engine, self.request("a-back", first, 256, 32))
            self.check("serves after swap back", out["num_generated"] == 32, out=out)
        stats = engine.stats()
        self.step("stats", 0.0, num_steps=stats.num_steps, observed_s=stats.step_time_observed_s,
                  predicted_s=stats.step_time_predicted_s, swaps=stats.num_swaps)
        await engine.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mistral-7b,qwen2.5-1.5b")
    parser.add_argument("--gpu", default="H100-80GB", help="profile GPU label")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.40)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()
    smoke = Smoke(args)
    started = time.time()
    try:
        asyncio.run(smoke.run())
    except BaseException as error:  # keep what was measured, say what broke
        smoke.result["error"] = "".join(traceback.format_exception(error))[-4000:]
        traceback.print_exc()
    smoke.result["total_s"] = round(time.time() - started, 1)
    smoke.save()
    ok = smoke.result["error"] is None and all(c["ok"] for c in smoke.result["checks"].values())
    print("DONE", "ok" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
