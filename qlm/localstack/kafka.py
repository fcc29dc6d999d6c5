"""Local Apache Kafka in KRaft mode on the machine's Java: one node (broker + controller), or
a cluster of several such nodes that form one controller quorum (:class:`KafkaCluster`).

The jars come from Maven Central through Maven and a small pom
(``qlm/localstack/kafka-pom.xml``) and are cached in
``~/.cache/qlm/kafka-<version>/libs`` (``QLM_KAFKA_LIBS`` overrides the directory,
``QLM_KAFKA_VERSION`` the version). Storage is formatted once per data directory;
later starts reuse it.

**Security** (``users``: :class:`KafkaUsers`): clients connect with SASL/SCRAM-SHA-512
over ``SASL_PLAINTEXT`` (the broker listens on loopback only; TLS on the Kafka listener is
left to deployments that leave the machine), the controller listener with SASL/PLAIN as
the admin, and ``StandardAuthorizer`` denies what no ACL allows. Every user's SCRAM
credentials are written into the storage when it is formatted; the passwords live in
``<data_dir>/users.json`` (mode 0600). :func:`apply_acls` creates the topics and the
ACLs of :mod:`qlm.bus.access` as the admin.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlm.bus.access import ADMIN, SERVICE_PRINCIPALS, acl_bindings
from qlm.bus.security import KafkaAuth
from qlm.bus.topics import TopicLayout, TopicNames, ensure_topics, topic_specs
from qlm.core.errors import InvalidInput, Unavailable
from qlm.localstack.process import (
    ServerProcess,
    ensure_port_free,
    free_loopback_port,
    load_or_create_passwords,
    start_on_free_ports,
)

DEFAULT_KAFKA_VERSION = "4.1.1"
DEFAULT_KAFKA_PORT = 9092
DEFAULT_CONTROLLER_PORT = 9093
START_TIMEOUT_S = 90.0
HEAP_OPTS = ("-Xms256m", "-Xmx512m")
#: Each node of a test cluster: three JVMs must share two busy cores and little memory.
CLUSTER_HEAP_OPTS = ("-Xms96m", "-Xmx256m")
#: JIT tier 1 only: a third to a half faster start on 2 busy cores, lower peak throughput.
QUICK_START_OPTS = ("-XX:TieredStopAtLevel=1",)
POM_PATH = Path(__file__).with_name("kafka-pom.xml")
BROKER_MAIN = "kafka.Kafka"
STORAGE_TOOL_MAIN = "kafka.tools.StorageTool"


def kafka_version() -> str:
    """The Kafka version to run (``QLM_KAFKA_VERSION``, default :data:`DEFAULT_KAFKA_VERSION`)."""
    return os.environ.get("QLM_KAFKA_VERSION", DEFAULT_KAFKA_VERSION)


def kafka_libs_dir(version: str | None = None) -> Path:
    """Where the broker's jars are cached (``QLM_KAFKA_LIBS`` overrides)."""
    override = os.environ.get("QLM_KAFKA_LIBS")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "qlm" / f"kafka-{version or kafka_version()}" / "libs"


def _broker_jar_present(libs: Path, version: str) -> bool:
    return (libs / f"kafka_2.13-{version}.jar").is_file()


def fetch_kafka_jars(version: str | None = None, libs: Path | None = None) -> Path:
    """Make sure the broker's jars are in ``libs`` (fetched with Maven once); returns ``libs``.

    Raises Unavailable when Maven is missing or the fetch fails.
    """
    version = version or kafka_version()
    libs = libs or kafka_libs_dir(version)
    if _broker_jar_present(libs, version):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise Unavailable("mvn not found: apt-get install maven (needed to fetch the Kafka jars)")
    staging = libs.with_name(libs.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        mvn, "-q", "-B", "-f", str(POM_PATH), f"-Dkafka.version={version}",
        "dependency:copy-dependencies", "-DincludeScope=runtime",
        f"-DoutputDirectory={staging}",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not _broker_jar_present(staging, version):
        raise Unavailable(
            f"fetching Kafka {version} jars with Maven failed (status {done.returncode}):\n"
            f"{(done.stdout + done.stderr)[-3000:]}"
        )
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)  # all or nothing: a half fetch never looks complete
    return libs


