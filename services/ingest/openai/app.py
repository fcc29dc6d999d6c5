"""The OpenAI-compatible HTTP routes (FastAPI): translate, call the ingest plane, translate back.

Every request goes through :class:`services.ingest.plane.IngestPlane` exactly as a gRPC ``Submit``
does (same validation, same admission control, same queue); nothing here validates
values or touches Redis. Errors become OpenAI error bodies in one place
(:mod:`services.ingest.openai.errors`).

Routes: ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (streaming or not; ``background`` answers 202 once queued),
``GET /v1/chat/completions/{id}``, ``GET /v1/completions/{id}``, the Batch API routes
(:mod:`services.ingest.openai.batch_routes`), ``GET /health``, ``/openapi.json``, and the
live status page ``GET /status`` (data: ``GET /status.json``, :mod:`services.ingest.status`).

Every completion response carries ``x-request-id`` (the qlm request id) and the
prediction of admission control: ``x-qlm-predicted-wait-s``,
``x-qlm-predicted-wait-p90-s``, ``x-qlm-p-meet-slo``, plus ``x-qlm-slo-class``,
``x-qlm-ttft-slo-s`` and ``x-qlm-deadline-at``. Retrieving a completion by id adds the
scheduler's refreshed forecast (GetRequest's, :meth:`RedisQueueStore.forecast_for`) once
there is one: ``x-qlm-predicted-first-token-at`` (Unix s), ``x-qlm-predicted-at`` and,
while it has not started, ``x-qlm-predicted-wait-s`` (seconds from now).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from qlm.core.errors import (
    InvalidInput,
    NotFound,
    QlmError,
    Unauthenticated,
    Unavailable,
    UnknownModel,
)
from qlm.core.types import RequestState
from qlm.log import get_logger
from qlm.store.records import RequestRecord
from services.common.auth import Authenticator, caller_tenant, set_caller_tenant
from services.ingest.fleet import Fleet, ServedModel
from services.ingest.openai import translate
from services.ingest.openai.batch_routes import add_batch_routes
from services.ingest.openai.batches import BatchStore
from services.ingest.openai.errors import Unauthorized, error_response, response_for
from services.ingest.openai.schemas import FIELD_NAMES, ChatCompletionBody, CompletionBody
from services.ingest.plane import IngestPlane, SubmitOutcome, TokenChunk
from services.ingest.status import StatusBoard
from services.ingest.status_page import STATUS_HTML

log = get_logger("services.ingest.openai")


@dataclass
class FrontDoor:
    """What the routes need: the plane, the fleet (served models), the settings."""

    plane: IngestPlane
    fleet: Fleet | None
    default_max_tokens: int = 256
    api_key: str | None = None
    #: Tenants' API keys (ingest --auth required): each request is its tenant's, and sees
    #: only its tenant's completions, files and batches. Takes precedence over api_key.
    authenticator: Authenticator | None = None
    clock: Callable[[], float] = time.time
    #: The Files and Batch APIs (None: not served).
    batches: BatchStore | None = None
    max_file_bytes: int = 64 * 1024 * 1024
    #: The live status page (None: not served).
    status: StatusBoard | None = None


# ------------------------------------------------------------------ errors
def _param_of(loc: tuple[Any, ...], unknown: bool = False) -> str | None:
    """``messages[0].content`` from a validation error's location (pydantic's type tags
    dropped; with ``unknown``, the last item names a field the body may not have)."""
    where, items = (loc[0], loc[1:]) if loc and loc[0] in _LOCATIONS else ("body", loc)
    if where != "body":  # a query, path or header parameter
        return str(items[0]) if items else None
    parts: list[str] = []
    for i, item in enumerate(items):
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
        elif i == 0 or item in FIELD_NAMES or (unknown and i == len(items) - 1):
            parts.append(str(item) or '""')  # a body may name a field "" too
    return ".".join(parts) or None


_LOCATIONS = ("body", "query", "path", "header", "cookie")


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0] if error.errors() else {}
    loc = tuple(first.get("loc", ()))
    kind = first.get("type", "")
    param = _param_of(loc, unknown=kind == "extra_forbidden")
    if kind == "json_invalid" or (param is None and kind in ("model_attributes_type",
                                                             "model_type", "dict_type",
                                                             "missing")):
        problem = "the body must be a JSON object" if kind != "json_invalid" else \
            f"the body is not valid JSON: {first.get('msg', '')}"
        return error_response(400, problem, "invalid_request_error", None, "invalid_value")
    if kind == "extra_forbidden":
        return error_response(400, f"Unrecognized request argument supplied: {param}",
                              "invalid_request_error", param, "unknown_parameter")
    message = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg"))
    return error_response(400, message, "invalid_request_error", param, "invalid_value")


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    status = error.status_code
    return error_response(status, str(error.detail), "invalid_request_error", None,
                          "not_found" if status == 404 else None,
                          headers=getattr(error, "headers", None))


async def _qlm_error(request: Request, error: Exception) -> JSONResponse:
    return response_for(error)


async def _redis_error(request: Request, error: Exception) -> JSONResponse:
    return response_for(Unavailable(f"redis: {error}"))


_SCHEMA_REF: Final = "#/components/schemas/{model}"


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a route that parses ``model`` itself
    (:func:`parse_body`); the model's schema joins the components (:func:`make_app`)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": _SCHEMA_REF.format(model=model.__name__)}}}}}


B = TypeVar("B", bound=BaseModel)


async def parse_body(request: Request, model: type[B]) -> B:
    """The body as ``model``, parsed and checked in one pass by pydantic-core (the hot
    path: FastAPI's own body handling parses JSON, then validates, then builds the
    model); a problem is the same 400 as FastAPI's validation errors."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False)) from None


