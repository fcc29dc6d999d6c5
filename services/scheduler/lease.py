"""Leader election with a Redis lease: one scheduler applies decisions, the others wait.

Keys (:mod:`qlm.store.keys`, under the store's prefix ``P``): ``P scheduler:leader``
(string: the owner's token, with a PX time to live) and ``P scheduler:fence``
(integer: incremented on every new acquisition; the *fencing token* of the current
term). Both carry the queue's hash tag, so the acquire script runs on one cluster slot.

* **acquire**: ``SET leader token NX PX ttl``; on success ``INCR fence`` (one Lua script,
  so a term and its token are one step). A replica that already holds the lease extends
  it instead. Standbys try every ``ttl/4``, so one takes over at most about ``ttl + ttl/4``
  after the leader last renewed.
* **renew**: compare-and-extend (``PEXPIRE`` only if the value is still our token).
* **release**: compare-and-delete (graceful shutdown hands over at once).

Safety: the holder computes its own deadline from when it *sent* the acquire/renew
(``sent_at + ttl``, monotonic clock), which is never later than Redis's expiry, and
stops applying ``margin_s`` before it (:meth:`LeaderLease.is_held`): a leader that
cannot renew (Redis unreachable, paused process) stops writing before a standby can
take over. Every LSO command carries the fencing token in its ``command_id``
(``<fence>-<seq>``), so a worker or a reader can tell terms apart.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import redis.exceptions

from qlm.core.errors import InvalidInput, Unavailable
from qlm.store.client import RedisClient
from qlm.store.keys import Keys

ACQUIRE_LUA: Final = """
-- KEYS[1] leader key, KEYS[2] fence key; ARGV[1] token, ARGV[2] ttl (ms)
-- Returns the fencing token of our term (> 0), or 0 when another owner holds the lease.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('GET', KEYS[2]) or '0')
end
return 0
"""

RENEW_LUA: Final = """
-- KEYS[1] leader key; ARGV[1] token, ARGV[2] ttl (ms). 1 if extended, 0 if not ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

RELEASE_LUA: Final = """
-- KEYS[1] leader key; ARGV[1] token. 1 if deleted, 0 if not ours.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class LeaseKeys:
    leader: str
    fence: str

    @classmethod
    def under(cls, prefix: str) -> LeaseKeys:
        """The two keys of the queue under ``prefix`` (one hash tag: one cluster slot)."""
        keys = Keys(prefix)
        return cls(keys.scheduler_leader, keys.scheduler_fence)


class LeaderLease:
    """One replica's side of the lease. ``token`` names the replica (unique per process)."""

    def __init__(self, redis_client: RedisClient, keys: LeaseKeys, token: str, *,
                 ttl_s: float = 3.0, margin_s: float = 0.5,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if not token:
            raise InvalidInput("instance_id", "must not be empty")
        if not 0 <= margin_s < ttl_s:
            raise InvalidInput("lease_margin_s", f"must be in [0, ttl={ttl_s}), got {margin_s}")
        self._redis = redis_client
        self.keys = keys
        self.token = token
        self.ttl_s = ttl_s
        self.margin_s = margin_s
        self._monotonic = monotonic
        self._acquire = redis_client.register_script(ACQUIRE_LUA)
        self._renew = redis_client.register_script(RENEW_LUA)
        self._release = redis_client.register_script(RELEASE_LUA)
        self.fence = 0
        self._valid_until = 0.0

    @property
    def ttl_ms(self) -> int:
        return max(1, int(self.ttl_s * 1000))

    def is_held(self) -> bool:
        """True while this replica may apply decisions (its deadline less the margin)."""
        return self.fence > 0 and self._monotonic() < self._valid_until - self.margin_s

    async def try_acquire(self) -> bool:
        """Take the lease if it is free (or extend it if ours); returns whether we hold it."""
        sent_at = self._monotonic()
        try:
            fence = int(await self._acquire(keys=[self.keys.leader, self.keys.fence],
                                            args=[self.token, self.ttl_ms]))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            self._valid_until = 0.0
            raise Unavailable(f"redis: {error}") from error
        if fence > 0:
            self.fence = fence
            self._valid_until = sent_at + self.ttl_s
            return True
        self.fence = 0
        self._valid_until = 0.0
        return False

    async def renew(self) -> bool:
        """Extend our lease; False (and no longer held) when it is not ours any more."""
        sent_at = self._monotonic()
        try:
            extended = int(await self._renew(keys=[self.keys.leader],
                                             args=[self.token, self.ttl_ms]))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as error:
            raise Unavailable(f"redis: {error}") from error
        if extended:
            self._valid_until = sent_at + self.ttl_s
            return True
        self.fence = 0
        self._valid_until = 0.0
        return False

    def forfeit(self) -> None:
        """Stop acting as leader now: a write found our fencing token superseded."""
        self.fence = 0
        self._valid_until = 0.0

    async def release(self) -> None:
        """Give the lease up now (graceful shutdown), if it is still ours."""
        self._valid_until = 0.0
        self.fence = 0
        with contextlib.suppress(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            await self._release(keys=[self.keys.leader], args=[self.token])

    async def owner(self) -> str | None:
        """The token of the replica that holds the lease in Redis now (None: nobody)."""
        value = await self._redis.get(self.keys.leader)
        return None if value is None else str(value)
