"""The order of the queue, and an in-memory index of queued requests kept in it.

The Redis store's sorted sets, the in-memory store and the simulator all read the
queue in one order, made of the scores :mod:`qlm.store.keys` describes:

* in a group, requests by :func:`group_member_score` (``deadline_at``), then id;
* groups by their head's score (the earliest deadline among their queued requests),
  then group key text.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator

from qlm.core.types import GroupKey, Request, RequestGroup


def group_member_score(deadline_at: float) -> float:
    """Score of a request in its group sorted set (see :mod:`qlm.store.keys`)."""
    return deadline_at


def request_order_key(request: Request) -> tuple[float, str]:
    """Where a queued request stands in its group (its score, then id)."""
    return group_member_score(request.deadline_at), request.id


def group_order_key(group: RequestGroup) -> tuple[float, str]:
    """Where a group stands in the index: its head's score (``requests`` in pull
    order), then its key text."""
    return request_order_key(group.requests[0])[0], str(group.key)


class QueueIndex:
    """Queued requests by group, read in the contract's order. Pure, synchronous.

    Each group's :class:`RequestGroup` is built once and kept until the group changes.
    """

    def __init__(self) -> None:
        self._members: dict[GroupKey, dict[str, Request]] = {}
        self._groups: dict[GroupKey, RequestGroup] = {}

    def add(self, key: GroupKey, request: Request) -> None:
        self._members.setdefault(key, {})[request.id] = request
        self._groups.pop(key, None)

    def remove(self, key: GroupKey, request_id: str) -> None:
        """Take ``request_id`` out of group ``key`` (KeyError if it is not there)."""
        members = self._members[key]
        del members[request_id]
        if not members:
            del self._members[key]
        self._groups.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._members

    def __iter__(self) -> Iterator[GroupKey]:
        return iter(self._members)

    def holds(self, key: GroupKey, request_id: str) -> bool:
        return request_id in self._members.get(key, ())

    def group(self, key: GroupKey) -> RequestGroup:
        """The queued group ``key``, requests in pull order (KeyError when empty)."""
        group = self._groups.get(key)
        if group is None:
            requests = sorted(self._members[key].values(), key=request_order_key)
            group = RequestGroup(key, tuple(requests))
            self._groups[key] = group
        return group

    def groups(self) -> tuple[RequestGroup, ...]:
        """Every queued group, in index order."""
        return tuple(sorted((self.group(k) for k in self._members), key=group_order_key))