def _openapi_with(app: FastAPI,
                  models: tuple[type[BaseModel], ...]) -> Callable[[], dict[str, Any]]:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                found = model.model_json_schema(ref_template=_SCHEMA_REF)
                components.update(found.pop("$defs", {}))
                components[model.__name__] = found
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def _openai_error(error: InvalidInput, chat: bool) -> InvalidInput:
    """``error`` naming the OpenAI parameter instead of the submission field."""
    if isinstance(error, UnknownModel):
        return error
    return InvalidInput(translate.openai_param(error, chat), error.problem)


# ------------------------------------------------------------------ helpers
def _forecast_headers(record: RequestRecord, now: float) -> dict[str, str]:
    """The scheduler's latest forecast of a request (none before its first)."""
    predicted = record.predicted_first_token_at
    if predicted is None or record.forecast is None:
        return {}
    headers = {"x-qlm-predicted-first-token-at": f"{predicted:.3f}",
               "x-qlm-predicted-at": f"{record.forecast.made_at:.3f}"}
    if record.state is RequestState.QUEUED:
        headers["x-qlm-predicted-wait-s"] = f"{max(0.0, predicted - now):.3f}"
    return headers


def _headers(outcome: SubmitOutcome) -> dict[str, str]:
    p = outcome.prediction
    headers = {"x-request-id": outcome.request_id,
               "x-qlm-deadline-at": f"{outcome.deadline_at:.3f}"}
    if p.known:
        headers.update({"x-qlm-predicted-wait-s": f"{p.wait_mean_s:.3f}",
                        "x-qlm-predicted-wait-p90-s": f"{p.wait_p90_s:.3f}",
                        "x-qlm-p-meet-slo": f"{p.p_meet_slo:.4f}"})
    if outcome.submission is not None:
        headers["x-qlm-slo-class"] = outcome.submission.slo_class.value
        headers["x-qlm-ttft-slo-s"] = f"{outcome.submission.slo.ttft_s:g}"
    if outcome.duplicate:
        headers["x-qlm-duplicate"] = "true"
    return headers


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def _ended_badly(chunk: TokenChunk) -> InvalidInput | QlmError | None:
    if chunk.final_state is RequestState.FAILED:
        return QlmError(f"request failed: {chunk.error or 'no reason given'}")
    if chunk.final_state is RequestState.CANCELLED:
        return NotFound("completion (cancelled)", "")
    return None


def _failure_response(chunk: TokenChunk) -> JSONResponse:
    if chunk.final_state is RequestState.CANCELLED:
        return error_response(409, "the request was cancelled before it finished",
                              "invalid_request_error", None, "request_cancelled")
    return error_response(500, f"the request failed: {chunk.error or 'no reason given'}",
                          "server_error", None, "request_failed")


