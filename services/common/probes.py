"""Health probes the services share."""

from __future__ import annotations

from aiokafka import AIOKafkaClient

from qlm.bus.security import PLAINTEXT, KafkaAuth


async def kafka_answers(bootstrap_servers: str, auth: KafkaAuth = PLAINTEXT) -> bool:
    """Whether a broker answers a metadata request (health probe)."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=2000,
                            **auth.client_options())
    try:
        await client.bootstrap()
        return True
    except Exception:
        return False
    finally:
        await client.close()
