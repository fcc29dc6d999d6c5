"""A reader's copy of a Redis queue's membership, kept up to date from the queue log.

The scheduler snapshots the queue every step. Reading every queued record each time
costs O(queued requests) (seconds at 100k); the queue log (:mod:`qlm.store.keys`,
``queue:log``) says which ids entered or left which group since the last read, so a
snapshot reads only those changes and the records of the ids that (re)entered a group:
a queued request's scheduling fields change only on its way back into a group
(eviction with progress), which the log reports as a new ``+``.

:class:`QueueMirror` is the pure part (no I/O): it folds the log's changes into the
membership (every queued id, by group) and a :class:`~qlm.core.queue.QueueIndex` of the
requests whose records were read. A group whose membership did not change keeps its
:class:`~qlm.core.types.RequestGroup` object from one snapshot to the next (the
policies memoise by it). :meth:`RedisQueueStore.snapshot
<qlm.store.store.RedisQueueStore.snapshot>` drives it:

1. the snapshot script returns the log since :attr:`QueueMirror.position` and the size
   of every queued group (or, when the mirror is new or the log was trimmed past its
   position, the whole membership: :meth:`QueueMirror.reset`);
2. :meth:`QueueMirror.apply` folds the changes; :meth:`QueueMirror.agrees` compares
   the group sizes with Redis's, and a disagreement (the queue was flushed, restored
   from a backup, or changed by hand) makes the store read the membership whole;
3. the records of :meth:`QueueMirror.unread` ids are read and :meth:`QueueMirror.fill`
   adds their requests; an id whose record is missing stays a member without a request,
   as a whole read leaves it out of its group.

The result equals a whole read (``tests/integration/test_snapshot_incremental.py``
checks it, and the decisions made from it, over random changes).

:meth:`QueueMirror.queued_ids` answers, for the snapshot just made, whether an id is
queued in its groups by a lookup in the membership (the applier checks the ids a
decision names that way, instead of a pass over every queued request).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from qlm.core.queue import QueueIndex
from qlm.core.types import GroupKey, Request, RequestGroup

#: A change of the queue log: ``"+"`` (queued in the group) or ``"-"`` (left it).
ADDED, REMOVED = "+", "-"


class QueueMirror:
    """Queued ids by group and their requests, as of log entry :attr:`position`."""

    def __init__(self) -> None:
        #: The last log entry folded in; None until the first :meth:`reset`.
        self.position: int | None = None
        #: How many times the membership was read whole (:meth:`reset`).
        self.num_resets = 0
        #: How many requests were read in all (:meth:`fill`).
        self.num_read = 0
        self.index = QueueIndex()
        self._group_of: dict[str, GroupKey] = {}
        self._sizes: dict[GroupKey, int] = {}
        self._unread: dict[str, GroupKey] = {}
        #: Members whose record was missing when read (no group shows them).
        self._missing: set[str] = set()
        self._keys: dict[str, GroupKey] = {}
        #: Counts the changes of the membership or of the index (:class:`QueuedIds`).
        self.version = 0

    def key(self, text: str) -> GroupKey:
        """The :class:`GroupKey` of a group name (parsed once per name)."""
        key = self._keys.get(text)
        if key is None:
            key = self._keys[text] = GroupKey.parse(text)
        return key

    @property
    def num_members(self) -> int:
        return len(self._group_of)

    def reset(self, position: int, groups: Iterable[tuple[str, Sequence[str]]]) -> None:
        """Forget everything; the membership is ``groups`` (name, ids) as of ``position``;
        every id is unread."""
        self.position = position
        self.num_resets += 1
        self.version += 1
        self.index = QueueIndex()
        self._group_of, self._sizes, self._unread, self._missing = {}, {}, {}, set()
        for text, ids in groups:
            for request_id in ids:
                self._add(self.key(text), request_id)

    def apply(self, position: int, changes: Sequence[str]) -> None:
        """Fold the log entries after :attr:`position` up to ``position``: ``changes``
        flat, ``op, group, id`` per entry, in log order."""
        self.version += 1
        for n in range(0, len(changes), 3):
            op, text, request_id = changes[n : n + 3]
            self._remove(request_id)
            if op == ADDED:
                self._add(self.key(text), request_id)
        self.position = position

    def agrees(self, sizes: Iterable[tuple[str, int]]) -> bool:
        """Whether the membership has exactly these groups (name, number of ids)."""
        seen = 0
        for text, size in sizes:
            if self._sizes.get(self.key(text)) != size:
                return False
            seen += 1
        return seen == len(self._sizes)

    def unread(self) -> list[str]:
        """Ids queued whose record has not been read since they entered their group."""
        return list(self._unread)

    def fill(self, requests: Mapping[str, Request | None]) -> None:
        """The requests read for unread ids (None: no record; the id stays a member that
        no group shows). Ids no longer unread are ignored."""
        self.version += 1
        self.num_read += len(requests)
        for request_id, request in requests.items():
            key = self._unread.pop(request_id, None)
            if key is None:
                continue
            if request is None:
                self._missing.add(request_id)
            else:
                self.index.add(key, request)

    def groups(self, order: Iterable[str]) -> tuple[RequestGroup, ...]:
        """The groups with a request, in ``order`` (group names: the index order)."""
        index = self.index
        return tuple(index.group(key) for key in map(self.key, order) if key in index)

    def among(self, request_ids: set[str]) -> set[str]:
        """Those of ``request_ids`` queued with their request read (a group shows them)."""
        found = request_ids & self._group_of.keys()  # one C loop over the fewer
        if self._unread:
            found -= self._unread.keys()
        if self._missing:
            found -= self._missing
        return found

    def queued_ids(self, groups: tuple[RequestGroup, ...]) -> QueuedIds:
        """Which ids ``groups`` (just made by :meth:`groups`) hold, by lookups here."""
        return QueuedIds(self, groups)

    def _add(self, key: GroupKey, request_id: str) -> None:
        self._group_of[request_id] = key
        self._sizes[key] = self._sizes.get(key, 0) + 1
        self._unread[request_id] = key

    def _remove(self, request_id: str) -> None:
        key = self._group_of.pop(request_id, None)
        if key is None:
            return
        size = self._sizes[key] - 1
        if size:
            self._sizes[key] = size
        else:
            del self._sizes[key]
        self._missing.discard(request_id)
        if self._unread.pop(request_id, None) is None and self.index.holds(key, request_id):
            self.index.remove(key, request_id)


class QueuedIds:
    """Which ids are queued in the groups of one snapshot (a
    :class:`~qlm.core.types.QueuedIndex`): looked up in the mirror while it has not
    changed since the snapshot; after (the snapshot outlived the next one), in a set of
    the groups' ids made once."""

    __slots__ = ("_fallback", "_groups", "_mirror", "_version")

    def __init__(self, mirror: QueueMirror, groups: tuple[RequestGroup, ...]) -> None:
        self._mirror = mirror
        self._version = mirror.version
        self._groups = groups
        self._fallback: frozenset[str] | None = None

    def among(self, request_ids: set[str]) -> set[str]:
        if self._mirror.version == self._version:
            return self._mirror.among(request_ids)
        if self._fallback is None:
            self._fallback = frozenset(r.id for g in self._groups for r in g.requests)
        return request_ids & self._fallback
