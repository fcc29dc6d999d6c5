"""Service configuration: command-line flags over ``QLM_*`` environment variables over defaults.

Every setting is validated when loaded; a bad value stops the service at start with a
message naming the setting. Flags are the field names in kebab case
(``--redis-url``), environment variables the upper-case names with the ``QLM_`` prefix
(``QLM_REDIS_URL``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from qlm.core.errors import InvalidInput

MIB = 1024 * 1024
S = TypeVar("S", bound=BaseSettings)


class CommonSettings(BaseSettings):
    """Settings every service shares: where Redis and Kafka are, logging."""

    model_config = SettingsConfigDict(env_prefix="QLM_", extra="forbid")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis server URL")
    key_prefix: str = Field("qlm:", min_length=1, description="prefix of every Redis key")
    kafka_bootstrap: str = Field("127.0.0.1:9092", min_length=1, description="Kafka brokers")
    topic_prefix: str = Field("", description="prefix of every Kafka topic (empty in production)")
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")
    log_json: bool = Field(True, description="JSON log lines (false: human-readable console)")


class IngestSettings(CommonSettings):
    """The ingest service: gRPC front door and Kafka batch consumer."""

    host: str = Field("0.0.0.0", description="gRPC listen address")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free one)")
    models_file: Path | None = Field(
        None, description="YAML/JSON list of served models and their max_model_len; "
        "default: the models of the performance profiles"
    )
    profiles_dir: Path | None = Field(None, description="performance profiles directory")
    max_message_bytes: int = Field(
        8 * MIB, gt=0, description="largest gRPC message accepted (transport limit)"
    )
    max_prompt_bytes: int = Field(
        1 * MIB, gt=0, description="largest prompt text, UTF-8 bytes (larger: INVALID_ARGUMENT)"
    )
    group_window_s: float = Field(5.0, gt=0, description="request-group window (seconds)")
    shutdown_grace_s: float = Field(10.0, ge=0, description="drain time on SIGTERM")
    batch_consumer: bool = Field(True, description="run the qlm.batch.requests consumer")
    consumer_group: str = Field("qlm-ingest", min_length=1)
    serve_grpc: bool = Field(True, description="serve the gRPC API")
    processes: int = Field(
        1, ge=1, le=64,
        description="ingest processes sharing --port (SO_REUSEPORT; needs a fixed port); each "
        "is also a member of the batch consumer group",
    )
    event_linger_ms: int = Field(
        50, ge=0, le=1000,
        description="how long the producer gathers admitted events into one batch "
        "(submits do not wait for it)",
    )
    metrics_port: int = Field(
        9460, ge=0, le=65535, description="Prometheus (0 = any); with --processes N, "
        "process i serves on metrics_port + i"
    )
    serve_metrics: bool = Field(True, description="serve Prometheus metrics over HTTP")
    queue_depth_interval_s: float = Field(
        5.0, gt=0, description="how often the queue-depth gauge is re-read from Redis"
    )

    http_port: int | None = Field(
        None, ge=0, le=65535, description="port of the OpenAI-compatible HTTP front door "
        "(/v1/chat/completions, /v1/batches, ...); unset: not served; 0 = pick a free one"
    )
    http_host: str = Field(
        "127.0.0.1", description="listen address of the HTTP front door (0.0.0.0 to publish)"
    )
    http_api_key: str | None = Field(
        None, min_length=1, description="when set, HTTP calls need 'Authorization: Bearer "
        "<key>' (else 401)"
    )
    http_default_max_tokens: int = Field(
        256, gt=0, description="max_tokens of an HTTP request that gives neither max_tokens "
        "nor max_completion_tokens"
    )
    http_max_file_bytes: int = Field(
        64 * MIB, gt=0, description="largest file POST /v1/files accepts (batch input JSONL)"
    )
    batch_poll_interval_s: float = Field(
        0.5, gt=0, description="how often the Batch API driver moves batches forward"
    )
    worker_timeout_s: float = Field(
        10.0, ge=0, description="GET /v1/models: a worker silent this long serves nothing "
        "(0 = never)"
    )

    estimator_addr: str | None = Field(
        None, description="estimator service host:port for predicted waits and admission; "
        "unset: the estimator in process over workers_file (or no prediction without it)"
    )
    estimator_timeout_s: float = Field(
        0.25, gt=0, description="PredictWait deadline; past it the request is admitted"
    )
    admission: str = Field(
        "interactive=reject", description="per class: reject (when the estimator says the "
        "SLO cannot be met) or queue, e.g. 'interactive=reject,custom=queue'"
    )
    admission_min_p: float = Field(
        0.05, ge=0, le=1, description="in-process estimator: admit when P(meet SLO) >= this"
    )
    workers_file: Path | None = Field(
        None, description="in-process estimator: YAML list of workers {id, gpu, models}"
    )

    @model_validator(mode="after")
    def _admission_rules_parse(self) -> Self:
        from qlm.ingest import AdmissionRules  # late: qlm.ingest is heavier than settings

        try:
            AdmissionRules.parse(self.admission)
        except InvalidInput as error:
            raise ValueError(str(error)) from None
        return self

    @model_validator(mode="after")
    def _prompt_fits_in_a_message(self) -> Self:
        if self.max_prompt_bytes >= self.max_message_bytes:
            raise ValueError("max_prompt_bytes must be smaller than max_message_bytes")
        return self



class EstimatorSettings(CommonSettings):
    """The estimator service: RWT estimator behind gRPC, corrected online from telemetry."""

    host: str = Field("0.0.0.0", description="gRPC listen address")
    port: int = Field(50052, ge=0, le=65535, description="gRPC port (0 = pick a free one)")
    metrics_port: int = Field(9463, ge=0, le=65535, description="Prometheus (0 = any)")
    serve_metrics: bool = Field(True, description="serve Prometheus metrics over HTTP")
    profiles_dir: Path | None = Field(None, description="performance profiles directory")
    workers_file: Path | None = Field(
        None, description="YAML list of workers {id, gpu, models}; others join by telemetry"
    )
    worker_timeout_s: float = Field(
        10.0, ge=0, description="a worker silent this long is gone (0 = never)"
    )
    refresh_interval_s: float = Field(
        1.0, gt=0, description="how often the queue view is re-read from Redis"
    )
    admission_min_p: float = Field(
        0.05, ge=0, le=1, description="admit when P(meet SLO) at the best place >= this"
    )
    policy: Literal["qlm", "fcfs", "edf", "shepherd", "priority"] = Field(
        "qlm", description="the scheduler's policy: which queued groups stay ahead of a new one"
    )
    shutdown_grace_s: float = Field(5.0, ge=0, description="drain time on SIGTERM")


class SchedulerSettings(CommonSettings):
    """The scheduler service: one leader (Redis lease) runs the policy; standbys wait."""

    policy: Literal["qlm", "fcfs", "edf", "shepherd", "priority"] = Field(
        "qlm", description="scheduling policy"
    )
    policy_options: dict[str, Any] = Field(
        default_factory=dict, description="policy options (JSON object)"
    )
    instance_id: str | None = Field(
        None, min_length=1, max_length=128, description="lease owner name (default host-pid)"
    )
    tick_s: float = Field(1.0, gt=0, description="decide at least this often (seconds)")
    debounce_s: float = Field(
        0.1, ge=0, description="after an event, wait this long for more before deciding"
    )
    lease_ttl_s: float = Field(3.0, gt=0, description="leader lease time to live")
    lease_renew_s: float = Field(1.0, gt=0, description="leader renews this often")
    lease_margin_s: float = Field(
        0.5, ge=0, description="the leader stops applying this long before its lease ends"
    )
    command_cooldown_s: float = Field(
        5.0, ge=0, description="do not repeat the same evict/swap command within this time"
    )
    online_correction: bool = Field(
        False, description="plan with profiles corrected by qlm.telemetry (as the estimator)"
    )
    correction_min_change: float = Field(
        0.1, ge=0, description="rebuild the corrected profiles when a factor moves this much"
    )
    profiles_dir: Path | None = Field(None, description="performance profiles directory")
    workers_file: Path | None = Field(
        None, description="YAML list of workers {id, gpu, models}; others join by telemetry"
    )
    worker_timeout_s: float = Field(
        10.0, ge=0, description="a worker silent this long gets no work (0 = never)"
    )
    host: str = Field("0.0.0.0", description="listen address of metrics")
    metrics_port: int = Field(9462, ge=0, le=65535, description="Prometheus (0 = any)")
    serve_metrics: bool = Field(True, description="serve Prometheus metrics over HTTP")

    @model_validator(mode="after")
    def _renew_within_lease(self) -> Self:
        if self.lease_renew_s + self.lease_margin_s >= self.lease_ttl_s:
            raise ValueError("lease_renew_s + lease_margin_s must be < lease_ttl_s")
        return self


class WorkerSettings(CommonSettings):
    """A worker service: one worker per GPU (flags), or several simulated ones (a file).

    Either ``worker_id`` + ``gpu`` + ``models`` (the first model is awake at start) or
    ``workers_file`` (YAML ``{"workers": [{id, gpu, models: [...]}, ...]}``, all run in
    this process; simulated engine only).
    """

    engine: Literal["sim", "vllm"] = Field("sim", description="sim (no GPU) or vllm")
    worker_id: str | None = Field(None, min_length=1, max_length=128)
    gpu: str | None = Field(None, min_length=1, description="GPU type, as in the profiles")
    models: list[str] = Field(default_factory=list, description="models held, first awake")
    workers_file: Path | None = Field(None, description="YAML list of simulated workers")
    profiles_dir: Path | None = Field(None, description="performance profiles directory")
    time_scale: float = Field(1.0, gt=0, description="simulated engine: x times faster")
    host: str = Field("0.0.0.0", description="listen address of health and metrics")
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
    vllm_model_dir: Path = Field(Path("/tmp/qlm-models"), description="config.json per model")
    vllm_gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="share of the GPU per model (default 0.85 / models)"
    )
    vllm_max_model_len: int | None = Field(None, gt=0)
    vllm_enforce_eager: bool = Field(False, description="no CUDA graphs (faster start)")
    vllm_load_format: str = Field("dummy", description="dummy: random weights of the shape")

    @model_validator(mode="after")
    def _one_way_to_name_workers(self) -> Self:
        if self.workers_file is not None:
            if self.worker_id or self.gpu or self.models:
                raise ValueError("give either workers_file or worker_id/gpu/models, not both")
            if self.engine != "sim":
                raise ValueError("workers_file runs simulated workers only (engine sim)")
        elif not (self.worker_id and self.gpu and self.models):
            raise ValueError("worker_id, gpu and models are required without workers_file")
        if len(set(self.models)) != len(self.models):
            raise ValueError("models: a model appears twice")
        return self


def load_settings(cls: type[S], argv: Sequence[str] | None = None) -> S:
    """Settings of ``cls`` from ``argv`` flags (none when None), env and defaults.

    Raises InvalidInput naming the first bad setting.
    """
    try:
        return cls(_cli_parse_args=list(argv) if argv is not None else False,
                   _cli_kebab_case=True, _cli_prog_name="qlm")
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "settings"
        problem = str(error["msg"]).removeprefix("Value error, ")
        raise InvalidInput(where, problem) from None
