"""The vLLM engine: vLLM's v1 ``AsyncLLM`` in-process, one instance per model on one GPU.

vLLM is imported in :meth:`VllmEngine.start`, never at module import, so nothing that
merely imports qlm needs vLLM (use :func:`qlm.engine.factory.make_engine`).

* **Models**: one ``AsyncLLM`` per model, all created with ``enable_sleep_mode=True`` and
  a share of the GPU (``gpu_memory_utilization``, default ``0.85 / number of models``;
  it is a share of the whole card, so co-resident models must split it). The models
  after the first are started and put to sleep at once; the first stays awake.
  ``sleep(model)`` = ``AsyncLLM.sleep(level)`` (level 1: weights to CPU memory, KV
  dropped), ``wake(model)`` = ``wake_up()``; ``swap`` runs the old model's sleep and the
  new one's wake at once when their shares fit the card together (docs/results/gpu/README.md,
  Part 3, for the times on an H100).
* **Models and checkpoints**: a model's checkpoint is the ``path`` its workers-file
  entry names (:class:`qlm.roster.ModelEntry`), else ``<model_dir>/<model>`` (for a known
  shape without a checkpoint, its config.json is written there: dummy weights only).
  vLLM loads the weights with its normal loader unless ``load_format`` says otherwise
  (``dummy``: random weights of the shape, a benchmark option, never the default; a
  checkpoint without weight files is refused unless dummy). Engine arguments: the
  options below, then the entry's ``engine_args`` (any ``AsyncEngineArgs`` field, names
  checked against vLLM at start, :mod:`qlm.engine.engine_args`).
* **Text**: qlm tokenizes and detokenizes itself with :mod:`qlm.engine.text` (the one
  implementation the simulated engine uses too), so vLLM runs with
  ``skip_tokenizer_init``: text and chat prompts are encoded with the checkpoint's
  tokenizer and chat template and sent as token ids; output ids are detokenized
  incrementally; EOS ids go to vLLM as ``stop_token_ids`` (unless ``ignore_eos``) and a
  stop string found in the text aborts the vLLM request and ends the output with
  ``"stop"``. A model without a tokenizer (dummy shapes) takes token-id prompts only.
* **Requests**: a resumed request is re-prefilled with prompt + kept output ids (prefix
  caching makes that cheap) and asks for the remaining tokens; its decoder and stop
  matcher continue from the kept output. ``ignore_eos`` (off unless the request asks:
  trace replays do) makes outputs exactly ``max_tokens`` long.
  Outputs stream as deltas (``RequestOutputKind.DELTA``).
* **abort** calls ``AsyncLLM.abort`` and returns the output streamed so far.
* **stats** come from vLLM's own per-step statistics (a stat logger registered with
  each ``AsyncLLM``): batch size and waiting requests from the scheduler, KV use as
  vLLM reports it (against ``num_gpu_blocks × block_size`` tokens). Each engine step
  (one set of outputs) counts as a step; its observed time is the time since the
  previous step while the engine stayed busy, its predicted time the profile's
  ``decode_step_s(batch, context)`` (a step that also prefills is predicted as a
  decode step: a known approximation).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlm.core.errors import InvalidInput, NotFound, Unavailable
from qlm.core.perf import PerfProfile
from qlm.engine.base import EngineRequest, EngineStats, FinishReason, OutputChunk, Progress
from qlm.engine.engine_args import check_engine_args, check_known_to_vllm
from qlm.engine.shapes import MODEL_SHAPES
from qlm.engine.text import OutputText, TextModel, has_tokenizer, tokenized
from qlm.roster import ModelEntry

#: A longer gap between two engine steps means the engine was idle, not stepping.
IDLE_GAP_S = 1.0


@dataclass(frozen=True, slots=True)
class VllmOptions:
    """How the AsyncLLM instances are built (see the module docstring)."""

    model_dir: Path = Path("/tmp/qlm-models")
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    enforce_eager: bool = False
    load_format: str | None = None
    enable_prefix_caching: bool = True
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    sleep_level: int = 1
    seed: int = 0
    extra_engine_args: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        share = self.gpu_memory_utilization
        if share is not None and not 0 < share <= 1:
            raise InvalidInput("gpu_memory_utilization", f"must be in (0, 1], got {share}")
        if self.sleep_level not in (1, 2):
            raise InvalidInput("sleep_level", f"must be 1 or 2, got {self.sleep_level}")


@dataclass(eq=False)
class _Live:
    request: EngineRequest
    model: str
    num_generated: int
    token_ids: list[int]
    text: list[str]
    output: OutputText | None = None
    aborted: bool = False
    abort_text: str = ""


#: Weight files vLLM's default loader reads.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


def model_path(model: str, options: VllmOptions, entry: ModelEntry | None = None) -> Path:
    """Where ``model``'s checkpoint is (see the module docstring). A known shape without a
    checkpoint gets its config.json written to ``<model_dir>/<model>`` (dummy weights)."""
    if entry is not None and entry.path is not None:
        return entry.path
    path = options.model_dir / model
    if not (path / "config.json").exists() and model in MODEL_SHAPES:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(MODEL_SHAPES[model], indent=1))
    return path


def has_weights(path: Path) -> bool:
    return any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS)


def checkpoint_problem(model: str, path: Path, load_format: str | None) -> str | None:
    """Why ``path`` cannot serve ``model`` with ``load_format``, or None."""
    if not (path / "config.json").is_file():
        return f"{path} has no config.json (name the checkpoint directory as path)"
    if load_format != "dummy" and not has_weights(path):
        return (f"{path} has no weights ({', '.join(WEIGHT_PATTERNS)}); name a checkpoint "
                "(path) or ask for random weights of its shape with load_format: dummy")
    return None


def engine_arguments(model: str, path: Path, options: VllmOptions, num_models: int,
                     entry: ModelEntry | None = None) -> dict[str, Any]:
    """The ``AsyncEngineArgs`` of ``model`` (module docstring): options, then the entry's
    ``engine_args``. Pure; checked against vLLM's fields in :meth:`VllmEngine.start`."""
    o = options
    args: dict[str, Any] = {
        "model": str(path),
        "skip_tokenizer_init": True,
        "enable_sleep_mode": True,
        "gpu_memory_utilization": o.gpu_memory_utilization or round(0.85 / num_models, 3),
        "max_model_len": o.max_model_len,
        "enforce_eager": o.enforce_eager,
        "enable_prefix_caching": o.enable_prefix_caching,
        "max_num_seqs": o.max_num_seqs,
        "max_num_batched_tokens": o.max_num_batched_tokens,
        "seed": o.seed,
        **check_engine_args(dict(o.extra_engine_args), "extra_engine_args"),
    }
    if o.load_format is not None:
        args["load_format"] = o.load_format
    if entry is not None:
        args |= dict(entry.engine_args)
    return args


