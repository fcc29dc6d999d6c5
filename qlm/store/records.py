"""The request record: what the store keeps per request, and its Redis hash encoding.

The hash schema is documented field by field in ``docs/redis.md``. Every value is a
string; numbers are written with ``repr`` (floats round-trip exactly) and an unset
optional value is the empty string. Pure functions, no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from qlm.core.errors import InvalidInput
from qlm.core.forecast import GroupForecast
from qlm.core.types import SLO, GroupKey, Request, RequestState, SLOClass

#: Fields a retry with the same id must repeat exactly (arrival time may differ).
IDENTITY_FIELDS = (
    "model",
    "prompt_tokens",
    "max_tokens",
    "slo_class",
    "ttft_s",
    "tpot_s",
    "tenant",
    "prompt",
    "params",
)

#: Fields needed to rebuild a :class:`Request` and a running request (snapshot reads).
SCHEDULING_FIELDS = (
    "id",
    "model",
    "prompt_tokens",
    "max_tokens",
    "slo_class",
    "ttft_s",
    "tpot_s",
    "tenant",
    "arrival_at",
    "num_generated",
    "started_at",
    "first_token_at",
)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """A request with everything the store knows about it.

    ``prompt`` (text or token ids) and ``params`` (sampling parameters) are opaque JSON
    values kept for the worker. ``worker_id`` is the worker that holds (or last held)
    the request. ``cancel_requested`` is set when a running request was cancelled:
    its worker must stop it and report it cancelled.
    """

    request: Request
    state: RequestState
    group: GroupKey
    enqueued_at: float
    prompt: Any = None
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    worker_id: str | None = None
    started_at: float | None = None
    first_token_at: float | None = None
    lease_expires_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    error: str = ""
    num_evictions: int = 0
    num_pulls: int = 0
    #: Its group's forecast and its place in the group (rank among ``forecast_size``
    #: queued): live while queued (:meth:`RedisQueueStore.forecast_for`), else as its
    #: last pull found them. None: no forecast yet.
    forecast: GroupForecast | None = None
    forecast_rank: int = 0
    forecast_size: int = 0

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def predicted_first_token_at(self) -> float | None:
        """When its first token is predicted (None: no forecast yet): for a queued request
        the scheduler's last forecast at its current place, once started the last
        forecast made before it started."""
        if self.forecast is None:
            return None
        return self.forecast.first_token_at_for(self.forecast_rank, self.forecast_size or None)


def encode_json(value: Any, field_name: str) -> str:
    """Canonical JSON (sorted keys, no spaces), so equal values give equal text."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(field_name, f"must be JSON-serialisable: {exc}") from None


def _num(value: float) -> str:
    return repr(float(value))


def _opt_num(value: float | None) -> str:
    return "" if value is None else _num(value)


def identity_pairs(request: Request, prompt_json: str, params_json: str) -> list[tuple[str, str]]:
    """``(field, value)`` of :data:`IDENTITY_FIELDS`, in that order, for the enqueue script."""
    values = {
        "model": request.model,
        "prompt_tokens": str(request.prompt_tokens),
        "max_tokens": str(request.max_tokens),
        "slo_class": request.slo_class.value,
        "ttft_s": _num(request.slo.ttft_s),
        "tpot_s": _opt_num(request.slo.tpot_s),
        "tenant": request.tenant,
        "prompt": prompt_json,
        "params": params_json,
    }
    return [(name, values[name]) for name in IDENTITY_FIELDS]


def initial_pairs(request: Request, group: GroupKey, enqueued_at: float) -> list[tuple[str, str]]:
    """``(field, value)`` of the non-identity fields of a new queued record."""
    values = {
        "id": request.id,
        "arrival_at": _num(request.arrival_at),
        "deadline_at": _num(request.deadline_at),
        "group": str(group),
        "state": RequestState.QUEUED.value,
        "num_generated": str(request.num_generated),
        "enqueued_at": _num(enqueued_at),
        "worker": "",
        "started_at": "",
        "first_token_at": "",
        "lease_expires_at": "",
        "finished_at": "",
        "cancel_requested": "0",
        "error": "",
        "num_evictions": "0",
        "num_pulls": "0",
    }
    return list(values.items())


def _float_or_none(text: str | None) -> float | None:
    return float(text) if text else None


def request_from_fields(fields: Mapping[str, str]) -> Request:
    """Rebuild the :class:`Request` from a record's fields (see :data:`SCHEDULING_FIELDS`)."""
    slo_class = SLOClass(fields["slo_class"])
    return Request(
        id=fields["id"],
        model=fields["model"],
        prompt_tokens=int(fields["prompt_tokens"]),
        max_tokens=int(fields["max_tokens"]),
        slo_class=slo_class,
        slo=SLO.of(float(fields["ttft_s"]), _float_or_none(fields.get("tpot_s"))),
        arrival_at=float(fields["arrival_at"]),
        tenant=fields["tenant"],
        num_generated=int(fields["num_generated"]),
    )


def record_from_fields(fields: Mapping[str, str]) -> RequestRecord:
    """Rebuild a :class:`RequestRecord` from the full hash (``HGETALL``)."""
    return RequestRecord(
        request=request_from_fields(fields),
        state=RequestState(fields["state"]),
        group=GroupKey.parse(fields["group"]),
        enqueued_at=float(fields["enqueued_at"]),
        prompt=json.loads(fields.get("prompt") or "null"),
        params=MappingProxyType(json.loads(fields.get("params") or "{}")),
        worker_id=fields.get("worker") or None,
        started_at=_float_or_none(fields.get("started_at")),
        first_token_at=_float_or_none(fields.get("first_token_at")),
        lease_expires_at=_float_or_none(fields.get("lease_expires_at")),
        finished_at=_float_or_none(fields.get("finished_at")),
        cancel_requested=fields.get("cancel_requested") == "1",
        error=fields.get("error", ""),
        num_evictions=int(fields.get("num_evictions") or 0),
        num_pulls=int(fields.get("num_pulls") or 0),
        **_forecast_fields(fields),
    )


def _forecast_fields(fields: Mapping[str, str]) -> dict[str, Any]:
    """The forecast a pull recorded (absent before the first pull with a forecast)."""
    text = fields.get("forecast")
    if not text:
        return {}
    return {"forecast": GroupForecast.from_json(text),
            "forecast_rank": int(fields.get("forecast_rank") or 0),
            "forecast_size": int(fields.get("forecast_size") or 0)}


def record_from_json(text: str) -> RequestRecord:
    """Rebuild a record from a script's reply: the hash as one JSON object of strings."""
    return record_from_fields(json.loads(text))
