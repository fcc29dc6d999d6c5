"""The ingest service's settings: flags over ``QLM_*`` environment variables over defaults.

Shared settings and the loader: :mod:`services.common.settings`; reference: docs/config.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator

from qlm.core.errors import InvalidInput
from services.common.settings import MIB, CommonSettings


class IngestSettings(CommonSettings):
    """The ingest service: gRPC and OpenAI-compatible HTTP front doors, Kafka batch consumer."""

    host: str = Field(
        "127.0.0.1", description="gRPC listen address (0.0.0.0: every interface, e.g. in a "
        "container)"
    )
    auth: Literal["required", "off"] = Field(
        "required", description="required: every QueueManager call needs "
        "'authorization: Bearer <API key>' (qlm tenants add) and sees only its tenant's "
        "requests, and batch records must be signed; off: one trust domain, no keys"
    )
    auth_cache_s: float = Field(
        5.0, ge=0, description="how long an API key's tenant is cached (a revoked key "
        "works at most this long)"
    )
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
    parked_retry_s: float = Field(
        1.0, gt=0, description="how often batch records parked over their tenant's quota "
        "are tried again (docs/security.md#quotas)"
    )
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
    served_models_timeout_s: float = Field(
        10.0, ge=0, description="a submit for a model no live worker holds (worker telemetry; "
        "liveness: worker_timeout_s) is refused (FAILED_PRECONDITION / DLQ) and ListModels "
        "leaves it out; until the first worker report, for at most this many seconds after "
        "the start, nothing is refused (0 = no check)"
    )
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
    http_tls: bool = Field(
        True, description="serve the HTTP front door over TLS with the gRPC listener's "
        "tls_cert_file / tls_key_file (and mTLS with tls_client_ca_file) when they are set; "
        "false: plain HTTP (only behind a TLS-terminating proxy on a private network)"
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
        from services.ingest.plane import AdmissionRules  # late: the plane is heavier

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
