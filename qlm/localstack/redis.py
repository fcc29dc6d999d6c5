"""A local Debian ``redis-server`` with the append-only file on (``appendfsync everysec``).

The data directory survives stop/start, so a restart on the same directory shows
what the AOF kept. RDB snapshots are off: whatever survives a restart survived
through the AOF alone.

With ``users`` (:class:`RedisUsers`) the server runs with ACLs from an ``aclfile`` it is
started with: the ``default`` user needs a password and may do everything (the admin),
and each service user only its own keys (passwords stored as SHA-256 in the ACL file, in clear in
``users.json``, mode 0600, for the URLs the services get).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from qlm.core.errors import InvalidInput, Unavailable
from qlm.localstack.process import (
    ServerProcess,
    ensure_port_free,
    free_loopback_port,
    load_or_create_passwords,
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


def ping(host: str, port: int, timeout_s: float = 0.5,
         auth: tuple[str, str] | None = None) -> bool:
    """Whether a Redis server on ``host:port`` answers PING with PONG and has loaded its data
    (as the ACL user ``auth`` = (name, password) when given).

    A server still loading its AOF answers ``-LOADING``, which counts as not ready.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            if auth is not None:
                sock.sendall(f"AUTH {auth[0]} {auth[1]}\r\n".encode())
                if not sock.recv(64).startswith(b"+OK"):
                    return False
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


#: Key patterns of the queue a service may touch (``{P}`` is the hash-tagged prefix); the
#: tenant keys (``tenant:*``, ``apikey:*``, ``tenants``) are ingest's alone, and only the
#: scheduler writes ``scheduler:*`` (its lease, fencing token and saved policy state).
_QUEUE_KEYS = ("req:*", "group:*", "groups", "vq:*", "workers", "running:*", "leases",
               "stream:*", "queue:log", "forecast")
_SERVICE_KEYS: Final = {
    "qlm-ingest": (*_QUEUE_KEYS, "tenant:*", "apikey:*", "tenants", "tenants:parked",
                   "file:*", "files", "batch:*", "batches", "batches:*"),  # Files/Batch API
    "qlm-scheduler": (*_QUEUE_KEYS, "scheduler:*"),
    "qlm-worker": _QUEUE_KEYS,
    "qlm-estimator": _QUEUE_KEYS,
}
_READ_ONLY_KEYS: Final = {"qlm-worker": ("scheduler:*",), "qlm-estimator": ("scheduler:*",)}
#: The admin is Redis's ``default`` user with a password: Redis 7.0 replays MULTI/EXEC
#: from the AOF as the default user, so a restricted default user loses data on restart.
REDIS_ADMIN: Final = "default"


@dataclass(frozen=True, slots=True)
class RedisUsers:
    """ACL users of a local Redis and their passwords: the admin (``default`` with a
    password: everything; tests, ``qlm tenants``, migrations) and one per service, each
    limited to the keys it needs and without the dangerous commands (CONFIG SET,
    FLUSHALL, KEYS, DEBUG, ...)."""

    passwords: Mapping[str, str]

    @classmethod
    def load_or_create(cls, path: Path) -> RedisUsers:
        """The users in ``path`` (JSON), else new random passwords written there (0600)."""
        return cls(load_or_create_passwords(path, (REDIS_ADMIN, *_SERVICE_KEYS)))

    def acl_file(self, prefix: str = "qlm:") -> str:
        """The ``aclfile`` of the server (one ``user`` line per user)."""
        tag = "{" + prefix + "}"
        lines = []
        for name, password in sorted(self.passwords.items()):
            if name == REDIS_ADMIN:
                rules = "~* &* +@all"
            else:
                keys = " ".join(f"~{tag}{k}" for k in _SERVICE_KEYS[name])
                reads = " ".join(f"%R~{tag}{k}" for k in _READ_ONLY_KEYS.get(name, ()))
                rules = f"{keys} {reads} &* +@all -@dangerous +info +config|get".strip()
            digest = hashlib.sha256(password.encode()).hexdigest()
            lines.append(f"user {name} on #{digest} resetchannels {rules}")
        return "\n".join(lines) + "\n"

    def url(self, user: str, host: str, port: int, db: int = 0) -> str:
        return f"redis://{user}:{self.passwords[user]}@{host}:{port}/{db}"


