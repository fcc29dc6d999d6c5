"""Python client of the qlm public API (``qlm.v1.QueueManager``), async and sync.

>>> async with QlmClient("127.0.0.1:50051") as client:
...     reply = await client.submit({"model": "mistral-7b", "prompt": "Hi", "max_tokens": 64})
...     async for chunk in client.stream_tokens(reply.request_id):
...         print(chunk.text, end="")

Submissions are records with the schema of :mod:`qlm.submission` (the same as a line of
a JSONL batch file). Server errors come back as qlm's own exceptions: INVALID_ARGUMENT
→ :class:`InvalidInput` (with ``field`` and ``problem``), NOT_FOUND → :class:`NotFound`,
UNAVAILABLE / DEADLINE_EXCEEDED → :class:`Unavailable`, RESOURCE_EXHAUSTED (admission
control) → :class:`Overloaded` (``retry_after_s`` and the predicted wait from the trailing
metadata), UNAUTHENTICATED → :class:`Unauthenticated`; anything else stays a ``grpc.RpcError``.

``api_key`` is sent as ``authorization: Bearer <key>`` on every call (``qlm tenants add``
prints one); ``tls_ca`` (a PEM file: ``.qlm/tls/ca.pem`` of ``make up``, ``QLM_TLS_CA``)
makes the channel TLS, trusting that CA; ``tls_client_cert`` / ``tls_client_key`` add a
client certificate where the server asks for one (mTLS).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NoReturn, Self

import grpc

from qlm.api.v1 import qlm_pb2 as pb
from qlm.api.v1 import qlm_pb2_grpc
from qlm.core.errors import (
    InvalidInput,
    NotFound,
    NotServed,
    Overloaded,
    Unauthenticated,
    Unavailable,
)

DEFAULT_TARGET: Final = "127.0.0.1:50051"
SLO_CLASS_TO_PB: Final = {
    "": pb.SLO_CLASS_UNSPECIFIED,
    "interactive": pb.SLO_CLASS_INTERACTIVE,
    "batch-1": pb.SLO_CLASS_BATCH_1,
    "batch-2": pb.SLO_CLASS_BATCH_2,
    "custom": pb.SLO_CLASS_CUSTOM,
}
STATE_NAMES: Final = {
    pb.REQUEST_STATE_QUEUED: "queued",
    pb.REQUEST_STATE_RUNNING: "running",
    pb.REQUEST_STATE_FINISHED: "finished",
    pb.REQUEST_STATE_FAILED: "failed",
    pb.REQUEST_STATE_CANCELLED: "cancelled",
}
_CHANNEL_OPTIONS: Final = [
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]


def submit_request(record: Mapping[str, Any]) -> pb.SubmitRequest:
    """A SubmitRequest from a submission record; the server validates the values.

    Only the shape is checked here (a field the message has no room for raises
    InvalidInput naming it); values that do not fit the wire types raise too.
    """
    known = {"request_id", "tenant", "model", "prompt", "prompt_text", "prompt_token_ids",
             "max_tokens", "slo_class", "ttft_slo_s", "tpot_slo_s", "sampling"}
    for name in record:
        if name not in known:
            raise InvalidInput(name, "unknown field")
    message = pb.SubmitRequest()
    try:
        for name in ("request_id", "tenant", "model", "max_tokens", "ttft_slo_s", "tpot_slo_s"):
            if record.get(name) is not None:
                setattr(message, name, record[name])
        text = record.get("prompt", record.get("prompt_text"))
        if text is not None:
            message.prompt_text = text
        if record.get("prompt_token_ids") is not None:
            message.prompt_token_ids.ids.extend(record["prompt_token_ids"])
        slo_class = record.get("slo_class") or ""
        if slo_class not in SLO_CLASS_TO_PB:
            allowed = ", ".join(list(SLO_CLASS_TO_PB)[1:])
            raise InvalidInput("slo_class", f"must be one of {allowed}, got {slo_class!r}")
        message.slo_class = SLO_CLASS_TO_PB[slo_class]
        if record.get("sampling") is not None:
            message.sampling.CopyFrom(pb.SamplingParams(**dict(record["sampling"])))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InvalidInput):
            raise
        raise InvalidInput("record", f"does not fit the SubmitRequest message: {exc}") from None
    return message


def raise_from_rpc_error(error: grpc.RpcError) -> NoReturn:
    """Re-raise a gRPC error as qlm's exception for its status code."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
        family = InvalidInput if code is grpc.StatusCode.INVALID_ARGUMENT else NotServed
        field, _, problem = details.partition(": ")
        raise family(field, problem) if problem else family("request", details)
    if code is grpc.StatusCode.NOT_FOUND:
        raise NotFound("request", details.split("'")[1] if details.count("'") >= 2 else details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        raise Unavailable(f"qlm at the target does not answer: {details}")
    if code is grpc.StatusCode.UNAUTHENTICATED:
        raise Unauthenticated(details)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        metadata = {str(k): str(v) for k, v in (trailing or ())}
        retry_after = float(metadata.pop("retry-after-s", "0") or 0)
        raise Overloaded(details, retry_after, metadata)
    raise error


def channel_credentials(tls_ca: str | Path | None, tls_client_cert: str | Path | None = None,
                        tls_client_key: str | Path | None = None
                        ) -> grpc.ChannelCredentials | None:
    """TLS credentials trusting the CA in ``tls_ca`` (None: plaintext)."""
    if tls_ca is None:
        return None
    from qlm.tls import read_pem

    chain = key = None
    if tls_client_cert is not None and tls_client_key is not None:
        chain = read_pem(Path(tls_client_cert), "tls_client_cert")
        key = read_pem(Path(tls_client_key), "tls_client_key")
    return grpc.ssl_channel_credentials(read_pem(Path(tls_ca), "tls_ca"), key, chain)


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


class QlmClient:
    """Async client on one channel; use as ``async with`` or call :meth:`close`."""

    def __init__(self, target: str = DEFAULT_TARGET, timeout_s: float = 30.0, *,
                 api_key: str | None = None, tls_ca: str | Path | None = None,
                 tls_client_cert: str | Path | None = None,
                 tls_client_key: str | Path | None = None) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._metadata = auth_metadata(api_key)
        credentials = channel_credentials(tls_ca, tls_client_cert, tls_client_key)
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS))
        self._stub = qlm_pb2_grpc.QueueManagerStub(self._channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def submit(self, record: Mapping[str, Any] | pb.SubmitRequest) -> pb.SubmitResponse:
        """Queue one request (record schema of :mod:`qlm.submission`)."""
        message = record if isinstance(record, pb.SubmitRequest) else submit_request(record)
        try:
            return await self._stub.Submit(message, timeout=self.timeout_s,
                                           metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise_from_rpc_error(error)

    async def get(self, request_id: str) -> pb.RequestInfo:
        try:
            return await self._stub.GetRequest(
                pb.GetRequestRequest(request_id=request_id), timeout=self.timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise_from_rpc_error(error)

    async def cancel(self, request_id: str) -> pb.CancelResponse:
        try:
            return await self._stub.Cancel(
                pb.CancelRequest(request_id=request_id), timeout=self.timeout_s,
                metadata=self._metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise_from_rpc_error(error)

    async def list_models(self) -> list[pb.ModelInfo]:
        try:
            reply = await self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s,
                                                metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise_from_rpc_error(error)
        return list(reply.models)

    async def stream_tokens(
        self, request_id: str, from_index: int = 0
    ) -> AsyncIterator[pb.TokenChunk]:
        """Token chunks as they are produced; the last one has ``final`` set."""
        call = self._stub.StreamTokens(
            pb.StreamTokensRequest(request_id=request_id, from_index=from_index),
            metadata=self._metadata,
        )
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as error:
            raise_from_rpc_error(error)


class SyncQlmClient:
    """The same calls, blocking (for scripts and the CLI); same arguments as QlmClient."""

    def __init__(self, target: str = DEFAULT_TARGET, timeout_s: float = 30.0, *,
                 api_key: str | None = None, tls_ca: str | Path | None = None,
                 tls_client_cert: str | Path | None = None,
                 tls_client_key: str | Path | None = None) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._metadata = auth_metadata(api_key)
        credentials = channel_credentials(tls_ca, tls_client_cert, tls_client_key)
        self._channel = (
            grpc.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
            if credentials is not None
            else grpc.insecure_channel(target, options=_CHANNEL_OPTIONS))
        self._stub = qlm_pb2_grpc.QueueManagerStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, message: Any) -> Any:
        try:
            return method(message, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise_from_rpc_error(error)

    def submit(self, record: Mapping[str, Any] | pb.SubmitRequest) -> pb.SubmitResponse:
        message = record if isinstance(record, pb.SubmitRequest) else submit_request(record)
        return self._call(self._stub.Submit, message)

    def get(self, request_id: str) -> pb.RequestInfo:
        return self._call(
            self._stub.GetRequest, pb.GetRequestRequest(request_id=request_id)
        )

    def cancel(self, request_id: str) -> pb.CancelResponse:
        return self._call(
            self._stub.Cancel, pb.CancelRequest(request_id=request_id)
        )

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._call(self._stub.ListModels, pb.ListModelsRequest()).models)

    def stream_tokens(self, request_id: str, from_index: int = 0) -> Iterator[pb.TokenChunk]:
        try:
            yield from self._stub.StreamTokens(
                pb.StreamTokensRequest(request_id=request_id, from_index=from_index),
                metadata=self._metadata,
            )
        except grpc.RpcError as error:
            raise_from_rpc_error(error)
