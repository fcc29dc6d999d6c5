"""The local brokers are real and behave: Redis keeps data across restarts through the AOF,
Kafka answers clients, and ``up``/``down`` leave no process behind."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from qlm.bus.security import KafkaAuth
from qlm.localstack import KafkaServer, RedisServer
from qlm.localstack.kafka import num_live_brokers
from qlm.localstack.process import port_is_open
from qlm.localstack.stack import read_ports
from services.common.probes import kafka_answers

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.redis
@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_redis_restart_keeps_data_through_aof(
    redis_server: RedisServer, redis_url: str, kill: bool
) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("save") == {"save": ""}  # no RDB: only the AOF can keep data
        client.zadd("queue", {"a": 1.0, "b": 2.0})
        client.set("record", "kept")
        wait_until_in_aof_file(client)
    finally:
        client.close()

    redis_server.restart(kill=kill)

    client = redis.Redis.from_url(redis_url)
    try:
        assert client.zrange("queue", 0, -1) == [b"a", b"b"]
        assert client.get("record") == b"kept"
    finally:
        client.close()


def wait_until_in_aof_file(client: redis.Redis, timeout_s: float = 10.0) -> None:
    """Wait until Redis has written its AOF buffer to the file.

    With ``appendfsync everysec`` Redis may postpone that write by up to two seconds
    while a previous fsync is still running (a loaded disk), and acknowledged writes
    are then held in memory only: a SIGKILL in that window loses them, as Redis
    documents. What this test checks is that what reached the AOF survives a kill.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.info("persistence")
        if int(info["aof_buffer_length"]) == 0 and int(info["aof_pending_bio_fsync"]) == 0:
            return
        assert time.monotonic() < deadline, f"AOF not written within {timeout_s} s: {info}"
        time.sleep(0.05)


@pytest.mark.redis
def test_redis_url_starts_each_test_empty(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.dbsize() == 0  # the test above wrote keys; the fixture flushed them
    finally:
        client.close()


@pytest.mark.kafka
async def test_kafka_answers_clients(
    kafka_server: KafkaServer, kafka_bootstrap: str, unique_topic: Callable[[str], str]
) -> None:
    assert num_live_brokers(kafka_server.host, kafka_server.port) == 1
    topic = unique_topic("smoke")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, b"hello")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        record = await consumer.getone()
    finally:
        await consumer.stop()
    assert (record.offset, record.value) == (sent.offset, b"hello")


def _localstack(command: str, stack_dir: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "QLM_KAFKA_QUICK_START": "1"}
    return subprocess.run(
        [sys.executable, "-m", "qlm.localstack", command, "--dir", str(stack_dir), *flags],
        capture_output=True, text=True, timeout=180, env=env, check=False,
    )  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@pytest.mark.redis
@pytest.mark.kafka
@pytest.mark.slow
def test_up_then_down_leaves_no_process(tmp_path: Path) -> None:
    stack_dir = tmp_path / "stack"
    up = _localstack("up", stack_dir, "--brokers-only", "--redis-port", "0", "--kafka-port", "0",
                     "--controller-port", "0")  # fmt: skip
    if up.returncode != 0:
        _localstack("down", stack_dir)
    assert up.returncode == 0, up.stderr
    ports = read_ports(stack_dir)
    assert ports is not None
    assert f"redis://127.0.0.1:{ports.redis}/0" in up.stdout
    assert f"127.0.0.1:{ports.kafka}" in up.stdout
    # secured by default: the brokers answer the client credentials of stack.env only
    env = dict(line.split("=", 1) for line in (stack_dir / "stack.env").read_text().split())
    assert env["QLM_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT"
    assert env["QLM_REDIS_URL"].startswith("redis://default:")
    client = KafkaAuth("SASL_PLAINTEXT", env["QLM_KAFKA_SASL_MECHANISM"],
                       env["QLM_KAFKA_SASL_USERNAME"], env["QLM_KAFKA_SASL_PASSWORD"])
    assert asyncio.run(kafka_answers(env["QLM_KAFKA_BOOTSTRAP"], client))
    assert not asyncio.run(kafka_answers(env["QLM_KAFKA_BOOTSTRAP"]))
    assert redis.Redis.from_url(env["QLM_REDIS_URL"]).ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=ports.redis).ping()
    pids = [int((stack_dir / name).read_text()) for name in ("redis/redis.pid", "kafka/kafka.pid")]
    assert all(_alive(pid) for pid in pids)
    assert _localstack("status", stack_dir).returncode == 0

    down = _localstack("down", stack_dir)

    assert down.returncode == 0, down.stderr
    assert not any(_alive(pid) for pid in pids)
    assert not port_is_open("127.0.0.1", ports.redis)
    assert not port_is_open("127.0.0.1", ports.kafka)
    assert not list(stack_dir.glob("*/*.pid"))
    assert _localstack("status", stack_dir).returncode == 3


@pytest.mark.redis
@pytest.mark.kafka
@pytest.mark.slow
def test_up_supervises_the_services_and_status_shows_a_restart(tmp_path: Path) -> None:
    workers = tmp_path / "workers.yaml"
    workers.write_text("workers:\n  - {id: one, gpu: A10-24GB, models: [mistral-7b]}\n")
    stack_dir = tmp_path / "stack"
    try:
        up = _localstack("up", stack_dir, "--redis-port", "0", "--kafka-port", "0",
                         "--controller-port", "0", "--workers-file", str(workers),
                         "--time-scale", "20")
        assert up.returncode == 0, up.stderr + up.stdout
        assert "supervisor pid" in up.stdout
        run_dir = stack_dir / "services"
        ingest_pid = int((run_dir / "ingest.pid").read_text())
        assert (run_dir / "worker-one.pid").is_file()  # one process per worker
        os.kill(ingest_pid, 9)
        deadline = time.monotonic() + 120
        while True:
            status = _localstack("status", stack_dir)
            line = next((x for x in status.stdout.splitlines() if x.startswith("ingest ")), "")
            if "restarts 1, last exit -9" in line and "pid" in line and " ready" in line:
                break
            assert time.monotonic() < deadline, status.stdout
            time.sleep(1.0)
        assert int((run_dir / "ingest.pid").read_text()) != ingest_pid
        assert "supervisor         pid" in status.stdout
    finally:
        down = _localstack("down", stack_dir)
    assert down.returncode == 0, down.stderr
    assert down.stdout.splitlines()[0].split() == ["supervisor", "stopped"]
    assert not list(stack_dir.glob("*/*.pid"))


def test_kafka_storage_formats_with_a_cluster_id_that_starts_with_a_dash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """About one random id in 64 starts with '-'; the storage tool must not read it as a flag."""
    from qlm.localstack import kafka

    monkeypatch.setattr(kafka, "new_cluster_id", lambda: "-" + "A" * 21)
    server = KafkaServer(tmp_path / "kafka", port=0, controller_port=0)
    server.data_dir.mkdir(parents=True)
    server.config_path.write_text(server.server_properties())
    server.format_storage(kafka.fetch_kafka_jars(server.version))
    assert "cluster.id=-AAAA" in (server.log_dirs / "meta.properties").read_text()
