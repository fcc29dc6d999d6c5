"""The Estimator servicer: wire messages in, :class:`EstimatorPlane` calls, wire out.

No error handling here: :class:`services.common.errors.ErrorInterceptor` (the one
interceptor of every qlm gRPC server) maps the plane's exceptions to status codes.
"""

from __future__ import annotations

import grpc

from qlm.api.v1 import estimator_pb2 as epb
from qlm.api.v1 import estimator_pb2_grpc
from qlm.core.errors import InvalidInput
from qlm.estimator_plane import EstimatorPlane, GroupSummary, WaitQuery, WorkerSummary
from services.common.messages import SLO_CLASS_FROM_PB


def wait_query(request: epb.PredictWaitRequest) -> WaitQuery:
    try:
        slo_class = SLO_CLASS_FROM_PB[request.slo_class]
    except KeyError:
        raise InvalidInput("slo_class", f"unknown value {request.slo_class}") from None
    return WaitQuery(request.model, slo_class, request.prompt_tokens, request.max_tokens,
                     request.ttft_slo_s or None)


def group_summary(spec: epb.GroupSpec) -> GroupSummary:
    return GroupSummary(spec.key, spec.model, spec.num_requests, spec.prefill_tokens,
                        spec.max_output_tokens, spec.earliest_deadline_at)


def worker_summary(spec: epb.WorkerSpec) -> WorkerSummary:
    if not spec.id or not spec.gpu:
        raise InvalidInput("workers.id" if not spec.id else "workers.gpu", "is required")
    return WorkerSummary(spec.id, spec.gpu, spec.active_model or None,
                         tuple(spec.resident_models), spec.running_remaining_tokens,
                         spec.running_batch_size)


class EstimatorServicer(estimator_pb2_grpc.EstimatorServicer):
    def __init__(self, plane: EstimatorPlane) -> None:
        self.plane = plane

    async def PredictWait(
        self, request: epb.PredictWaitRequest, context: grpc.aio.ServicerContext
    ) -> epb.PredictWaitResponse:
        answer = await self.plane.predict_wait(wait_query(request))
        return epb.PredictWaitResponse(
            wait_mean_s=answer.wait_mean_s, wait_std_s=answer.wait_std_s,
            wait_p90_s=answer.wait_p90_s, p_meet_slo=answer.p_meet_slo, admit=answer.admit,
            best_worker_id=answer.best_worker_id, retry_after_s=answer.retry_after_s)

    async def EstimateBatch(
        self, request: epb.EstimateBatchRequest, context: grpc.aio.ServicerContext
    ) -> epb.EstimateBatchResponse:
        groups = [group_summary(g) for g in request.groups]
        workers = [worker_summary(w) for w in request.workers]
        out = self.plane.estimate_batch(groups, workers)
        return epb.EstimateBatchResponse(
            num_groups=len(groups), num_workers=len(workers),
            service_mean_s=out.service_mean_s.ravel().tolist(),
            service_std_s=out.service_std_s.ravel().tolist(),
            head_wait_mean_s=out.head_wait_mean_s.ravel().tolist(),
            head_wait_std_s=out.head_wait_std_s.ravel().tolist())
