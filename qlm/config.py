"""Service configuration: command-line flags over ``QLM_*`` environment variables over defaults.

Every setting is validated when loaded; a bad value stops the service at start with a
message naming the setting. Flags are the field names in kebab case
(``--redis-url``), environment variables the upper-case names with the ``QLM_`` prefix
(``QLM_REDIS_URL``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Self, TypeVar

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

    @model_validator(mode="after")
    def _prompt_fits_in_a_message(self) -> Self:
        if self.max_prompt_bytes >= self.max_message_bytes:
            raise ValueError("max_prompt_bytes must be smaller than max_message_bytes")
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
