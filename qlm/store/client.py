"""The one way qlm opens a Redis client from a URL: one server, or a Redis Cluster.

``redis://host:port/db`` (or ``rediss://``, ``unix://``) is one server; a URL whose
scheme ends in ``+cluster`` (``redis+cluster://host:port``, ``rediss+cluster://...``)
is a Redis Cluster reached through any of its nodes (the client discovers the
others and follows MOVED / ASK redirections). A cluster has database 0 only.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis, RedisCluster

from qlm.core.errors import InvalidInput

#: A client of either kind: both answer the commands and scripts the store sends.
RedisClient = Redis | RedisCluster

CLUSTER_SUFFIX = "+cluster"


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (its scheme ends in ``+cluster``)."""
    return url.partition("://")[0].lower().endswith(CLUSTER_SUFFIX)


def cluster_node_url(url: str) -> str:
    """The plain ``redis://`` / ``rediss://`` URL of the node a cluster URL names.

    InvalidInput (field ``redis_url``) for another scheme or a database other than 0."""
    scheme, sep, rest = url.partition("://")
    base = scheme.lower().removesuffix(CLUSTER_SUFFIX)
    if not sep or not scheme.lower().endswith(CLUSTER_SUFFIX) or base not in ("redis", "rediss"):
        raise InvalidInput("redis_url", f"a cluster URL is redis+cluster://host:port, got {url!r}")
    path = urlsplit(f"{base}://{rest}").path.strip("/")
    if path not in ("", "0"):
        raise InvalidInput("redis_url", f"a Redis Cluster has database 0 only, got /{path}")
    return f"{base}://{rest}"


def redis_client(url: str, **options: Any) -> RedisClient:
    """A client for ``url``: :class:`redis.asyncio.RedisCluster` for a cluster URL (module
    docstring), else :class:`redis.asyncio.Redis`. ``options`` go to ``from_url``."""
    if is_cluster_url(url):
        return RedisCluster.from_url(cluster_node_url(url), **options)
    return Redis.from_url(url, **options)
