"""Translation between the wire messages of ``qlm.v1`` and the data plane's plain values.

Nothing here validates beyond what the wire itself can get wrong (a field sent with the
wrong wire type); every semantic check is :func:`qlm.submission.parse_submission`, the
same one the Kafka batch path runs.
"""

from __future__ import annotations

from typing import Any, Final

from google.protobuf import unknown_fields
from google.protobuf.message import Message

from qlm.api.v1 import qlm_pb2 as pb
from qlm.core.errors import InvalidInput
from qlm.core.types import RequestState, SLOClass
from qlm.store.records import RequestRecord
from qlm.submission import ModelLimits
from services.ingest.plane import CancelOutcome, SubmitOutcome, TokenChunk

SLO_CLASS_FROM_PB: Final = {
    pb.SLO_CLASS_UNSPECIFIED: "",
    pb.SLO_CLASS_INTERACTIVE: SLOClass.INTERACTIVE.value,
    pb.SLO_CLASS_BATCH_1: SLOClass.BATCH_1.value,
    pb.SLO_CLASS_BATCH_2: SLOClass.BATCH_2.value,
    pb.SLO_CLASS_CUSTOM: SLOClass.CUSTOM.value,
}
SLO_CLASS_TO_PB: Final = {v: k for k, v in SLO_CLASS_FROM_PB.items() if v}
STATE_TO_PB: Final = {
    RequestState.QUEUED: pb.REQUEST_STATE_QUEUED,
    RequestState.RUNNING: pb.REQUEST_STATE_RUNNING,
    RequestState.FINISHED: pb.REQUEST_STATE_FINISHED,
    RequestState.FAILED: pb.REQUEST_STATE_FAILED,
    RequestState.CANCELLED: pb.REQUEST_STATE_CANCELLED,
}


def reject_mistyped_fields(message: Message) -> None:
    """Raise InvalidInput when a known field arrived with the wrong wire type.

    protobuf parks such a field among the unknown fields (and leaves the field at its
    default), which would otherwise read as "not given".
    """
    fields = message.DESCRIPTOR.fields_by_number
    unknown_set = unknown_fields.UnknownFieldSet(message)
    for i in range(len(unknown_set)):
        unknown = unknown_set[i]
        if unknown.field_number in fields:
            name = fields[unknown.field_number].name
            raise InvalidInput(name, "has the wrong type on the wire")


def _sampling_record(sampling: pb.SamplingParams) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for name in ("temperature", "top_p", "seed"):
        if sampling.HasField(name):
            record[name] = getattr(sampling, name)
    if sampling.top_k:
        record["top_k"] = sampling.top_k
    if sampling.stop:
        record["stop"] = list(sampling.stop)
    if sampling.ignore_eos:
        record["ignore_eos"] = True
    return record


def submit_record(request: pb.SubmitRequest) -> dict[str, Any]:
    """A SubmitRequest as a submission record (schema in :mod:`qlm.submission`)."""
    reject_mistyped_fields(request)
    record: dict[str, Any] = {
        "request_id": request.request_id,
        "tenant": request.tenant,
        "model": request.model,
        "max_tokens": request.max_tokens,
    }
    which = request.WhichOneof("prompt")
    if which == "prompt_text":
        record["prompt"] = request.prompt_text
    elif which == "prompt_token_ids":
        reject_mistyped_fields(request.prompt_token_ids)
        record["prompt_token_ids"] = list(request.prompt_token_ids.ids)
    # An enum value this server does not know reaches the validator as its number.
    record["slo_class"] = SLO_CLASS_FROM_PB.get(request.slo_class, request.slo_class)
    if request.HasField("ttft_slo_s"):
        record["ttft_slo_s"] = request.ttft_slo_s
    if request.HasField("tpot_slo_s"):
        record["tpot_slo_s"] = request.tpot_slo_s
    if request.HasField("sampling"):
        reject_mistyped_fields(request.sampling)
        record["sampling"] = _sampling_record(request.sampling)
    return record


def submit_response(outcome: SubmitOutcome) -> pb.SubmitResponse:
    return pb.SubmitResponse(
        request_id=outcome.request_id,
        state=STATE_TO_PB[outcome.state],
        predicted_wait_mean_s=outcome.prediction.wait_mean_s,
        predicted_wait_p90_s=outcome.prediction.wait_p90_s,
        p_meet_slo=outcome.prediction.p_meet_slo,
        duplicate=outcome.duplicate,
        deadline_at=outcome.deadline_at,
    )


def request_info(record: RequestRecord) -> pb.RequestInfo:
    request = record.request
    return pb.RequestInfo(
        request_id=request.id,
        tenant=request.tenant,
        model=request.model,
        slo_class=SLO_CLASS_TO_PB.get(request.slo_class.value, pb.SLO_CLASS_UNSPECIFIED),
        state=STATE_TO_PB[record.state],
        ttft_slo_s=request.slo.ttft_s,
        tpot_slo_s=request.slo.tpot_s or 0.0,
        num_prompt_tokens=request.prompt_tokens,
        max_tokens=request.max_tokens,
        num_generated=request.num_generated,
        arrival_at=request.arrival_at,
        deadline_at=request.deadline_at,
        first_token_at=record.first_token_at or 0.0,
        finished_at=record.finished_at or 0.0,
        worker_id=record.worker_id or "",
        group=str(record.group),
        num_evictions=record.num_evictions,
        error=record.error,
        **_prediction_fields(record),
    )


def _prediction_fields(record: RequestRecord) -> dict[str, float]:
    """RequestInfo's predicted_* fields (absent: no forecast yet)."""
    predicted = record.predicted_first_token_at
    if predicted is None or record.forecast is None:
        return {}
    return {"predicted_first_token_at": predicted, "predicted_at": record.forecast.made_at,
            "predicted_wait_s": max(0.0, predicted - record.request.arrival_at),
            "predicted_wait_std_s": record.forecast.std_s}


def cancel_response(outcome: CancelOutcome) -> pb.CancelResponse:
    return pb.CancelResponse(
        request_id=outcome.request_id,
        state=STATE_TO_PB[outcome.state],
        cancelled=outcome.cancelled,
    )


def token_chunk(request_id: str, chunk: TokenChunk) -> pb.TokenChunk:
    message = pb.TokenChunk(
        request_id=request_id, index=chunk.index, token_ids=chunk.token_ids, text=chunk.text
    )
    if chunk.final_state is not None:
        message.final.CopyFrom(
            pb.FinalStatus(
                state=STATE_TO_PB[chunk.final_state],
                finish_reason=chunk.finish_reason,
                error=chunk.error,
                num_generated=chunk.num_generated,
            )
        )
    return message


def list_models_response(models: list[ModelLimits]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        models=[
            pb.ModelInfo(name=m.name, max_model_len=m.max_model_len, gpus=list(m.gpus))
            for m in sorted(models, key=lambda m: m.name)
        ]
    )
