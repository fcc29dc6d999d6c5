"""The one meaning of a Decision (qlm.runtime.apply): every rule of its docstring, over a
recording Effects. The simulator, the scheduler service and the GPU harness implement
those effects; their own tests check what each effect does there."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from qlm.core.perf import ProfileBook
from qlm.core.types import (
    SLO,
    Decision,
    Evict,
    GroupKey,
    Place,
    Pull,
    QueueSnapshot,
    Reject,
    Request,
    RequestGroup,
    RunningRequest,
    SLOClass,
    Swap,
    WorkerView,
)
from qlm.runtime.apply import DEFAULT_REJECT_REASON, apply

PROFILES = ProfileBook.load()
GPU, MISTRAL, VICUNA = "A100-80GB", "mistral-7b", "vicuna-13b"
KEY_A = GroupKey(MISTRAL, SLOClass.BATCH_1, 0)
KEY_B = GroupKey(MISTRAL, SLOClass.BATCH_1, 1)


@dataclass
class Recorder:
    calls: list[tuple[object, ...]] = field(default_factory=list)

    def set_virtual_queues(self, orders: Mapping[str, tuple[GroupKey, ...]]) -> None:
        self.calls.append(("queues", dict(orders)))

    def reject(self, request_id: str, reason: str) -> None:
        self.calls.append(("reject", request_id, reason))

    def evict(self, worker_id: str, request_id: str, state_swap: bool, reason: str) -> None:
        self.calls.append(("evict", worker_id, request_id, state_swap))

    def swap(self, worker_id: str, to_model: str) -> None:
        self.calls.append(("swap", worker_id, to_model))

    def keep_model(self, worker_id: str) -> None:
        self.calls.append(("keep", worker_id))

    def cap_batch(self, worker_id: str, max_batch_size: int | None) -> None:
        self.calls.append(("cap", worker_id, max_batch_size))

    def pull(self, worker_id: str) -> None:
        self.calls.append(("pull", worker_id))

    def of(self, kind: str) -> list[tuple[object, ...]]:
        return [c for c in self.calls if c[0] == kind]


def _request(rid: str, window: int = 0) -> Request:
    return Request(rid, MISTRAL, 100, 100, SLOClass.BATCH_1, SLO(60.0), float(window))


def _snapshot() -> QueueSnapshot:
    running = (RunningRequest(_request("run"), 0.0),)
    w0 = WorkerView("w0", GPU, (MISTRAL,), MISTRAL, 100_000, 64, running)
    w1 = WorkerView("w1", GPU, (MISTRAL,), MISTRAL, 100_000, 64)
    groups = (RequestGroup(KEY_A, (_request("q1"), _request("q2"))),
              RequestGroup(KEY_B, (_request("q3", 1),)))
    return QueueSnapshot(1.0, groups, (w0, w1), {"w0": (KEY_A,), "w1": (KEY_B,)})


def test_placements_are_the_whole_new_assignment() -> None:
    effects = Recorder()
    invalid = apply(Decision(placements=(Place("w1", (KEY_A, KEY_B)), Place("nobody", ()))),
                    _snapshot(), PROFILES, effects, known_workers=("gone",))
    assert invalid == 1  # the placement on a worker not in the snapshot
    assert effects.of("queues") == [("queues", {"gone": (), "w0": (), "w1": (KEY_A, KEY_B)})]


def test_a_decision_without_placements_leaves_the_queues() -> None:
    effects = Recorder()
    assert apply(Decision(), _snapshot(), PROFILES, effects) == 0
    assert effects.of("queues") == []
    assert effects.calls == [("pull", "w0"), ("pull", "w1")]  # every worker acts now


def test_rejections_name_queued_requests_once() -> None:
    effects = Recorder()
    decision = Decision(rejections=(Reject("q1", ""), Reject("q1", "again"),
                                    Reject("run", "running"), Reject("q3", "late")))
    assert apply(decision, _snapshot(), PROFILES, effects) == 2
    assert effects.of("reject") == [("reject", "q1", DEFAULT_REJECT_REASON),
                                    ("reject", "q3", "late")]


def test_evictions_name_requests_running_on_that_worker() -> None:
    effects = Recorder()
    decision = Decision(evictions=(Evict("w0", "run", state_swap=True), Evict("w1", "run"),
                                   Evict("w0", "q1")))
    assert apply(decision, _snapshot(), PROFILES, effects) == 2
    assert effects.of("evict") == [("evict", "w0", "run", True)]


def test_swaps_need_a_servable_model_and_a_swap_to_the_active_one_keeps_it() -> None:
    effects = Recorder()
    decision = Decision(swaps=(Swap("w0", VICUNA), Swap("w1", MISTRAL), Swap("w1", "nope"),
                               Swap("nobody", MISTRAL)))
    assert apply(decision, _snapshot(), PROFILES, effects) == 2
    assert effects.of("swap") == [("swap", "w0", VICUNA)]
    assert effects.of("keep") == [("keep", "w1")]


def test_pulls_are_a_forecast_checked_against_the_queue() -> None:
    effects = Recorder()
    decision = Decision(rejections=(Reject("q2", "x"),),
                        pulls=(Pull("w0", ("q1", "q2", "run")), Pull("nobody", ("q3",))))
    assert apply(decision, _snapshot(), PROFILES, effects) == 3  # q2 rejected, run, nobody
    # nothing is admitted by the applier: every worker pulls its own queue head
    assert [c for c in effects.calls if c[0] != "reject"] == [("pull", "w0"), ("pull", "w1")]


@dataclass
class _Lookups:
    """An environment's index of the queued ids, counting the lookups made in it."""

    ids: frozenset[str]
    asked: list[object] = field(default_factory=list)

    def among(self, request_ids: set[str]) -> set[str]:
        self.asked.extend(request_ids)
        return request_ids & self.ids


def test_an_index_of_queued_ids_gives_the_same_outcome_by_lookups_only() -> None:
    decision = Decision(rejections=(Reject("q2", "x"), Reject("run", "x")),
                        pulls=(Pull("w0", ("q1", "q2", "run")), Pull("nobody", ("q3",))))
    plain, indexed = Recorder(), Recorder()
    index = _Lookups(frozenset({"q1", "q2", "q3"}))
    snapshot = _snapshot()
    with_index = QueueSnapshot(snapshot.now, snapshot.groups, snapshot.workers,
                               snapshot.virtual_queues, queued_ids=index)
    assert with_index == snapshot  # the index takes no part in equality
    assert apply(decision, snapshot, PROFILES, plain) == 4
    assert apply(decision, with_index, PROFILES, indexed) == 4
    assert indexed.calls == plain.calls
    assert sorted(index.asked) == ["q1", "q2", "q3", "run"]  # each named id once, no pass
