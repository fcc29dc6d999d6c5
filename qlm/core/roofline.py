"""Roofline performance model: PerfProfile values from model shapes and GPU specs.

Decode is bound by memory bandwidth (every step reads all weights once and the KV
state of every sequence once); prefill is bound by tensor-core FLOPs. The handful of
efficiency factors below were fitted once against vLLM 0.25.0 on one H100 80GB
(dummy Llama-3-8B shape, bf16, CUDA graphs; ``docs/profiles.md`` has the table) and
are applied unchanged to the other GPUs. Tensor-parallel instances split weights, KV
heads and FLOPs over ``num_gpus`` cards and pay two all-reduces per layer.

Pure functions, no I/O: :func:`roofline_profile` returns a
:class:`~qlm.core.perf.PerfProfile`; ``python -m loadgen.profiles`` writes the files.

Formulas (per GPU of a ``k``-way tensor-parallel instance; W = weight bytes,
kv = KV bytes per token, P = parameters, L = layers, h = hidden size):

* decode step(B, ctx) = base_s + per_seq_s·B + per_ctx_token_s·ctx, with
  base_s = W/k / (BW·DECODE_BANDWIDTH_EFFICIENCY) + DECODE_STEP_OVERHEAD_S + 2L·α_link,
  per_seq_s = DECODE_EXPOSED_COMPUTE · 2P/k / peak + 2L·(2h·2(k−1)/k)/β_link,
  per_ctx_token_s = kv/k / (BW·DECODE_BANDWIDTH_EFFICIENCY);
* prefill(n) = PREFILL_OVERHEAD_S + (2P·n + 2L·n²·h)/k / (peak·PREFILL_FLOPS_EFFICIENCY)
  + 2L·(α_link + n·2h·2(k−1)/k / β_link);
* KV capacity = (mem·GPU_MEMORY_UTILIZATION·k − W − k·activation reserve) / kv;
* wake = SWAP_FIXED_S + W/k / (PCIe·WAKE_PCIE_EFFICIENCY), sleep likewise with
  SLEEP_PCIE_EFFICIENCY; cold load = COLD_START_FIXED_S + W / DISK_READ_BYTES_PER_S
  (+ TP_COLD_START_EXTRA_S when k > 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from qlm.core.errors import InvalidInput
from qlm.core.perf import PerfProfile

GIB: Final = 2**30
GB: Final = 1e9

# ------------------------------------------------------------------ constants
# Decode, fitted by least squares to the H100 ms/step of batch 1/8/32/128
# (512 prompt + 128 output tokens, vLLM 0.25.0, CUDA graphs; ../shared/gpu/README.md):
# fitted 0.932, 1.31 ms, 0.773; max error 1.5 % on H100, 2.8 % on H200 (not fitted).
#: Share of the datasheet memory bandwidth that decode kernels reach.
DECODE_BANDWIDTH_EFFICIENCY: Final = 0.93
#: Fixed cost per decode step (scheduler, sampler, launches), seconds.
DECODE_STEP_OVERHEAD_S: Final = 1.3e-3
#: Share of a sequence's per-token GEMM FLOPs (2P) that does not hide under weight reads.
DECODE_EXPOSED_COMPUTE: Final = 0.77

# Prefill, fitted to the H100 time-to-first-token of 1/8/32/128 prompts of 512 tokens
# (512…65,536 tokens per batch): fitted 0.719 and 4.7 ms; max error 0.7 %.
#: Share of the datasheet dense bf16 tensor FLOPs that prefill reaches.
PREFILL_FLOPS_EFFICIENCY: Final = 0.72
#: Fixed cost of a prefill (launch, scheduling, first sampling step), seconds.
PREFILL_OVERHEAD_S: Final = 4.7e-3

# Memory.
#: vLLM's gpu_memory_utilization: share of each card vLLM may use.
GPU_MEMORY_UTILIZATION: Final = 0.9
#: Per-GPU memory outside weights and KV: CUDA context, cuBLAS/NCCL workspaces and the
#: CUDA-graph pool (vLLM start-up logs show 0.5–1.5 GiB of these for 7–13B models).
ACTIVATION_RESERVE_FIXED_GIB: Final = 1.0
#: Peak activation bytes per batched token per unit of hidden size during vLLM's profile
#: run: residual + QKV + gated-MLP intermediate (≈3.5·h, two of them) in bf16 ≈ 19 bytes.
ACTIVATION_BYTES_PER_TOKEN_HIDDEN: Final = 19
#: vLLM's default token budget per step (max_num_batched_tokens) for the profile run.
MAX_NUM_BATCHED_TOKENS: Final = 8192
#: Scheduler limit on running sequences (vLLM max_num_seqs), the same on every GPU.
MAX_BATCH_SIZE: Final = 256

# Model swap (vLLM sleep mode level 1: weights to pinned CPU memory and back), fitted to
# the steady-state wakes of two co-resident engines on one H100 (8B: 0.434 s, 1.5B:
# 0.129 s; PCIe Gen5 x16) and the steady-state 8B sleep (0.332 s).
#: Fixed cost of a sleep or a wake, seconds (intercept of the wake fit).
SWAP_FIXED_S: Final = 0.056
#: Share of the PCIe bandwidth reached by wake (host → device), slope of the wake fit.
WAKE_PCIE_EFFICIENCY: Final = 0.66
#: Share of the PCIe bandwidth reached by sleep (device → pinned host).
SLEEP_PCIE_EFFICIENCY: Final = 0.91
#: Engine start with warm compile caches (measured 16.5 s, 8B shape, dummy weights, H100).
COLD_START_FIXED_S: Final = 16.5
#: Weight read rate from local NVMe / page cache during a cold start (assumed, not
#: measured: no real weights were loaded on the GPU host).
DISK_READ_BYTES_PER_S: Final = 2.0 * GB
#: Extra start-up of a tensor-parallel instance (worker processes, NCCL init; assumed).
TP_COLD_START_EXTRA_S: Final = 10.0

#: Prompt lengths at which prefill is tabulated in a profile.
PREFILL_POINTS: Final = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The numbers of a dense decoder-only transformer that its timing depends on."""

    name: str
    num_params: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_model_len: int
    dtype_bytes: int = 2

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def prefill_flops(self, prompt_tokens: int) -> float:
        """GEMMs (2·P per token) plus causal attention (2·L·n²·h)."""
        n = prompt_tokens
        return 2.0 * self.num_params * n + 2.0 * self.num_layers * n * n * self.hidden_size


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """Datasheet numbers of one GPU type (dense bf16, no sparsity)."""

    name: str
    memory_gib: float
    bandwidth_bytes_per_s: float
    bf16_flops: float
    pcie_bytes_per_s: float
    allreduce_latency_s: float
    allreduce_bus_bytes_per_s: float