# ------------------------------------------------------------------ app
def make_app(door: FrontDoor) -> FastAPI:
    """The FastAPI application of one front door."""

    async def authorize(request: Request) -> None:
        if door.authenticator is not None:
            try:
                tenant = await door.authenticator.tenant_of(request.headers.get("authorization"))
            except Unauthenticated:
                raise Unauthorized("Incorrect API key provided: give your tenant's key as "
                                   "'Authorization: Bearer <key>'") from None
            set_caller_tenant(tenant)
            return
        if door.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip(), door.api_key):
            raise Unauthorized("Incorrect API key provided: give it as 'Authorization: "
                               "Bearer <key>'")

    app = FastAPI(
        title="qlm OpenAI-compatible API",
        version="1",
        description="The OpenAI API (chat, completions, models, files, batches) on qlm's "
        "SLO-aware queue. Extensions: slo_class, ttft_slo_s, background; headers "
        "x-qlm-slo-class, x-qlm-ttft-slo-s.",
        dependencies=([Depends(authorize)]
                      if door.api_key is not None or door.authenticator is not None else []),
        docs_url="/docs",
        redoc_url=None,
    )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(QlmError, _qlm_error)
    app.add_exception_handler(Unauthorized, _qlm_error)
    app.add_exception_handler(RedisConnectionError, _redis_error)
    app.add_exception_handler(RedisTimeoutError, _redis_error)
    app.state.door = door

    @app.get("/health", include_in_schema=False)
    async def health() -> Response:
        ok = await door.plane.health()
        return JSONResponse({"status": "ok" if ok else "unavailable"},
                            status_code=200 if ok else 503)

    # -------------------------------------------------------------- models
    def model_object(served: ServedModel) -> dict[str, Any]:
        return {"id": served.limits.name, "object": "model", "created": 0, "owned_by": "qlm",
                "state": served.state, "max_model_len": served.limits.max_model_len,
                "workers": list(served.workers), "awake_on": list(served.awake_on)}

    def served() -> list[ServedModel]:
        return door.fleet.models() if door.fleet is not None else []

    @app.get("/v1/models", summary="Models some live worker serves, each awake or asleep")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_object(m) for m in served()]}

    @app.get("/v1/models/{model:path}", summary="One served model")
    async def get_model(model: str) -> dict[str, Any]:
        for m in served():
            if m.limits.name == model:
                return model_object(m)
        raise UnknownModel("model", "no live worker serves it", model)

    # -------------------------------------------------------------- completions
    async def submit(body: dict[str, Any], request: Request, chat: bool) -> SubmitOutcome:
        try:
            record = translate.submission_record(
                body, request.headers, chat=chat, default_max_tokens=door.default_max_tokens)
            return await door.plane.submit(record, caller_tenant(), source="http")
        except InvalidInput as error:
            raise _openai_error(error, chat) from None

    async def create(body: dict[str, Any], request: Request, chat: bool) -> Response:
        outcome = await submit(body, request, chat)
        headers = _headers(outcome)
        model = str(body["model"])
        created = int(door.clock())
        if body.get("background"):
            return JSONResponse(_queued_object(outcome, model, created, chat), status_code=202,
                                headers=headers)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                stream(outcome, model, created, chat, include_usage),
                media_type="text/event-stream", headers={**headers, "cache-control": "no-cache"})
        text, final = await collect(outcome.request_id)
        if _ended_badly(final) is not None:
            return _failure_response(final)
        return JSONResponse(finished_object(outcome, model, created, chat, text, final),
                            headers=headers)

    async def collect(request_id: str, from_index: int = 0) -> tuple[str, TokenChunk]:
        parts: list[str] = []
        async for chunk in door.plane.stream_tokens(request_id, from_index,
                                                    tenant=caller_tenant()):
            if chunk.final_state is not None:
                return "".join(parts), chunk
            parts.append(chunk.text)
        raise QlmError("token stream ended without a final chunk")  # pragma: no cover

    def finished_object(outcome: SubmitOutcome, model: str, created: int, chat: bool,
                        text: str, final: TokenChunk) -> dict[str, Any]:
        sub = outcome.submission
        max_tokens = sub.max_tokens if sub is not None else final.num_generated
        prompt_tokens = sub.num_prompt_tokens if sub is not None else 0
        return translate.completion_object(
            request_id=outcome.request_id, model=model, created=created, text=text,
            finish_reason=translate.finish_reason_of("finished", final.num_generated,
                                                     max_tokens),
            usage_=translate.usage(prompt_tokens, final.num_generated), chat=chat,
            service_tier="default" if chat else None)

    async def stream(outcome: SubmitOutcome, model: str, created: int, chat: bool,
                     include_usage: bool) -> AsyncIterator[bytes]:
        rid = outcome.request_id
        sub = outcome.submission
        first = True
        ended = False
        try:
            async for chunk in door.plane.stream_tokens(rid, tenant=caller_tenant()):
                if chunk.final_state is None:
                    if chunk.text or chunk.token_ids:
                        yield _sse(translate.chunk_object(
                            request_id=rid, model=model, created=created, text=chunk.text,
                            finish_reason=None, chat=chat, first=first))
                        first = False
                    continue
                ended = True
                if _ended_badly(chunk) is not None:
                    failure = _failure_response(chunk)
                    yield _sse(bytes(failure.body).decode())
                    yield _sse("[DONE]")
                    return
                max_tokens = sub.max_tokens if sub is not None else chunk.num_generated
                reason = translate.finish_reason_of("finished", chunk.num_generated, max_tokens)
                yield _sse(translate.chunk_object(
                    request_id=rid, model=model, created=created, text="", finish_reason=reason,
                    chat=chat, first=first))
                if include_usage:
                    prompt_tokens = sub.num_prompt_tokens if sub is not None else 0
                    yield _sse(translate.chunk_object(
                        request_id=rid, model=model, created=created, text=None,
                        finish_reason=None, chat=chat,
                        usage_=translate.usage(prompt_tokens, chunk.num_generated)))
                yield _sse("[DONE]")
        finally:
            if not ended:  # the client went away: stop spending a GPU on it
                _cancel_soon(door.plane, rid, caller_tenant())

    @app.post("/v1/chat/completions", summary="Create a chat completion (OpenAI)",
              openapi_extra=json_body(ChatCompletionBody))
    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request, ChatCompletionBody)
        return await create(body.model_dump(exclude_unset=True), request, chat=True)

    @app.post("/v1/completions", summary="Create a completion (OpenAI, legacy)",
              openapi_extra=json_body(CompletionBody))
    async def completions(request: Request) -> Response:
        body = await parse_body(request, CompletionBody)
        return await create(body.model_dump(exclude_unset=True), request, chat=False)

    async def retrieve(completion_id: str, chat: bool) -> Response:
        request_id = translate.request_id_of(completion_id)
        try:
            record = await door.plane.get(request_id, caller_tenant())
        except InvalidInput as error:
            raise NotFound("completion", completion_id) from error
        request = record.request
        if not record.state.is_terminal:
            return JSONResponse({"id": translate.completion_id(request_id, chat),
                                 "object": "chat.completion" if chat else "text_completion",
                                 "status": record.state.value, "model": request.model,
                                 "created": int(request.arrival_at), "choices": []},
                                headers={"x-request-id": request_id,
                                         **_forecast_headers(record, door.plane.clock())})
        text, final = await collect(request_id)
        if _ended_badly(final) is not None:
            return _failure_response(final)
        return JSONResponse(translate.completion_object(
            request_id=request_id, model=request.model, created=int(request.arrival_at),
            text=text, chat=chat,
            finish_reason=translate.finish_reason_of("finished", final.num_generated,
                                                     request.max_tokens),
            usage_=translate.usage(request.prompt_tokens, final.num_generated)),
            headers={"x-request-id": request_id,
                     **_forecast_headers(record, door.plane.clock())})

    @app.get("/v1/chat/completions/{completion_id}",
             summary="A chat completion by id (the result of a background request)")
    async def get_chat_completion(completion_id: str) -> Response:
        return await retrieve(completion_id, chat=True)

    @app.get("/v1/completions/{completion_id}",
             summary="A completion by id (the result of a background request)")
    async def get_completion(completion_id: str) -> Response:
        return await retrieve(completion_id, chat=False)

    app.openapi = _openapi_with(app, (ChatCompletionBody, CompletionBody))  # type: ignore[method-assign]
    if door.batches is not None:
        add_batch_routes(app, door.batches, door.clock, door.max_file_bytes)
    if door.status is not None:
        board = door.status

        @app.get("/status", include_in_schema=False, response_class=HTMLResponse)
        async def status_page() -> HTMLResponse:
            return HTMLResponse(STATUS_HTML)

        @app.get("/status.json", summary="Live status: queues, SLO attainment, workers, swaps")
        async def status_json() -> dict[str, Any]:
            return board.snapshot()

    return app


def _queued_object(outcome: SubmitOutcome, model: str, created: int,
                   chat: bool) -> dict[str, Any]:
    return {"id": translate.completion_id(outcome.request_id, chat),
            "object": "chat.completion" if chat else "text_completion",
            "status": outcome.state.value, "model": model, "created": created, "choices": []}


#: Cancellations under way (the loop keeps only weak references to tasks).
_CANCELLING: set[asyncio.Task[None]] = set()


def _cancel_soon(plane: IngestPlane, request_id: str, tenant: str | None = None) -> None:
    async def cancel() -> None:
        with contextlib.suppress(Exception):
            await plane.cancel(request_id, tenant)
            log.info("stream_abandoned_cancelled", request_id=request_id)

    task = asyncio.get_running_loop().create_task(cancel())
    _CANCELLING.add(task)
    task.add_done_callback(_CANCELLING.discard)