class RedisServer:
    """``redis-server`` on ``127.0.0.1:port`` with its data, log and pid file under ``data_dir``."""

    def __init__(
        self,
        data_dir: Path,
        port: int = DEFAULT_REDIS_PORT,
        die_with_parent: bool = False,
        cluster: bool = False,
        users: RedisUsers | None = None,
        cluster_bus_port: int | None = None,
    ) -> None:
        """``die_with_parent``: stop the server when the starting thread exits (tests).
        ``cluster``: a Redis Cluster node (``--cluster-enabled yes``; see
        :class:`LocalRedisCluster`), its node-to-node bus on ``cluster_bus_port``
        (default: Redis's own, ``port`` + 10000, which does not exist above 55535)."""
        self.data_dir = data_dir.resolve()
        self.port = port
        self.die_with_parent = die_with_parent
        self.cluster = cluster
        self.users = users
        self.cluster_bus_port = cluster_bus_port
        self.host = "127.0.0.1"
        self.process = ServerProcess("redis", self.data_dir, marker=f"{self.host}:{port}")

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0`` (as ``qlm-admin`` when the server has users)."""
        if self.users is not None:
            return self.url_for(REDIS_ADMIN)
        return f"redis://{self.host}:{self.port}/0"

    def url_for(self, user: str) -> str:
        """The URL of one ACL user (:class:`RedisUsers`)."""
        if self.users is None:
            raise InvalidInput("user", "this Redis has no ACL users")
        return self.users.url(user, self.host, self.port)

    @property
    def acl_path(self) -> Path:
        return self.data_dir / "users.acl"

    def _auth(self) -> tuple[str, str] | None:
        return (REDIS_ADMIN, self.users.passwords[REDIS_ADMIN]) if self.users else None

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
            # with ACLs workers may not CONFIG SET the notifications they wake on
            *(("--aclfile", str(self.acl_path), "--notify-keyspace-events", "Kz")
              if self.users else ()),
            *(("--cluster-port", str(self.cluster_bus_port))
              if self.cluster and self.cluster_bus_port is not None else ()),
        ]  # fmt: skip

    def start(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Start the server and wait until it answers PING; returns the seconds it took."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.users is not None:
            self.acl_path.write_text(self.users.acl_file())
            self.acl_path.chmod(0o600)
        ensure_port_free(self.host, self.port, "redis")
        self.process.start(self.argv(), die_with_parent=self.die_with_parent)
        try:
            return self.process.wait_until(
                lambda: ping(self.host, self.port, auth=self._auth()), timeout_s,
                f"PING on port {self.port}"
            )
        except Unavailable:
            self.process.stop(timeout_s=2.0, kill=True)
            raise

    @classmethod
    def start_on_free_port(
        cls, data_dir: Path, die_with_parent: bool = False, num_attempts: int = 3,
        users: RedisUsers | None = None,
    ) -> RedisServer:
        """A started server on a free loopback port; tries new ports when one is taken first.

        Raises the last Unavailable when every attempt fails.
        """
        return start_on_free_ports(
            lambda: cls(data_dir, free_loopback_port(), die_with_parent=die_with_parent,
                        users=users),
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


def _defaults(n: int) -> list[int | None]:
    return [None] * n


class LocalRedisCluster:
    """A Redis Cluster of ``num_masters`` masters (no replicas) on ``127.0.0.1``.

    Each node is a :class:`RedisServer` with ``--cluster-enabled yes`` (AOF on) under
    ``data_dir/node-<port>``; ``redis-cli --cluster create`` spreads the 16,384 slots
    over them. :attr:`url` is the ``redis+cluster://`` URL qlm's clients take.
    """

    def __init__(
        self, data_dir: Path, ports: list[int], die_with_parent: bool = False,
        bus_ports: list[int] | None = None,
    ) -> None:
        """``bus_ports``: each node's cluster bus port (default: its port + 10000)."""
        if len(ports) < 3:
            raise InvalidInput("ports", f"a Redis Cluster needs 3 masters or more, got {ports}")
        if bus_ports is not None and len(bus_ports) != len(ports):
            raise InvalidInput("bus_ports", f"one per node: {len(ports)} ports, {bus_ports}")
        self.data_dir = data_dir.resolve()
        self.nodes = [
            RedisServer(self.data_dir / f"node-{port}", port, die_with_parent, cluster=True,
                        cluster_bus_port=bus_port)
            for port, bus_port in zip(ports, bus_ports or _defaults(len(ports)), strict=True)
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
        """A started cluster on free loopback ports (new ports and directory per try).

        The bus ports are chosen free too: the OS hands out ports up to 60999 here, and
        Redis's default bus port (port + 10000) does not exist above 55535."""
        attempts = iter(range(1, num_attempts + 1))
        return start_on_free_ports(lambda: cls(
            data_dir / f"try-{next(attempts)}",
            [free_loopback_port() for _ in range(num_masters)],
            die_with_parent=die_with_parent,
            bus_ports=[free_loopback_port() for _ in range(num_masters)],
        ), num_attempts)  # fmt: skip

    def stop(self, kill: bool = False) -> None:
        """Stop every node (SIGTERM; SIGKILL with ``kill``)."""
        for node in self.nodes:
            node.stop(kill=kill)