# Shapes from the models' config.json files.
MODELS: Final[dict[str, ModelShape]] = {
    "mistral-7b": ModelShape("mistral-7b", 7_241_732_096, 32, 4096, 32, 8, 128, 32768),
    # Vicuna-13B is a Llama-2-13B fine-tune: same shape, no grouped-query attention.
    "vicuna-13b": ModelShape("vicuna-13b", 13_015_864_320, 40, 5120, 40, 40, 128, 4096),
    # Llama-2-70B (grouped-query attention, 8 KV heads).
    "llama-70b": ModelShape("llama-70b", 68_976_648_192, 80, 8192, 64, 8, 128, 4096),
}

#: The shape measured on the GPU host, used only for calibration.
LLAMA3_8B: Final = ModelShape("llama-3-8b", 8_030_261_248, 32, 4096, 32, 8, 128, 4096)
#: The second shape of the swap measurement (Qwen2.5-1.5B), calibration only.
QWEN25_1_5B: Final = ModelShape("qwen2.5-1.5b", 1_543_714_304, 28, 1536, 12, 2, 128, 4096)

# Memory as nvidia-smi reports it; bandwidth/FLOPs from NVIDIA datasheets (A10: 600 GB/s,
# 125 TFLOPs; A100 SXM 80GB: 2,039 GB/s, 312 TFLOPs; H100 SXM: 3,350 GB/s, 989 TFLOPs);
# PCIe Gen4/Gen5 x16 = 32/64 GB/s per direction. All-reduce: NCCL bus bandwidth and small
# message latency typical of nccl-tests (A10: PCIe through the host, no NVLink; A100/H100:
# NVLink 3/4) — assumptions, not measured here.
GPUS: Final[dict[str, GpuSpec]] = {
    "A10-24GB": GpuSpec("A10-24GB", 23028 / 1024, 600 * GB, 125e12, 32 * GB, 30e-6, 12 * GB),
    "A100-80GB": GpuSpec("A100-80GB", 80.0, 2039 * GB, 312e12, 32 * GB, 10e-6, 230 * GB),
    "H100-80GB": GpuSpec("H100-80GB", 81559 / 1024, 3350 * GB, 989e12, 64 * GB, 8e-6, 360 * GB),
}
#: The measured H200 (141 GB, 4.8 TB/s, same FLOPs), used only to cross-check calibration.
H200: Final = GpuSpec("H200-141GB", 143771 / 1024, 4800 * GB, 989e12, 64 * GB, 8e-6, 360 * GB)

