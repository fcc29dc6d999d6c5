"""The store's Lua scripts: read once from ``qlm/store/lua``, registered for EVALSHA.

Each script is ``_lib.lua`` (shared helpers) followed by the script's own file; the
header of each file lists its KEYS and ARGV. One Python constant is set in Lua ahead of
the helpers: the queue log's bound, ``QUEUE_LOG_MAXLEN``. Every script touches the keys of one
queue only, which share one hash tag (:mod:`qlm.store.keys`), so each runs on one
Redis Cluster slot.

On one server a pipeline loads the scripts it lacks before it runs them. A Redis
Cluster pipeline does not, and a primary that was just promoted, restarted or added
has an empty script cache, so on a cluster a script queued on a pipeline is sent
whole (EVAL; Redis caches it by its SHA1) instead of by its SHA1 (EVALSHA, which would
fail with NOSCRIPT there). Calls outside pipelines use EVALSHA and load the script on
NOSCRIPT, on either kind of client.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterPipeline
from redis.commands.core import AsyncScript

from qlm.store.client import RedisClient
from qlm.store.keys import QUEUE_LOG_MAXLEN

LUA_DIR = Path(__file__).with_name("lua")
SCRIPT_NAMES = (
    "enqueue",
    "pull",
    "claim",
    "finish",
    "requeue",
    "requeue_expired",
    "cancel",
    "renew",
    "set_virtual_queues",
    "set_policy_state",
    "set_forecasts",
    "append_tokens",
    "snapshot",
    "read_records",
    "queue_head",
)


@cache
def script_source(name: str) -> str:
    """The full text sent to Redis for script ``name``: the queue log's bound
    (:data:`qlm.store.keys.QUEUE_LOG_MAXLEN`), the helpers, the body."""
    if name not in SCRIPT_NAMES:
        raise KeyError(name)
    lib = (LUA_DIR / "_lib.lua").read_text()
    bound = f"local QUEUE_LOG_MAXLEN = '{QUEUE_LOG_MAXLEN}'\n"
    return bound + lib + "\n" + (LUA_DIR / f"{name}.lua").read_text()


class StoreScript(Protocol):
    """One registered script: ``await script(keys=..., args=..., client=...)`` runs it on
    the registered client, or queues it on ``client`` (a pipeline of that client)."""

    sha: str
    script: Any

    async def __call__(self, keys: Any = None, args: Any = None, client: Any = None) -> Any: ...


class ClusterScript(AsyncScript):
    """A script of a Redis Cluster client: sent whole (EVAL) when queued on a pipeline,
    so that a node without it in its cache runs it all the same (module docstring)."""

    def __init__(self, client: RedisCluster, source: str) -> None:
        super().__init__(client, source)
        self.source = source

    async def __call__(self, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        if isinstance(client, ClusterPipeline):
            keys, args = list(keys or ()), list(args or ())
            return client.eval(self.source, len(keys), *keys, *args)
        return await super().__call__(keys, args, client)


@dataclass(frozen=True, slots=True)
class Scripts:
    """Every store script registered on one client (EVALSHA, loaded again on NOSCRIPT)."""

    enqueue: StoreScript
    pull: StoreScript
    claim: StoreScript
    finish: StoreScript
    requeue: StoreScript
    requeue_expired: StoreScript
    cancel: StoreScript
    renew: StoreScript
    set_virtual_queues: StoreScript
    set_policy_state: StoreScript
    set_forecasts: StoreScript
    append_tokens: StoreScript
    snapshot: StoreScript
    read_records: StoreScript
    queue_head: StoreScript

    @classmethod
    def register(cls, client: RedisClient) -> Scripts:
        scripts: dict[str, StoreScript]
        if isinstance(client, RedisCluster):
            scripts = {name: ClusterScript(client, script_source(name)) for name in SCRIPT_NAMES}
        else:
            scripts = {name: client.register_script(script_source(name)) for name in SCRIPT_NAMES}
        return cls(**scripts)
