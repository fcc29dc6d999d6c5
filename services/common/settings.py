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
from typing import TypeVar

from pydantic import Field, ValidationError
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
