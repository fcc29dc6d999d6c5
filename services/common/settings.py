"""Service configuration: command-line flags over ``QLM_*`` environment variables over defaults.

The settings every service shares (:class:`CommonSettings`) and the one loader
(:func:`load_settings`); each service's own settings class is in its ``settings`` module
(``services/<name>/settings.py``).

Every setting is validated when loaded; a bad value stops the service at start with a
message naming the setting. Flags are the field names in kebab case
(``--redis-url``), environment variables the upper-case names with the ``QLM_`` prefix
(``QLM_REDIS_URL``); files of ``QLM_SECRETS_DIR`` come after both (:func:`load_settings`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Self, TypeVar

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from qlm.bus.security import KafkaAuth
from qlm.bus.topics import TopicLayout
from qlm.core.errors import InvalidInput

MIB = 1024 * 1024
#: Environment variable naming a directory of settings files (:func:`load_settings`).
SECRETS_DIR_ENV = "QLM_SECRETS_DIR"
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
    kafka_security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="how this service connects to Kafka (SASL_*: with "
        "kafka_sasl_mechanism, kafka_sasl_username, kafka_sasl_password)"
    )
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism"
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user (Kafka principal)")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password")
    kafka_ssl_cafile: Path | None = Field(None, description="SASL_SSL: CA (PEM) of the brokers")
    kafka_partitions: dict[str, int] = Field(
        default_factory=dict, description="partitions per topic, overriding the defaults "
        "(JSON object, e.g. {\"qlm.batch.requests\": 12})"
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate of this service's listeners: gRPC, and ingest's "
        "HTTP front door (with tls_key_file: TLS on; unset: plaintext)"
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file")
    tls_client_ca_file: Path | None = Field(
        None, description="mTLS: require client certificates signed by this CA (PEM)"
    )
    tls_ca_file: Path | None = Field(
        None, description="CA (PEM) this service trusts when it calls another qlm service "
        "over gRPC (set: TLS to it)"
    )
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")
    log_json: bool = Field(True, description="JSON log lines (false: human-readable console)")

    @model_validator(mode="after")
    def _tls_files_pair(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self

    @model_validator(mode="after")
    def _topic_layout_is_valid(self) -> Self:
        try:
            self.topic_layout()
        except InvalidInput as error:
            raise ValueError(f"kafka_{error.field}: {error.problem}") from None
        return self

    @model_validator(mode="after")
    def _kafka_auth_is_complete(self) -> Self:
        try:
            self.kafka_auth()
        except InvalidInput as error:
            raise ValueError(str(error)) from None
        return self

    def kafka_auth(self) -> KafkaAuth:
        """How this service's Kafka clients authenticate (qlm.bus.security)."""
        password = self.kafka_sasl_password
        return KafkaAuth(
            self.kafka_security_protocol, self.kafka_sasl_mechanism, self.kafka_sasl_username,
            password.get_secret_value() if password is not None else None,
            str(self.kafka_ssl_cafile) if self.kafka_ssl_cafile is not None else None,
        )

    def topic_layout(self) -> TopicLayout:
        """Partitions and replication of the topics this deployment creates."""
        return TopicLayout(
            replication_factor=self.kafka_replication_factor,
            partitions=dict(self.kafka_partitions),
            min_insync_replicas=self.kafka_min_insync_replicas,
        )


def load_settings(cls: type[S], argv: Sequence[str] | None = None) -> S:
    """Settings of ``cls`` from ``argv`` flags (none when None), env, the files of
    ``QLM_SECRETS_DIR`` and defaults.

    ``QLM_SECRETS_DIR`` (a directory): one file per setting, named as its environment
    variable (``QLM_REDIS_URL``, ``QLM_KAFKA_SASL_PASSWORD``), its content the value; how
    containers get their passwords without putting them in the environment or on a
    command line (:mod:`qlm.localstack.credentials` writes them). Flags and environment
    variables win over these files.

    Raises InvalidInput naming the first bad setting.
    """
    secrets_dir = os.environ.get(SECRETS_DIR_ENV) or None
    if secrets_dir is not None and not Path(secrets_dir).is_dir():
        raise InvalidInput(SECRETS_DIR_ENV, f"{secrets_dir} is not a directory")
    try:
        return cls(_cli_parse_args=list(argv) if argv is not None else False,
                   _cli_kebab_case=True, _cli_prog_name="qlm", _secrets_dir=secrets_dir)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "settings"
        problem = str(error["msg"]).removeprefix("Value error, ")
        raise InvalidInput(where, problem) from None
