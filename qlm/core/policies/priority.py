"""``priority``: vLLM's priority scheduling — interactive before batch, then FCFS.

Order: interactive groups first, every other class after, each level by first
arrival. Like vLLM's priority policy it preempts: when interactive requests at the
head of a worker's queue do not fit (no free batch slot or KV headroom), running
non-interactive requests are evicted (latest started first; they keep their
progress and return to the queue) to make exactly that much room. Dispatch,
idle-only swaps and pulls as in :mod:`qlm.core.policies.baseline`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from qlm.core.perf import ProfileBook
from qlm.core.policies.base import QueueOrder, by_level_then_arrival, register
from qlm.core.policies.baseline import OrderedDispatchPolicy, _Dispatch
from qlm.core.pulls import kv_reservation, kv_reserved_tokens
from qlm.core.types import Evict, QueueSnapshot, RequestGroup, SLOClass, WorkerView


@register("priority")
@dataclass(frozen=True)
class PriorityPolicy(OrderedDispatchPolicy):
    name: ClassVar[str] = "priority"
    queue_order: ClassVar[QueueOrder] = staticmethod(by_level_then_arrival)

    def preemptions(
        self,
        snapshot: QueueSnapshot,
        order: Sequence[RequestGroup],
        state: _Dispatch,
        profiles: ProfileBook,
    ) -> tuple[Evict, ...]:
        by_key = {g.key: g for g in order}
        evictions: list[Evict] = []
        for w in snapshot.workers:
            if w.active_model is None or w.swapping_until is not None:
                continue
            waiting = [
                r
                for k in state.queues.get(w.id, ())
                if by_key[k].slo_class is SLOClass.INTERACTIVE and by_key[k].model == w.active_model
                for r in by_key[k].requests
            ]
            evictions.extend(self._make_room(w, waiting, profiles))
        return tuple(evictions)

    def _make_room(
        self, worker: WorkerView, waiting: Sequence[Any], profiles: ProfileBook
    ) -> list[Evict]:
        if not waiting or worker.active_model is None:
            return []
        profile = profiles.get(worker.active_model, worker.gpu)
        slots = min(worker.max_batch_size, profile.max_batch_size)
        capacity = min(worker.kv_capacity_tokens, profile.kv_capacity_tokens)
        free_slots = slots - worker.batch_size
        headroom = capacity - kv_reserved_tokens(worker, self.expected_output_tokens)
        need_slots = len(waiting) - free_slots
        need_kv = sum(kv_reservation(r, self.expected_output_tokens) for r in waiting) - headroom
        victims = sorted(
            (r for r in worker.running if r.request.slo_class is not SLOClass.INTERACTIVE),
            key=lambda r: (-r.started_at, r.request.id),
        )
        evictions: list[Evict] = []
        for victim in victims:
            if need_slots <= 0 and need_kv <= 0:
                break
            evictions.append(Evict(worker.id, victim.request.id, reason="priority"))
            need_slots -= 1
            need_kv -= kv_reservation(victim.request, self.expected_output_tokens)
        return evictions
