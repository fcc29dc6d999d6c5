"""Every Redis key qlm uses, named once, and how every sorted-set score is computed.

All keys share one prefix (default ``qlm:``) so that several deployments can share
a server and so that nothing ever needs ``KEYS *``: every key is reachable from
one of the index keys below.

Keys (``P`` is the prefix):

========================  ==========  ==================================================
key                       type        contents
========================  ==========  ==================================================
``P req:{id}``            hash        the request record (schema in docs/redis.md);
                                      its existence is the idempotency check
``P group:{group}``       sorted set  ids of the *queued* requests of one group
``P groups``              sorted set  every group that has at least one queued request
``P vq:{worker}``         list        the worker's virtual queue: group keys, head first
``P workers``             set         every worker that has a virtual queue or has pulled
``P running:{worker}``    set         ids of the requests running on the worker
``P leases``              sorted set  ids of every running request
``P stream:{id}``         stream      the request's output chunks, then one end entry
========================  ==========  ==================================================

``{group}`` is ``str(GroupKey)``: ``model|slo_class|window``.

Scores (the sorted-set score is the policy's sort key):

* ``group:{group}`` member ``id``: ``deadline_at = arrival_at + slo.ttft_s`` of the
  request (seconds, same clock as ``arrival_at``). Ties are broken by Redis itself
  in lexicographic order of the request id. An evicted request keeps its deadline,
  so it returns ahead of later arrivals of its group.
  (:func:`qlm.core.queue.group_member_score`; the in-memory store and the simulator
  order their queue by the same scores, :mod:`qlm.core.queue`.)
* ``groups`` member ``{group}``: the earliest deadline among the group's queued
  requests, i.e. the score of the head of ``group:{group}``. A group with no queued
  request is not in the index.
* ``leases`` member ``id``: ``lease_expires_at``, the time (store clock) after
  which ``requeue_expired`` returns the request to its group unless renewed.

Scripts that touch keys which depend on data read inside the script (the group of
a request whose lease expired, the groups named by a virtual queue) build those
names from the prefix passed in ARGV, with the same layout as this module. That is
fine on a single Redis server (qlm's deployment) and is not Redis-Cluster safe.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlm.core.errors import InvalidInput
from qlm.core.queue import group_member_score
from qlm.core.types import GroupKey

__all__ = ["DEFAULT_PREFIX", "Keys", "group_member_score", "lease_score"]

DEFAULT_PREFIX = "qlm:"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one prefix. Pure string building, no I/O."""

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or any(c.isspace() for c in self.prefix):
            raise InvalidInput("prefix", f"must be non-empty without spaces, got {self.prefix!r}")

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
    def workers(self) -> str:
        return f"{self.prefix}workers"

    def running(self, worker_id: str) -> str:
        return f"{self.prefix}running:{worker_id}"

    @property
    def leases(self) -> str:
        return f"{self.prefix}leases"

    def stream(self, request_id: str) -> str:
        return f"{self.prefix}stream:{request_id}"


def lease_score(lease_expires_at: float) -> float:
    """Score of a request in the lease sorted set (see the module docstring)."""
    return lease_expires_at
