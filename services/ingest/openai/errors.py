"""The one place where qlm's error families become OpenAI error responses.

Body: ``{"error": {"message", "type", "param", "code"}}``, as OpenAI sends it.

====================================  ======  =========================  ====================
raised                                status  type                       code
====================================  ======  =========================  ====================
UnknownModel                          404     invalid_request_error      model_not_found
InvalidInput (and the rest of it)     400     invalid_request_error      invalid_value
a body that is not the route's JSON   400     invalid_request_error      invalid_value
NotFound (request, file, batch)       404     invalid_request_error      not_found
Unauthorized (--http-api-key)         401     invalid_request_error      invalid_api_key
Overloaded (admission control)        429     rate_limit_error           slo_unattainable
Unavailable (Redis / Kafka away)      503     service_unavailable_error  service_unavailable
anything else                         500     server_error               (logged)
====================================  ======  =========================  ====================

A 429 carries ``Retry-After`` (whole seconds, rounded up) and the predicted wait in
``x-qlm-*`` headers. ``param`` is the OpenAI parameter (``max_tokens``,
``messages[0].content``, a header name), null when the problem is not one parameter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fastapi.responses import JSONResponse

from qlm.core.errors import (
    InvalidInput,
    NotFound,
    Overloaded,
    QuotaExceeded,
    Unavailable,
    UnknownModel,
)
from qlm.log import get_logger

log = get_logger("services.ingest.openai.errors")


class Unauthorized(Exception):
    """No or a wrong API key."""


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status,
                        headers=dict(headers or {}))


def response_for(error: Exception, param: str | None = None) -> JSONResponse:
    """The response of ``error`` (table in the module docstring); ``param`` overrides the
    parameter an InvalidInput names (the caller maps qlm fields to OpenAI parameters)."""
    if isinstance(error, UnknownModel):
        return error_response(404, f"The model `{error.model}` does not exist or is not "
                              f"served here ({error.problem})", "invalid_request_error",
                              "model", "model_not_found")
    if isinstance(error, InvalidInput):
        name = param or error.field
        return error_response(400, f"{name}: {error.problem}", "invalid_request_error",
                              name, "invalid_value")
    if isinstance(error, NotFound):
        return error_response(404, str(error), "invalid_request_error", None, "not_found")
    if isinstance(error, Unauthorized):
        return error_response(401, str(error) or "Incorrect API key provided",
                              "invalid_request_error", None, "invalid_api_key")
    if isinstance(error, Overloaded):
        headers = {"Retry-After": str(max(1, math.ceil(error.retry_after_s))),
                   **{f"x-qlm-{k}": v for k, v in error.details.items()}}
        code = "rate_limit_exceeded" if isinstance(error, QuotaExceeded) else "slo_unattainable"
        return error_response(429, str(error), "rate_limit_error", None, code,
                              headers)
    if isinstance(error, Unavailable):
        return error_response(503, f"service unavailable: {error}", "service_unavailable_error",
                              None, "service_unavailable")
    log.error("unhandled_error", error=repr(error), exc_info=error)
    return error_response(500, "internal error", "server_error", None, None)
