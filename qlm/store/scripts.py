"""The store's Lua scripts: read once from ``qlm/store/lua``, registered for EVALSHA.

Each script is ``_lib.lua`` (shared helpers) followed by the script's own file; the
header of each file lists its KEYS and ARGV.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

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
    "append_tokens",
    "snapshot",
    "read_records",
    "queue_head",
)


@cache
def script_source(name: str) -> str:
    """The full text sent to Redis for script ``name`` (helpers + body)."""
    if name not in SCRIPT_NAMES:
        raise KeyError(name)
    lib = (LUA_DIR / "_lib.lua").read_text()
    return lib + "\n" + (LUA_DIR / f"{name}.lua").read_text()


@dataclass(frozen=True, slots=True)
class Scripts:
    """Every store script registered on one client (EVALSHA, loaded again on NOSCRIPT)."""

    enqueue: AsyncScript
    pull: AsyncScript
    claim: AsyncScript
    finish: AsyncScript
    requeue: AsyncScript
    requeue_expired: AsyncScript
    cancel: AsyncScript
    renew: AsyncScript
    set_virtual_queues: AsyncScript
    append_tokens: AsyncScript
    snapshot: AsyncScript
    read_records: AsyncScript
    queue_head: AsyncScript

    @classmethod
    def register(cls, client: Redis) -> Scripts:
        return cls(**{name: client.register_script(script_source(name)) for name in SCRIPT_NAMES})
