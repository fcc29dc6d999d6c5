"""QueueIndex (qlm.core.queue) keeps each group in the contract's order as requests come
and go: the same groups, in the same order, as sorting what is queued from scratch."""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st

from qlm.core.queue import QueueIndex, group_order_key, request_order_key
from qlm.core.types import SLO, GroupKey, Request, RequestGroup, SLOClass

KEYS = (GroupKey("m", SLOClass.BATCH_1, 0), GroupKey("m", SLOClass.BATCH_1, 1))

# (add?, group, id number, arrival): ties of deadline are common, broken by id.
CHANGES = st.lists(st.tuples(st.booleans(), st.integers(0, 1), st.integers(0, 30),
                             st.integers(0, 5)), max_size=80)


@hypothesis.given(changes=CHANGES)
def test_groups_stay_in_pull_order_through_adds_removes_and_replacements(
    changes: list[tuple[bool, int, int, int]],
) -> None:
    index = QueueIndex()
    expected: dict[GroupKey, dict[str, Request]] = {}
    for add, k, number, arrival in changes:
        key, rid = KEYS[k], f"r{number}"
        members = expected.setdefault(key, {})
        if add:  # a new request, or the same id again with other fields
            request = Request(rid, "m", 10, 20, SLOClass.BATCH_1, SLO(60.0), float(arrival))
            index.add(key, request)
            members[rid] = request
        elif rid in members:
            index.remove(key, rid)
            del members[rid]
        if not members:
            del expected[key]
        built = index.groups()
        assert built == tuple(sorted(
            (RequestGroup(g, tuple(sorted(m.values(), key=request_order_key)))
             for g, m in expected.items()), key=group_order_key))
        assert all(index.holds(g, i) for g, m in expected.items() for i in m)
        assert all(index.group(g.key) is g for g in built)  # kept until the group changes


@hypothesis.given(changes=CHANGES)
def test_queued_ids_answer_for_the_groups_they_were_made_with(
    changes: list[tuple[bool, int, int, int]],
) -> None:
    index = QueueIndex()
    asked = {f"r{n}" for n in range(31)}
    for add, k, number, arrival in changes:
        ids = index.queued_ids()
        held = {r.id for g in index.groups() for r in g.requests}
        if add:
            index.add(KEYS[k], Request(f"r{number}", "m", 10, 20, SLOClass.BATCH_1,
                                       SLO(60.0), float(arrival)))
        elif index.holds(KEYS[k], f"r{number}"):
            index.remove(KEYS[k], f"r{number}")
        # made before the change: still the ids of its groups, not the index's now
        assert ids.among(set(asked)) == held
        assert index.queued_ids().among(set(asked)) == {
            r.id for g in index.groups() for r in g.requests}


def test_an_id_queued_in_two_groups_stays_queued_until_it_leaves_both() -> None:
    index = QueueIndex()
    for key in KEYS:
        index.add(key, Request("r0", "m", 10, 20, SLOClass.BATCH_1, SLO(60.0), 0.0))
    index.remove(KEYS[1], "r0")
    assert index.queued_ids().among({"r0"}) == {"r0"}
    index.remove(KEYS[0], "r0")
    assert index.queued_ids().among({"r0"}) == set()
