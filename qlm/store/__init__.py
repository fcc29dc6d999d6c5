"""The durable queue of qlm on Redis: see :mod:`qlm.store.store` and ``docs/redis.md``."""

from qlm.store.errors import IdempotencyConflict, LeaseLost
from qlm.store.keys import DEFAULT_PREFIX, Keys
from qlm.store.records import RequestRecord
from qlm.store.store import (
    EnqueueResult,
    LeaseRenewal,
    RedisQueueStore,
    StoreSnapshot,
    TokenAppend,
    TokenChunk,
)

__all__ = [
    "DEFAULT_PREFIX",
    "EnqueueResult",
    "IdempotencyConflict",
    "Keys",
    "LeaseLost",
    "LeaseRenewal",
    "RedisQueueStore",
    "RequestRecord",
    "StoreSnapshot",
    "TokenAppend",
    "TokenChunk",
]
