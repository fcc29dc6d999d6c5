"""Request bodies of the OpenAI-compatible routes, as pydantic models (the OpenAPI schema).

They check the JSON types only (strict: ``"5"`` is not an integer; unknown fields are
refused, as OpenAI refuses them); values are checked by
:func:`qlm.submission.parse_submission` after :mod:`services.ingest.openai.translate`.
Parameters qlm does not implement are declared so that their neutral values pass
(``n: 1``, ``logprobs: false``) and anything else is a 400 naming them.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class _Sampling(_Body):
    """What chat and completions share: model, lengths, sampling, SLO extensions."""

    model: str = Field(description="a model listed by GET /v1/models")
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = Field(None, description="end-user id; qlm records it as the tenant")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    service_tier: str | None = Field(
        None, description="flex → batch-1; auto, default, priority, scale → interactive")
    slo_class: str | None = Field(
        None, description="qlm extension: interactive, batch-1, batch-2 or custom")
    ttft_slo_s: float | None = Field(None, description="qlm extension: TTFT SLO, seconds")
    tpot_slo_s: float | None = Field(None, description="qlm extension: time per output token")
    background: bool | None = Field(
        None, description="qlm extension: answer 202 once queued; fetch the result with "
        "GET /v1/chat/completions/{id} or /v1/completions/{id}")
    top_k: int | None = Field(None, description="vLLM extension")
    ignore_eos: bool | None = Field(None, description="vLLM extension")
    metadata: dict[str, str] | None = None
    store: bool | None = None
    # Declared so that their neutral values pass; anything else is a 400 (translate).
    n: int | None = None
    logprobs: Any = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None


class ChatCompletionBody(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


class CompletionBody(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class BatchCreateBody(_Body):
    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions"]
    completion_window: str = Field(
        description="24h as OpenAI; qlm also takes <n>s, <n>m, <n>h: the batch's TTFT SLO")
    metadata: dict[str, str] | None = None


#: Every field name of the bodies above (turns a validation error's location into the
#: parameter it is about).
FIELD_NAMES: Final = frozenset(
    name for model in (ChatCompletionBody, CompletionBody, StreamOptions, ChatMessage,
                       BatchCreateBody)
    for name in model.model_fields
)