#: Tensor-parallel degree per (model, GPU); a pair absent here is not shipped.
#: mistral-7b fits one card everywhere. vicuna-13b: 26 GB of weights exceed an A10, TP=2
#: leaves ~17k KV tokens (four full 4k contexts). llama-70b: 138 GB of weights; on
#: A100/H100 TP=2 fits but leaves ~40k KV tokens (a batch of ~40 at 1k context), TP=4 is
#: the usual deployment; on A10 only TP=8 fits (an 8×A10 host), shipped but slow because
#: its all-reduces cross PCIe.
TENSOR_PARALLEL: Final[dict[tuple[str, str], int]] = {
    ("mistral-7b", "A10-24GB"): 1,
    ("mistral-7b", "A100-80GB"): 1,
    ("mistral-7b", "H100-80GB"): 1,
    ("vicuna-13b", "A10-24GB"): 2,
    ("vicuna-13b", "A100-80GB"): 1,
    ("vicuna-13b", "H100-80GB"): 1,
    ("llama-70b", "A10-24GB"): 8,
    ("llama-70b", "A100-80GB"): 4,
    ("llama-70b", "H100-80GB"): 4,
}


# ------------------------------------------------------------------ formulas
def _allreduce_s(gpu: GpuSpec, num_gpus: int, message_bytes: float) -> float:
    """One ring all-reduce of ``message_bytes`` over ``num_gpus`` cards (0 when k = 1)."""
    if num_gpus == 1:
        return 0.0
    ring = 2.0 * (num_gpus - 1) / num_gpus
    return gpu.allreduce_latency_s + message_bytes * ring / gpu.allreduce_bus_bytes_per_s


def decode_base_s(model: ModelShape, gpu: GpuSpec, num_gpus: int) -> float:
    bandwidth = gpu.bandwidth_bytes_per_s * DECODE_BANDWIDTH_EFFICIENCY
    weights = model.weight_bytes / num_gpus / bandwidth
    comm = 2 * model.num_layers * _allreduce_s(gpu, num_gpus, 0.0)
    return weights + DECODE_STEP_OVERHEAD_S + comm


def decode_per_seq_s(model: ModelShape, gpu: GpuSpec, num_gpus: int) -> float:
    compute = DECODE_EXPOSED_COMPUTE * 2.0 * model.num_params / num_gpus / gpu.bf16_flops
    comm = 0.0
    if num_gpus > 1:  # bandwidth part of the all-reduces grows with the batch
        row = model.hidden_size * model.dtype_bytes
        comm = 2 * model.num_layers * (_allreduce_s(gpu, num_gpus, row) - gpu.allreduce_latency_s)
    return compute + comm


def decode_per_ctx_token_s(model: ModelShape, gpu: GpuSpec, num_gpus: int) -> float:
    per_gpu = model.kv_bytes_per_token / num_gpus
    return per_gpu / (gpu.bandwidth_bytes_per_s * DECODE_BANDWIDTH_EFFICIENCY)


