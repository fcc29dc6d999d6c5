"""The order of the queue, and an in-memory index of queued requests kept in it.

The Redis store's sorted sets, the in-memory store and the simulator all read the
queue in one order, made of the scores :mod:`qlm.store.keys` describes:

* in a group, requests by :func:`group_member_score` (``deadline_at``), then id;
* groups by their head's score (the earliest deadline among their queued requests),
  then group key text.

Pure: no I/O.
"""

from __future__ import annotations

from bisect import bisect_left, insort
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

    Each group's requests are kept in pull order as they come and go (a binary search
    and a list insert or delete per change, not a sort of the group per read); its
    :class:`RequestGroup` is built once and kept until the group changes. The groups
    are kept in index order the same way (a group moves when its head's score does),
    and :meth:`groups` is built once per change of the queue, not sorted per read.
    """

    def __init__(self) -> None:
        self._members: dict[GroupKey, _Members] = {}
        self._groups: dict[GroupKey, RequestGroup] = {}
        #: Every group's place in index order: (head score, key text, key), sorted.
        self._order: list[tuple[float, str, GroupKey]] = []
        self._place: dict[GroupKey, tuple[float, str, GroupKey]] = {}
        self._all: tuple[RequestGroup, ...] | None = None
        #: How many groups hold each queued id (one, unless the caller queues an id twice).
        self._holders: dict[str, int] = {}
        #: Counts the changes (a :class:`QueuedIds` answers from the index while unchanged).
        self.version = 0

    def add(self, key: GroupKey, request: Request) -> None:
        members = self._members.get(key)
        if members is None:
            members = self._members[key] = _Members()
        if request.id not in members.by_id:
            self._holders[request.id] = self._holders.get(request.id, 0) + 1
        members.add(request)
        self._groups.pop(key, None)
        self._reorder(key, members)

    def remove(self, key: GroupKey, request_id: str) -> None:
        """Take ``request_id`` out of group ``key`` (KeyError if it is not there)."""
        members = self._members[key]
        members.remove(request_id)
        holders = self._holders[request_id] - 1
        if holders:
            self._holders[request_id] = holders
        else:
            del self._holders[request_id]
        if not members.by_id:
            del self._members[key]
        self._groups.pop(key, None)
        self._reorder(key, members)

    def _reorder(self, key: GroupKey, members: _Members) -> None:
        """Move group ``key`` to its place in index order after a change of its members
        (out of the order once empty)."""
        self._all = None
        self.version += 1
        old = self._place.get(key)
        if members.order_keys:
            score = members.order_keys[0][0]
            if old is not None and old[0] == score:
                return
            new = (score, old[1] if old is not None else str(key), key)
            self._place[key] = new
        else:
            new = None
            del self._place[key]
        if old is not None:
            del self._order[bisect_left(self._order, old)]
        if new is not None:
            insort(self._order, new)

    def __contains__(self, key: object) -> bool:
        return key in self._members

    def __iter__(self) -> Iterator[GroupKey]:
        return iter(self._members)

    def holds(self, key: GroupKey, request_id: str) -> bool:
        members = self._members.get(key)
        return members is not None and request_id in members.by_id

    def group(self, key: GroupKey) -> RequestGroup:
        """The queued group ``key``, requests in pull order (KeyError when empty)."""
        group = self._groups.get(key)
        if group is None:
            group = RequestGroup(key, tuple(self._members[key].ordered))
            self._groups[key] = group
        return group

    def groups(self) -> tuple[RequestGroup, ...]:
        """Every queued group, in index order (:func:`group_order_key`)."""
        if self._all is None:
            group = self.group
            self._all = tuple(group(key) for _, _, key in self._order)
        return self._all

    def queued_ids(self) -> QueuedIds:
        """Which ids :meth:`groups` holds now (a :class:`~qlm.core.types.QueuedIndex` for a
        snapshot of them), by lookups in this index instead of a pass over the groups."""
        return QueuedIds(self)


class QueuedIds:
    """Which ids a :class:`QueueIndex` held when this was made: looked up in the index
    while it has not changed since; after, in a set of the ids of its groups then."""

    __slots__ = ("_fallback", "_groups", "_index", "_version")

    def __init__(self, index: QueueIndex) -> None:
        self._index = index
        self._version = index.version
        self._groups = index.groups()
        self._fallback: frozenset[str] | None = None

    def among(self, request_ids: set[str]) -> set[str]:
        if self._index.version == self._version:
            return request_ids & self._index._holders.keys()
        if self._fallback is None:
            self._fallback = frozenset(r.id for g in self._groups for r in g.requests)
        return request_ids & self._fallback


class _Members:
    """One group's requests by id and in pull order (:func:`request_order_key`)."""

    __slots__ = ("by_id", "order_keys", "ordered")

    def __init__(self) -> None:
        self.by_id: dict[str, Request] = {}
        self.order_keys: list[tuple[float, str]] = []
        self.ordered: list[Request] = []

    def add(self, request: Request) -> None:
        if request.id in self.by_id:  # the same id again: its new fields replace the old
            self.remove(request.id)
        self.by_id[request.id] = request
        order_key = request_order_key(request)
        at = bisect_left(self.order_keys, order_key)
        self.order_keys.insert(at, order_key)
        self.ordered.insert(at, request)

    def remove(self, request_id: str) -> None:
        request = self.by_id.pop(request_id)
        at = bisect_left(self.order_keys, request_order_key(request))
        del self.order_keys[at]
        del self.ordered[at]
