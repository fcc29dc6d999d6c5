"""How a qlm client authenticates to Kafka: SASL (SCRAM-SHA-512 or PLAIN), optionally TLS.

:class:`KafkaAuth` holds it once; :meth:`KafkaAuth.client_options` are the keyword
arguments every aiokafka client of qlm (producer, consumers, admin, probes) takes. The
services build it from ``QLM_KAFKA_SECURITY_PROTOCOL``, ``QLM_KAFKA_SASL_MECHANISM``,
``QLM_KAFKA_SASL_USERNAME`` and ``QLM_KAFKA_SASL_PASSWORD`` (``services/common/settings``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from qlm.core.errors import InvalidInput

SecurityProtocol = Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"]
SASL_MECHANISMS: Final = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")


@dataclass(frozen=True, slots=True)
class KafkaAuth:
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: str | None = None
    username: str | None = None
    password: str | None = None
    ssl_cafile: str | None = None

    def __post_init__(self) -> None:
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism not in SASL_MECHANISMS:
                raise InvalidInput("kafka_sasl_mechanism",
                                   f"must be one of {', '.join(SASL_MECHANISMS)} with "
                                   f"{self.security_protocol}, got {self.sasl_mechanism!r}")
            if not self.username or not self.password:
                raise InvalidInput("kafka_sasl_username", f"{self.security_protocol} needs a "
                                   "user name and a password")

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for aiokafka's clients."""
        options: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.security_protocol.startswith("SASL"):
            options.update(sasl_mechanism=self.sasl_mechanism,
                           sasl_plain_username=self.username, sasl_plain_password=self.password)
        if self.security_protocol.endswith("SSL"):
            from aiokafka.helpers import create_ssl_context

            options["ssl_context"] = create_ssl_context(cafile=self.ssl_cafile)
        return options


PLAINTEXT: Final = KafkaAuth()
