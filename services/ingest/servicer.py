"""The QueueManager servicer: wire messages in, :class:`~services.ingest.plane.IngestPlane`
calls, wire out.

The caller's tenant (:func:`services.common.auth.caller_tenant`, set by the
authentication interceptor) goes with every call: the plane scopes ids to it.
No validation and no error handling here: the plane validates, and
:func:`services.common.errors.add_with_error_mapping` maps its exceptions to status codes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from qlm.api.v1 import qlm_pb2 as pb
from qlm.api.v1 import qlm_pb2_grpc
from services.common.auth import caller_tenant
from services.ingest import messages
from services.ingest.plane import IngestPlane


class QueueManagerServicer(qlm_pb2_grpc.QueueManagerServicer):
    def __init__(self, plane: IngestPlane) -> None:
        self.plane = plane

    async def Submit(
        self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitResponse:
        outcome = await self.plane.submit(messages.submit_record(request), caller_tenant())
        return messages.submit_response(outcome)

    async def StreamTokens(
        self, request: pb.StreamTokensRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TokenChunk]:
        async for chunk in self.plane.stream_tokens(request.request_id, request.from_index,
                                                     tenant=caller_tenant()):
            yield messages.token_chunk(request.request_id, chunk)

    async def GetRequest(
        self, request: pb.GetRequestRequest, context: grpc.aio.ServicerContext
    ) -> pb.RequestInfo:
        return messages.request_info(await self.plane.get(request.request_id, caller_tenant()))

    async def Cancel(
        self, request: pb.CancelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelResponse:
        outcome = await self.plane.cancel(request.request_id, caller_tenant())
        return messages.cancel_response(outcome)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return messages.list_models_response(self.plane.list_models())
