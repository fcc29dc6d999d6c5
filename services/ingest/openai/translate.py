"""OpenAI request bodies to qlm submission records, and qlm outcomes to OpenAI objects.

Pure (no I/O, no clock): the HTTP routes (:mod:`services.ingest.openai.app`) and the
Batch API driver (:mod:`services.ingest.openai.batches`) both call these, so that a line
of a batch file and a live request become the same submission. Every semantic check
stays in :func:`qlm.submission.parse_submission` (the one the gRPC and Kafka paths run);
this module only moves fields, refuses what qlm does not do (``n > 1``, tools, logprobs,
...) and names the OpenAI parameter in every error (:func:`openai_param`).

**SLO in the OpenAI idiom** (:func:`slo_fields`): the class comes from the body's
``slo_class`` (an extension field; the openai SDK sends it with ``extra_body``), else the
``x-qlm-slo-class`` header, else ``service_tier`` (``flex`` → ``batch-1``; ``auto``,
``default``, ``priority``, ``scale`` → ``interactive``), else ``interactive``. The TTFT
SLO likewise from ``ttft_slo_s`` or ``x-qlm-ttft-slo-s`` (else the class's default).

**Chat messages** become one prompt text through :func:`render_chat` until the workers
apply each model's own chat template (see its docstring).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Final

from qlm.core.errors import InvalidInput
from qlm.core.types import SLOClass

#: ``service_tier`` values and the SLO class each asks for.
SERVICE_TIER_CLASS: Final[Mapping[str, SLOClass]] = {
    "auto": SLOClass.INTERACTIVE,
    "default": SLOClass.INTERACTIVE,
    "priority": SLOClass.INTERACTIVE,
    "scale": SLOClass.INTERACTIVE,
    "flex": SLOClass.BATCH_1,
}
SLO_CLASS_HEADER: Final = "x-qlm-slo-class"
TTFT_HEADER: Final = "x-qlm-ttft-slo-s"
REQUEST_ID_HEADER: Final = "x-qlm-request-id"

#: Field names of a submission record (:mod:`qlm.submission`) → the OpenAI parameter.
_PARAM_OF_FIELD: Final[Mapping[str, str]] = {
    "prompt": "prompt",
    "prompt_token_ids": "prompt",
    "tenant": "user",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.top_k": "top_k",
    "sampling.seed": "seed",
    "sampling.stop": "stop",
    "sampling.ignore_eos": "ignore_eos",
    "request_id": REQUEST_ID_HEADER,
}

#: Parameters OpenAI defines that qlm does not implement, with the value that means
#: "not used" (anything else is a 400 naming the parameter).
_UNSUPPORTED_UNLESS: Final[Mapping[str, tuple[Any, ...]]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}


def openai_param(error: InvalidInput, chat: bool = True) -> str:
    """The OpenAI parameter an InvalidInput from :func:`parse_submission` is about."""
    field = error.field
    if field in ("prompt", "prompt_text", "prompt_token_ids") and chat:
        return "messages"
    return _PARAM_OF_FIELD.get(field, field)


def check_unsupported(body: Mapping[str, Any]) -> None:
    """InvalidInput naming the first OpenAI parameter qlm does not implement."""
    for name, neutral in _UNSUPPORTED_UNLESS.items():
        value = body.get(name)
        if value is not None and not any(value == v and type(value) is type(v)
                                          for v in neutral if v is not None):
            if name == "n":
                raise InvalidInput("n", f"only n=1 is supported, got {value!r}")
            raise InvalidInput(name, f"is not supported by qlm (got {value!r})")


# ------------------------------------------------------------------ SLO
def slo_fields(body: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
    """``slo_class`` / ``ttft_slo_s`` of the record (module docstring); InvalidInput names
    the body field or header that is wrong."""
    out: dict[str, Any] = {}
    slo_class = body.get("slo_class")
    if slo_class is None and headers.get(SLO_CLASS_HEADER):
        slo_class = _header_class(headers[SLO_CLASS_HEADER])
    tier = body.get("service_tier")
    if slo_class is None and tier is not None:
        if tier not in SERVICE_TIER_CLASS:
            raise InvalidInput("service_tier", f"must be one of "
                               f"{', '.join(SERVICE_TIER_CLASS)}, got {tier!r}")
        slo_class = SERVICE_TIER_CLASS[tier].value
    if slo_class is not None:
        out["slo_class"] = slo_class
    ttft = body.get("ttft_slo_s")
    if ttft is None and headers.get(TTFT_HEADER):
        ttft = _header_seconds(headers[TTFT_HEADER])
    if ttft is not None:
        out["ttft_slo_s"] = ttft
    if body.get("tpot_slo_s") is not None:
        out["tpot_slo_s"] = body["tpot_slo_s"]
    return out


def _header_class(value: str) -> str:
    try:
        return SLOClass(value.strip()).value
    except ValueError:
        names = ", ".join(c.value for c in SLOClass)
        raise InvalidInput(SLO_CLASS_HEADER, f"must be one of {names}, got {value!r}") from None


def _header_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise InvalidInput(TTFT_HEADER, f"must be a number of seconds, got {value!r}") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidInput(TTFT_HEADER, f"must be a finite number > 0, got {value!r}")
    return seconds


# ------------------------------------------------------------------ chat
def render_chat(messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt text of a chat: one ``role: content`` line block per message, then
    ``assistant:`` for the reply to follow.

    This stands in for the model's chat template while qlm's workers take text prompts
    and the simulated engine has no tokenizer. To use a model's own template, replace
    the body with ``tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=True)`` (or move rendering into the worker, which holds the
    tokenizer): every caller goes through this function. ``messages`` are already
    checked by :func:`chat_messages`.
    """
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join([*lines, "assistant:"])


