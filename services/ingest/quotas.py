"""Per-tenant quotas, checked by ingest before a submission is queued.

Two limits per tenant (``qlm tenants limit NAME --max-queued N --tokens-per-minute M``;
0 = none), kept in the tenant's record (:mod:`qlm.tenants`):

* ``max_queued``: requests of the tenant not yet ended (queued or running). Ingest keeps
  the ids it admitted in ``{qlm:}tenant:<name>:live`` (sorted set by booking time); the
  check first drops the ids whose record ended, and those without a record booked more
  than ``ENQUEUE_GRACE_S`` ago (expired, or an enqueue that failed), then counts. An id
  booked just now whose record is not written yet still counts: concurrent submits
  cannot overrun the limit between the booking and the enqueue.
* ``tokens_per_minute``: prompt + ``max_tokens`` of the requests admitted in the current
  minute (a fixed window, ``{qlm:}tenant:<name>:tpm:<minute>``, expiring after two).

Both are one Lua script (:data:`QUOTA_LUA`), so concurrent submits of one tenant cannot
overrun a limit. A refusal is :class:`~qlm.core.errors.QuotaExceeded`: gRPC
RESOURCE_EXHAUSTED with ``retry-after-s``, HTTP 429 with ``Retry-After`` — for the
token limit the seconds to the next minute, for the queued limit a short retry (requests
end at the pace of the fleet). Nothing is written for a refused request. A repeat of an
id already stored (a client's retry, a Kafka record delivered again, a Batch API line
enqueued again after a restart) is admitted without booking anything.

Every admission line books here (:meth:`services.ingest.plane.IngestPlane.book_quota`):
gRPC and HTTP submits answer the refusal; a ``qlm.batch.requests`` record over quota
is parked in Redis until it fits (:mod:`services.ingest.parking`,
:mod:`services.ingest.batch`); a Batch API line over quota stays unqueued and its
batch's cursor waits on it (:mod:`services.ingest.openai.batches`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Final

from qlm.core.errors import QuotaExceeded
from qlm.store.client import RedisClient
from qlm.store.keys import DEFAULT_PREFIX, Keys
from qlm.tenants import TenantLimits, TenantRegistry

#: Seconds a client refused for the queued limit is told to wait.
QUEUED_RETRY_S: Final = 1.0
#: A booked id without a stored record counts as queued this long (its enqueue is in
#: flight; concurrent submits must see it), then as gone (its enqueue failed).
ENQUEUE_GRACE_S: Final = 30.0
WINDOW_S: Final = 60

QUOTA_LUA: Final = """
-- KEYS[1] tenant:<name>:live (sorted set), KEYS[2] tenant:<name>:tpm:<minute> (counter)
-- ARGV[1] the hash-tagged key prefix, ARGV[2] request id, ARGV[3] now,
-- ARGV[4] max_queued (0: none), ARGV[5] tokens, ARGV[6] tokens_per_minute (0: none),
-- ARGV[7] window ttl (s), ARGV[8] grace (s): an id booked this recently whose record is
-- not stored yet is still being enqueued (kept); older ones without a record are dropped
-- Returns {0} admitted, {1, live} over max_queued, {2, used} over tokens_per_minute.
-- A request already stored (a retry, a redelivered record) is admitted and books nothing.
if redis.call('EXISTS', ARGV[1] .. 'req:' .. ARGV[2]) == 1 then
  return {0}
end
local max_queued = tonumber(ARGV[4])
local tokens = tonumber(ARGV[5])
local tpm = tonumber(ARGV[6])
if max_queued > 0 then
  local booked = redis.call('ZRANGE', KEYS[1], 0, 2 * max_queued + 16, 'WITHSCORES')
  local stale_before = tonumber(ARGV[3]) - tonumber(ARGV[8])
  for i = 1, #booked, 2 do
    local id = booked[i]
    local state = redis.call('HGET', ARGV[1] .. 'req:' .. id, 'state')
    if state == 'finished' or state == 'failed' or state == 'cancelled'
        or ((not state) and tonumber(booked[i + 1]) < stale_before) then
      redis.call('ZREM', KEYS[1], id)
    end
  end
  local live = redis.call('ZCARD', KEYS[1])
  if live >= max_queued and not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
    return {1, live}
  end
end
if tpm > 0 then
  local used = redis.call('INCRBY', KEYS[2], tokens)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[7]))
  if used > tpm then
    redis.call('DECRBY', KEYS[2], tokens)
    return {2, used - tokens}
  end
end
if max_queued > 0 then
  redis.call('ZADD', KEYS[1], tonumber(ARGV[3]), ARGV[2])
end
return {0}
"""


class QuotaGate:
    """Checks and books one submission against its tenant's limits (module docstring).

    A tenant's limits are cached for ``cache_s`` seconds (a change applies within it).
    """

    def __init__(self, redis: RedisClient, tenants: TenantRegistry,
                 prefix: str = DEFAULT_PREFIX, clock: Callable[[], float] = time.time,
                 cache_s: float = 5.0) -> None:
        self.keys = Keys(prefix)
        self.tenants = tenants
        self.clock = clock
        self.cache_s = cache_s
        self._script: Any = redis.register_script(QUOTA_LUA)
        self._limits: dict[str, tuple[TenantLimits, float]] = {}

    async def limits_of(self, tenant: str) -> TenantLimits:
        now = time.monotonic()
        hit = self._limits.get(tenant)
        if hit is not None and hit[1] > now:
            return hit[0]
        limits = await self.tenants.limits_of(tenant)
        self._limits[tenant] = (limits, now + self.cache_s)
        return limits

    async def admit(self, tenant: str, stored_id: str, tokens: int) -> None:
        """Book the request, or raise QuotaExceeded (nothing booked)."""
        limits = await self.limits_of(tenant)
        if not limits.max_queued and not limits.tokens_per_minute:
            return
        now = self.clock()
        minute = int(now // WINDOW_S)
        reply = await self._script(
            keys=[self.keys.tenant_live(tenant), self.keys.tenant_tokens(tenant, minute)],
            args=[self.keys.prefix, stored_id, repr(now), limits.max_queued, tokens,
                  limits.tokens_per_minute, 2 * WINDOW_S, ENQUEUE_GRACE_S])
        verdict = int(reply[0])
        if verdict == 1:
            raise QuotaExceeded(
                f"tenant {tenant!r} has {int(reply[1])} requests queued or running, its "
                f"limit is {limits.max_queued}; retry after {QUEUED_RETRY_S:g} s",
                QUEUED_RETRY_S, {"quota": "max_queued"})
        if verdict == 2:
            retry = max(0.001, (minute + 1) * WINDOW_S - now)
            raise QuotaExceeded(
                f"tenant {tenant!r} used {int(reply[1])} of its {limits.tokens_per_minute} "
                f"tokens this minute and this request needs {tokens}; retry after "
                f"{math.ceil(retry)} s", retry, {"quota": "tokens_per_minute"})
