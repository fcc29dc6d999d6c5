"""The files compose.yaml and deploy/k8s run with (qlm.localstack.credentials) make a
secured Redis and Kafka that work, here on loopback without containers:

* ``write`` on a fresh directory; ``redis-server`` started with its ``redis/users.acl``;
  a Kafka node started by its own ``kafka/start.sh`` (as the containers start it: the
  storage formatted with every SCRAM user, then the broker on ``server-0.properties``),
  with Kafka's scripts replaced by two lines that run the same jars;
* ``grant`` (topics, ACLs, the development tenant) as the one-shot job runs it;
* each service's settings loaded from its directory through ``QLM_SECRETS_DIR``: every
  user gets in with its password and only to what it may do (a worker cannot write
  ``qlm.lso`` nor read the tenants; nobody gets in without a password).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka.errors import TopicAuthorizationFailedError
from redis.exceptions import AuthenticationError, NoPermissionError

from qlm.bus.producer import BusProducer
from qlm.bus.topics import TopicNames
from qlm.localstack import free_loopback_port
from qlm.localstack.credentials import PRINCIPALS, Deployment, write
from qlm.localstack.kafka import fetch_kafka_jars, java_binary
from qlm.localstack.redis import redis_server_binary
from qlm.tenants import TenantRegistry
from services.common.probes import kafka_answers
from services.common.settings import SECRETS_DIR_ENV, CommonSettings, load_settings
from tests.conftest import server_unavailable

pytestmark = [pytest.mark.redis, pytest.mark.kafka, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "cred."


@dataclass
class Deployed:
    directory: Path
    deployment: Deployment


def _kafka_home(root: Path) -> Path:
    """Kafka's two scripts start.sh calls, as two lines each over the cached jars."""
    libs = fetch_kafka_jars()
    java = [java_binary(), "-Xms96m", "-Xmx256m", "-XX:TieredStopAtLevel=1",
            "-XX:+UseSerialGC", "-cp", f"{libs}/*"]
    for script, main in (("kafka-storage.sh", "kafka.tools.StorageTool"),
                         ("kafka-server-start.sh", "kafka.Kafka")):
        path = root / "bin" / script
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\nexec " + " ".join(f"'{a}'" for a in java)
                        + f" {main} \"$@\"\n")
        path.chmod(0o755)
    return root


def _wait(condition: object, timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.3)
    server_unavailable(f"{what} did not start:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    work = tmp_path_factory.mktemp("credentials")
    deployment = Deployment(
        redis_host="127.0.0.1", redis_port=free_loopback_port(), kafka_nodes=("127.0.0.1",),
        kafka_port=free_loopback_port(), controller_port=free_loopback_port(),
        kafka_listen_host="127.0.0.1", kafka_data_dir=work / "kafka-data")
    directory = work / "credentials"
    write(directory, deployment)
    redis_log, kafka_log = work / "redis.log", work / "kafka.log"
    with redis_log.open("w") as redis_out, kafka_log.open("w") as kafka_out:
        redis_proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(deployment.redis_port), "--bind", "127.0.0.1",
             "--aclfile", str(directory / "redis" / "users.acl"), "--save", "",
             "--dir", str(work)], stdout=redis_out, stderr=subprocess.STDOUT)
        kafka_proc = subprocess.Popen(
            ["sh", str(directory / "kafka" / "start.sh")], stdout=kafka_out,
            stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "QLM_KAFKA_NODE": "0",
                 "KAFKA_HOME": str(_kafka_home(work / "kafka-home"))})
    try:
        admin = settings_of(directory, "admin")
        _wait(lambda: asyncio.run(kafka_answers(admin.kafka_bootstrap, admin.kafka_auth())),
              120, "Kafka from kafka/start.sh", kafka_log)
        granted = subprocess.run(
            [sys.executable, "-m", "qlm.localstack.credentials", "grant", "--dir",
             str(directory), "--topic-prefix", PREFIX],
            capture_output=True, text=True, check=False, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert granted.returncode == 0, granted.stderr[-3000:]
        yield Deployed(directory, deployment)
    finally:
        os.killpg(kafka_proc.pid, signal.SIGKILL)
        redis_proc.kill()
        kafka_proc.wait(timeout=10)
        redis_proc.wait(timeout=10)
        shutil.rmtree(deployment.kafka_data_dir, ignore_errors=True)


def settings_of(directory: Path, who: str) -> CommonSettings:
    """``who``'s settings as its container loads them (QLM_SECRETS_DIR, nothing else)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("QLM_")}
    try:
        for name in saved:
            del os.environ[name]
        os.environ[SECRETS_DIR_ENV] = str(directory / who)
        return load_settings(CommonSettings, [])
    finally:
        os.environ.pop(SECRETS_DIR_ENV, None)
        os.environ.update(saved)


def test_every_principal_has_its_settings_files(deployed: Deployed) -> None:
    for who, (redis_user, kafka_user) in PRINCIPALS.items():
        settings = settings_of(deployed.directory, who)
        assert settings.kafka_security_protocol == "SASL_PLAINTEXT"
        assert settings.kafka_sasl_username == kafka_user
        if redis_user is not None:
            assert settings.redis_url.startswith(f"redis://{redis_user}:")
        mode = (deployed.directory / who / "QLM_KAFKA_SASL_PASSWORD").stat().st_mode & 0o777
        assert mode == 0o600, (who, oct(mode))


async def test_redis_users_get_in_with_their_password_and_only_to_their_keys(
    deployed: Deployed,
) -> None:
    d = deployed.deployment
    nobody = aioredis.Redis(host=d.redis_host, port=d.redis_port)
    with pytest.raises(AuthenticationError):
        await nobody.set("{qlm:}req:x", "1")
    await nobody.aclose()
    clients = {who: aioredis.Redis.from_url(settings_of(deployed.directory, who).redis_url,
                                            decode_responses=True)
               for who in ("ingest", "worker", "admin")}
    try:
        await clients["ingest"].hset("{qlm:}req:r1", "state", "queued")
        await clients["ingest"].smembers("{qlm:}tenants:parked")  # the parked batch records
        await clients["worker"].hget("{qlm:}req:r1", "state")
        with pytest.raises(NoPermissionError):  # the tenants are ingest's alone
            await clients["worker"].hgetall("{qlm:}tenant:dev")
        with pytest.raises(NoPermissionError):  # no FLUSHALL for a service
            await clients["ingest"].flushall()
        key = (deployed.directory / "client" / "QLM_API_KEY").read_text().strip()
        assert await TenantRegistry(clients["admin"]).authenticate(key) == "dev"
    finally:
        for client in clients.values():
            await client.aclose()


async def test_kafka_users_write_only_their_topics(deployed: Deployed) -> None:
    topics = TopicNames(PREFIX)

    def producer(who: str) -> BusProducer:
        settings = settings_of(deployed.directory, who)
        return BusProducer(settings.kafka_bootstrap, client_id=f"t-{who}",
                           **settings.kafka_auth().client_options())

    async with producer("scheduler") as scheduler:
        await scheduler.publish_raw(topics.lso, b"{}", b"k")
    async with producer("worker") as worker:
        await worker.publish_raw(topics.events, b"{}", b"k")
        with pytest.raises(TopicAuthorizationFailedError):  # a forged evict, by ACL
            await worker.publish_raw(topics.lso, b"{}", b"k")
    async with producer("client") as client:
        await client.publish_raw(topics.batch_requests, b"{}", b"k")
        with pytest.raises(TopicAuthorizationFailedError):
            await client.publish_raw(topics.events, b"{}", b"k")
