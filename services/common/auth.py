"""Who is calling: API keys on gRPC (``authorization: Bearer <key>``) → the caller's tenant.

:class:`AuthInterceptor` (a ``grpc.aio`` server interceptor) wraps each method's handler
once; the wrapper reads the ``authorization`` metadata, asks the :class:`Authenticator`
for the tenant, and answers UNAUTHENTICATED (``"missing or invalid API key"``, the same
for every failure) without running the handler when there is none. Otherwise the handler
runs with :func:`caller_tenant` set to the tenant. ``grpc.health.v1`` and reflection stay
open (probes carry no key). With authentication off no interceptor is installed and
:func:`caller_tenant` is None: one trust domain, ids unscoped (qlm.tenants).

:class:`Authenticator` caches a key's tenant for ``cache_s`` seconds (a revoked key is
refused within that time) so that a call costs no Redis round trip; a key that did not
authenticate is not cached.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Final

import grpc

from qlm.core.errors import Unauthenticated
from qlm.log import get_logger
from qlm.tenants import TenantRegistry, key_digest

log = get_logger("services.common.auth")

_CALLER: ContextVar[str | None] = ContextVar("qlm_caller_tenant", default=None)
UNAUTHENTICATED_MESSAGE: Final = "missing or invalid API key"
OPEN_SERVICES: Final = ("/grpc.health.v1.", "/grpc.reflection.")
_CACHE_LIMIT = 10_000


def caller_tenant() -> str | None:
    """The authenticated tenant of the call being served (None: authentication off)."""
    return _CALLER.get()


def set_caller_tenant(tenant: str | None) -> None:
    """Make ``tenant`` the caller of the request being served (the HTTP front door)."""
    _CALLER.set(tenant)


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``authorization: Bearer <key>`` value, or None."""
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()


class Authenticator:
    """API key → tenant, through the registry, cached (module docstring)."""

    def __init__(self, registry: TenantRegistry, cache_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.cache_s = cache_s
        self.clock = clock
        self._cache: dict[str, tuple[str, float]] = {}

    async def tenant_of(self, authorization: str | None) -> str:
        """The tenant of an ``authorization`` header value; Unauthenticated otherwise."""
        key = bearer_key(authorization)
        if key is None:
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        digest = key_digest(key)
        now = self.clock()
        hit = self._cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        tenant = await self.registry.authenticate(key)
        if tenant is None:
            raise Unauthenticated(UNAUTHENTICATED_MESSAGE)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[digest] = (tenant, now + self.cache_s)
        return tenant


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid API key (module docstring)."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if method.startswith(OPEN_SERVICES):
            return await continuation(handler_call_details)
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return handler
            wrapped = self._wrapped[method] = self._wrap(handler)
        return wrapped

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        try:
            tenant = await self.authenticator.tenant_of(_authorization(context))
        except Unauthenticated as error:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
        except Exception as error:  # Redis away: the caller may retry
            log.warning("auth_unavailable", error=repr(error))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "cannot check the API key now")
        _CALLER.set(tenant)

    def _wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        authenticate = self._authenticate
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await authenticate(context)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await authenticate(context)
                async for item in inner_stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler
