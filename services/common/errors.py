"""The one place where qlm's error families become gRPC status codes.

==================================  ===================
raised                              status
==================================  ===================
NotServed (a model no worker has)   FAILED_PRECONDITION
InvalidInput (and other subclasses) INVALID_ARGUMENT
NotFound                            NOT_FOUND
Unavailable                         UNAVAILABLE
Overloaded                          RESOURCE_EXHAUSTED (trailing metadata: retry-after-s, …)
Unauthenticated                     UNAUTHENTICATED
anything else                       INTERNAL (logged)
==================================  ===================

The status message is the error's text, e.g. ``"max_tokens: must be > 0, got 0"``.
Ingest applies the mapping when it registers its servicer
(:func:`add_with_error_mapping`); other services use :class:`ErrorInterceptor`.
A request whose bytes do not parse as the method's message also gets INVALID_ARGUMENT
(the interceptor wraps the deserializer; gRPC's own answer would be INTERNAL).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError

from qlm.core.errors import (
    InvalidInput,
    NotFound,
    NotServed,
    Overloaded,
    Unauthenticated,
    Unavailable,
)
from qlm.log import get_logger

log = get_logger("services.common.errors")

STATUS_OF: Final[tuple[tuple[type[Exception], grpc.StatusCode], ...]] = (
    (NotServed, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
)


def status_for(error: Exception) -> grpc.StatusCode:
    for family, code in STATUS_OF:
        if isinstance(error, family):
            return code
    return grpc.StatusCode.INTERNAL


@dataclass(frozen=True, slots=True)
class MalformedMessage:
    """Stands in for a request whose bytes did not parse; the handler rejects it."""

    problem: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as exc:
            return MalformedMessage(str(exc))

    return parse


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    code = status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("unhandled_error", error=repr(error))
        await context.abort(code, "internal error")
    if isinstance(error, Overloaded):
        metadata = (("retry-after-s", f"{error.retry_after_s:.3f}"), *error.details.items())
        await context.abort(code, str(error), trailing_metadata=metadata)
    await context.abort(code, str(error))


def _check_parsed(request: Any) -> None:
    if isinstance(request, MalformedMessage):
        raise InvalidInput("request", f"is not a valid protobuf message: {request.problem}")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by any handler to status codes (table in the module doc).

    The wrapped handler of each method is built once and reused.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return handler
            wrapped = self._wrapped[method] = _wrap(handler)
        return wrapped


def add_with_error_mapping(
    add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server
) -> None:
    """Register ``servicer`` through its generated ``add_*_to_server`` with every handler
    wrapped as :class:`ErrorInterceptor` wraps it (same status codes, same tolerant
    parsing), at registration instead of per call: grpc.aio awaits a server interceptor
    on every call, which cost ingest about 0.025 ms of CPU per Submit."""
    add_to_server(servicer, _WrappingRegistrar(server))


class _WrappingRegistrar:
    """Stands in for the server while a generated ``add_*_to_server`` registers handlers."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(tuple(_WrappedGeneric(h) for h in handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        self.server.add_registered_method_handlers(
            service, {name: _wrap(handler) for name, handler in handlers.items()}
        )


class _WrappedGeneric(grpc.GenericRpcHandler):
    """A generic handler whose method handlers are wrapped (each built once)."""

    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self.inner = inner
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = self.inner.service(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped[method] = _wrap(handler)
        return wrapped


def _wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(handler.unary_stream),
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
    return handler


def _wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _check_parsed(request)
            return await behavior(request, context)
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            await _abort(context, error)

    return call


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            _check_parsed(request)
            async for item in behavior(request, context):
                yield item
        except Exception as error:
            if isinstance(error, grpc.aio.AbortError):
                raise
            await _abort(context, error)

    return call
