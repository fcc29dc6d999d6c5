"""A real checkpoint through the worker's vLLM engine: weights loaded by vLLM's normal loader,
text in and out with the checkpoint's tokenizer, stops at EOS and stop strings, and
output tok/s against dummy weights of the same shape.

Runs on the GPU host (vLLM unpacked as docs/results/gpu/README.md says; no network)::

    python3 -m loadgen.gpu.real_checkpoint --model qwen2.5-1.5b --out $OUT

Steps, each timed and written to ``OUT/<--name>.json`` (device, vLLM version, commit,
exact command, every check with what it saw):

1. write a checkpoint of the model's real shape (``loadgen.gpu.common.MODEL_SHAPES``) with
   random weights and a tokenizer trained on the repository's docs
   (:func:`qlm.engine.checkpoint.write_checkpoint`; embedding rows past the tokenizer's
   vocabulary are zero, so greedy decoding picks real tokens);
2. engine **real** (:class:`qlm.engine.vllm_engine.VllmEngine`, the checkpoint as the
   workers file would name it, vLLM's default loader): a text prompt and a chat prompt
   (greedy, ``ignore_eos``) give non-empty text that equals the whole-sequence decode of
   the ids and holds only the tokenizer's ids; a stop string taken from the middle of that
   text ends a rerun there with ``"stop"`` and the text before it; sampling with a seed
   repeats itself; then a batch (``--batch`` prompts of ``--prompt-tokens`` ids, exactly
   ``--max-tokens`` each): output tok/s;
3. engine **eos**: the same weights with one more EOS id in ``generation_config.json``
   (the id greedy decoding produced at position ``--eos-at``; real models list several
   EOS ids too), the same greedy request without ``ignore_eos`` ends right after it with
   ``"stop"`` and the text before it;
4. engine **dummy**: ``load_format="dummy"``, same shape and settings, the same batch:
   output tok/s (the ratio real / dummy is in the result).

``--steps`` runs a subset of the engines (e.g. ``real`` in one call and ``eos,dummy`` in the
next on the same warm host; the checkpoint and step 2's greedy ids stay under
``--checkpoint-dir``). Exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from loadgen.gpu.common import MODEL_SHAPES, StepLog, device_facts, stream_to_end
from loadgen.gpu.stack_replay import code_version
from qlm.engine.base import EngineRequest
from qlm.roster import ModelEntry

#: The top-level keys this program writes into its JSON (checked against the committed
#: results by tests/unit/test_results_keys.py).
RESULT_KEYS: Final = frozenset({
    "args", "checks", "code_version", "command", "device", "error", "steps", "tok_s_dummy",
    "tok_s_real", "tok_s_real_over_dummy", "total_s", "vllm_version",
})

PROMPT = "The queue manager keeps interactive requests within their time to first token."
#: The engines of steps 2-4, in order.
STEPS = ("real", "eos", "dummy")
#: Where step 2 keeps its greedy output ids (beside the checkpoint) for a later step 3.
GREEDY_FILE = "greedy_ids.json"
CHAT = [{"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "What does a model swap cost on one GPU?"}]


# ------------------------------------------------------------------ pure helpers
def pick_stop_string(text: str, length: int = 4) -> str | None:
    """A substring of ``text`` from its middle whose first occurrence is there (so a
    rerun with it as stop string must end at that place); None if there is none."""
    for start in range(len(text) // 2, len(text) - length):
        candidate = text[start:start + length]
        if candidate.strip() and text.find(candidate) == start:
            return candidate
    return None


def eos_variant(source: Path, target: Path, extra_eos: int) -> Path:
    """``target``: the checkpoint at ``source`` (files linked, not copied) whose
    ``generation_config.json`` lists ``extra_eos`` as one more EOS id."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for file in source.iterdir():
        if file.name != "generation_config.json":
            (target / file.name).symlink_to(file.resolve())
    config = json.loads((source / "generation_config.json").read_text())
    eos = config.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    config["eos_token_id"] = [*ids, int(extra_eos)]
    (target / "generation_config.json").write_text(json.dumps(config, indent=1))
    return target


