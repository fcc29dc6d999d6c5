"""A broker with SASL/SCRAM-SHA-512 and ACLs (qlm.bus.access): each service may write only
its own topics; a forged ``evict`` on ``qlm.lso`` with worker credentials is refused by
the broker. The stale-token half (scheduler credentials, an old fencing token) is in
tests/integration/test_worker.py; the virtual-queue fence in test_fencing.py.

The broker starts once for this module (its JVM costs seconds); the session's broker of
the other tests stays PLAINTEXT (their topic prefixes differ per test, and ACLs name
topics).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

from qlm.bus.producer import BusProducer
from qlm.bus.records import LsoCommand
from qlm.bus.security import KafkaAuth
from qlm.bus.topics import TopicNames
from qlm.core.errors import Unavailable
from qlm.localstack.kafka import KafkaServer, KafkaUsers, apply_acls
from services.common.probes import kafka_answers
from tests.conftest import server_unavailable

pytestmark = [pytest.mark.kafka]

TOPICS = TopicNames("acl.")


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KafkaServer,
                                                                             KafkaUsers]]:
    data_dir: Path = tmp_path_factory.mktemp("kafka-sasl")
    users = KafkaUsers.load_or_create(data_dir / "users.json")
    try:
        server = KafkaServer.start_on_free_ports(data_dir, die_with_parent=True,
                                                 quick_start=True, users=users)
        apply_acls(server.bootstrap_servers, users, TOPICS)
    except Unavailable as error:
        server_unavailable(f"the SASL Kafka did not start: {error}")
    yield server, users
    server.stop()


def evict(issued_by: str) -> LsoCommand:
    return LsoCommand(type="evict", command_id="1-1", worker="w1", issued_at=time.time(),
                      request_ids=("r1",), reason=issued_by)


async def test_only_the_scheduler_may_write_lso(
    secure_kafka: tuple[KafkaServer, KafkaUsers],
) -> None:
    server, users = secure_kafka
    async with BusProducer(server.bootstrap_servers, client_id="t-worker",
                           **users.auth("qlm-worker").client_options()) as worker:
        with pytest.raises(TopicAuthorizationFailedError):
            await worker.publish(TOPICS.lso, evict("forged"))
        await worker.publish(TOPICS.events, evict("a worker may write events"))
    async with BusProducer(server.bootstrap_servers, client_id="t-scheduler",
                           **users.auth("qlm-scheduler").client_options()) as scheduler:
        await scheduler.publish(TOPICS.lso, evict("scheduler"))
        with pytest.raises(TopicAuthorizationFailedError):
            await scheduler.publish(TOPICS.batch_results, evict("x"))
    async with BusProducer(server.bootstrap_servers, client_id="t-client",
                           **users.auth("qlm-client").client_options()) as client:
        for topic in (TOPICS.lso, TOPICS.events, TOPICS.telemetry):
            with pytest.raises(TopicAuthorizationFailedError):
                await client.publish(topic, evict("x"))


async def test_no_credentials_or_a_wrong_password_get_nothing(
    secure_kafka: tuple[KafkaServer, KafkaUsers],
) -> None:
    server, users = secure_kafka
    wrong = KafkaAuth("SASL_PLAINTEXT", "SCRAM-SHA-512", "qlm-scheduler", "not-the-password")
    assert await kafka_answers(server.bootstrap_servers, users.auth("qlm-ingest"))
    assert not await kafka_answers(server.bootstrap_servers, wrong)
    assert not await kafka_answers(server.bootstrap_servers)  # PLAINTEXT on a SASL listener
    with pytest.raises((Unavailable, KafkaConnectionError)):
        async with BusProducer(server.bootstrap_servers, **wrong.client_options()):
            pass