_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool"})


def chat_messages(raw: Any) -> list[dict[str, str]]:
    """``messages`` as ``[{role, content: str}]``; InvalidInput names ``messages[i]...``.

    Content may be a string or a list of ``{"type": "text", "text": ...}`` parts (joined);
    other part types (images, audio) are refused.
    """
    if not isinstance(raw, list) or not raw:
        raise InvalidInput("messages", "must be a non-empty list of messages")
    out = []
    for i, message in enumerate(raw):
        at = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise InvalidInput(at, "must be an object with role and content")
        role = message.get("role")
        if role not in _ROLES:
            raise InvalidInput(f"{at}.role", f"must be one of {', '.join(sorted(_ROLES))}, "
                               f"got {role!r}")
        for name in ("tool_calls", "function_call", "audio"):
            if message.get(name):
                raise InvalidInput(f"{at}.{name}", "is not supported by qlm")
        out.append({"role": role, "content": _content(message.get("content"), at)})
    return out


def _content(content: Any, at: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        raise InvalidInput(f"{at}.content", "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        where = f"{at}.content[{j}]"
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise InvalidInput(f"{where}.type", f"only text parts are supported, got {kind!r}")
        if not isinstance(part.get("text"), str):
            raise InvalidInput(f"{where}.text", "must be a string")
        texts.append(part["text"])
    return "".join(texts)


# ------------------------------------------------------------------ records
def _stop(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value] if value else None
    if isinstance(value, list) and len(value) <= 4:
        return list(value)
    raise InvalidInput("stop", "must be a string or a list of at most 4 strings")


def _sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    sampling = {name: body[name] for name in ("temperature", "top_p", "top_k", "seed",
                                              "ignore_eos") if body.get(name) is not None}
    temperature = sampling.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool) \
            and temperature > 2:
        raise InvalidInput("temperature", f"must be in [0, 2], got {temperature}")
    stop = _stop(body.get("stop"))
    if stop:
        sampling["stop"] = stop
    return sampling


def _max_tokens(body: Mapping[str, Any], default: int) -> Any:
    given = body.get("max_completion_tokens")
    if given is None:
        given = body.get("max_tokens")
    return default if given is None else given


def submission_record(body: Mapping[str, Any], headers: Mapping[str, str], *, chat: bool,
                      default_max_tokens: int) -> dict[str, Any]:
    """The submission record (schema in :mod:`qlm.submission`) of a chat or completions
    body. InvalidInput names the OpenAI parameter; ``parse_submission`` checks the rest
    (map its field back with :func:`openai_param`)."""
    check_unsupported(body)
    record: dict[str, Any] = {"model": body.get("model"),
                              "max_tokens": _max_tokens(body, default_max_tokens)}
    if chat:
        record["prompt"] = render_chat(chat_messages(body.get("messages")))
    else:
        record.update(_completion_prompt(body.get("prompt")))
    if body.get("user"):
        record["tenant"] = body["user"]
    if headers.get(REQUEST_ID_HEADER):
        record["request_id"] = headers[REQUEST_ID_HEADER]
    record.update(slo_fields(body, headers))
    sampling = _sampling(body)
    if sampling:
        record["sampling"] = sampling
    return record


def _completion_prompt(prompt: Any) -> dict[str, Any]:
    """``prompt`` of /v1/completions: a string, token ids, or a list of one of those."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        if len(prompt) != 1:
            raise InvalidInput("prompt", f"one prompt per request is supported, got {len(prompt)}")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, list):
        return {"prompt_token_ids": prompt}
    raise InvalidInput("prompt", "must be a string or a list of token ids")


# ------------------------------------------------------------------ responses
def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def completion_id(request_id: str, chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"


def request_id_of(completion: str) -> str:
    """The qlm request id inside a completion id (``chatcmpl-<id>`` / ``cmpl-<id>``)."""
    for prefix in ("chatcmpl-", "cmpl-"):
        if completion.startswith(prefix):
            return completion[len(prefix):]
    return completion


def completion_object(*, request_id: str, model: str, created: int, text: str,
                      finish_reason: str | None, usage_: Mapping[str, int] | None,
                      chat: bool, service_tier: str | None = None) -> dict[str, Any]:
    """A whole ``chat.completion`` / ``text_completion``."""
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    out: dict[str, Any] = {
        "id": completion_id(request_id, chat),
        "object": "chat.completion" if chat else "text_completion",
        "created": created, "model": model, "choices": [choice],
        "system_fingerprint": None,
    }
    if usage_ is not None:
        out["usage"] = dict(usage_)
    if chat and service_tier is not None:
        out["service_tier"] = service_tier
    return out


def chunk_object(*, request_id: str, model: str, created: int, text: str | None,
                 finish_reason: str | None, chat: bool, first: bool = False,
                 usage_: Mapping[str, int] | None = None) -> dict[str, Any]:
    """One streamed ``chat.completion.chunk`` / ``text_completion`` event. ``text`` None
    with ``usage_`` is the usage chunk (no choices)."""
    choices: list[dict[str, Any]] = []
    if text is not None:
        if chat:
            delta: dict[str, Any] = {"content": text}
            if first:
                delta["role"] = "assistant"
            choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                        "logprobs": None}]
        else:
            choices = [{"index": 0, "text": text, "finish_reason": finish_reason,
                        "logprobs": None}]
    out: dict[str, Any] = {
        "id": completion_id(request_id, chat),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created, "model": model, "choices": choices,
        "system_fingerprint": None,
    }
    if usage_ is not None:
        out["usage"] = dict(usage_)
    return out


def finish_reason_of(state: str, num_generated: int, max_tokens: int) -> str:
    """OpenAI's finish_reason of a finished request."""
    return "length" if num_generated >= max_tokens else "stop"
