"""The worker service's settings: flags over ``QLM_*`` environment variables over defaults.

Shared settings and the loader: :mod:`services.common.settings`; reference: docs/config.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator

from services.common.settings import CommonSettings


class WorkerSettings(CommonSettings):
    """A worker service: one worker per GPU (flags), or several simulated ones (a file).

    Either ``worker_id`` + ``gpu`` + ``models`` (the first model is awake at start) or
    ``workers_file`` (YAML ``{"workers": [{id, gpu, models: [...]}, ...]}``; a model is a
    name or ``{name, path, engine_args}``, see :mod:`qlm.roster`): every worker of the file
    runs in this process, or only ``worker_id``'s when given (the vLLM engine runs one).
    """

    engine: Literal["sim", "vllm"] = Field("sim", description="sim (no GPU) or vllm")
    worker_id: str | None = Field(None, min_length=1, max_length=128)
    gpu: str | None = Field(None, min_length=1, description="GPU type, as in the profiles")
    models: list[str] = Field(default_factory=list, description="models held, first awake")
    workers_file: Path | None = Field(
        None, description="YAML list of workers {id, gpu, models}; a model may name its "
        "checkpoint directory (path) and vLLM engine_args"
    )
    profiles_dir: Path | None = Field(None, description="performance profiles directory")
    time_scale: float = Field(1.0, gt=0, description="simulated engine: x times faster")
    host: str = Field("127.0.0.1", description="listen address of health and metrics")
    health_port: int = Field(50061, ge=0, le=65535, description="grpc.health.v1 (0 = any)")
    metrics_port: int = Field(9461, ge=0, le=65535, description="Prometheus (0 = any)")
    lease_s: float = Field(15.0, gt=0, description="lease of a pulled request")
    renew_interval_s: float = Field(1.0, gt=0, description="lease renewal / cancel check")
    pull_interval_s: float = Field(0.005, gt=0, description="queue poll period when idle")
    wake_on_enqueue: bool = Field(
        True, description="wake idle workers by Redis keyspace notifications (CONFIG SET)"
    )
    telemetry_interval_s: float = Field(1.0, gt=0, description="qlm.telemetry period")
    expected_output_tokens: int = Field(338, gt=0, description="KV reservation per request")
    prefill_cap_tokens: int = Field(
        16384, ge=0,
        description="pull no more while this many prompt tokens wait for prefill (0 = no cap)",
    )
    max_prefill_tokens: int = Field(8192, gt=0, description="simulated engine prefill budget")
    shutdown_grace_s: float = Field(10.0, ge=0, description="finish in-flight work on SIGTERM")
    lso_group: str | None = Field(None, description="Kafka group of the qlm.lso reader")
    vllm_model_dir: Path = Field(
        Path("/tmp/qlm-models"), description="<dir>/<model>: the checkpoint of a model the "
        "workers file gives no path (or the config.json written for a known shape)"
    )
    vllm_gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="share of the GPU per model (default 0.85 / models)"
    )
    vllm_max_model_len: int | None = Field(None, gt=0)
    vllm_enforce_eager: bool = Field(False, description="no CUDA graphs (faster start)")
    vllm_load_format: str | None = Field(
        None, min_length=1, description="vLLM load_format of every model (default: vLLM's, "
        "the checkpoint's weights; 'dummy': random weights of its shape, for benchmarks)"
    )

    @model_validator(mode="after")
    def _one_way_to_name_workers(self) -> Self:
        if self.workers_file is not None:
            if self.gpu or self.models:
                raise ValueError("give either workers_file (worker_id picks one of its workers) "
                                 "or gpu/models, not both")
        elif not (self.worker_id and self.gpu and self.models):
            raise ValueError("worker_id, gpu and models are required without workers_file")
        if len(set(self.models)) != len(self.models):
            raise ValueError("models: a model appears twice")
        return self
