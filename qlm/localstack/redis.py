"""A local Debian ``redis-server`` with the append-only file on (``appendfsync everysec``).

The data directory survives stop/start, so a restart on the same directory shows
what the AOF kept. RDB snapshots are off: whatever survives a restart survived
through the AOF alone.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from qlm.core.errors import InvalidInput, Unavailable
from qlm.localstack.process import (
    ServerProcess,
    ensure_port_free,
    free_loopback_port,
    start_on_free_ports,
)

DEFAULT_REDIS_PORT = 6379
START_TIMEOUT_S = 20.0


def redis_server_binary() -> str:
    """Path of ``redis-server`` (``QLM_REDIS_SERVER`` overrides); Unavailable when absent."""
    binary = os.environ.get("QLM_REDIS_SERVER") or shutil.which("redis-server")
    if not binary or not Path(binary).exists():
        raise Unavailable("redis-server not found: apt-get install redis-server")
    return binary


def ping(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether a Redis server on ``host:port`` answers PING with PONG and has loaded its data.

    A server still loading its AOF answers ``-LOADING``, which counts as not ready.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """``redis-server`` on ``127.0.0.1:port`` with its data, log and pid file under ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        port: int = DEFAULT_REDIS_PORT,
        die_with_parent: bool = False,
        cluster: bool = False,
    ) -> None:
        """``die_with_parent``: stop the server when the starting thread exits (tests).
        ``cluster``: a Redis Cluster node (``--cluster-enabled yes``; see
        :class:`LocalRedisCluster`)."""
        self.data_dir = data_dir.resolve()
        self.port = port
        self.die_with_parent = die_with_parent
        self.cluster = cluster
        self.host = "127.0.0.1"
        self.process = ServerProcess("redis", self.data_dir, marker=f"{self.host}:{port}")

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{self.host}:{self.port}/0"

    def argv(self) -> list[str]:
        """The ``redis-server`` command line: config as arguments, no config file."""
        return [
            redis_server_binary(),
            # The address comes first so that the process title names it (the pid-file marker).
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", "",
            *(("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
               "--cluster-node-timeout", "5000") if self.cluster else ()),
        ]  # fmt: skip

    def start(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Start the server and wait until it answers PING; returns the seconds it took."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ensure_port_free(self.host, self.port, "redis")
        self.process.start(self.argv(), die_with_parent=self.die_with_parent)
        try:
            return self.process.wait_until(
                lambda: ping(self.host, self.port), timeout_s, f"PING on port {self.port}"
            )
        except Unavailable:
            self.process.stop(timeout_s=2.0, kill=True)
            raise

    @classmethod
    def start_on_free_port(
        cls, data_dir: Path, die_with_parent: bool = False, num_attempts: int = 3
    ) -> RedisServer:
        """A started server on a free loopback port; tries new ports when one is taken first.

        Raises the last Unavailable when every attempt fails.
        """
        return start_on_free_ports(
            lambda: cls(data_dir, free_loopback_port(), die_with_parent=die_with_parent),
            num_attempts,
        )

    def stop(self, kill: bool = False) -> bool:
        """SIGTERM (Redis flushes the AOF and exits) or, with ``kill``, SIGKILL.

        Returns False when no server was running.
        """
        return self.process.stop(kill=kill)

    def restart(self, kill: bool = False, timeout_s: float = START_TIMEOUT_S) -> float:
        """Stop and start again on the same port and data directory (the AOF is replayed)."""
        self.stop(kill=kill)
        return self.start(timeout_s)

    def is_running(self) -> bool:
        """Whether the server this object (or its pid file) names is alive."""
        return self.process.running_pid() is not None


def redis_cli_binary() -> str:
    """Path of ``redis-cli`` (``QLM_REDIS_CLI`` overrides); Unavailable when absent."""
    binary = os.environ.get("QLM_REDIS_CLI") or shutil.which("redis-cli")
    if not binary or not Path(binary).exists():
        raise Unavailable("redis-cli not found: apt-get install redis-tools")
    return binary


def cluster_state_ok(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether the node on ``host:port`` reports ``cluster_state:ok`` (all slots served)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"CLUSTER INFO\r\n")
            return b"cluster_state:ok" in sock.recv(4096)
    except OSError:
        return False


class LocalRedisCluster:
    """A Redis Cluster of ``num_masters`` masters (no replicas) on ``127.0.0.1``.

    Each node is a :class:`RedisServer` with ``--cluster-enabled yes`` (AOF on) under
    ``data_dir/node-<port>``; ``redis-cli --cluster create`` spreads the 16,384 slots
    over them. :attr:`url` is the ``redis+cluster://`` URL qlm's clients take.
    """

    def __init__(
        self, data_dir: Path, ports: list[int], die_with_parent: bool = False
    ) -> None:
        if len(ports) < 3:
            raise InvalidInput("ports", f"a Redis Cluster needs 3 masters or more, got {ports}")
        self.data_dir = data_dir.resolve()
        self.nodes = [
            RedisServer(self.data_dir / f"node-{port}", port, die_with_parent, cluster=True)
            for port in ports
        ]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:<first node's port>`` (the client finds the others)."""
        first = self.nodes[0]
        return f"redis+cluster://{first.host}:{first.port}"

    def start(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Start every node, create the cluster, wait until every node reports it ok;
        returns the seconds it took. On failure every node is stopped."""
        started_at = time.monotonic()
        try:
            for node in self.nodes:
                node.start(timeout_s)
            argv = [redis_cli_binary(), "--cluster", "create",
                    *(f"{n.host}:{n.port}" for n in self.nodes),
                    "--cluster-replicas", "0", "--cluster-yes"]  # fmt: skip
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout_s, check=False
            )
            if done.returncode != 0:
                raise Unavailable(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
            for node in self.nodes:
                node.process.wait_until(
                    functools.partial(cluster_state_ok, node.host, node.port),
                    timeout_s, f"cluster_state:ok on port {node.port}",
                )  # fmt: skip
        except (Unavailable, subprocess.TimeoutExpired):
            self.stop(kill=True)
            raise
        return time.monotonic() - started_at

    @classmethod
    def start_on_free_ports(
        cls, data_dir: Path, num_masters: int = 3, die_with_parent: bool = False,
        num_attempts: int = 3,
    ) -> LocalRedisCluster:
        """A started cluster on free loopback ports (new ports and directory per try)."""
        attempts = iter(range(1, num_attempts + 1))
        return start_on_free_ports(lambda: cls(
            data_dir / f"try-{next(attempts)}",
            [free_loopback_port() for _ in range(num_masters)],
            die_with_parent=die_with_parent,
        ), num_attempts)  # fmt: skip

    def stop(self, kill: bool = False) -> None:
        """Stop every node (SIGTERM; SIGKILL with ``kill``)."""
        for node in self.nodes:
            node.stop(kill=kill)
