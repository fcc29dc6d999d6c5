"""The one place where qlm's error families become gRPC status codes.

================================  =================
raised                            status
================================  =================
InvalidInput (and subclasses)     INVALID_ARGUMENT
NotFound                          NOT_FOUND
Unavailable                       UNAVAILABLE
Overloaded                        RESOURCE_EXHAUSTED (trailing metadata: retry-after-s, …)
anything else                     INTERNAL (logged)
================================  =================

The status message is the error's text, e.g. ``"max_tokens: must be > 0, got 0"``.
A request whose bytes do not parse as the method's message also gets INVALID_ARGUMENT
(the interceptor wraps the deserializer; gRPC's own answer would be INTERNAL).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError

from qlm.core.errors import InvalidInput, NotFound, Overloaded, Unavailable
from qlm.log import get_logger

log = get_logger("services.ingest.errors")

STATUS_OF: Final[tuple[tuple[type[Exception], grpc.StatusCode], ...]] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
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