class VllmEngine:
    """An :class:`~qlm.engine.base.Engine` on vLLM ``AsyncLLM`` (one per model)."""

    def __init__(
        self,
        gpu: str,
        models: Sequence[str],
        options: VllmOptions | None = None,
        profiles: Mapping[str, PerfProfile] | None = None,
        entries: Mapping[str, ModelEntry] | None = None,
    ) -> None:
        if not models or len(set(models)) != len(models):
            raise InvalidInput("models", "must be a non-empty list of distinct models")
        self._gpu = gpu
        self._models = tuple(models)
        self.options = options or VllmOptions()
        self._profiles = dict(profiles or {})
        self._entries = dict(entries or {})
        self._llms: dict[str, Any] = {}
        self._texts: dict[str, TextModel | None] = {}
        self._shares: dict[str, float] = {}  # each model's gpu_memory_utilization
        self._active: str | None = None
        self._live: dict[str, _Live] = {}
        self._num_swaps = 0
        self._num_steps = 0
        self._observed_s = 0.0
        self._predicted_s = 0.0
        self._num_output_tokens = 0
        self._last_step_at: float | None = None
        self._batch_size = 0
        self._num_waiting = 0
        self._kv_used_fraction = 0.0

    # ---------------------------------------------------------------- identity
    @property
    def gpu(self) -> str:
        return self._gpu

    @property
    def models(self) -> tuple[str, ...]:
        return self._models

    @property
    def active_model(self) -> str | None:
        return self._active

    # ---------------------------------------------------------------- lifecycle
    def _engine_args(self, model: str) -> Any:
        """vLLM's ``AsyncEngineArgs`` of ``model``; InvalidInput names a bad argument."""
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs

        entry = self._entries.get(model)
        path = model_path(model, self.options, entry)
        args = engine_arguments(model, path, self.options, len(self._models), entry)
        problem = checkpoint_problem(model, path, args.get("load_format"))
        if problem is not None:
            raise InvalidInput(f"models.{model}.path", problem)
        known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        check_known_to_vllm(args, known, f"models.{model}.engine_args", vllm.__version__)
        self._texts[model] = TextModel.load(path) if has_tokenizer(path) else None
        self._shares[model] = float(args["gpu_memory_utilization"])
        return AsyncEngineArgs(**args)

    def text_model(self, model: str) -> TextModel | None:
        """The tokenizer side of ``model``'s checkpoint (None: token-id prompts only)."""
        return self._texts.get(model)

    async def start(self) -> None:
        """Start every model; all but the first go to sleep right after starting."""
        if self._llms:
            return
        try:
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as error:
            raise Unavailable(f"vLLM is not installed: {error}") from error
        for model in (*self._models[1:], self._models[0]):
            llm = AsyncLLM.from_engine_args(
                self._engine_args(model), stat_loggers=[self._stat_logger(model)]
            )
            self._llms[model] = llm
            if model != self._models[0]:
                await llm.sleep(level=self.options.sleep_level)
        self._active = self._models[0]

    def _stat_logger(self, model: str) -> Any:
        """A vLLM stat logger class that feeds each engine step of ``model`` to
        :meth:`_on_step` (vLLM calls it in the event loop, once per set of outputs)."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class QlmStatLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any,
                       mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
                engine._on_step(model, scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return QlmStatLogger

    async def close(self) -> None:
        for request_id in list(self._live):
            await self.abort(request_id)
        for llm in self._llms.values():
            llm.shutdown()
        self._llms.clear()
        self._active = None

    # ---------------------------------------------------------------- requests
    def add(self, request: EngineRequest) -> AsyncIterator[OutputChunk]:
        if request.model != self._active:
            raise InvalidInput(
                "model", f"{request.model!r} is not the active model ({self._active!r})"
            )
        if request.request_id in self._live:
            raise InvalidInput("request_id", f"{request.request_id!r} is already running")
        text = self._texts.get(request.model)
        request = tokenized(request, text)
        output = None
        if text is not None:
            output = text.output(stop=request.stop, ignore_eos=request.ignore_eos,
                                 kept_ids=request.generated_token_ids,
                                 kept_text=request.generated_text)
        live = _Live(request, request.model, request.num_generated,
                     list(request.generated_token_ids), [request.generated_text], output)
        self._live[request.request_id] = live
        return self._stream(live, self._llms[request.model])

    def _sampling_params(self, request: EngineRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        optional: dict[str, Any] = {
            name: value
            for name, value in (
                ("temperature", request.temperature),
                ("top_p", request.top_p),
                ("top_k", request.top_k),
                ("seed", request.seed),
            )
            if value is not None
        }
        text = self._texts.get(request.model)
        if text is not None and not request.ignore_eos:
            optional["stop_token_ids"] = sorted(text.eos_token_ids)
        return SamplingParams(
            max_tokens=request.remaining_tokens,
            ignore_eos=request.ignore_eos,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
            **optional,
        )

    async def _stream(self, live: _Live, llm: Any) -> AsyncIterator[OutputChunk]:
        request = live.request
        prompt = {"prompt_token_ids": request.resume_prompt_ids()}
        finish: FinishReason | None = None
        try:
            async for out in llm.generate(prompt, self._sampling_params(request),
                                          request_id=request.request_id):
                completion = out.outputs[0]
                new = tuple(int(t) for t in completion.token_ids)
                text = ""
                if live.output is not None:
                    delta = live.output.feed(new)
                    new, text = delta.token_ids, delta.text
                    if delta.finish_reason is not None:
                        finish = "stop"
                if out.finished and finish is None:
                    finish = _finish_reason(completion.finish_reason, live.aborted)
                    if live.output is not None and finish != "abort":
                        text += live.output.flush()
                self._num_output_tokens += len(new)
                live.num_generated += len(new)
                live.token_ids.extend(new)
                live.text.append(text)
                if finish is not None and finish != "abort" and not out.finished:
                    await llm.abort(request.request_id)  # a stop string, found by qlm
                if finish == "abort":
                    text += live.abort_text
                yield OutputChunk(request.request_id, new, live.num_generated, text, finish)
                if finish is not None:
                    return
        except Exception:
            if not live.aborted:
                raise
        finally:
            self._live.pop(request.request_id, None)
        if finish is None:
            yield OutputChunk(request.request_id, (), live.num_generated, live.abort_text,
                              finish_reason="abort")

    async def abort(self, request_id: str, keep_kv: bool = False) -> Progress:
        """Abort; ``keep_kv`` is not supported (vLLM frees the KV cache; prefix caching
        makes the re-prefill of a resumed request cheaper)."""
        live = self._live.get(request_id)
        if live is None:
            raise NotFound("request", request_id)
        live.aborted = True
        if live.output is not None:  # text held back for a stop string goes with the progress
            live.abort_text = live.output.flush()
            live.text.append(live.abort_text)
        await self._llms[live.model].abort(request_id)
        self._live.pop(request_id, None)
        return Progress(request_id, live.num_generated, tuple(live.token_ids), "".join(live.text))

    # ---------------------------------------------------------------- model swap
    async def sleep(self, model: str) -> None:
        if model != self._active:
            raise InvalidInput("model", f"{model!r} is not awake")
        if any(live.model == model for live in self._live.values()):
            raise InvalidInput("model", f"{model!r} still has requests; abort them first")
        self._active = None
        self._num_swaps += 1
        await self._llms[model].sleep(level=self.options.sleep_level)

    async def wake(self, model: str) -> None:
        if model not in self._llms:
            raise InvalidInput("model", f"{model!r} is not one of {list(self._models)}")
        if self._active is not None:
            raise InvalidInput("model", f"{self._active!r} is awake; put it to sleep first")
        await self._llms[model].wake_up()
        self._active = model

    async def swap(self, to_model: str) -> None:
        """Make ``to_model`` active. Each model has its own share of the card, so when the
        shares add up to at most the card (the default ``0.85 / number of models``) the
        new model's weights and KV cache fit while the old one's leave: the two copies
        (device → host and host → device, the two directions of PCIe) run at once.
        Otherwise sleep, then wake."""
        if to_model not in self._llms:
            raise InvalidInput("model", f"{to_model!r} is not one of {list(self._models)}")
        current = self._active
        if current == to_model:
            return
        if current is None:
            await self.wake(to_model)
            return
        if not self.overlapped_swaps(current, to_model):
            await self.sleep(current)
            await self.wake(to_model)
            return
        if any(live.model == current for live in self._live.values()):
            raise InvalidInput("model", f"{current!r} still has requests; abort them first")
        self._active = None
        self._num_swaps += 1
        outcomes = await asyncio.gather(
            self._llms[current].sleep(level=self.options.sleep_level),
            self._llms[to_model].wake_up(), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise Unavailable(f"swap {current} -> {to_model} failed: {outcome!r}")
        self._active = to_model

    def overlapped_swaps(self, a: str, b: str) -> bool:
        """Whether ``a`` and ``b`` fit the card awake together (their shares' sum ≤ 1)."""
        return self._shares.get(a, 1.0) + self._shares.get(b, 1.0) <= 1.0 + 1e-9

    # ---------------------------------------------------------------- stats
    def _context_tokens(self) -> int:
        return sum(live.request.prompt_tokens + live.num_generated for live in self._live.values())

    def _on_step(self, model: str, scheduler: Any, iteration: Any) -> None:
        """One engine step of ``model`` ended (vLLM's scheduler and iteration stats)."""
        if model != self._active:
            return
        if scheduler is not None:
            self._batch_size = int(scheduler.num_running_reqs)
            self._num_waiting = int(scheduler.num_waiting_reqs)
            self._kv_used_fraction = float(scheduler.kv_cache_usage)
        if iteration is None:
            return
        now = float(iteration.iteration_timestamp)
        last, self._last_step_at = self._last_step_at, now
        self._num_steps += 1
        if last is None or not 0 <= now - last < IDLE_GAP_S:
            return
        self._observed_s += now - last
        profile = self._profiles.get(model)
        if profile is not None:
            batch = self._batch_size or len(self._live)
            self._predicted_s += profile.decode_step_s(batch, self._context_tokens())

    def kv_capacity_tokens(self) -> int:
        if self._active is None or self._active not in self._llms:
            return 0
        cache = self._llms[self._active].vllm_config.cache_config
        return int(cache.num_gpu_blocks or 0) * int(cache.block_size)

    def stats(self) -> EngineStats:
        capacity = self.kv_capacity_tokens()
        return EngineStats(
            active_model=self._active,
            batch_size=min(self._batch_size, len(self._live)),
            num_waiting=min(self._num_waiting, len(self._live)),
            kv_used_tokens=round(self._kv_used_fraction * capacity) if self._live else 0,
            kv_capacity_tokens=capacity,
            num_steps=self._num_steps,
            step_time_observed_s=self._observed_s,
            step_time_predicted_s=self._predicted_s,
            num_output_tokens=self._num_output_tokens,
            num_swaps=self._num_swaps,
        )


def _finish_reason(reason: str | None, aborted: bool) -> FinishReason:
    if aborted or reason == "abort":
        return "abort"
    return "length" if reason == "length" else "stop"

