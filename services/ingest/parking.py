"""Where ``qlm.batch.requests`` records over their tenant's quota wait: parked in Redis.

A record over quota is fine but may not be queued *now*. Holding it on Kafka would hold
every record behind it on its partition, other tenants' too; so it is parked instead,
per tenant and in arrival order, and its offset is committed like any handled record.
A record of a tenant that already has parked records is parked behind them (a tenant's
records enter the queue in the order they came). :class:`Parking` is the Redis side
(one Lua script per change, keys in :class:`qlm.store.keys.Keys`):

* ``{qlm:}tenant:<name>:parked`` (sorted set: stored id → arrival order) and
  ``…:parked:records`` (hash: stored id → the record's bytes, base64, and its origin:
  topic, partition, offset, key);
* ``{qlm:}tenants:parked`` (set): the tenants that have any.

Parking is idempotent by stored id (a record delivered again after a restart is parked
once). The ingest process's drain (:class:`services.ingest.batch.BatchIngest`) moves each
tenant's parked records into the queue, oldest first, while its quota lets them in,
holding ``…:parked:lock`` so that one process drains a tenant at a time.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from qlm.store.client import RedisClient
from qlm.store.keys import DEFAULT_PREFIX, Keys

PARK_LUA: Final = """
-- KEYS[1] tenant:<name>:parked, KEYS[2] tenant:<name>:parked:records, KEYS[3] tenants:parked
-- ARGV[1] stored id, ARGV[2] order (score), ARGV[3] the record (JSON), ARGV[4] tenant
-- Returns 1 when parked now, 0 when it was parked already.
local new = redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
if new == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
end
redis.call('SADD', KEYS[3], ARGV[4])
return new
"""

UNPARK_LUA: Final = """
-- KEYS as PARK_LUA; ARGV[1] stored id, ARGV[2] tenant. The tenant leaves tenants:parked
-- with its last record.
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[2])
end
return 1
"""

def _text(value: Any) -> str:
    """A reply as text, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else str(value)


#: How long a drainer holds a tenant (renewed at each drain; a killed one's lock expires).
LOCK_MS: Final = 30_000


@dataclass(frozen=True, slots=True)
class ParkedRecord:
    """A parked record: its stored id, bytes and where it came from on Kafka."""

    stored_id: str
    value: bytes
    key: bytes | None
    topic: str
    partition: int
    offset: int

    def to_json(self) -> str:
        return json.dumps({
            "value": base64.b64encode(self.value).decode(),
            "key": base64.b64encode(self.key).decode() if self.key is not None else None,
            "topic": self.topic, "partition": self.partition, "offset": self.offset})

    @classmethod
    def from_json(cls, stored_id: str, text: str) -> ParkedRecord:
        data = json.loads(text)
        key = data.get("key")
        return cls(stored_id, base64.b64decode(data["value"]),
                   base64.b64decode(key) if key is not None else None,
                   str(data["topic"]), int(data["partition"]), int(data["offset"]))


class Parking:
    """The parked records of every tenant (module docstring)."""

    def __init__(self, redis: RedisClient, prefix: str = DEFAULT_PREFIX,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.clock = clock
        self._park: Any = redis.register_script(PARK_LUA)
        self._unpark: Any = redis.register_script(UNPARK_LUA)
        self._owner = uuid.uuid4().hex

    def _keys(self, tenant: str) -> list[str]:
        return [self.keys.tenant_parked(tenant), self.keys.tenant_parked_records(tenant),
                self.keys.parked_tenants]

    async def holds(self, tenant: str) -> bool:
        """Whether ``tenant`` has parked records (a new one then goes behind them)."""
        return bool(await self.redis.exists(self.keys.tenant_parked(tenant)))

    async def park(self, tenant: str, record: ParkedRecord) -> bool:
        """Park ``record`` behind the tenant's others; False when it was parked already."""
        return bool(await self._park(keys=self._keys(tenant), args=[
            record.stored_id, repr(self.clock()), record.to_json(), tenant]))

    async def tenants(self) -> list[str]:
        return sorted(_text(t) for t in await self.redis.smembers(self.keys.parked_tenants))

    async def oldest(self, tenant: str, count: int) -> list[ParkedRecord]:
        """The tenant's first ``count`` parked records, oldest first."""
        ids = [_text(i) for i in
               await self.redis.zrange(self.keys.tenant_parked(tenant), 0, count - 1)]
        if not ids:
            return []
        texts = await self.redis.hmget(self.keys.tenant_parked_records(tenant), ids)
        return [ParkedRecord.from_json(i, _text(t)) for i, t in zip(ids, texts, strict=True)
                if t is not None]

    async def count(self, tenant: str) -> int:
        return int(await self.redis.zcard(self.keys.tenant_parked(tenant)))

    async def remove(self, tenant: str, stored_id: str) -> None:
        await self._unpark(keys=self._keys(tenant), args=[stored_id, tenant])

    async def lock(self, tenant: str) -> bool:
        """Take (or renew) the right to drain ``tenant``; False when another process has it."""
        key = self.keys.tenant_parked_lock(tenant)
        if await self.redis.set(key, self._owner, nx=True, px=LOCK_MS):
            return True
        if await self.redis.get(key) == self._owner:
            await self.redis.pexpire(key, LOCK_MS)
            return True
        return False
