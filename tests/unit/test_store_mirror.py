"""QueueMirror (qlm.store.mirror): folding the queue log into a copy of the membership.
Pure; the same copy against a real Redis is tests/integration/test_snapshot_incremental.py."""

from __future__ import annotations

from qlm.core.types import SLO, GroupKey, Request, SLOClass
from qlm.store.mirror import QueueMirror

G1, G2 = "m|batch-1|1", "m|interactive|1"


def request(rid: str, arrival_at: float, num_generated: int = 0) -> Request:
    return Request(rid, "m", 10, 20, SLOClass.BATCH_1, SLO(60.0), arrival_at,
                   num_generated=num_generated)


def test_changes_fold_into_groups_and_unchanged_groups_stay_the_same_object() -> None:
    mirror = QueueMirror()
    mirror.reset(5, [(G1, ["a", "b"]), (G2, ["c"])])
    assert mirror.position == 5 and mirror.num_resets == 1
    assert sorted(mirror.unread()) == ["a", "b", "c"]
    mirror.fill({"a": request("a", 1.0), "b": request("b", 2.0), "c": request("c", 0.5)})
    assert mirror.unread() == []
    first = mirror.groups([G2, G1])
    assert [g.key for g in first] == [GroupKey.parse(G2), GroupKey.parse(G1)]
    assert [r.id for r in first[1].requests] == ["a", "b"]

    # b pulled, then evicted back with progress; d arrives; c cancelled
    mirror.apply(9, ["-", G1, "b", "+", G1, "b", "+", G1, "d", "-", G2, "c"])
    assert mirror.position == 9
    assert sorted(mirror.unread()) == ["b", "d"]  # only those records are read again
    assert mirror.agrees([(G1, 3)])
    assert not mirror.agrees([(G1, 3), (G2, 1)]) and not mirror.agrees([(G1, 2)])
    mirror.fill({"b": request("b", 2.0, num_generated=4), "d": None})  # d: record gone
    (group,) = mirror.groups([G1, G2])
    assert [(r.id, r.num_generated) for r in group.requests] == [("a", 0), ("b", 4)]
    assert mirror.groups([G1]) == (group,) and mirror.groups([G1])[0] is group

    mirror.apply(10, [])  # nothing changed: the same objects
    assert mirror.groups([G1])[0] is group


def test_an_id_that_leaves_before_its_record_is_read_is_not_shown() -> None:
    mirror = QueueMirror()
    mirror.reset(0, [])
    mirror.apply(2, ["+", G1, "a", "-", G1, "a"])
    assert mirror.unread() == [] and mirror.agrees([])
    mirror.fill({"a": request("a", 1.0)})  # read late: ignored
    assert mirror.groups([G1]) == ()


def test_queued_ids_answer_by_lookup_and_stay_true_to_their_snapshot() -> None:
    mirror = QueueMirror()
    mirror.reset(1, [(G1, ["a", "b"]), (G2, ["c"])])
    mirror.fill({"a": request("a", 1.0), "b": request("b", 2.0), "c": None})  # c: no record
    groups = mirror.groups([G1, G2])
    queued = mirror.queued_ids(groups)
    assert queued.among({"a", "b", "c", "zz"}) == {"a", "b"}  # as no group shows c

    mirror.apply(3, ["-", G1, "a", "+", G1, "d"])  # a newer snapshot's changes ...
    mirror.fill({"d": request("d", 3.0)})
    assert queued.among({"a", "d"}) == {"a"}  # ... do not change what the older one says
    later = mirror.queued_ids(mirror.groups([G1]))
    assert later.among({"a", "b", "d"}) == {"b", "d"}
    mirror.apply(4, ["+", G2, "e"])  # queued, not read yet: not shown
    assert mirror.queued_ids(mirror.groups([G1])).among({"b", "e"}) == {"b"}