def decode_step_s(model: ModelShape, gpu: GpuSpec, num_gpus: int, batch: int,
                  ctx_tokens: int) -> float:
    return (decode_base_s(model, gpu, num_gpus) + decode_per_seq_s(model, gpu, num_gpus) * batch
            + decode_per_ctx_token_s(model, gpu, num_gpus) * ctx_tokens)


def prefill_s(model: ModelShape, gpu: GpuSpec, num_gpus: int, prompt_tokens: int,
              num_prompts: int = 1) -> float:
    """Seconds to prefill ``num_prompts`` prompts of ``prompt_tokens`` each in one batch."""
    flops = num_prompts * model.prefill_flops(prompt_tokens) / num_gpus
    compute = flops / (gpu.bf16_flops * PREFILL_FLOPS_EFFICIENCY)
    activations = num_prompts * prompt_tokens * model.hidden_size * model.dtype_bytes
    comm = 2 * model.num_layers * _allreduce_s(gpu, num_gpus, activations)
    return PREFILL_OVERHEAD_S + compute + comm


def activation_reserve_bytes(model: ModelShape) -> float:
    peak = MAX_NUM_BATCHED_TOKENS * model.hidden_size * ACTIVATION_BYTES_PER_TOKEN_HIDDEN
    return ACTIVATION_RESERVE_FIXED_GIB * GIB + peak