def java_binary() -> str:
    """The ``java`` to run Kafka with (``JAVA_HOME`` first, then PATH); Unavailable when absent."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").exists():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise Unavailable("java not found: apt-get install openjdk-17-jre-headless")
    return java


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64 without padding (22 characters).

    It may start with ``-``, so pass it as ``--cluster-id=ID`` (``-t ID`` reads it as a flag)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


def _metadata_request(correlation_id: int) -> bytes:
    """A Metadata v1 request asking for no topics (only the brokers), with its size prefix."""
    client_id = b"qlm-localstack"
    body = struct.pack(">hhih", 3, 1, correlation_id, len(client_id)) + client_id
    body += struct.pack(">i", 0)  # topics: empty array
    return struct.pack(">i", len(body)) + body


def _recv_exactly(sock: socket.socket, num_bytes: int) -> bytes:
    chunks = b""
    while len(chunks) < num_bytes:
        chunk = sock.recv(num_bytes - len(chunks))
        if not chunk:
            raise OSError("connection closed")
        chunks += chunk
    return chunks


def num_live_brokers(host: str, port: int, timeout_s: float = 1.0) -> int:
    """How many brokers the node on ``host:port`` reports in a Metadata response (0 on error).

    A broker lists itself only once it has registered with the controller and been
    unfenced, i.e. when it can serve produce and admin requests.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(_metadata_request(correlation_id=1))
            (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
            response = _recv_exactly(sock, size)
    except OSError:
        return 0
    correlation_id, num_brokers = struct.unpack_from(">ii", response, 0)
    return num_brokers if correlation_id == 1 else 0


@dataclass(frozen=True, slots=True)
class KafkaUsers:
    """SASL users of a secured broker and their passwords (the admin among them)."""

    passwords: Mapping[str, str]

    @classmethod
    def load_or_create(cls, path: Path) -> KafkaUsers:
        """The users recorded in ``path``, else new random passwords for the admin and every
        service principal (written to ``path``, mode 0600)."""
        return cls(load_or_create_passwords(path, (ADMIN, *SERVICE_PRINCIPALS)))

    def auth(self, user: str) -> KafkaAuth:
        """How ``user`` connects (SASL_PLAINTEXT, SCRAM-SHA-512)."""
        return KafkaAuth("SASL_PLAINTEXT", "SCRAM-SHA-512", user, self.passwords[user])


def apply_acls(bootstrap_servers: str, users: KafkaUsers, topics: TopicNames,
               timeout_s: float = 30.0, layout: TopicLayout | None = None) -> int:
    """Create the topics under ``topics.prefix`` (partitions and replicas: ``layout``) and
    the ACLs of :mod:`qlm.bus.access` as the admin (idempotent); returns the number of ACL
    bindings."""
    import asyncio

    from confluent_kafka.admin import (
        AclBinding,
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
        ResourceType,
    )

    asyncio.run(ensure_topics(bootstrap_servers, topic_specs(topics, layout), users.auth(ADMIN)))
    admin = AdminClient({
        "bootstrap.servers": bootstrap_servers, "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": ADMIN,
        "sasl.password": users.passwords[ADMIN],
    })
    bindings = [
        AclBinding({"topic": ResourceType.TOPIC, "group": ResourceType.GROUP,
                    "cluster": ResourceType.BROKER}[e.resource],  # BROKER: Kafka's CLUSTER
                   e.name, ResourcePatternType.LITERAL, f"User:{e.principal}", "*",
                   getattr(AclOperation, e.operation), AclPermissionType.ALLOW)
        for e in acl_bindings(topics)
    ]
    for binding, future in admin.create_acls(bindings, request_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
        except Exception as error:
            raise Unavailable(f"creating Kafka ACL {binding} failed: {error}") from None
    # The broker applies new ACLs from the metadata log a moment after they are created.
    anything: Any = None  # a filter's None matches every value (the stubs say str)
    every = AclBindingFilter(ResourceType.ANY, anything, ResourcePatternType.ANY, anything,
                             anything, AclOperation.ANY, AclPermissionType.ANY)
    deadline = time.monotonic() + timeout_s
    while len(admin.describe_acls(every).result(timeout=timeout_s)) < len(bindings):
        if time.monotonic() > deadline:
            raise Unavailable("the broker did not apply the new ACLs in time")
        time.sleep(0.1)
    return len(bindings)


def _num_live_brokers_sasl(bootstrap_servers: str, auth: KafkaAuth) -> int:
    import asyncio

    from aiokafka import AIOKafkaClient

    async def count() -> int:
        client = AIOKafkaClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=2000,
                                **auth.client_options())
        quiet = logging.getLogger("aiokafka")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # "Unable connect" on every poll until it is up
        try:
            await client.bootstrap()
            return len(client.cluster.brokers())
        except Exception:
            return 0
        finally:
            quiet.setLevel(level)
            await client.close()

    return asyncio.run(count())


class KafkaServer:
    """One KRaft node on ``127.0.0.1``; data, config, log and pid file live under ``data_dir``.

    Alone it is its own quorum; as a member of a :class:`KafkaCluster` it gets its
    ``node_id``, the ``voters`` of the quorum (``id@host:port,...``), the cluster's
    ``cluster_id`` and the replication of Kafka's internal topics (consumer offsets,
    transactions) from the cluster.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = DEFAULT_KAFKA_PORT,
        controller_port: int = DEFAULT_CONTROLLER_PORT,
        version: str | None = None,
        die_with_parent: bool = False,
        quick_start: bool = False,
        *,
        node_id: int = 1,
        voters: str | None = None,
        cluster_id: str | None = None,
        internal_replication: int = 1,
        heap_opts: tuple[str, ...] = HEAP_OPTS,
        users: KafkaUsers | None = None,
        host: str = "127.0.0.1",
        listen_host: str | None = None,
    ) -> None:
        """``die_with_parent``: stop the broker when the starting thread exits (tests).

        ``quick_start``: JIT tier 1 only, for brokers that must start fast more than
        run fast (tests); benchmarks and ``make up`` leave it off.

        ``host``: the name clients and the other nodes reach this node by (advertised);
        ``listen_host``: the address its listeners bind (default ``host``; ``0.0.0.0`` in
        a container, :mod:`qlm.localstack.credentials`).
        """
        self.data_dir = data_dir.resolve()
        self.die_with_parent = die_with_parent
        self.quick_start = quick_start
        self.port = port
        self.controller_port = controller_port
        self.version = version or kafka_version()
        self.host = host
        self.listen_host = listen_host or host
        self.node_id = node_id
        self.voters = voters or f"{node_id}@{self.host}:{controller_port}"
        self.cluster_id = cluster_id
        self.internal_replication = internal_replication
        self.heap_opts = heap_opts
        self.users = users
        self.config_path = self.data_dir / "server.properties"
        self.log_dirs = self.data_dir / "data"
        self.process = ServerProcess("kafka", self.data_dir, marker=str(self.config_path))

    @property
    def bootstrap_servers(self) -> str:
        """``127.0.0.1:<port>``, for aiokafka's ``bootstrap_servers``."""
        return f"{self.host}:{self.port}"

    def server_properties(self) -> str:
        """Combined broker+controller config; internal topics have one partition, replicated
        ``internal_replication`` times (their min ISR is a majority of that)."""
        return "".join(f"{key}={value}\n" for key, value in self.properties().items())

    def properties(self) -> dict[str, str]:
        """:meth:`server_properties` as a mapping."""
        host, port, cport = self.host, self.port, self.controller_port
        bind = self.listen_host
        replicas = str(self.internal_replication)
        min_isr = str(self.internal_replication // 2 + 1)
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": self.voters,
            "listeners": f"PLAINTEXT://{bind}:{port},CONTROLLER://{bind}:{cport}",
            "advertised.listeners": f"PLAINTEXT://{host}:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.log_dirs),
            "num.partitions": "1",
            "auto.create.topics.enable": "false",
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            "share.coordinator.state.topic.num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            # A crashed node is fenced (its partitions get new leaders) after 4 s, not 9 s.
            "broker.session.timeout.ms": "4000",
            "broker.heartbeat.interval.ms": "1000",
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "log.retention.hours": "168",
        }
        if self.users is not None:
            settings.update(self._security_properties())
        return settings

    def _security_properties(self) -> dict[str, str]:
        """SASL listeners and the authorizer (module docstring)."""
        assert self.users is not None
        host, port, cport = self.host, self.port, self.controller_port
        bind = self.listen_host
        password = self.users.passwords[ADMIN]
        plain = ("org.apache.kafka.common.security.plain.PlainLoginModule required "
                 f'username="{ADMIN}" password="{password}" user_{ADMIN}="{password}";')
        scram = ("org.apache.kafka.common.security.scram.ScramLoginModule required "
                 f'username="{ADMIN}" password="{password}";')
        return {
            "listeners": f"SASL_PLAINTEXT://{bind}:{port},CONTROLLER://{bind}:{cport}",
            "advertised.listeners": f"SASL_PLAINTEXT://{host}:{port}",
            "inter.broker.listener.name": "SASL_PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:SASL_PLAINTEXT,"
                                              "SASL_PLAINTEXT:SASL_PLAINTEXT",
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "sasl.mechanism.inter.broker.protocol": "SCRAM-SHA-512",
            "sasl.mechanism.controller.protocol": "PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
            "listener.name.controller.plain.sasl.jaas.config": plain,
            "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config": scram,
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": f"User:{ADMIN}",
            "allow.everyone.if.no.acl.found": "false",
        }

    def _log4j2_config(self) -> Path:
        path = self.data_dir / "log4j2.properties"
        path.write_text(
            "status = warn\n"
            "appender.out.type = Console\n"
            "appender.out.name = out\n"
            "appender.out.layout.type = PatternLayout\n"
            "appender.out.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = info\n"
            "rootLogger.appenderRef.out.ref = out\n"
            "logger.kafka.name = kafka\n"
            "logger.kafka.level = warn\n"
            "logger.org.name = org.apache.kafka\n"
            "logger.org.level = warn\n"
            "logger.started.name = kafka.server.KafkaRaftServer\n"
            "logger.started.level = info\n"
        )
        return path

    def _java_argv(self, libs: Path, main: str, *args: str, quick: bool = False) -> list[str]:
        return [
            java_binary(), *self.heap_opts, *(QUICK_START_OPTS if quick else ()),
            "-XX:+UseSerialGC", "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self._log4j2_config()}",
            "-cp", f"{libs}/*", main, *args,
        ]  # fmt: skip

    def is_formatted(self) -> bool:
        """Whether the KRaft storage under ``log_dirs`` has been formatted already."""
        return (self.log_dirs / "meta.properties").is_file()

    def format_storage(self, libs: Path) -> None:
        """Format KRaft storage once (``cluster_id``, else a new one); a formatted directory
        is left alone."""
        if self.is_formatted():
            return
        cluster_id = self.cluster_id or new_cluster_id()
        argv = self._java_argv(
            libs, STORAGE_TOOL_MAIN, "format", f"--cluster-id={cluster_id}",
            "-c", str(self.config_path), *self.scram_args(), quick=True,
        )  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not self.is_formatted():
            raise Unavailable(
                f"formatting Kafka storage in {self.log_dirs} failed:\n"
                f"{(done.stdout + done.stderr)[-3000:]}"
            )

    def scram_args(self) -> list[str]:
        """``kafka-storage format`` arguments that write every user's SCRAM credentials."""
        if self.users is None:
            return []
        return [arg for user, password in self.users.passwords.items()
                for arg in ("--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]")]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Fetch jars if needed, format once, start the broker and wait until it serves metadata.

        Returns the seconds from process start to ready.
        """
        started_at = self.launch()
        self.wait_ready(1, timeout_s)
        return time.monotonic() - started_at

    def launch(self) -> float:
        """Fetch jars if needed, format once and start the process without waiting for it;
        returns the ``time.monotonic()`` of the start."""
        libs = fetch_kafka_jars(self.version)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.server_properties())
        self.format_storage(libs)
        ensure_port_free(self.host, self.port, "kafka")
        ensure_port_free(self.host, self.controller_port, "kafka controller")
        started_at = time.monotonic()
        self.process.start(
            self._java_argv(libs, BROKER_MAIN, str(self.config_path), quick=self.quick_start),
            die_with_parent=self.die_with_parent,
        )
        return started_at

    def wait_ready(self, num_brokers: int, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until this node reports ``num_brokers`` live brokers; on failure stop it
        (SIGKILL) and raise Unavailable with its log's tail."""
        try:
            self.process.wait_until(
                lambda: self.num_live_brokers() >= num_brokers,
                timeout_s,
                f"{num_brokers} broker(s) answering on port {self.port}",
                poll_s=0.2,
            )
        except Unavailable:
            self.process.stop(timeout_s=2.0, kill=True)
            raise

    def num_live_brokers(self) -> int:
        """Live brokers this node reports (0 when it does not answer); as the admin over
        SASL when secured."""
        if self.users is None:
            return num_live_brokers(self.host, self.port)
        return _num_live_brokers_sasl(self.bootstrap_servers, self.users.auth(ADMIN))

    @classmethod
    def start_on_free_ports(
        cls,
        data_dir: Path,
        die_with_parent: bool = False,
        quick_start: bool = False,
        num_attempts: int = 3,
        users: KafkaUsers | None = None,
    ) -> KafkaServer:
        """A started broker on free loopback ports; tries new ports when one is taken first.

        Raises the last Unavailable when every attempt fails.
        """
        return start_on_free_ports(lambda: cls(
            data_dir, free_loopback_port(), free_loopback_port(),
            die_with_parent=die_with_parent, quick_start=quick_start, users=users,
        ), num_attempts)  # fmt: skip

    def stop(self, kill: bool = False) -> bool:
        """Controlled shutdown on SIGTERM (or SIGKILL with ``kill``); False when none ran."""
        return self.process.stop(timeout_s=30.0, kill=kill)

    def is_running(self) -> bool:
        """Whether the broker this object (or its pid file) names is alive."""
        return self.process.running_pid() is not None


class KafkaCluster:
    """``num_nodes`` KRaft nodes on ``127.0.0.1``, each broker and controller, one quorum.

    Node ``i`` (1-based) lives under ``data_dir/node-i``. Kafka's internal topics are
    replicated on every node (at most three), so the cluster keeps serving consumer
    groups when one node dies. Topics qlm creates get the replication its settings ask for
    (:class:`qlm.bus.topics.TopicLayout`).
    """

    def __init__(
        self,
        data_dir: Path,
        ports: Sequence[tuple[int, int]],
        die_with_parent: bool = False,
        quick_start: bool = False,
        heap_opts: tuple[str, ...] = CLUSTER_HEAP_OPTS,
    ) -> None:
        """``ports``: (broker port, controller port) per node."""
        if not ports:
            raise InvalidInput("ports", "a cluster needs at least one node")
        self.data_dir = data_dir.resolve()
        host = "127.0.0.1"
        voters = ",".join(f"{i}@{host}:{cport}" for i, (_, cport) in enumerate(ports, start=1))
        cluster_id = new_cluster_id()
        self.nodes = [
            KafkaServer(
                self.data_dir / f"node-{i}", port, cport, die_with_parent=die_with_parent,
                quick_start=quick_start, node_id=i, voters=voters, cluster_id=cluster_id,
                internal_replication=min(3, len(ports)), heap_opts=heap_opts,
            )
            for i, (port, cport) in enumerate(ports, start=1)
        ]  # fmt: skip

    @property
    def bootstrap_servers(self) -> str:
        """Every node's ``127.0.0.1:<port>``, comma-separated (aiokafka's ``bootstrap_servers``)."""
        return ",".join(node.bootstrap_servers for node in self.nodes)

    def start(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Start every node, then wait until each reports all of them live; returns seconds.

        The nodes are started together: none is ready before a majority of the quorum runs.
        On failure every node is stopped and Unavailable raised.
        """
        started_at = time.monotonic()
        try:
            for node in self.nodes:
                node.launch()
            for node in self.nodes:
                remaining_s = max(1.0, timeout_s - (time.monotonic() - started_at))
                node.wait_ready(len(self.nodes), remaining_s)
        except Unavailable:
            self.stop(kill=True)
            raise
        return time.monotonic() - started_at

    @classmethod
    def start_on_free_ports(
        cls,
        data_dir: Path,
        num_nodes: int = 3,
        die_with_parent: bool = False,
        quick_start: bool = False,
        num_attempts: int = 3,
    ) -> KafkaCluster:
        """A started cluster on free loopback ports (new ports and a new directory per try)."""
        attempts = iter(range(1, num_attempts + 1))
        return start_on_free_ports(lambda: cls(
            data_dir / f"try-{next(attempts)}",
            [(free_loopback_port(), free_loopback_port()) for _ in range(num_nodes)],
            die_with_parent=die_with_parent, quick_start=quick_start,
        ), num_attempts)  # fmt: skip

    def node_of_port(self, port: int) -> KafkaServer:
        """The node whose broker listens on ``port``."""
        for node in self.nodes:
            if node.port == port:
                return node
        raise InvalidInput("port", f"no node of this cluster listens on {port}")

    def kill(self, node: KafkaServer) -> None:
        """SIGKILL one node (a crash: no controlled shutdown, no leadership hand-over)."""
        node.stop(kill=True)

    def stop(self, kill: bool = False) -> None:
        """Stop every node (controlled shutdown; SIGKILL with ``kill``)."""
        for node in self.nodes:
            node.stop(kill=kill)
