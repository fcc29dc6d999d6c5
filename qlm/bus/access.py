"""Who may do what on qlm's Kafka topics: one principal per service, least privilege.

=================  =====================================  ==============================
principal          writes                                 reads
=================  =====================================  ==============================
``qlm-ingest``     ``qlm.events``, ``qlm.dlq``            ``qlm.batch.requests``,
                                                          ``qlm.telemetry``, ``qlm.events``
                                                          (the live workers)
``qlm-scheduler``  ``qlm.lso``                            ``qlm.events``, ``qlm.telemetry``
``qlm-worker``     ``qlm.events``, ``qlm.telemetry``,     ``qlm.lso``
                   ``qlm.batch.results``, ``qlm.dlq``
``qlm-estimator``  (nothing)                              ``qlm.telemetry``, ``qlm.events``
``qlm-client``     ``qlm.batch.requests``                 ``qlm.batch.results``
``qlm-admin``      super user: creates topics and ACLs    (everything)
=================  =====================================  ==============================

Every principal may also DESCRIBE the six topics (a service checks at start that they
exist; the admin creates them) and READ any consumer group (``*``: group names carry the
topic prefix and worker ids, so they are not known in advance; a group gives no access
to a topic by itself); a principal that writes may also IDEMPOTENT_WRITE on the cluster
(qlm's producers are idempotent). Nothing else is allowed
(``allow.everyone.if.no.acl.found=false``).
:func:`acl_bindings` is this table as data; ``qlm.localstack`` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from qlm.bus.topics import TopicNames

Operation = Literal["READ", "WRITE", "DESCRIBE", "IDEMPOTENT_WRITE"]
ADMIN: Final = "qlm-admin"
SERVICE_PRINCIPALS: Final = ("qlm-ingest", "qlm-scheduler", "qlm-worker", "qlm-estimator",
                             "qlm-client")


@dataclass(frozen=True, slots=True)
class AclEntry:
    """Allow ``principal`` (a user name) ``operation`` on ``resource`` (topic or group)."""

    principal: str
    resource: Literal["topic", "group", "cluster"]
    name: str
    operation: Operation


def _access(topics: TopicNames) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    t = topics
    return {
        "qlm-ingest": ((t.events, t.dlq), (t.batch_requests, t.telemetry, t.events)),
        "qlm-scheduler": ((t.lso,), (t.events, t.telemetry)),
        "qlm-worker": ((t.events, t.telemetry, t.batch_results, t.dlq), (t.lso,)),
        "qlm-estimator": ((), (t.telemetry, t.events)),
        "qlm-client": ((t.batch_requests,), (t.batch_results,)),
    }


def acl_bindings(topics: TopicNames) -> list[AclEntry]:
    """The table of the module docstring for the topics under ``topics.prefix``."""
    every_topic = (topics.events, topics.telemetry, topics.lso, topics.batch_requests,
                   topics.batch_results, topics.dlq)
    entries: list[AclEntry] = []
    for principal, (writes, reads) in _access(topics).items():
        entries += [AclEntry(principal, "topic", name, "WRITE") for name in writes]
        entries += [AclEntry(principal, "topic", name, "READ") for name in reads]
        entries += [AclEntry(principal, "topic", name, "DESCRIBE") for name in every_topic]
        entries.append(AclEntry(principal, "group", "*", "READ"))
        if writes:  # qlm's producers are idempotent (acks=all, no duplicates on retry)
            entries.append(AclEntry(principal, "cluster", "kafka-cluster", "IDEMPOTENT_WRITE"))
    return entries
