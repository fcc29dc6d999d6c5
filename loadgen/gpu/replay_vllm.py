"""Replay a slice of the Azure LLM trace through real vLLM (AsyncLLM in-process), open loop.

Each request is sent at its (time-scaled) trace arrival, whatever happened to earlier ones,
with a prompt of ``prompt_tokens`` random token ids and ``max_tokens=output_tokens``,
``ignore_eos=True`` so output lengths follow the trace. Per request it records arrival,
first token, finish and output tokens; the summary gives TTFT p50/p99, TPOT p50/p99 and
output tokens per second.

Used by ``profile_vllm.py`` (same engine, after the profile) or alone, on the GPU host::

    python3 -m loadgen.gpu.replay_vllm --model mistral-7b --slice .stage/azure_conv_0_400.csv \
        --speedup 2 --out $OUT
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    ENGINE_SETTINGS,
    MODEL_SHAPES,
    RequestTiming,
    TraceRequest,
    device_facts,
    latency_summary,
    max_model_len_for,
    read_slice_csv,
    write_json,
    write_model_dir,
)


def scaled(requests: Sequence[TraceRequest], speedup: float) -> list[TraceRequest]:
    """The same requests arriving ``speedup`` times faster."""
    return [TraceRequest(r.arrival_s / speedup, r.prompt_tokens, r.output_tokens)
            for r in requests]


async def replay(engine: Any, requests: Sequence[TraceRequest], vocab_size: int,
                 seed: int = 0, tag: str = "r") -> list[dict[str, Any]]:
    """Send ``requests`` to ``engine`` at their arrival times; one record per request.

    Times in the records are seconds after the replay's start (the first arrival is at
    its ``arrival_s``). Prompts are drawn before the clock starts.
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    rng = np.random.default_rng(seed)
    prompts = [rng.integers(100, vocab_size - 100, size=r.prompt_tokens).tolist()
               for r in requests]
    records: list[dict[str, Any]] = [{} for _ in requests]
    start_at = time.perf_counter() + 0.2

    async def one(i: int, req: TraceRequest) -> None:
        delay = start_at + req.arrival_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        params = SamplingParams(max_tokens=req.output_tokens, ignore_eos=True, detokenize=False,
                                output_kind=RequestOutputKind.DELTA)
        sent_at = time.perf_counter() - start_at
        first_at: float | None = None
        num_out = 0
        async for out in engine.generate({"prompt_token_ids": prompts[i]}, params,
                                         request_id=f"{tag}{i}"):
            num_out += len(out.outputs[0].token_ids)
            if first_at is None and num_out > 0:
                first_at = time.perf_counter() - start_at
        finish_at = time.perf_counter() - start_at
        records[i] = {
            "arrival_s": round(req.arrival_s, 6), "sent_s": round(sent_at, 6),
            "prompt_tokens": req.prompt_tokens, "max_tokens": req.output_tokens,
            "first_token_s": round(first_at if first_at is not None else finish_at, 6),
            "finish_s": round(finish_at, 6), "output_tokens": num_out,
        }

    await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    return records


def timings_of(records: Sequence[dict[str, Any]]) -> list[RequestTiming]:
    return [RequestTiming(r["arrival_s"], r["first_token_s"], r["finish_s"], r["output_tokens"])
            for r in records]


def replay_result(records: Sequence[dict[str, Any]], speedup: float,
                  slice_name: str) -> dict[str, Any]:
    """Summary + per-request records of one replay, as written to JSON."""
    return {
        "slice": slice_name,
        "speedup": speedup,
        "summary": latency_summary(timings_of(records)),
        "late_sends_over_10ms": sum(1 for r in records if r["sent_s"] - r["arrival_s"] > 0.01),
        "requests": list(records),
    }


async def _main(args: argparse.Namespace) -> None:
    import vllm
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = write_model_dir(args.model, Path("/tmp/qlm-models"))
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, seed=0,
        max_model_len=max_model_len_for(args.model), **ENGINE_SETTINGS))
    requests = read_slice_csv(Path(args.slice))
    vocab = int(MODEL_SHAPES[args.model]["vocab_size"])
    result: dict[str, Any] = {
        "model": args.model, "device": device_facts(), "vllm_version": vllm.__version__,
        "command": " ".join(sys.argv), "engine_settings": ENGINE_SETTINGS, "replays": []}
    for speedup in (float(s) for s in args.speedup.split(",")):
        records = await replay(engine, scaled(requests, speedup), vocab, tag=f"x{speedup}-")
        result["replays"].append(replay_result(records, speedup, Path(args.slice).name))
        print("replay", speedup, result["replays"][-1]["summary"], flush=True)
        write_json(out_dir / f"replay_{args.model}.json", result)
    engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mistral-7b", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--slice", required=True, help="CSV written by common.write_slice_csv")
    parser.add_argument("--speedup", default="2", help="comma-separated arrival speed-ups")
    parser.add_argument("--out", default="gpu-results")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
