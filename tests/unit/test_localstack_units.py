"""Local broker management without starting servers: pid-file trust, ports, configs."""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from qlm.core.errors import InvalidInput, Unavailable
from qlm.localstack.kafka import KafkaCluster, KafkaServer, _metadata_request, new_cluster_id
from qlm.localstack.process import (
    PortTaken,
    ServerProcess,
    ensure_port_free,
    free_loopback_port,
)
from qlm.localstack.services import ServicePorts
from qlm.localstack.stack import LocalStack, StackPorts, read_ports


def test_a_pid_file_naming_someone_elses_process_is_not_trusted(tmp_path: Path) -> None:
    process = ServerProcess("redis", tmp_path, marker="127.0.0.1:1")
    process.pid_path.write_text(f"{os.getpid()}\n")  # this test run: alive, but not ours

    assert process.running_pid() is None
    assert process.stop() is False  # nothing signalled (this test would have died)
    assert not process.pid_path.exists()


def test_stop_ends_the_process_it_started(tmp_path: Path) -> None:
    process = ServerProcess("sleeper", tmp_path, marker="sleep")
    pid = process.start([sys.executable, "-c", "import time; time.sleep(60)  # sleep"])
    assert process.running_pid() == pid
    with pytest.raises(Unavailable, match="already runs"):
        process.start(["true"])

    assert process.stop(timeout_s=5) is True
    assert process.running_pid() is None
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0


def test_wait_until_reports_the_log_when_the_process_exits(tmp_path: Path) -> None:
    process = ServerProcess("failing", tmp_path, marker="nothing")
    process.start([sys.executable, "-c", "print('bind: address in use'); raise SystemExit(3)"])
    with pytest.raises(Unavailable, match=r"exited with status 3(.|\n)*address in use"):
        process.wait_until(lambda: False, timeout_s=10, what="PING")


def test_a_busy_port_is_refused() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(PortTaken, match="already in use") as taken:
            ensure_port_free("127.0.0.1", port, "redis")
        assert taken.value.port == port and isinstance(taken.value, Unavailable)
    ensure_port_free("127.0.0.1", free_loopback_port(), "redis")


def test_a_taken_port_is_unchosen_wherever_it_stands_and_only_there() -> None:
    ports = ServicePorts(ingest=5001, http=5002, estimator=5003,
                         workers=(("w-0", 5001, 5004), ("w-1", 5005, 5006)))
    assert ports.without(5001) == ServicePorts(
        ingest=0, http=5002, estimator=5003, workers=(("w-0", 0, 5004), ("w-1", 5005, 5006)))
    assert ports.without(4999) == ports


def test_cluster_id_is_22_url_safe_base64_characters() -> None:
    ids = {new_cluster_id() for _ in range(20)}
    assert len(ids) == 20
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id) for cluster_id in ids)


def test_metadata_request_is_a_sized_v1_request_for_no_topics() -> None:
    raw = _metadata_request(correlation_id=7)
    (size,) = struct.unpack_from(">i", raw)
    api_key, api_version, correlation_id, client_id_len = struct.unpack_from(">hhih", raw, 4)
    assert size == len(raw) - 4
    assert (api_key, api_version, correlation_id) == (3, 1, 7)
    assert struct.unpack_from(">i", raw, 14 + client_id_len) == (0,)


def test_kafka_config_is_a_single_kraft_node_on_loopback(tmp_path: Path) -> None:
    settings = dict(
        line.split("=", 1)
        for line in KafkaServer(tmp_path, 19092, 19093).server_properties().splitlines()
    )
    assert settings["process.roles"] == "broker,controller"
    assert settings["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert settings["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert settings["auto.create.topics.enable"] == "false"


def test_kafka_cluster_nodes_share_one_quorum_and_replicate_internal_topics(
    tmp_path: Path,
) -> None:
    cluster = KafkaCluster(tmp_path, [(19092, 19093), (19094, 19095), (19096, 19097)])
    configs = [
        dict(line.split("=", 1) for line in node.server_properties().splitlines())
        for node in cluster.nodes
    ]
    voters = "1@127.0.0.1:19093,2@127.0.0.1:19095,3@127.0.0.1:19097"
    assert [c["node.id"] for c in configs] == ["1", "2", "3"]
    assert {c["controller.quorum.voters"] for c in configs} == {voters}
    assert {c["offsets.topic.replication.factor"] for c in configs} == {"3"}
    assert {c["transaction.state.log.min.isr"] for c in configs} == {"2"}
    assert len({node.cluster_id for node in cluster.nodes}) == 1
    assert len({node.data_dir for node in cluster.nodes}) == 3
    assert cluster.bootstrap_servers == "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096"
    with pytest.raises(InvalidInput, match="ports"):
        KafkaCluster(tmp_path, [])


def test_stack_ports_are_validated_and_recorded(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as error:
        StackPorts(redis=70000, kafka=1, kafka_controller=2)
    assert error.value.field == "ports.redis"

    stack = LocalStack.open(tmp_path, StackPorts(0, 0, 0))
    assert 0 not in (stack.ports.redis, stack.ports.kafka, stack.ports.kafka_controller)
    (tmp_path / "stack.json").write_text('{"redis": 1, "kafka": 2, "kafka_controller": 3}')
    assert read_ports(tmp_path) == StackPorts(1, 2, 3)
    assert LocalStack.open(tmp_path, StackPorts(0, 0, 0)).ports == StackPorts(1, 2, 3)


def test_supervisor_backoff_doubles_up_to_its_cap() -> None:
    from qlm.localstack.supervisor import Backoff, describe

    assert [Backoff(1.0, 30.0).delay_s(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert Backoff(0.5, 2.0).delay_s(100) == 2.0
    assert describe({"restarts": 2, "last_exit": -9, "last_exit_at": 0.0}).startswith(
        "restarts 2, last exit -9 at ")
    assert describe(None) == "not supervised"
