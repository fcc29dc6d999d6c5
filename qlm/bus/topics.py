"""Every Kafka topic qlm uses, its partitions and settings, and the admin step that creates them.

Topic names are ``<prefix>qlm.<name>``; the prefix is empty in a deployment and
unique per test, so that tests on one broker never see each other's records.
Record keys (see :mod:`qlm.bus.records`) decide partitions: request id for
requests, events and results (one request's records stay in order), worker id for
LSO commands and telemetry. Partition counts and replication come from the
deployment's :class:`TopicLayout` (settings ``kafka_partitions``,
``kafka_replication_factor``, ``kafka_min_insync_replicas``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

from qlm.bus.security import PLAINTEXT, KafkaAuth
from qlm.core.errors import InvalidInput, Unavailable

BATCH_REQUESTS: Final = "qlm.batch.requests"
BATCH_RESULTS: Final = "qlm.batch.results"
EVENTS: Final = "qlm.events"
LSO: Final = "qlm.lso"
TELEMETRY: Final = "qlm.telemetry"
DLQ: Final = "qlm.dlq"

DAY_MS: Final = 24 * 3600 * 1000
#: Name -> (default partitions, retention in ms). Partitions bound consumer parallelism per
#: group; :class:`TopicLayout` changes them per deployment.
_LAYOUT: Final[Mapping[str, tuple[int, int]]] = MappingProxyType(
    {
        BATCH_REQUESTS: (4, 7 * DAY_MS),
        BATCH_RESULTS: (2, 7 * DAY_MS),
        EVENTS: (4, 7 * DAY_MS),
        LSO: (2, 1 * DAY_MS),
        TELEMETRY: (2, 1 * DAY_MS),
        DLQ: (1, 30 * DAY_MS),
    }
)


@dataclass(frozen=True, slots=True)
class TopicNames:
    """The six topic names under one prefix (empty in a deployment)."""

    prefix: str = ""

    def __post_init__(self) -> None:
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        if not set(self.prefix) <= allowed or len(self.prefix) > 200:
            raise InvalidInput("prefix", "must be at most 200 characters of [A-Za-z0-9._-]")

    @property
    def batch_requests(self) -> str:
        return self.prefix + BATCH_REQUESTS

    @property
    def batch_results(self) -> str:
        return self.prefix + BATCH_RESULTS

    @property
    def events(self) -> str:
        return self.prefix + EVENTS

    @property
    def lso(self) -> str:
        return self.prefix + LSO

    @property
    def telemetry(self) -> str:
        return self.prefix + TELEMETRY

    @property
    def dlq(self) -> str:
        return self.prefix + DLQ

    def all(self) -> tuple[str, ...]:
        """All six names, in the order of :data:`_LAYOUT`."""
        return tuple(self.prefix + name for name in _LAYOUT)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """How one topic is created."""

    name: str
    num_partitions: int
    replication_factor: int
    configs: Mapping[str, str] = field(default_factory=dict)


def default_min_insync_replicas(replication_factor: int) -> int:
    """A majority of the replicas from three replicas on (3 → 2, 5 → 3); 1 below three.

    With acks=all a write is acknowledged once every in-sync replica has it, and refused
    while fewer than ``min.insync.replicas`` are in sync: with 3 replicas and 2, one
    broker may die without losing an acknowledged record or stopping writes. With 2
    replicas, 2 would stop writes whenever either broker is down, so 1 is kept there.
    """
    return replication_factor // 2 + 1 if replication_factor >= 3 else 1


@dataclass(frozen=True, slots=True)
class TopicLayout:
    """How many partitions and replicas qlm's topics get (the deployment's choice).

    ``partitions`` overrides the default partition count of the named topics (names
    without prefix, e.g. ``{"qlm.batch.requests": 12}``); partitions bound how many
    members of one consumer group work in parallel. ``min_insync_replicas`` None means
    :func:`default_min_insync_replicas`.
    """

    replication_factor: int = 1
    partitions: Mapping[str, int] = field(default_factory=dict)
    min_insync_replicas: int | None = None

    def __post_init__(self) -> None:
        if self.replication_factor < 1:
            raise InvalidInput(
                "replication_factor", f"must be >= 1, got {self.replication_factor}"
            )
        for name, num_partitions in self.partitions.items():
            if name not in _LAYOUT:
                raise InvalidInput(
                    "partitions", f"unknown topic {name!r}; known: {', '.join(_LAYOUT)}"
                )
            if not isinstance(num_partitions, int) or num_partitions < 1:
                raise InvalidInput("partitions", f"{name}: must be an integer >= 1, "
                                   f"got {num_partitions!r}")
        min_isr = self.min_insync_replicas
        if min_isr is not None and not 1 <= min_isr <= self.replication_factor:
            raise InvalidInput(
                "min_insync_replicas",
                f"must be between 1 and replication_factor={self.replication_factor}, "
                f"got {min_isr}",
            )

    @property
    def min_isr(self) -> int:
        """The ``min.insync.replicas`` every topic gets."""
        if self.min_insync_replicas is not None:
            return self.min_insync_replicas
        return default_min_insync_replicas(self.replication_factor)

    def num_partitions(self, name: str) -> int:
        """Partitions of topic ``name`` (without prefix)."""
        return self.partitions.get(name, _LAYOUT[name][0])


def topic_specs(
    names: TopicNames | None = None, layout: TopicLayout | None = None
) -> list[TopicSpec]:
    """The specs of all six topics under ``names``' prefix, laid out as ``layout`` says."""
    names = names or TopicNames()
    layout = layout or TopicLayout()
    return [
        TopicSpec(
            names.prefix + name,
            layout.num_partitions(name),
            layout.replication_factor,
            {"retention.ms": str(retention_ms), "min.insync.replicas": str(layout.min_isr)},
        )
        for name, (_, retention_ms) in _LAYOUT.items()
    ]


