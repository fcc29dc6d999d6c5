"""Every Redis key qlm uses, named once, and how every sorted-set score is computed.

All keys of one queue share one prefix (default ``qlm:``) so that several deployments
can share a server and so that nothing ever needs ``KEYS *``: every key is reachable
from one of the index keys below.

The prefix is a Redis Cluster **hash tag**: every key starts with ``{prefix}``
(``{qlm:}req:r1``), so all keys of one queue hash to one slot and every Lua script,
including the keys it derives from data it reads (the group of a request whose lease
expired, the groups named by a virtual queue), touches that slot only. A cluster thus
runs each queue on one shard; several queues (prefixes) spread over the shards. Why
the queue is not split further (by model or tenant) is in docs/redis.md.

Keys (``P`` is ``{prefix}``; ``<id>``, ``<group>``, ``<worker>`` are values):

==========================  ==========  ================================================
key                         type        contents
==========================  ==========  ================================================
``P req:<id>``              hash        the request record (schema in docs/redis.md);
                                        its existence is the idempotency check
``P group:<group>``         sorted set  ids of the *queued* requests of one group
``P groups``                sorted set  every group that has at least one queued request
``P vq:<worker>``           list        the worker's virtual queue: group keys, head first
``P forecast``              hash        group key → the group's predicted first tokens as
                                        of the scheduler's last decision (JSON of
                                        :class:`qlm.core.forecast.GroupForecast`)
``P workers``               set         every worker that has a virtual queue or has pulled
``P running:<worker>``      set         ids of the requests running on the worker
``P leases``                sorted set  ids of every running request
``P stream:<id>``           stream      the request's output chunks, then one end entry
``P queue:log``             stream      the queue log: one entry per change of a group's
                                        membership (``o`` ``+`` queued / ``-`` left,
                                        ``g`` group, ``i`` id); entry ids ``0-1``,
                                        ``0-2``, ... number every change; trimmed to
                                        about :data:`QUEUE_LOG_MAXLEN` entries
``P scheduler:leader``      string      the scheduler leader's token (PX: the lease)
``P scheduler:fence``       integer     the fencing token of the current leader's term
``P scheduler:state``       hash        policy name → the policy's state as its leader
                                        last saved it (JSON; qlm: fair share's counters),
                                        written only under the current fencing token
``P tenants``               set         every tenant name ever added (revoked ones too)
``P tenant:<name>``         hash        a tenant: ``key_sha256``, ``signing_key``,
                                        ``created_at``, ``revoked_at`` (qlm.tenants)
``P apikey:<sha256>``       string      the tenant whose active API key has this
                                        SHA-256 (hex); deleted on revoke
``P tenant:<name>:live``    sorted set  ids of the tenant's requests not known to have
                                        ended, by arrival (quota ``max_queued``)
``P tenant:<name>:tpm:<m>`` integer     tokens asked for in minute ``m`` (quota
                                        ``tokens_per_minute``; expires after 2 min)
``P file:<id>``             hash        an uploaded / produced file's metadata (Files API)
``P file:<id>:content``     string      its content (UTF-8 JSONL)
``P files``                 sorted set  every file id, scored by ``created_at``
``P batch:<id>``            hash        a batch (Batch API): status, times, counts, cursor
``P batch:<id>:out``        hash        custom_id → its output line (request succeeded)
``P batch:<id>:err``        hash        custom_id → its error line (refused, failed,
                                        cancelled, expired)
``P batches``               sorted set  every batch id, scored by ``created_at``
``P batches:active``        set         batches not yet completed, failed, expired or
                                        cancelled
``P batches:driver``        string      lock of the one process that moves batches forward
==========================  ==========  ================================================

``<group>`` is ``str(GroupKey)``: ``model|slo_class|window``, with ``|tenant`` (percent-encoded)
after it for a tenant other than ``default`` (one group per tenant: fair share).

Scores (the sorted-set score is the policy's sort key):

* ``group:<group>`` member ``id``: ``deadline_at = arrival_at + slo.ttft_s`` of the
  request (seconds, same clock as ``arrival_at``). Ties are broken by Redis itself
  in lexicographic order of the request id. An evicted request keeps its deadline,
  so it returns ahead of later arrivals of its group.
  (:func:`qlm.core.queue.group_member_score`; the in-memory store and the simulator
  order their queue by the same scores, :mod:`qlm.core.queue`.)
* ``groups`` member ``<group>``: the earliest deadline among the group's queued
  requests, i.e. the score of the head of ``group:<group>``. A group with no queued
  request is not in the index.
* ``leases`` member ``id``: ``lease_expires_at``, the time (store clock) after
  which ``requeue_expired`` returns the request to its group unless renewed.

The queue log lets a reader that keeps a copy of the membership (the scheduler's
snapshot, :mod:`qlm.store.mirror`) read only what changed since its last read: every
script that adds an id to a ``group:<group>`` or takes one out logs it, in the same
atomic step.

Scripts that touch keys which depend on data read inside the script build those
names from :attr:`Keys.prefix` passed in ARGV (the tagged ``{prefix}``), with the
same layout as this module, so they stay in the slot of the keys they declare.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlm.core.errors import InvalidInput
from qlm.core.queue import group_member_score
from qlm.core.types import GroupKey

__all__ = ["DEFAULT_PREFIX", "QUEUE_LOG_MAXLEN", "Keys", "group_member_score", "lease_score"]

DEFAULT_PREFIX = "qlm:"
#: About how many entries the queue log keeps (``XADD MAXLEN ~``): a reader more
#: changes than this behind reads the membership whole again. About 57 bytes an entry
#: with 9-character ids (5.7 MB at the bound).
QUEUE_LOG_MAXLEN = 100_000


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix. Pure string building, no I/O.

    ``Keys("qlm:").prefix`` is the hash-tagged ``"{qlm:}"`` that starts every key (a
    prefix given already tagged is kept as it is); :attr:`name` is the prefix given.
    """

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        prefix = self.prefix
        if not prefix or any(c.isspace() for c in prefix):
            raise InvalidInput("prefix", f"must be non-empty without spaces, got {prefix!r}")
        if not is_tagged(prefix):
            if "{" in prefix or "}" in prefix:
                raise InvalidInput("prefix", f"must not contain '{{' or '}}', got {prefix!r}")
            object.__setattr__(self, "prefix", f"{{{prefix}}}")

    @property
    def name(self) -> str:
        """The prefix without its hash-tag braces (``qlm:``)."""
        return self.prefix[1:-1]

    def request(self, request_id: str) -> str:
        return f"{self.prefix}req:{request_id}"

    def group(self, group: GroupKey | str) -> str:
        return f"{self.prefix}group:{group}"

    @property
    def groups(self) -> str:
        return f"{self.prefix}groups"

    def virtual_queue(self, worker_id: str) -> str:
        return f"{self.prefix}vq:{worker_id}"

    @property
    def forecast(self) -> str:
        return f"{self.prefix}forecast"

    @property
    def workers(self) -> str:
        return f"{self.prefix}workers"

    def running(self, worker_id: str) -> str:
        return f"{self.prefix}running:{worker_id}"

    @property
    def leases(self) -> str:
        return f"{self.prefix}leases"

    def stream(self, request_id: str) -> str:
        return f"{self.prefix}stream:{request_id}"

    @property
    def queue_log(self) -> str:
        return f"{self.prefix}queue:log"

    @property
    def scheduler_leader(self) -> str:
        return f"{self.prefix}scheduler:leader"

    @property
    def scheduler_fence(self) -> str:
        return f"{self.prefix}scheduler:fence"

    @property
    def scheduler_state(self) -> str:
        return f"{self.prefix}scheduler:state"

    @property
    def tenants(self) -> str:
        return f"{self.prefix}tenants"

    def tenant(self, name: str) -> str:
        return f"{self.prefix}tenant:{name}"

    def api_key(self, key_sha256: str) -> str:
        return f"{self.prefix}apikey:{key_sha256}"

    def tenant_live(self, name: str) -> str:
        """Ids of the tenant's requests not known to have ended (quota max_queued)."""
        return f"{self.prefix}tenant:{name}:live"

    def tenant_tokens(self, name: str, minute: int) -> str:
        """Tokens the tenant's requests asked for in one minute (quota tokens_per_minute)."""
        return f"{self.prefix}tenant:{name}:tpm:{minute}"

    def tenant_parked(self, name: str) -> str:
        """The tenant's batch records waiting for its quota, in arrival order (sorted set)."""
        return f"{self.prefix}tenant:{name}:parked"

    def tenant_parked_records(self, name: str) -> str:
        """The records of :meth:`tenant_parked` by stored id (hash)."""
        return f"{self.prefix}tenant:{name}:parked:records"

    def tenant_parked_lock(self, name: str) -> str:
        """Held by the ingest process moving the tenant's parked records (string, PX)."""
        return f"{self.prefix}tenant:{name}:parked:lock"

    @property
    def parked_tenants(self) -> str:
        """Tenants with parked batch records (set)."""
        return f"{self.prefix}tenants:parked"
    def file(self, file_id: str) -> str:
        return f"{self.prefix}file:{file_id}"

    def file_content(self, file_id: str) -> str:
        return f"{self.prefix}file:{file_id}:content"

    @property
    def files(self) -> str:
        return f"{self.prefix}files"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}batch:{batch_id}"

    def batch_output(self, batch_id: str) -> str:
        return f"{self.prefix}batch:{batch_id}:out"

    def batch_errors(self, batch_id: str) -> str:
        return f"{self.prefix}batch:{batch_id}:err"

    @property
    def batches(self) -> str:
        return f"{self.prefix}batches"

    @property
    def active_batches(self) -> str:
        return f"{self.prefix}batches:active"

    @property
    def batch_driver(self) -> str:
        return f"{self.prefix}batches:driver"


def is_tagged(prefix: str) -> bool:
    """Whether ``prefix`` is already a whole hash tag, ``{...}``, with no other braces."""
    inner = prefix[1:-1]
    return (
        len(prefix) > 2 and prefix[0] == "{" and prefix[-1] == "}"
        and "{" not in inner and "}" not in inner
    )



def lease_score(lease_expires_at: float) -> float:
    """Score of a request in the lease sorted set (see the module docstring)."""
    return lease_expires_at
