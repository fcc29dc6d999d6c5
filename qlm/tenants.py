"""Tenants: API keys (stored hashed), request ids scoped to a tenant, signed batch records.

Identity
    ``qlm tenants add NAME`` makes a tenant and prints its API key once:
    ``qlm_`` + 43 URL-safe characters (32 random bytes from :mod:`secrets`). Redis keeps
    only the key's SHA-256 (``{qlm:}apikey:<sha256>`` → tenant name, deleted on revoke)
    and the tenant's record (``{qlm:}tenant:<name>``; key names in
    :mod:`qlm.store.keys`). A caller sends the key as ``authorization: Bearer <key>``;
    :meth:`TenantRegistry.authenticate` looks the digest up and compares it again with
    :func:`hmac.compare_digest`. A 256-bit random key needs no slow hash: the digest of a
    key cannot be guessed, only the key itself, and it has 256 bits.

Isolation
    With authentication on, a request's stored id is ``<tenant>/<id>``
    (:func:`scoped_id`): ``/`` is allowed neither in tenant names nor in client-chosen
    ids, so two tenants that choose the same id get two requests, and an id of another
    tenant is looked up in the caller's own namespace, where it does not exist: the answer
    is the same NOT_FOUND, with the same message, as for an id nobody used. Clients see
    their own id (:func:`client_id`).

Signed batch records
    A record on ``qlm.batch.requests`` carries its tenant in the JSON and a header
    ``qlm-signature`` = hex HMAC-SHA256 over the record's value bytes, keyed with the
    tenant's *signing key*: HMAC-SHA256(api key, ``"qlm batch signing v1"``)
    (:func:`signing_key`). The client derives it from its API key; Redis keeps it in the
    tenant's record (readable only by ingest's Redis user), so ingest can check a record
    without the API key itself. A record whose signature is missing or wrong, or whose
    tenant is unknown or revoked, goes to the DLQ.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from qlm.core.errors import InvalidInput, NotFound
from qlm.store.client import RedisClient
from qlm.store.keys import DEFAULT_PREFIX, Keys

#: Tenant names: lower-case letters, digits, ``-`` and ``_``, 1..63, starting with a
#: letter or digit (no ``/``: it separates the tenant from the id in stored ids).
TENANT_NAME_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
KEY_PREFIX: Final = "qlm_"
SIGNATURE_HEADER: Final = "qlm-signature"
_SIGNING_CONTEXT: Final = b"qlm batch signing v1"
ID_SEPARATOR: Final = "/"


def check_tenant_name(name: str) -> str:
    if not isinstance(name, str) or not TENANT_NAME_PATTERN.fullmatch(name):
        raise InvalidInput("tenant", "must be 1..63 characters of [a-z0-9_-], starting with "
                           f"a letter or digit, got {str(name)[:70]!r}")
    return name


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(api_key: str) -> str:
    """SHA-256 of the key (hex): what Redis keeps."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def signing_key(api_key: str) -> bytes:
    """The key a tenant signs batch records with, derived from its API key."""
    return hmac.new(api_key.encode(), _SIGNING_CONTEXT, hashlib.sha256).digest()


def sign_record(value: bytes, key: bytes) -> str:
    """The ``qlm-signature`` header of a batch record (hex HMAC-SHA256 of its value)."""
    return hmac.new(key, value, hashlib.sha256).hexdigest()


def signature_matches(value: bytes, key: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign_record(value, key), signature)


def scoped_id(tenant: str | None, request_id: str) -> str:
    """The stored id of ``request_id`` for ``tenant`` (None: authentication off)."""
    return request_id if tenant is None else f"{tenant}{ID_SEPARATOR}{request_id}"


