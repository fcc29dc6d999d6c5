"""The backpressure pull: which queued requests a worker admits now.

Shared by the simulator and the worker service, so both admit exactly the same
requests from the same state. A worker takes requests from the head of its
ordered virtual queue while it has

* a free batch slot (``worker.batch_size < worker.batch_limit``: its ``max_batch_size``,
  or the batch cap the scheduler set while requests with a TPOT target run there), and
* KV-cache headroom for the request's *reservation* (below).

It stops at the first request that does not fit (strict order: a small request
behind a large one does not jump the queue) and at the first group of a model
other than ``worker.active_model`` (a model swap must happen first; pulling past
it would reorder the queue). A worker that is swapping (``active_model is None``
or ``swapping_until`` set) pulls nothing.

KV reservation of a request (tokens)::

    reservation = prompt_tokens + min(max_tokens, max(num_generated + 1, expected_output_tokens))

i.e. the context it holds now plus the output it is *expected* to grow to
(``expected_output_tokens``, default :data:`DEFAULT_EXPECTED_OUTPUT_TOKENS`, the
mean output length of ShareGPT-like chat traffic), never more than ``max_tokens``
allows. The true output length is unknown to the scheduler and is never read.
Headroom is ``kv_capacity_tokens`` minus the reservations of the running requests.
A request longer than expected may still outgrow the cache; the engine then
preempts (the simulator models that as an eviction that keeps progress).

**Prefill cap** (``prefill_cap_tokens``, 0 = none). A pull also stops once the context
admitted but not yet prefilled (running requests without a first token) would exceed
the cap; one request is always admitted when nothing is waiting for its prefill. The
engine prefills what it holds in its own FCFS order, so a burst pulled all at once
queues *inside* it, where no later decision can put a tighter request that arrives
a moment later ahead of it. With a cap of a couple of engine steps of prefill
(:data:`DEFAULT_PREFILL_CAP_TOKENS`, twice vLLM's default ``max_num_batched_tokens``)
the engine never runs dry of prompt work, and the rest waits in the queue, where the
scheduler can still reorder it. The worker pulls again as each first token arrives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Final

import numpy as np

from qlm.core.perf import PerfProfile, ProfileBook
from qlm.core.types import (
    Decision,
    GroupKey,
    Pull,
    QueueSnapshot,
    Request,
    RequestGroup,
    WorkerView,
)

#: Output tokens reserved per request when admitting (ShareGPT-like mean output).
DEFAULT_EXPECTED_OUTPUT_TOKENS: Final[int] = 338
#: Context tokens a worker keeps admitted but not yet prefilled, at most (two engine
#: steps of vLLM's default ``max_num_batched_tokens`` = 8,192).
DEFAULT_PREFILL_CAP_TOKENS: Final[int] = 16_384


def kv_reservation(
    request: Request, expected_output_tokens: int = DEFAULT_EXPECTED_OUTPUT_TOKENS
) -> int:
    """KV tokens a request is expected to hold at its end (see the module docstring).
    Comparisons instead of ``max``/``min``: a pull asks it of every request it walks."""
    expected_total = request.num_generated + 1
    if expected_total < expected_output_tokens:
        expected_total = expected_output_tokens
    max_tokens = request.max_tokens
    return request.prompt_tokens + (max_tokens if max_tokens < expected_total
                                    else expected_total)


def kv_reservations(prompt_tokens: np.ndarray, max_tokens: np.ndarray,
                    num_generated: np.ndarray,
                    expected_output_tokens: int = DEFAULT_EXPECTED_OUTPUT_TOKENS) -> np.ndarray:
    """:func:`kv_reservation` of many requests at once (arrays of their fields)."""
    expected_total = np.maximum(num_generated + 1, expected_output_tokens)
    return prompt_tokens + np.minimum(max_tokens, expected_total)


def kv_reserved_tokens(
    worker: WorkerView, expected_output_tokens: int = DEFAULT_EXPECTED_OUTPUT_TOKENS
) -> int:
    """Sum of the reservations of the requests running on ``worker``."""
    return sum(kv_reservation(r.request, expected_output_tokens) for r in worker.running)


def pending_prefill_tokens(worker: WorkerView) -> int:
    """Context tokens of the running requests that have no first token yet."""
    return sum(r.request.context_tokens for r in worker.running if r.first_token_at is None)


def fits_prefill_cap(pending_tokens: int, request: Request, prefill_cap_tokens: int) -> bool:
    """Whether admitting ``request`` keeps the context waiting for prefill within the cap
    (always when there is no cap or nothing waits)."""
    return (prefill_cap_tokens <= 0 or pending_tokens == 0
            or pending_tokens + request.context_tokens <= prefill_cap_tokens)


def can_serve(worker: WorkerView, model: str, profiles: ProfileBook) -> bool:
    """True if ``worker`` could run ``model``: a profile exists for its GPU and fits its GPUs."""
    if not profiles.has(model, worker.gpu):
        return False
    return profiles.get(model, worker.gpu).num_gpus <= worker.num_gpus


def plan_pulls(
    worker: WorkerView,
    queue: Iterable[RequestGroup],
    profile: PerfProfile,
    expected_output_tokens: int = DEFAULT_EXPECTED_OUTPUT_TOKENS,
    exclude: frozenset[str] = frozenset(),
    reserved_tokens: int | None = None,
    prefill_cap_tokens: int = 0,
) -> tuple[str, ...]:
    """Ids of the requests ``worker`` admits now from the head of its ordered ``queue``.

    ``profile`` is the profile of the worker's active model on its GPU; the stricter
    of its limits and the worker's own (``max_batch_size``, ``kv_capacity_tokens``)
    applies. Requests in ``exclude`` are skipped (e.g. already pulled elsewhere).
    ``reserved_tokens``, when given, must equal ``kv_reserved_tokens(worker, …)``
    (a caller that keeps it up to date saves the sum). ``prefill_cap_tokens`` > 0 caps
    the context admitted but not yet prefilled (module docstring). Pure: same inputs,
    same answer.
    """
    if worker.active_model is None or worker.swapping_until is not None:
        return ()
    free_slots = min(worker.batch_limit, profile.max_batch_size) - worker.batch_size
    if free_slots <= 0:
        return ()
    if reserved_tokens is None:
        reserved_tokens = kv_reserved_tokens(worker, expected_output_tokens)
    headroom = min(worker.kv_capacity_tokens, profile.kv_capacity_tokens) - reserved_tokens
    pending = pending_prefill_tokens(worker) if prefill_cap_tokens > 0 else 0
    pulled: list[str] = []
    model = worker.active_model
    for group in queue:
        if group.model != model:
            break
        for request in group.requests:
            if request.id in exclude:
                continue
            need = kv_reservation(request, expected_output_tokens)
            if free_slots <= 0 or need > headroom:
                return tuple(pulled)
            if not fits_prefill_cap(pending, request, prefill_cap_tokens):
                return tuple(pulled)
            pending += request.context_tokens
            pulled.append(request.id)
            free_slots -= 1
            headroom -= need
    return tuple(pulled)


def ordered_groups(
    order: Iterable[GroupKey], groups_by_key: Mapping[GroupKey, RequestGroup]
) -> tuple[RequestGroup, ...]:
    """The queued groups named by ``order``, in that order (keys no longer queued are skipped)."""
    return tuple(groups_by_key[k] for k in order if k in groups_by_key)


def with_pulls(
    decision: Decision,
    snapshot: QueueSnapshot,
    profiles: ProfileBook,
    expected_output_tokens: int = DEFAULT_EXPECTED_OUTPUT_TOKENS,
) -> Decision:
    """``decision`` with ``pulls`` filled from its placements: one :func:`plan_pulls` per worker.

    Workers that the decision evicts from or swaps pull nothing in this step (the
    evictions and the swap take effect first). Explicit pulls already in the decision
    are kept and their requests are not pulled twice.
    """
    groups_by_key = {g.key: g for g in snapshot.groups}
    busy = {e.worker_id for e in decision.evictions} | {s.worker_id for s in decision.swaps}
    explicit = {p.worker_id for p in decision.pulls}
    taken = frozenset(rid for p in decision.pulls for rid in p.request_ids)
    pulls = list(decision.pulls)
    for place in decision.placements:
        if place.worker_id in busy or place.worker_id in explicit:
            continue
        worker = snapshot.worker(place.worker_id)
        if worker.active_model is None or not profiles.has(worker.active_model, worker.gpu):
            continue
        ids = plan_pulls(
            worker,
            # lazily: the pull stops at the first group that does not fit, the lane is long
            (groups_by_key[k] for k in place.order if k in groups_by_key),
            profiles.get(worker.active_model, worker.gpu),
            expected_output_tokens,
            exclude=taken,
        )
        if ids:
            pulls.append(Pull(place.worker_id, ids))
            taken = taken | frozenset(ids)
    return replace(decision, pulls=tuple(pulls))
