"""A read-only look at the head of a worker's virtual queue, for the backpressure pull.

The worker decides *how many* requests to pull with :func:`qlm.core.pulls.plan_pulls`
(the same function the simulator uses), which needs the sizes of the requests at the
head of its queue. This module reads them without taking anything: the virtual queue
(``LRANGE``), then the first requests of each leading group of the active model
(``ZRANGE`` in pull order: deadline, then id) and their scheduling fields (``HMGET``),
in two pipelined round trips. The read is not atomic; the pull that follows is (a
request taken meanwhile by another worker is simply not pulled).
"""

from __future__ import annotations

from redis.asyncio import Redis

from qlm.core.types import GroupKey, RequestGroup
from qlm.store.keys import Keys
from qlm.store.records import SCHEDULING_FIELDS, request_from_fields

#: Leading groups read per look (a pull rarely spans more).
MAX_GROUPS = 8


async def read_queue_head(
    redis: Redis, keys: Keys, worker_id: str, model: str, max_requests: int
) -> tuple[RequestGroup, ...]:
    """The leading groups of ``worker_id``'s virtual queue, each with at most
    ``max_requests`` queued requests in pull order, up to the first group of a model
    other than ``model`` that has queued requests (as :func:`~qlm.core.pulls.plan_pulls`
    stops there too; groups with nothing queued are skipped, as the simulator does)."""
    if max_requests <= 0:
        return ()
    order = [GroupKey.parse(str(t)) for t in
             await redis.lrange(keys.virtual_queue(worker_id), 0, MAX_GROUPS - 1)]
    if not order:
        return ()
    async with redis.pipeline(transaction=False) as pipe:
        for key in order:
            pipe.zrange(keys.group(key), 0, max_requests - 1)
        queued: list[list[str]] = await pipe.execute()
    leading: list[GroupKey] = []
    members: list[list[str]] = []
    for key, group_ids in zip(order, queued, strict=True):
        if not group_ids:
            continue  # a group with nothing queued is not in the way
        if key.model != model:
            break
        leading.append(key)
        members.append(group_ids)
    ids = [i for group in members for i in group][: max_requests * 2]
    if not ids:
        return ()
    async with redis.pipeline(transaction=False) as pipe:
        for request_id in ids:
            pipe.hmget(keys.request(request_id), SCHEDULING_FIELDS)
        rows = await pipe.execute()
    fields = {
        request_id: dict(zip(SCHEDULING_FIELDS, row, strict=True))
        for request_id, row in zip(ids, rows, strict=True)
        if row[0] is not None
    }
    groups = []
    for key, group_ids in zip(leading, members, strict=True):
        requests = tuple(request_from_fields(fields[i]) for i in group_ids if i in fields)
        if requests:
            groups.append(RequestGroup(key, requests))
    return tuple(groups)
