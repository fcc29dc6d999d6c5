"""Service configuration: command-line flags over ``QLM_*`` environment variables over defaults.

The settings every service shares (:class:`CommonSettings`) and the one loader
(:func:`load_settings`); each service's own settings class is in its ``settings`` module
(``services/<name>/settings.py``).

Every setting is validated when loaded; a bad value stops the service at start with a
message naming the setting. Flags are the field names in kebab case
(``--redis-url``), environment variables the upper-case names with the ``QLM_`` prefix
(``QLM_REDIS_URL``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self, TypeVar

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from qlm.bus.topics import TopicLayout
from qlm.core.errors import InvalidInput

MIB = 1024 * 1024
S = TypeVar("S", bound=BaseSettings)


class CommonSettings(BaseSettings):
    """Settings every service shares: where Redis and Kafka are, logging."""

    model_config = SettingsConfigDict(env_prefix="QLM_", extra="forbid")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis URL: redis://host:port/db, or redis+cluster://host:port (any node "
        "of a Redis Cluster)",
    )
    key_prefix: str = Field(
        "qlm:", min_length=1,
        description="prefix of every Redis key, and their hash tag: {qlm:}req:<id>",
    )
    kafka_bootstrap: str = Field("127.0.0.1:9092", min_length=1, description="Kafka brokers")
    topic_prefix: str = Field("", description="prefix of every Kafka topic (empty in production)")
    kafka_replication_factor: int = Field(
        1, ge=1, le=16, description="replicas of each qlm topic it creates (3 on a cluster)"
    )
    kafka_min_insync_replicas: int | None = Field(
        None, ge=1, description="min.insync.replicas of each topic (acks=all waits for "
        "them); default: a majority from 3 replicas on, else 1"
    )
    kafka_partitions: dict[str, int] = Field(
        default_factory=dict, description="partitions per topic, overriding the defaults "
        "(JSON object, e.g. {\"qlm.batch.requests\": 12})"
    )
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")
    log_json: bool = Field(True, description="JSON log lines (false: human-readable console)")

    @model_validator(mode="after")
    def _topic_layout_is_valid(self) -> Self:
        try:
            self.topic_layout()
        except InvalidInput as error:
            raise ValueError(f"kafka_{error.field}: {error.problem}") from None
        return self

    def topic_layout(self) -> TopicLayout:
        """Partitions and replication of the topics this deployment creates."""
        return TopicLayout(
            replication_factor=self.kafka_replication_factor,
            partitions=dict(self.kafka_partitions),
            min_insync_replicas=self.kafka_min_insync_replicas,
        )


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
