"""Credentials and certificates of a containerised deployment (compose.yaml, deploy/k8s):
what ``make up`` makes for the local stack (:mod:`qlm.localstack.redis`,
:mod:`qlm.localstack.kafka`, :mod:`qlm.tls`), written as files the containers mount.

``python -m qlm.localstack.credentials write --dir DIR`` (compose: the one-shot
``credentials`` service, into a volume; Kubernetes: once on the operator's machine, into
``deploy/k8s/base/credentials/`` for kustomize's ``secretGenerator``) writes, and keeps
on a rerun (passwords and keys do not change once made):

================  ==============================================================
``DIR/tls/``       ``ca.pem``, ``server.pem`` / ``server-key.pem`` (names: localhost,
                   the loopback addresses and ``--tls-names``), ``client.pem`` /
                   ``client-key.pem`` (mTLS)
``DIR/redis/``     ``users.acl`` (Redis's ``aclfile``: the admin and one user per
                   service, :class:`~qlm.localstack.redis.RedisUsers`), ``admin-password``
``DIR/kafka/``     ``server-<i>.properties`` per node of ``--kafka-nodes`` (SASL/SCRAM,
                   the ACL authorizer, as ``make up``'s broker), ``scram-args`` (the
                   ``kafka-storage format`` arguments that create every SCRAM user),
                   ``cluster-id``, ``admin.properties`` (the admin's client config, for
                   Kafka's own tools), ``start.sh`` (format once, then run the node)
``DIR/<who>/``     for ``ingest``, ``scheduler``, ``worker``, ``estimator``, ``client``
                   and ``admin``: one file per setting, named as its environment
                   variable (``QLM_REDIS_URL`` with the user and password,
                   ``QLM_KAFKA_SASL_USERNAME``, ``QLM_KAFKA_SASL_PASSWORD``, ...). A
                   service reads them with ``QLM_SECRETS_DIR=DIR/<who>``
                   (:func:`services.common.settings.load_settings`); in Kubernetes the
                   directory is a Secret taken with ``envFrom``.
``DIR/*.json``     the passwords (``redis-users.json``, ``kafka-users.json``), and
                   ``DIR/ca-key.pem``, the CA's key (kept out of ``tls/``)
================  ==============================================================

Files holding a secret are mode 0600 (0644: certificates, the cluster id, the start
script); run as root, each directory is handed to the user of the image that reads it
(:data:`OWNERS`).

``python -m qlm.localstack.credentials grant --dir DIR`` runs once the brokers answer,
with the admin's settings of ``DIR/admin`` and the topic layout of its flags (defaults:
``QLM_TOPIC_PREFIX``, ``QLM_KAFKA_REPLICATION_FACTOR``, ``QLM_KAFKA_PARTITIONS``): it
creates the topics and the ACLs of :mod:`qlm.bus.access` as the Kafka admin, and (unless
``--no-dev-tenant``) the development tenant, whose API key it writes to
``DIR/client/QLM_API_KEY``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from qlm.bus.access import ADMIN as KAFKA_ADMIN
from qlm.bus.topics import TopicLayout, TopicNames
from qlm.core.errors import InvalidInput, QlmError
from qlm.localstack.kafka import KafkaServer, KafkaUsers, new_cluster_id
from qlm.localstack.redis import REDIS_ADMIN, RedisUsers
from qlm.tls import ensure_local_pki

#: Who gets a directory of settings: service → (Redis user, Kafka user); the client has no
#: Redis user (it submits through ingest and Kafka), the admin is both brokers' admin.
PRINCIPALS: Final[Mapping[str, tuple[str | None, str]]] = {
    "ingest": ("qlm-ingest", "qlm-ingest"),
    "scheduler": ("qlm-scheduler", "qlm-scheduler"),
    "worker": ("qlm-worker", "qlm-worker"),
    "estimator": ("qlm-estimator", "qlm-estimator"),
    "client": (None, "qlm-client"),
    "admin": (REDIS_ADMIN, KAFKA_ADMIN),
}
#: The user each directory belongs to when written as root: the images that read them
#: (apache/kafka runs as uid 1000, redis as 999, qlm's image as 10001).
OWNERS: Final = {"kafka": 1000, "redis": 999, **dict.fromkeys((*PRINCIPALS, "tls"), 10001)}
#: Where the Kafka image keeps its data, tools and the files of ``DIR/kafka``.
KAFKA_DATA_DIR: Final = Path("/var/lib/kafka")
KAFKA_HOME: Final = "/opt/kafka"
KAFKA_START: Final = """#!/bin/sh
# Start one qlm Kafka node: format its storage once (with every SCRAM user), then run it.
# The node is QLM_KAFKA_NODE, else the ordinal at the end of the host name (StatefulSet);
# Kafka's scripts are under KAFKA_HOME (the apache/kafka image's /opt/kafka).
set -euf
here=$(dirname "$0")
home=${{KAFKA_HOME:-{home}}}
node=${{QLM_KAFKA_NODE:-${{HOSTNAME##*-}}}}
conf="$here/server-$node.properties"
"$home/bin/kafka-storage.sh" format --ignore-formatted \\
  --cluster-id "$(cat "$here/cluster-id")" --config "$conf" $(cat "$here/scram-args")
exec "$home/bin/kafka-server-start.sh" "$conf"
"""


@dataclass(frozen=True, slots=True)
class Deployment:
    """Where the brokers are, as the containers see them."""

    redis_host: str = "redis"
    redis_port: int = 6379
    kafka_nodes: tuple[str, ...] = ("kafka",)
    kafka_port: int = 9092
    controller_port: int = 9093
    kafka_listen_host: str = "0.0.0.0"
    tls_names: tuple[str, ...] = ()
    key_prefix: str = "qlm:"
    #: The Kafka node's data directory (its ``log.dirs`` is ``<this>/data``).
    kafka_data_dir: Path = KAFKA_DATA_DIR

    def __post_init__(self) -> None:
        if not self.kafka_nodes or any(not n.strip() for n in self.kafka_nodes):
            raise InvalidInput("kafka_nodes", "must name at least one host")

    @property
    def kafka_bootstrap(self) -> str:
        return ",".join(f"{node}:{self.kafka_port}" for node in self.kafka_nodes)


def _write(path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` with ``mode`` (created with it: never readable by others meanwhile)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, mode)


def kafka_nodes(deployment: Deployment, users: KafkaUsers,
                cluster_id: str) -> list[KafkaServer]:
    """One :class:`KafkaServer` per node (only its configuration is used here)."""
    d = deployment
    voters = ",".join(f"{i}@{node}:{d.controller_port}" for i, node in enumerate(d.kafka_nodes))
    return [KafkaServer(d.kafka_data_dir, port=d.kafka_port, controller_port=d.controller_port,
                        version="container", node_id=i, voters=voters, cluster_id=cluster_id,
                        internal_replication=min(3, len(d.kafka_nodes)), users=users,
                        host=node, listen_host=d.kafka_listen_host)
            for i, node in enumerate(d.kafka_nodes)]


def settings_of(who: str, deployment: Deployment, redis: RedisUsers,
                kafka: KafkaUsers) -> dict[str, str]:
    """The settings files of ``who`` (a key of :data:`PRINCIPALS`)."""
    redis_user, kafka_user = PRINCIPALS[who]
    files = {"QLM_KAFKA_BOOTSTRAP": deployment.kafka_bootstrap,
             "QLM_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
             "QLM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
             "QLM_KAFKA_SASL_USERNAME": kafka_user,
             "QLM_KAFKA_SASL_PASSWORD": kafka.passwords[kafka_user]}
    if redis_user is not None:
        files["QLM_REDIS_URL"] = redis.url(redis_user, deployment.redis_host,
                                           deployment.redis_port)
    return files


def write(directory: Path, deployment: Deployment) -> list[Path]:
    """Write (or complete) the files of the module docstring; the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = ensure_local_pki(directory / "tls", names=deployment.tls_names)
    if pki.ca_key.exists():  # the services mount tls/: the CA's key stays with the admin
        pki.ca_key.replace(directory / "ca-key.pem")
    redis = RedisUsers.load_or_create(directory / "redis-users.json")
    kafka = KafkaUsers.load_or_create(directory / "kafka-users.json")
    cluster_id_file = directory / "kafka" / "cluster-id"
    cluster_id = (cluster_id_file.read_text().strip() if cluster_id_file.exists()
                  else new_cluster_id())
    written: list[Path] = []

    def put(path: Path, text: str, mode: int = 0o600) -> None:
        _write(path, text, mode)
        written.append(path)

    put(directory / "redis" / "users.acl", redis.acl_file(deployment.key_prefix))
    put(directory / "redis" / "admin-password", redis.passwords[REDIS_ADMIN])
    nodes = kafka_nodes(deployment, kafka, cluster_id)
    for node in nodes:
        put(directory / "kafka" / f"server-{node.node_id}.properties", node.server_properties())
    put(directory / "kafka" / "scram-args", " ".join(nodes[0].scram_args()))
    put(cluster_id_file, cluster_id, 0o644)
    put(directory / "kafka" / "admin.properties", kafka_client_properties(kafka))
    put(directory / "kafka" / "start.sh", KAFKA_START.format(home=KAFKA_HOME), 0o755)
    for who in PRINCIPALS:
        for name, value in settings_of(who, deployment, redis, kafka).items():
            put(directory / who / name, value)
    if os.geteuid() == 0:
        hand_over(directory)
    return written


def kafka_client_properties(kafka: KafkaUsers, user: str = KAFKA_ADMIN) -> str:
    """A Kafka tool's ``--command-config``: SASL/SCRAM as ``user``."""
    return ("security.protocol=SASL_PLAINTEXT\nsasl.mechanism=SCRAM-SHA-512\n"
            "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule "
            f'required username="{user}" password="{kafka.passwords[user]}";\n')


def hand_over(directory: Path) -> None:
    """Give each directory of :data:`OWNERS` (and its files) to the user that reads it."""
    for name, uid in OWNERS.items():
        sub = directory / name
        if not sub.is_dir():
            continue
        os.chown(sub, uid, uid)
        os.chmod(sub, 0o700)
        for path in sub.iterdir():
            os.chown(path, uid, uid)


def grant(directory: Path, layout: TopicLayout, topic_prefix: str = "",
          key_prefix: str = "qlm:", dev_tenant: bool = True) -> str | None:
    """Topics (``layout``) and ACLs as the Kafka admin of ``directory/admin``, and with
    ``dev_tenant`` the development tenant as the Redis admin (module docstring); returns
    the tenant's API key (None without it)."""
    from qlm.localstack.kafka import apply_acls
    from qlm.localstack.services import ensure_dev_tenant

    admin = directory / "admin"

    def setting(name: str) -> str:
        try:
            return (admin / name).read_text().strip()
        except OSError as error:
            raise InvalidInput(name, f"cannot read {admin / name}: {error.strerror}") from None

    kafka = KafkaUsers({KAFKA_ADMIN: setting("QLM_KAFKA_SASL_PASSWORD")})
    apply_acls(setting("QLM_KAFKA_BOOTSTRAP"), kafka, TopicNames(topic_prefix), layout=layout)
    if not dev_tenant:
        return None
    key_file = directory / "client" / "QLM_API_KEY"
    key = ensure_dev_tenant(setting("QLM_REDIS_URL"), key_file, key_prefix)
    _write(key_file, key)
    if os.geteuid() == 0:
        os.chown(key_file, OWNERS["client"], OWNERS["client"])
    return key


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlm.localstack.credentials",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["write", "grant"])
    parser.add_argument("--dir", type=Path, required=True, help="where the files go")
    parser.add_argument("--redis-host", default="redis")
    parser.add_argument("--redis-port", type=int, default=6379)
    parser.add_argument("--kafka-nodes", default="kafka",
                        help="host names of the Kafka nodes, comma-separated (node i is "
                        "the i-th)")
    parser.add_argument("--kafka-port", type=int, default=9092)
    parser.add_argument("--controller-port", type=int, default=9093)
    parser.add_argument("--kafka-listen-host", default="0.0.0.0")
    parser.add_argument("--tls-names", default="",
                        help="DNS names of the services, comma-separated, for the server "
                        "certificate (besides localhost)")
    env = os.environ.get
    parser.add_argument("--topic-prefix", default=env("QLM_TOPIC_PREFIX", ""),
                        help="grant: prefix of the topics (env QLM_TOPIC_PREFIX)")
    parser.add_argument("--key-prefix", default=env("QLM_KEY_PREFIX", "qlm:"),
                        help="prefix of the Redis keys (env QLM_KEY_PREFIX)")
    parser.add_argument("--replication-factor", type=int,
                        default=int(env("QLM_KAFKA_REPLICATION_FACTOR", "1")),
                        help="grant: replicas of each topic (env QLM_KAFKA_REPLICATION_FACTOR)")
    parser.add_argument("--partitions", default=env("QLM_KAFKA_PARTITIONS", "{}"),
                        help="grant: partitions per topic, JSON (env QLM_KAFKA_PARTITIONS)")
    parser.add_argument("--no-dev-tenant", action="store_true",
                        help="grant: make no development tenant (Kubernetes: tenants are "
                        "added with qlm tenants add)")
    args = parser.parse_args(argv)
    try:
        if args.command == "write":
            deployment = Deployment(
                redis_host=args.redis_host, redis_port=args.redis_port,
                kafka_nodes=_names(args.kafka_nodes), kafka_port=args.kafka_port,
                controller_port=args.controller_port, kafka_listen_host=args.kafka_listen_host,
                tls_names=_names(args.tls_names), key_prefix=args.key_prefix)
            written = write(args.dir, deployment)
            print(f"credentials: {len(written)} files under {args.dir}")
        else:
            try:
                partitions = {str(k): int(v) for k, v in json.loads(args.partitions).items()}
            except (ValueError, AttributeError, TypeError):
                raise InvalidInput("partitions", "must be a JSON object of topic: count, got "
                                   f"{args.partitions!r}") from None
            key = grant(args.dir, TopicLayout(replication_factor=args.replication_factor,
                                              partitions=partitions),
                        args.topic_prefix, args.key_prefix, dev_tenant=not args.no_dev_tenant)
            print("granted: topics, Kafka ACLs" + (
                f" and the development tenant ({args.dir / 'client' / 'QLM_API_KEY'})"
                if key is not None else ""))
    except (QlmError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