def batch_prompts(seed: int, count: int, length: int, vocab: int) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(t) for t in rng.integers(10, vocab - 10, size=length))
            for _ in range(count)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default="qwen2.5-1.5b", choices=sorted(MODEL_SHAPES))
    p.add_argument("--gpu", default="H100-80GB", help="the profile's GPU label")
    p.add_argument("--checkpoint-dir", type=Path, default=Path("/tmp/qlm-checkpoints"),
                   help="where the checkpoint is written (reused when already there)")
    p.add_argument("--tokenizer-vocab", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.40)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--text-tokens", type=int, default=64, help="tokens of the text checks")
    p.add_argument("--eos-at", type=int, default=12,
                   help="output position whose token becomes an extra EOS id (step 3)")
    p.add_argument("--steps", default=",".join(STEPS),
                   help="which engines to run (steps 2-4), e.g. 'eos,dummy' in a second call "
                        "on the same host: eos then reads the greedy ids step 2 kept")
    p.add_argument("--code-version", default="", help="default: the checkout's git commit")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    p.add_argument("--name", default="real_checkpoint")
    args = p.parse_args(argv)
    args.steps = [s for s in args.steps.split(",") if s]
    if not args.steps or any(s not in STEPS for s in args.steps):
        p.error(f"--steps: a comma-separated subset of {','.join(STEPS)}")
    if not 0 < args.eos_at < args.text_tokens:
        p.error("--eos-at must be in (0, --text-tokens)")
    if not 0 < args.gpu_memory_utilization <= 1:
        p.error("--gpu-memory-utilization must be in (0, 1]")
    return args


# ------------------------------------------------------------------ on the GPU
async def run_one(engine: Any, request: EngineRequest) -> dict[str, Any]:
    """Stream ``request`` to its end: ids, text, finish reason, seconds."""
    chunks, first, total = await stream_to_end(engine, request)
    return {"token_ids": [t for c in chunks for t in c.token_ids],
            "text": "".join(c.text for c in chunks),
            "finish_reason": chunks[-1].finish_reason if chunks else None,
            "ttft_s": first, "total_s": total}


async def close(engine: Any) -> None:
    await engine.close()
    await asyncio.sleep(2.0)  # let the engine process release its GPU memory


