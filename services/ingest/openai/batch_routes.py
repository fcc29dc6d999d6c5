"""The Files and Batch API routes (OpenAI): translate HTTP to :mod:`.batches` and back.

``POST /v1/files`` (multipart ``file`` + ``purpose``, as the openai SDK sends it),
``GET /v1/files``, ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``,
``DELETE /v1/files/{id}``; ``POST /v1/batches``, ``GET /v1/batches``,
``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``.

With tenants (ingest ``--auth required``) every file and batch belongs to the tenant that
made it: another tenant's id answers exactly as an unknown one (404), and lists show the
caller's own only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Query, UploadFile
from fastapi.responses import PlainTextResponse

from qlm.core.errors import InvalidInput
from services.common.auth import caller_tenant
from services.ingest.openai.batches import BatchStore, create_batch
from services.ingest.openai.schemas import BatchCreateBody

PURPOSES = ("batch",)


def add_batch_routes(app: FastAPI, store: BatchStore, clock: Callable[[], float],
                     max_file_bytes: int) -> None:
    @app.post("/v1/files", summary="Upload a file (purpose batch: JSONL of requests)")
    async def upload_file(file: Annotated[UploadFile, File()],
                          purpose: Annotated[str, Form()]) -> dict[str, Any]:
        if purpose not in PURPOSES:
            raise InvalidInput("purpose", f"must be 'batch', got {purpose!r}")
        data = await file.read(max_file_bytes + 1)
        if len(data) > max_file_bytes:
            raise InvalidInput("file", f"is over the limit of {max_file_bytes} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise InvalidInput("file", f"must be UTF-8 text (JSONL): {error}") from None
        if not text.strip():
            raise InvalidInput("file", "is empty")
        return await store.create_file(text, file.filename or "upload.jsonl", purpose,
                                       tenant=caller_tenant())

    @app.get("/v1/files", summary="List files")
    async def list_files(purpose: str | None = None,
                         limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
                         after: str | None = None) -> dict[str, Any]:
        data = await store.list_files(purpose, limit, after, caller_tenant())
        return {"object": "list", "data": data, "has_more": False}

    @app.get("/v1/files/{file_id}", summary="A file's metadata")
    async def get_file(file_id: str) -> dict[str, Any]:
        return await store.get_file(file_id, caller_tenant())

    @app.get("/v1/files/{file_id}/content", summary="A file's content (batch output: JSONL)",
             response_class=PlainTextResponse)
    async def file_content(file_id: str) -> PlainTextResponse:
        return PlainTextResponse(await store.file_content(file_id, caller_tenant()),
                                 media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}", summary="Delete a file")
    async def delete_file(file_id: str) -> dict[str, Any]:
        await store.delete_file(file_id, caller_tenant())
        return {"id": file_id, "object": "file", "deleted": True}

    @app.post("/v1/batches", summary="Create a batch from an uploaded file")
    async def create(body: BatchCreateBody) -> dict[str, Any]:
        return await create_batch(store, body.input_file_id, body.endpoint,
                                  body.completion_window, body.metadata, clock, caller_tenant())

    @app.get("/v1/batches", summary="List batches, newest first")
    async def list_batches(limit: Annotated[int, Query(ge=1, le=100)] = 20,
                           after: str | None = None) -> dict[str, Any]:
        data = await store.list_batches(limit, after, caller_tenant())
        return {"object": "list", "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": False}

    @app.get("/v1/batches/{batch_id}", summary="A batch: status and request_counts")
    async def get_batch(batch_id: str) -> dict[str, Any]:
        return await store.get_batch(batch_id, caller_tenant())

    @app.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch")
    async def cancel(batch_id: str) -> dict[str, Any]:
        await store.request_cancel(batch_id, caller_tenant())
        return await store.get_batch(batch_id, caller_tenant())