async def ensure_topics(bootstrap_servers: str, specs: Sequence[TopicSpec],
                        auth: KafkaAuth = PLAINTEXT) -> list[str]:
    """Create the topics that do not exist yet; returns the names it created.

    Existing topics are left as they are (their partitions are not changed).
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="qlm-admin",
                                **auth.client_options())
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [spec for spec in specs if spec.name not in existing]
        if not missing:
            return []
        new_topics = [
            NewTopic(
                spec.name,
                num_partitions=spec.num_partitions,
                replication_factor=spec.replication_factor,
                topic_configs=dict(spec.configs),
            )
            for spec in missing
        ]
        response = await admin.create_topics(new_topics)
        created = []
        for topic, error_code, *rest in response.topic_errors:
            if error_code == TopicAlreadyExistsError.errno:  # created by another process meanwhile
                continue
            if error_code != 0:
                message = rest[0] if rest and rest[0] else for_code(error_code).__name__
                raise Unavailable(f"creating Kafka topic {topic!r} failed: {message}")
            created.append(topic)
        await until_described(admin, created)
        return created
    finally:
        await admin.close()


#: How long :func:`ensure_topics` waits for topics it created to be known with a leader
#: for every partition.
TOPIC_READY_TIMEOUT_S = 30.0


async def until_described(admin: AIOKafkaAdminClient, topics: Sequence[str]) -> None:
    """Wait until every broker asked knows ``topics`` with a leader for each partition: a
    new topic's metadata reaches the brokers of a cluster a moment after it is created,
    and a client that asks another broker meanwhile is told the topic does not exist."""
    if not topics:
        return
    deadline = time.monotonic() + TOPIC_READY_TIMEOUT_S
    while True:
        described = await admin.describe_topics(list(topics))
        pending = [d["topic"] for d in described
                   if d["error_code"] != 0 or not d["partitions"]
                   or any(p["leader"] < 0 for p in d["partitions"])]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise Unavailable(f"Kafka topics {sorted(pending)} created but not ready after "
                              f"{TOPIC_READY_TIMEOUT_S:.0f} s")
        await asyncio.sleep(0.1)
