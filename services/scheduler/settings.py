"""The scheduler service's settings: flags over ``QLM_*`` environment variables over defaults.

Shared settings and the loader: :mod:`services.common.settings`; reference: docs/config.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, model_validator

from qlm.core.policies.base import check_policy_options
from services.common.settings import CommonSettings


class SchedulerSettings(CommonSettings):
    """The scheduler service: one leader (Redis lease) runs the policy; standbys wait."""

    policy: Literal["qlm", "fcfs", "edf", "shepherd", "priority", "static", "vllm-swap"] = Field(
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
        0.02, ge=0, description="after an event, wait this long for more before deciding"
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
    gc_freeze_records: int = Field(
        10_000, ge=0, description="gc.freeze() after a step once the snapshots have read this "
        "many queued requests since the last (0 = never): the queue held in memory is kept "
        "out of the garbage collector's full passes"
    )
    policy_state_interval_s: float = Field(
        2.0, gt=0, description="the leader saves its policy's state (qlm: fair-share "
        "counters) to Redis at most this often (seconds); a new leader restores it"
    )
    log_worker_state: bool = Field(
        False, description="log each applied decision's view of every busy worker "
        "(running requests by class, KV reserved, its lane's head, the evictions sent): "
        "for reading why a run missed, one line per worker and decision"
    )
    host: str = Field("127.0.0.1", description="listen address of metrics")
    metrics_port: int = Field(9462, ge=0, le=65535, description="Prometheus (0 = any)")
    serve_metrics: bool = Field(True, description="serve Prometheus metrics over HTTP")

    @model_validator(mode="after")
    def _options_of_the_policy(self) -> Self:
        check_policy_options(self.policy, self.policy_options)  # names the bad option
        return self

    @model_validator(mode="after")
    def _renew_within_lease(self) -> Self:
        if self.lease_renew_s + self.lease_margin_s >= self.lease_ttl_s:
            raise ValueError("lease_renew_s + lease_margin_s must be < lease_ttl_s")
        return self