def kv_capacity_tokens(model: ModelShape, gpu: GpuSpec, num_gpus: int) -> int:
    """KV-cache tokens left once weights and the activation reserve are placed (may be <= 0)."""
    usable = gpu.memory_gib * GIB * GPU_MEMORY_UTILIZATION * num_gpus
    free = usable - model.weight_bytes - num_gpus * activation_reserve_bytes(model)
    return int(free // model.kv_bytes_per_token)


def wake_s(model: ModelShape, gpu: GpuSpec, num_gpus: int) -> float:
    per_gpu = model.weight_bytes / num_gpus
    return SWAP_FIXED_S + per_gpu / (gpu.pcie_bytes_per_s * WAKE_PCIE_EFFICIENCY)


def sleep_s(model: ModelShape, gpu: GpuSpec, num_gpus: int) -> float:
    per_gpu = model.weight_bytes / num_gpus
    return SWAP_FIXED_S + per_gpu / (gpu.pcie_bytes_per_s * SLEEP_PCIE_EFFICIENCY)


def cold_load_s(model: ModelShape, num_gpus: int) -> float:
    extra = TP_COLD_START_EXTRA_S if num_gpus > 1 else 0.0
    return COLD_START_FIXED_S + model.weight_bytes / DISK_READ_BYTES_PER_S + extra


# ------------------------------------------------------------------ profiles
def roofline_profile(model: ModelShape, gpu: GpuSpec, num_gpus: int,
                     prefill_points: Sequence[int] = PREFILL_POINTS) -> PerfProfile:
    """The modelled profile of ``model`` on ``num_gpus`` cards of ``gpu``.

    Raises InvalidInput(``num_gpus``) when the weights leave no room for a single
    full-length context.
    """
    if num_gpus <= 0 or model.num_kv_heads % num_gpus:
        raise InvalidInput("num_gpus",
                           f"{num_gpus} must be > 0 and divide {model.num_kv_heads} KV heads")
    capacity = kv_capacity_tokens(model, gpu, num_gpus)
    if capacity < 2048:
        raise InvalidInput("num_gpus", f"{model.name} on {num_gpus}×{gpu.name} leaves "
                           f"{capacity} KV tokens; use more GPUs")
    return PerfProfile(
        model=model.name,
        gpu=gpu.name,
        num_gpus=num_gpus,
        prefill_tokens=tuple(prefill_points),
        prefill_seconds=tuple(round(prefill_s(model, gpu, num_gpus, n), 6) for n in prefill_points),
        decode_base_s=round(decode_base_s(model, gpu, num_gpus), 9),
        decode_per_seq_s=round(decode_per_seq_s(model, gpu, num_gpus), 12),
        decode_per_ctx_token_s=round(decode_per_ctx_token_s(model, gpu, num_gpus), 15),
        kv_capacity_tokens=capacity,
        max_batch_size=MAX_BATCH_SIZE,
        max_model_len=min(model.max_model_len, capacity),
        sleep_s=round(sleep_s(model, gpu, num_gpus), 4),
        wake_s=round(wake_s(model, gpu, num_gpus), 4),
        cold_load_s=round(cold_load_s(model, num_gpus), 2),
        source=(f"roofline (H100-calibrated: decode bw eff {DECODE_BANDWIDTH_EFFICIENCY}, "
                f"prefill flops eff {PREFILL_FLOPS_EFFICIENCY}; docs/profiles.md)"),
        notes={
            "tensor_parallel": num_gpus,
            "weight_gb": round(model.weight_bytes / GB, 2),
            "kv_bytes_per_token": model.kv_bytes_per_token,
            "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
            "native_max_model_len": model.max_model_len,
        },
    )


def shipped_profiles() -> tuple[PerfProfile, ...]:
    """Every (model, GPU) pair of :data:`TENSOR_PARALLEL`, in a stable order."""
    return tuple(
        roofline_profile(MODELS[model], GPUS[gpu], num_gpus)
        for (model, gpu), num_gpus in sorted(TENSOR_PARALLEL.items())
    )


# ------------------------------------------------------------------ calibration
#: vLLM 0.25.0, dummy Llama-3-8B shape, bf16, CUDA graphs, 512 prompt + 128 output tokens:
#: (batch, measured decode ms/step, measured time to first token of the batch in s).
H100_MEASURED: Final = (
    (1, 6.512, 0.0164), (8, 6.817, 0.0973), (32, 7.516, 0.379), (128, 11.178, 1.5005))
H200_MEASURED: Final = (
    (1, 4.933, 0.0158), (8, 5.192, 0.0967), (32, 5.843, 0.3819), (128, 8.918, 1.5249))
CALIBRATION_PROMPT_TOKENS: Final = 512
CALIBRATION_OUTPUT_TOKENS: Final = 128


@dataclass(frozen=True, slots=True)
class CalibrationRow:
    what: str
    batch: int
    measured_s: float
    modelled_s: float

    @property
    def error(self) -> float:
        """Relative error of the model, (modelled − measured) / measured."""
        return self.modelled_s / self.measured_s - 1.0


def calibration_rows(gpu: GpuSpec, measured: Sequence[tuple[int, float, float]]
                     ) -> tuple[CalibrationRow, ...]:
    """Modelled vs measured decode step and batch prefill of the Llama-3-8B shape."""
    mean_ctx = CALIBRATION_PROMPT_TOKENS + CALIBRATION_OUTPUT_TOKENS / 2
    rows: list[CalibrationRow] = []
    for batch, step_ms, ttft_s in measured:
        step = decode_step_s(LLAMA3_8B, gpu, 1, batch, int(batch * mean_ctx))
        rows.append(CalibrationRow("decode step", batch, step_ms / 1000, step))
        fill = prefill_s(LLAMA3_8B, gpu, 1, CALIBRATION_PROMPT_TOKENS, num_prompts=batch)
        rows.append(CalibrationRow("prefill", batch, ttft_s, fill))
    return tuple(rows)


#: Steady-state sleep-mode swaps measured on the H100: (model, what, measured seconds).
H100_SWAP_MEASURED: Final = (
    (LLAMA3_8B, "wake", 0.434),
    (QWEN25_1_5B, "wake", 0.129),
    (LLAMA3_8B, "sleep", 0.332),
    (LLAMA3_8B, "wake (first, single engine)", 0.568),
)


def swap_calibration_rows() -> tuple[CalibrationRow, ...]:
    h100 = GPUS["H100-80GB"]
    rows = []
    for model, what, measured in H100_SWAP_MEASURED:
        modelled = sleep_s(model, h100, 1) if what == "sleep" else wake_s(model, h100, 1)
        rows.append(CalibrationRow(f"{what} {model.name}", 1, measured, modelled))
    return tuple(rows)