class Run(StepLog):
    def __init__(self, args: argparse.Namespace, argv: Sequence[str]) -> None:
        self.args = args
        self.out = Path(args.out)
        self.result: dict[str, Any] = {
            "device": device_facts(),
            "command": " ".join(["python3 -m loadgen.gpu.real_checkpoint", *argv]),
            "code_version": code_version(args.code_version), "args": vars(args),
            "steps": [], "checks": {}, "error": None,
        }

    def result_file(self) -> Path:
        return self.out / f"{self.args.name}.json"

    async def engine(self, path: Path, load_format: str | None) -> Any:
        from qlm.core.perf import PROFILE_DIR, ProfileBook
        from qlm.engine.vllm_engine import VllmEngine, VllmOptions

        a = self.args
        book = ProfileBook.load(PROFILE_DIR)
        profiles = {a.model: book.get(a.model, a.gpu)} if book.has(a.model, a.gpu) else {}
        options = VllmOptions(gpu_memory_utilization=a.gpu_memory_utilization,
                              max_model_len=a.max_model_len, load_format=load_format)
        engine = VllmEngine(a.gpu, [a.model], options, profiles,
                            {a.model: ModelEntry(a.model, path)})
        started = time.perf_counter()
        await engine.start()
        self.step(f"start engine ({load_format or 'checkpoint weights'})",
                  time.perf_counter() - started, path=str(path),
                  kv_capacity_tokens=engine.kv_capacity_tokens())
        return engine

    def request(self, rid: str, **fields: Any) -> EngineRequest:
        fields.setdefault("max_tokens", self.args.text_tokens)
        fields.setdefault("prompt_tokens", 16)
        return EngineRequest(rid, self.args.model, **fields)

    async def throughput(self, engine: Any, label: str) -> float:
        a = self.args
        vocab = int(MODEL_SHAPES[a.model]["vocab_size"])
        warm = batch_prompts(1, 4, 128, vocab)
        await asyncio.gather(*(run_one(engine, self.request(
            f"{label}-warm{i}", prompt_tokens=len(p), prompt_token_ids=p, max_tokens=16,
            ignore_eos=True)) for i, p in enumerate(warm)))
        prompts = batch_prompts(2, a.batch, a.prompt_tokens, vocab)
        started = time.perf_counter()
        outs = await asyncio.gather(*(run_one(engine, self.request(
            f"{label}-b{i}", prompt_tokens=len(p), prompt_token_ids=p, max_tokens=a.max_tokens,
            ignore_eos=True)) for i, p in enumerate(prompts)))
        elapsed = time.perf_counter() - started
        tokens = sum(len(o["token_ids"]) for o in outs)
        self.check(f"{label}: batch outputs have exactly max_tokens",
                   all(len(o["token_ids"]) == a.max_tokens for o in outs))
        tok_s = tokens / elapsed
        self.step(f"{label}: batch {a.batch} x {a.prompt_tokens} in / {a.max_tokens} out",
                  elapsed, output_tok_s=round(tok_s, 1),
                  ttft_p50_s=round(sorted(o["ttft_s"] or 0 for o in outs)[len(outs) // 2], 4))
        return tok_s

    async def real(self, path: Path) -> list[int]:
        """Step 2; returns the greedy output ids of the text prompt."""
        engine = await self.engine(path, None)
        try:
            text_model = engine.text_model(self.args.model)
            live_vocab = text_model.vocab_size
            greedy = await run_one(engine, self.request(
                "text", prompt_text=PROMPT, temperature=0.0, ignore_eos=True))
            ids, text = greedy["token_ids"], greedy["text"]
            self.check("text prompt: text out", bool(text.strip())
                       and text == text_model.decode(ids)
                       and all(t < live_vocab for t in ids)
                       and len(ids) == self.args.text_tokens,
                       text=text[:300], num_tokens=len(ids), finish=greedy["finish_reason"])
            chat = await run_one(engine, self.request(
                "chat", prompt_messages=tuple(CHAT), temperature=0.0, ignore_eos=True))
            self.check("chat prompt: text out", bool(chat["text"].strip()),
                       rendered=text_model.render_chat(CHAT), text=chat["text"][:300])
            stop = pick_stop_string(text)
            if stop is None:
                self.check("stop string ends the output", False, reason="no stop string")
            else:
                stopped = await run_one(engine, self.request(
                    "stop", prompt_text=PROMPT, temperature=0.0, stop=(stop,), ignore_eos=True))
                self.check("stop string ends the output",
                           stopped["finish_reason"] == "stop"
                           and stopped["text"] == text[:text.index(stop)]
                           and stopped["token_ids"] == ids[:len(stopped["token_ids"])],
                           stop=stop, text=stopped["text"][-120:],
                           finish=stopped["finish_reason"])
            seeded = [await run_one(engine, self.request(
                f"seed{i}", prompt_text=PROMPT, temperature=1.0, top_p=0.9, seed=s,
                ignore_eos=True)) for i, s in enumerate((7, 7, 8))]
            self.check("sampling parameters pass through (seed repeats, another differs)",
                       seeded[0]["token_ids"] == seeded[1]["token_ids"]
                       != seeded[2]["token_ids"])
            self.result["tok_s_real"] = round(await self.throughput(engine, "real"), 1)
            return list(ids)
        finally:
            await close(engine)

    async def eos(self, path: Path, greedy_ids: list[int]) -> None:
        """Step 3."""
        at = self.args.eos_at
        variant = eos_variant(path, path.parent / f"{path.name}-eos", greedy_ids[at])
        engine = await self.engine(variant, None)
        try:
            text_model = engine.text_model(self.args.model)
            out = await run_one(engine, self.request("eos", prompt_text=PROMPT,
                                                     temperature=0.0))
            first = greedy_ids.index(greedy_ids[at])  # the id may come earlier too
            self.check("EOS ends the output", out["finish_reason"] == "stop"
                       and out["token_ids"] == greedy_ids[:first + 1]
                       and out["text"] == text_model.decode(greedy_ids[:first]),
                       eos_id=greedy_ids[at], num_tokens=len(out["token_ids"]),
                       finish=out["finish_reason"], text=out["text"][-120:])
        finally:
            await close(engine)

    async def dummy(self, path: Path) -> None:
        """Step 4."""
        engine = await self.engine(path, "dummy")
        try:
            self.result["tok_s_dummy"] = round(await self.throughput(engine, "dummy"), 1)
        finally:
            await close(engine)
        real, dummy = self.result.get("tok_s_real"), self.result["tok_s_dummy"]
        if real:
            self.result["tok_s_real_over_dummy"] = round(real / dummy, 4)

    async def run(self) -> None:
        import vllm

        from qlm.engine.checkpoint import write_checkpoint

        self.result["vllm_version"] = vllm.__version__
        a = self.args
        path = a.checkpoint_dir / a.model
        started = time.perf_counter()
        if not (path / "model.safetensors").exists():
            write_checkpoint(path, MODEL_SHAPES[a.model], tokenizer_vocab=a.tokenizer_vocab)
        self.step("write checkpoint", time.perf_counter() - started, path=str(path),
                  gib=round(sum(f.stat().st_size for f in path.iterdir()) / 2**30, 2))
        kept = path.parent / f"{path.name}-{GREEDY_FILE}"
        if "real" in a.steps:
            greedy = await self.real(path)
            kept.write_text(json.dumps(greedy))
        if "eos" in a.steps:
            if not kept.exists():
                raise FileNotFoundError(f"{kept}: run the step 'real' first")
            await self.eos(path, json.loads(kept.read_text()))
        if "dummy" in a.steps:
            await self.dummy(path)


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(given)
    run = Run(args, given)
    started = time.time()
    try:
        asyncio.run(run.run())
    except (Exception, KeyboardInterrupt) as error:  # keep what was measured, say what broke
        run.result["error"] = "".join(traceback.format_exception(error))[-4000:]
        traceback.print_exc()
    run.result["total_s"] = round(time.time() - started, 1)
    run.save()
    checks = run.result["checks"]
    ok = run.result["error"] is None and bool(checks) and all(c["ok"] for c in checks.values())
    print("DONE", "ok" if ok else "FAILED", run.result["total_s"], flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
