"""The estimator service's settings: flags over ``QLM_*`` environment variables over defaults.

Shared settings and the loader: :mod:`services.common.settings`; reference: docs/config.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from services.common.settings import CommonSettings


class EstimatorSettings(CommonSettings):
    """The estimator service: RWT estimator behind gRPC, corrected online from telemetry."""

    host: str = Field("127.0.0.1", description="gRPC listen address (0.0.0.0: every interface)")
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
    policy: Literal["qlm", "fcfs", "edf", "shepherd", "priority", "static", "vllm-swap"] = Field(
        "qlm", description="the scheduler's policy: which queued groups stay ahead of a new one"
    )
    shutdown_grace_s: float = Field(5.0, ge=0, description="drain time on SIGTERM")
