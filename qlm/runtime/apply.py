"""What a :class:`~qlm.core.types.Decision` means: the one applier of every environment.

A policy's ``decide(snapshot, ctx)`` returns a Decision; :func:`apply` turns it into
primitive operations on an :class:`Effects`, which each environment implements thinly:
the simulator over its in-memory state (:mod:`qlm.sim.engine`), the scheduler service
over Redis and Kafka (``services/scheduler/loop.py``), the GPU harness over its
in-process queue and engines (``loadgen/gpu/qlm_vs_fcfs.py``). :func:`apply` is pure:
it reads the snapshot the decision was made on and calls ``effects``; it never does I/O.

Actions are checked against ``snapshot`` (the state the policy saw) and applied in this
order; an action that fails its check is *invalid*: skipped and counted (the return
value), never half-applied.

==============  ========================================================================
action          meaning
==============  ========================================================================
``Reject``      the request leaves the queue, failed with the reason (default
                :data:`DEFAULT_REJECT_REASON`). Invalid unless it is queued (a request
                rejected earlier in the same decision is no longer queued).
``Place``       the placements are the whole new assignment: each named worker's
                virtual queue becomes its order (head first); every other worker the
                environment knows (``known_workers``) and every unnamed worker of the
                snapshot gets an empty queue, so a group sits on one queue only. A
                placement naming a worker not in the snapshot is invalid. A decision
                with no valid placement leaves every virtual queue as it is.
                (``Effects.set_virtual_queues``, one atomic write.)
``Evict``       preempt a running request at the worker's next step boundary; it keeps
                its progress and returns to its group (``state_swap``: its KV state is
                kept in the worker's CPU memory instead of being recomputed). Invalid
                unless the request runs on that worker.
``Swap``        switch the worker's active model at its next step boundary (running
                requests are evicted first, keeping progress). Invalid unless the worker
                can serve the model (:func:`qlm.core.pulls.can_serve`). A swap to the
                model the worker already serves (and is not swapping away from)
                withdraws any swap not yet begun (``Effects.keep_model``).
``BatchCap``    the worker admits requests only while it runs fewer than the cap (None:
                its own limit again), from now until another cap: requests already
                running above it finish, none is evicted for it. Invalid unless the
                worker is in the snapshot. (``Effects.cap_batch``.)
``Pull``        a forecast, not an order: the requests the worker's own backpressure
                pull (:func:`qlm.core.pulls.plan_pulls` over its new virtual queue) is
                expected to admit. Workers always admit from the head of their virtual
                queue when they have room — in the simulator at each step boundary, in
                the worker service in its pull loop, in the GPU harness whenever a
                request ends — so a Pull grants nothing beyond that; the applier checks
                that it names queued requests (invalid otherwise).
==============  ========================================================================

Last, every worker of the snapshot is told to act now (``Effects.pull``): to take its
pending evictions and swap at its next step boundary and to pull from the head of its
virtual queue as far as its backpressure allows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final, Protocol

from qlm.core.perf import ProfileBook
from qlm.core.pulls import can_serve
from qlm.core.types import Decision, GroupKey, QueueSnapshot

#: The failure reason of a rejection that gives none.
DEFAULT_REJECT_REASON: Final[str] = "rejected by scheduler"


class Effects(Protocol):
    """The primitive operations an environment performs for :func:`apply`.

    :func:`apply` calls them only for valid actions (module docstring), in the order
    there. An environment whose state moved on since the snapshot (the services decide
    in a thread while requests run) may find an action stale when it carries it out;
    it then skips it as the action's own check would have.
    """

    def set_virtual_queues(self, orders: Mapping[str, tuple[GroupKey, ...]]) -> None:
        """Replace these workers' virtual queues (head first) at once."""
        ...

    def reject(self, request_id: str, reason: str) -> None:
        """Take a queued request out of the queue as failed with ``reason``."""
        ...

    def evict(self, worker_id: str, request_id: str, state_swap: bool, reason: str) -> None:
        """Preempt a running request at the worker's next step boundary (progress kept)."""
        ...

    def swap(self, worker_id: str, to_model: str) -> None:
        """Switch the worker to ``to_model`` at its next step boundary."""
        ...

    def keep_model(self, worker_id: str) -> None:
        """Withdraw a swap of the worker that has not begun (it keeps its model)."""
        ...

    def cap_batch(self, worker_id: str, max_batch_size: int | None) -> None:
        """Let the worker admit requests only while it runs fewer than ``max_batch_size``
        (None: its own limit)."""
        ...

    def pull(self, worker_id: str) -> None:
        """Let the worker act now: pending evictions and swap at its next step boundary,
        then a backpressure pull from the head of its virtual queue."""
        ...


def apply(
    decision: Decision,
    snapshot: QueueSnapshot,
    profiles: ProfileBook,
    effects: Effects,
    known_workers: Iterable[str] = (),
) -> int:
    """Carry out ``decision``, made on ``snapshot``, through ``effects``; returns the
    number of invalid actions (skipped). ``known_workers``: workers the environment
    knows besides the snapshot's (their queues are emptied by a new assignment)."""
    workers = {w.id: w for w in snapshot.workers}
    asked = {r.request_id for r in decision.rejections}
    asked.update(rid for pull in decision.pulls for rid in pull.request_ids)
    # which of the ids the decision names are queued (a set of only those: a set of every
    # queued id, or a pass over them, would make a large queue the step's biggest cost)
    queued = snapshot.queued_among(asked)
    num_invalid = 0

    for reject in decision.rejections:
        if reject.request_id not in queued:
            num_invalid += 1
            continue
        queued.discard(reject.request_id)
        effects.reject(reject.request_id, reject.reason or DEFAULT_REJECT_REASON)

    named: dict[str, tuple[GroupKey, ...]] = {}
    for place in decision.placements:
        if place.worker_id not in workers:
            num_invalid += 1
            continue
        named[place.worker_id] = place.order
    if named:
        effects.set_virtual_queues(virtual_queues(named, workers, known_workers))

    for evict in decision.evictions:
        worker = workers.get(evict.worker_id)
        if worker is None or all(r.request.id != evict.request_id for r in worker.running):
            num_invalid += 1
            continue
        effects.evict(evict.worker_id, evict.request_id, evict.state_swap, evict.reason)

    for swap in decision.swaps:
        worker = workers.get(swap.worker_id)
        if worker is None or not can_serve(worker, swap.to_model, profiles):
            num_invalid += 1
        elif worker.swapping_until is None and swap.to_model == worker.active_model:
            effects.keep_model(swap.worker_id)
        else:
            effects.swap(swap.worker_id, swap.to_model)

    for cap in decision.batch_caps:
        if cap.worker_id not in workers:
            num_invalid += 1
            continue
        effects.cap_batch(cap.worker_id, cap.max_batch_size)

    for pull in decision.pulls:
        known = pull.worker_id in workers
        num_invalid += sum(1 for rid in pull.request_ids if not known or rid not in queued)

    for worker_id in workers:
        effects.pull(worker_id)
    return num_invalid


def virtual_queues(
    named: Mapping[str, tuple[GroupKey, ...]],
    workers: Iterable[str],
    known_workers: Iterable[str] = (),
) -> dict[str, tuple[GroupKey, ...]]:
    """The queue of every worker under a new assignment ``named`` (see ``Place`` in the
    module docstring): its order for a named worker, empty for every other one."""
    orders: dict[str, tuple[GroupKey, ...]] = dict.fromkeys(known_workers, ())
    orders.update(dict.fromkeys(workers, ()))
    orders.update(named)
    return orders
