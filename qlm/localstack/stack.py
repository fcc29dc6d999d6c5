"""The local broker stack under one directory (default ``.qlm``): Redis + Kafka.

``up`` starts what is not running yet and writes ``stack.json`` (ports) and
``stack.env`` (``QLM_REDIS_URL``, ``QLM_KAFKA_BOOTSTRAP``) so that other
processes can find the servers; ``down`` stops exactly the processes whose pid
files are under the directory. ``QLM_KAFKA_QUICK_START=1`` starts Kafka with JIT
tier 1 only (faster start, lower peak throughput; for tests).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from qlm.core.errors import InvalidInput
from qlm.localstack.kafka import KafkaServer
from qlm.localstack.process import free_loopback_port, port_is_open
from qlm.localstack.redis import RedisServer

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

    def __init__(self, stack_dir: Path, ports: StackPorts) -> None:
        self.stack_dir = stack_dir.resolve()
        self.ports = ports
        self.redis = RedisServer(self.stack_dir / "redis", ports.redis)
        self.kafka = KafkaServer(
            self.stack_dir / "kafka",
            ports.kafka,
            ports.kafka_controller,
            quick_start=os.environ.get("QLM_KAFKA_QUICK_START", "") in {"1", "true", "yes"},
        )

    @classmethod
    def open(cls, stack_dir: Path, requested: StackPorts) -> LocalStack:
        """The stack in ``stack_dir``, keeping the ports of an earlier ``up`` if it recorded any."""
        recorded = read_ports(stack_dir)
        return cls(stack_dir, recorded if recorded is not None else requested.resolved())

    def environment(self) -> dict[str, str]:
        """How clients reach the servers, as environment variables."""
        return {
            "QLM_REDIS_URL": self.redis.url,
            "QLM_KAFKA_BOOTSTRAP": self.kafka.bootstrap_servers,
        }

    def up(self) -> list[str]:
        """Start whatever is not running; returns one line per server saying where it listens."""
        self.stack_dir.mkdir(parents=True, exist_ok=True)
        (self.stack_dir / STACK_FILE).write_text(json.dumps(asdict(self.ports), indent=2) + "\n")
        lines = [
            self._up_one("redis", self.redis.is_running(), self.redis.start, self.redis.url),
            self._up_one(
                "kafka", self.kafka.is_running(), self.kafka.start, self.kafka.bootstrap_servers
            ),
        ]
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
                self.redis.url,
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