def client_id(tenant: str | None, stored_id: str) -> str:
    """The id a client of ``tenant`` knows for ``stored_id`` (inverse of :func:`scoped_id`)."""
    if tenant is None:
        return stored_id
    return stored_id.removeprefix(f"{tenant}{ID_SEPARATOR}")


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """A tenant's quotas (0: none): requests queued or running, tokens per minute."""

    max_queued: int = 0
    tokens_per_minute: int = 0

    def __post_init__(self) -> None:
        for name in ("max_queued", "tokens_per_minute"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInput(name, f"must be an integer >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class TenantInfo:
    name: str
    created_at: float
    revoked_at: float | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


class TenantRegistry:
    """Tenants and their API keys in Redis (module docstring). ``redis`` answers strings
    (``decode_responses=True``)."""

    def __init__(self, redis: RedisClient, prefix: str = DEFAULT_PREFIX,
                 clock: Callable[[], float] = time.time) -> None:
        self.redis = redis
        self.keys = Keys(prefix)
        self.clock = clock

    async def add(self, name: str) -> str:
        """Make tenant ``name``; returns its API key (shown once, never stored).

        InvalidInput when the name is malformed or already taken (also by a revoked
        tenant: a name is never reused, so old ids cannot be read by a new owner)."""
        check_tenant_name(name)
        api_key = new_api_key()
        digest = key_digest(api_key)
        if not await self.redis.hsetnx(self.keys.tenant(name), "key_sha256", digest):
            raise InvalidInput("tenant", f"{name!r} already exists")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.tenant(name), mapping={
                "signing_key": signing_key(api_key).hex(), "created_at": repr(self.clock()),
            })
            pipe.set(self.keys.api_key(digest), name)
            pipe.sadd(self.keys.tenants, name)
            await pipe.execute()
        return api_key

    async def revoke(self, name: str) -> None:
        """Revoke ``name``'s key: calls with it fail from now on (ingest's cache: within
        its ``auth_cache_s``). NotFound for an unknown tenant."""
        fields = await self.redis.hgetall(self.keys.tenant(check_tenant_name(name)))
        if not fields:
            raise NotFound("tenant", name)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.api_key(str(fields["key_sha256"])))
            pipe.hset(self.keys.tenant(name), "revoked_at", repr(self.clock()))
            await pipe.execute()

    async def list(self) -> list[TenantInfo]:
        names = sorted(str(n) for n in await self.redis.smembers(self.keys.tenants))
        infos = []
        for name in names:
            fields = await self.redis.hgetall(self.keys.tenant(name))
            if fields:
                revoked = fields.get("revoked_at")
                infos.append(TenantInfo(name, float(fields.get("created_at", 0)),
                                        float(revoked) if revoked else None))
        return infos

    async def authenticate(self, api_key: str) -> str | None:
        """The active tenant whose key this is, or None."""
        if not api_key.startswith(KEY_PREFIX) or len(api_key) > 256:
            return None
        digest = key_digest(api_key)
        name = await self.redis.get(self.keys.api_key(digest))
        if name is None:
            return None
        stored = await self.redis.hget(self.keys.tenant(str(name)), "key_sha256")
        if stored is None or not hmac.compare_digest(str(stored), digest):
            return None
        return str(name)

    async def set_limits(self, name: str, limits: TenantLimits) -> None:
        """Set ``name``'s quotas (ingest applies them within its cache time, 5 s)."""
        if not await self.redis.exists(self.keys.tenant(check_tenant_name(name))):
            raise NotFound("tenant", name)
        await self.redis.hset(self.keys.tenant(name), mapping={
            "max_queued": limits.max_queued, "tokens_per_minute": limits.tokens_per_minute})

    async def limits_of(self, name: str) -> TenantLimits:
        """``name``'s quotas (none set: no limits)."""
        queued, tpm = await self.redis.hmget(self.keys.tenant(name),
                                             ["max_queued", "tokens_per_minute"])
        return TenantLimits(int(queued or 0), int(tpm or 0))

    async def signing_key_of(self, name: str) -> bytes | None:
        """The signing key of an active tenant, or None (unknown or revoked)."""
        if not TENANT_NAME_PATTERN.fullmatch(name):
            return None
        fields = await self.redis.hmget(self.keys.tenant(name), ["signing_key", "revoked_at"])
        key, revoked = fields
        if key is None or revoked:
            return None
        return bytes.fromhex(str(key))
