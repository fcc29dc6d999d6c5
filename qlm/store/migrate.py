"""Move a queue's keys from the layout before hash tags to the tagged one.

Before hash tags a key was ``<prefix><name>`` (``qlm:req:r1``); now it is
``{<prefix>}<name>`` (``{qlm:}req:r1``, :mod:`qlm.store.keys`). A deployment that
kept its queue in Redis across that change runs, once, with every qlm service
stopped::

    python -m qlm.store.migrate --redis-url redis://host:6379/0 [--key-prefix qlm:]

Only the names of :class:`~qlm.store.keys.Keys` under the prefix move (records, groups,
the group index, virtual queues, workers, running sets, leases, token streams, the
scheduler lease); values need no change (they hold ids and group keys, not key names)
and ``RENAME`` keeps each key's time to live. Running it again moves nothing. A key
present under both names is refused, not overwritten: the run stops there, naming it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import redis.asyncio
import redis.exceptions

from qlm.core.errors import InvalidInput
from qlm.store.keys import DEFAULT_PREFIX, Keys

#: Key names, after the prefix, of the layout in qlm.store.keys: whole names ...
_SINGLE_NAMES = ("groups", "workers", "leases", "scheduler:leader", "scheduler:fence")
#: ... and names followed by an id, a group or a worker.
_NAME_PREFIXES = ("req:", "group:", "vq:", "running:", "stream:")


def untagged_target(key: str, keys: Keys) -> str | None:
    """The tagged name of ``key`` when it is a qlm key of the old layout, else None."""
    if not key.startswith(keys.name):
        return None
    rest = key[len(keys.name) :]
    if rest in _SINGLE_NAMES or rest.startswith(_NAME_PREFIXES):
        return keys.prefix + rest
    return None


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


async def migrate(client: redis.asyncio.Redis, keys: Keys) -> int:
    """Rename every old-layout key of ``keys``' queue; returns how many moved.

    Raises InvalidInput (field ``key``) when a key exists under both names."""
    moved = 0
    async for raw in client.scan_iter(match=_glob_escape(keys.name) + "*", count=1000):
        key = raw.decode() if isinstance(raw, bytes) else str(raw)
        target = untagged_target(key, keys)
        if target is None:
            continue
        if not await client.renamenx(key, target):
            raise InvalidInput(
                "key", f"{key!r} and {target!r} both exist; moved {moved} keys before it"
            )
        moved += 1
    return moved


async def _run(url: str, prefix: str) -> int:
    client = redis.asyncio.Redis.from_url(url)
    try:
        return await migrate(client, Keys(prefix))
    finally:
        await client.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qlm.store.migrate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--redis-url", required=True, help="the one Redis server of the queue")
    parser.add_argument("--key-prefix", default=DEFAULT_PREFIX, help="the queue's key prefix")
    args = parser.parse_args(argv)
    try:
        moved = asyncio.run(_run(args.redis_url, args.key_prefix))
    except (InvalidInput, redis.exceptions.RedisError, OSError) as error:
        print(f"migration stopped: {error}", file=sys.stderr)
        return 1
    print(f"moved {moved} keys to the hash-tagged layout {Keys(args.key_prefix).prefix}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
