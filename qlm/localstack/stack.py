"""The local broker stack under one directory (default ``.qlm``): Redis + Kafka.

``up`` starts what is not running yet and writes ``stack.json`` (ports) and
``stack.env`` (``QLM_REDIS_URL``, ``QLM_KAFKA_BOOTSTRAP``, and with ``secure`` the
credentials: ``QLM_REDIS_URL`` as the admin, ``QLM_KAFKA_*`` as ``qlm-client``) so that
other processes can find the servers; with ``secure`` (the default) Redis runs with ACL
users and Kafka with SASL/SCRAM and the ACLs of :mod:`qlm.bus.access` (users and
passwords in ``<dir>/redis/users.json`` and ``<dir>/kafka/users.json``, mode 0600);
``down`` stops exactly the processes whose pid files are under the directory.
``QLM_KAFKA_QUICK_START=1`` starts Kafka with JIT tier 1 only (faster start, lower peak
throughput; for tests).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from qlm.bus.topics import TopicNames
from qlm.core.errors import InvalidInput
from qlm.localstack.kafka import KafkaServer, KafkaUsers, apply_acls
from qlm.localstack.process import free_loopback_port, port_is_open
from qlm.localstack.redis import RedisServer, RedisUsers

STACK_FILE = "stack.json"
ENV_FILE = "stack.env"


@dataclass(frozen=True, slots=True)
class StackPorts:
    """The loopback ports of one stack; 0 asks for a free port at ``up``."""

    redis: int
    kafka: int
    kafka_controller: int

    def __post_init__(self) -> None:
        for name, port in asdict(self).items():
            if not (isinstance(port, int) and 0 <= port <= 65535):
                raise InvalidInput(f"ports.{name}", f"must be an integer in 0..65535, got {port!r}")

    def resolved(self) -> StackPorts:
        """The same ports with every 0 replaced by a free port."""
        return StackPorts(*(port or free_loopback_port() for port in asdict(self).values()))


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """What ``status`` reports for one server."""

    name: str
    address: str
    pid: int | None
    answers: bool


class LocalStack:
    """Redis under ``<dir>/redis`` and Kafka under ``<dir>/kafka``."""

    def __init__(self, stack_dir: Path, ports: StackPorts, secure: bool = True) -> None:
        self.stack_dir = stack_dir.resolve()
        self.ports = ports
        self.secure = secure
        kafka_dir = self.stack_dir / "kafka"
        if secure and (kafka_dir / "data" / "meta.properties").exists() and not (
                kafka_dir / "users.json").exists():
            raise InvalidInput("kafka", f"{kafka_dir} was formatted without SASL users; "
                               "make down, remove it and make up again")
        self.redis_users = (RedisUsers.load_or_create(self.stack_dir / "redis" / "users.json")
                            if secure else None)
        self.kafka_users = KafkaUsers.load_or_create(kafka_dir / "users.json") if secure else None
        self.redis = RedisServer(self.stack_dir / "redis", ports.redis, users=self.redis_users)
        self.kafka = KafkaServer(
            kafka_dir,
            ports.kafka,
            ports.kafka_controller,
            quick_start=os.environ.get("QLM_KAFKA_QUICK_START", "") in {"1", "true", "yes"},
            users=self.kafka_users,
        )

    @classmethod
    def open(cls, stack_dir: Path, requested: StackPorts, secure: bool = True) -> LocalStack:
        """The stack in ``stack_dir``, keeping the ports of an earlier ``up`` if it recorded any."""
        recorded = read_ports(stack_dir)
        return cls(stack_dir, recorded if recorded is not None else requested.resolved(),
                   secure)

    def environment(self) -> dict[str, str]:
        """How clients reach the servers, as environment variables."""
        env = {
            "QLM_REDIS_URL": self.redis.url,
            "QLM_KAFKA_BOOTSTRAP": self.kafka.bootstrap_servers,
        }
        if self.kafka_users is not None:
            auth = self.kafka_users.auth("qlm-client")
            env.update(QLM_KAFKA_SECURITY_PROTOCOL=auth.security_protocol,
                       QLM_KAFKA_SASL_MECHANISM=str(auth.sasl_mechanism),
                       QLM_KAFKA_SASL_USERNAME="qlm-client",
                       QLM_KAFKA_SASL_PASSWORD=str(auth.password))
        return env

    def up(self) -> list[str]:
        """Start whatever is not running; returns one line per server saying where it listens."""
        self.stack_dir.mkdir(parents=True, exist_ok=True)
        (self.stack_dir / STACK_FILE).write_text(json.dumps(asdict(self.ports), indent=2) + "\n")
        lines = [
            self._up_one("redis", self.redis.is_running(), self.redis.start,
                         f"redis://{self.redis.host}:{self.redis.port}/0"),
            self._up_one(
                "kafka", self.kafka.is_running(), self.kafka.start, self.kafka.bootstrap_servers
            ),
        ]
        if self.kafka_users is not None:
            num_acls = apply_acls(self.kafka.bootstrap_servers, self.kafka_users, TopicNames(""))
            lines.append(f"kafka  SASL/SCRAM-SHA-512, {num_acls} ACL bindings (qlm.bus.access)")
        env = "".join(f"{key}={value}\n" for key, value in self.environment().items())
        (self.stack_dir / ENV_FILE).write_text(env)
        return lines

    @staticmethod
    def _up_one(name: str, running: bool, start: Callable[[], float], address: str) -> str:
        if running:
            return f"{name:6} already running at {address}"
        seconds = start()
        return f"{name:6} listening at {address} (ready in {seconds:.1f} s)"

    def down(self) -> list[str]:
        """Stop Kafka, then Redis (only processes started by ``up`` in this directory)."""
        lines = []
        for name, server in (("kafka", self.kafka), ("redis", self.redis)):
            stopped = server.stop()
            lines.append(f"{name:6} {'stopped' if stopped else 'was not running'}")
        return lines

    def status(self) -> list[ServerStatus]:
        """Each server's address, pid (None when not running) and whether its port answers."""
        return [
            ServerStatus(
                "redis",
                f"redis://{self.redis.host}:{self.redis.port}/0",  # no password in a status
                self.redis.process.running_pid(),
                port_is_open(self.redis.host, self.redis.port),
            ),
            ServerStatus(
                "kafka",
                self.kafka.bootstrap_servers,
                self.kafka.process.running_pid(),
                port_is_open(self.kafka.host, self.kafka.port),
            ),
        ]


def read_ports(stack_dir: Path) -> StackPorts | None:
    """The ports an earlier ``up`` recorded in ``stack_dir``, or None."""
    try:
        recorded = json.loads((stack_dir / STACK_FILE).read_text())
    except (OSError, ValueError):
        return None
    return StackPorts(**recorded)
