"""Wake idle workers when requests are queued, instead of waiting for the next poll.

Redis keyspace notifications for sorted sets (``notify-keyspace-events`` with ``K`` and
``z``) announce every change of a group sorted set (``<prefix>group:*``): an enqueue, a
requeue, a pull. :class:`QueueWatcher` subscribes to them on one connection per process
and sets every registered :class:`asyncio.Event`; a worker waiting for work wakes and
looks at its queue at once. If the server's setting lacks those flags the watcher adds
them (``CONFIG SET``); where that is not allowed (managed Redis), it stays off and the
workers keep polling. Polling stays on in any case as the fallback (a lost
notification only delays a pull to the next poll). On a Redis Cluster the watcher
subscribes on the master that serves the queue's slot (notifications are per node;
every key of the queue is in that slot).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.exceptions
from redis.asyncio import Redis, RedisCluster

from qlm.aio import cancel_and_wait
from qlm.log import get_logger
from qlm.store.client import cluster_node_url, is_cluster_url
from qlm.store.keys import Keys

log = get_logger("services.worker.wakeup")

REQUIRED_FLAGS = "Kz"


def merged_flags(current: str) -> str:
    """``current`` notification flags plus keyspace (K) and sorted-set (z) events."""
    flags = current
    for flag in REQUIRED_FLAGS:
        if flag not in flags and not (flag == "z" and "A" in flags):
            flags += flag
    return flags


class QueueWatcher:
    """One keyspace subscription for the group sorted sets under ``keys.prefix``."""

    def __init__(self, redis_url: str, keys: Keys) -> None:
        self._url = redis_url
        self._redis: Redis | None = None
        self._keys = keys
        self._events: list[asyncio.Event] = []
        self._task: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self.enabled = False

    def register(self, event: asyncio.Event) -> None:
        self._events.append(event)

    async def start(self) -> bool:
        """Subscribe; False (and polling only) when notifications cannot be turned on."""
        try:
            self._redis = await self._queue_node()
            reply = await self._redis.config_get("notify-keyspace-events")
            current = str(reply.get("notify-keyspace-events") or "")
            wanted = merged_flags(current)
            if wanted != current:
                await self._redis.config_set("notify-keyspace-events", wanted)
            db = int(self._redis.connection_pool.connection_kwargs.get("db", 0))
            self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            await self._pubsub.psubscribe(f"__keyspace@{db}__:{self._keys.group('*')}")
        except (redis.exceptions.RedisError, OSError) as error:
            log.warning("queue_watch_off", error=str(error))
            if self._redis is not None:
                await self._redis.aclose()
            return False
        self._task = asyncio.create_task(self._listen(), name="queue-watch")
        self.enabled = True
        return True

    async def _queue_node(self) -> Redis:
        """A client of the server that holds the queue (on a cluster: its slot's master)."""
        if not is_cluster_url(self._url):
            return Redis.from_url(self._url, decode_responses=True)
        cluster = RedisCluster.from_url(cluster_node_url(self._url))
        try:
            await cluster.initialize()
            node = cluster.get_node_from_key(self._keys.groups)
        finally:
            await cluster.aclose()
        if node is None:
            raise redis.exceptions.ConnectionError("no cluster node serves the queue's slot")
        return Redis(host=node.host, port=int(node.port), decode_responses=True)

    async def _listen(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (redis.exceptions.RedisError, OSError) as error:
                log.warning("queue_watch_failed", error=str(error))
                await asyncio.sleep(1.0)
                continue
            if message is not None:
                for event in self._events:
                    event.set()

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
        if self._pubsub is not None:
            with contextlib.suppress(redis.exceptions.RedisError, OSError):
                await self._pubsub.aclose()
        if self.enabled and self._redis is not None:
            await self._redis.aclose()
