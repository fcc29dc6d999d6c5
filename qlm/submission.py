"""What a client may submit, and the one validation every entry point applies.

A submission arrives as a plain mapping with the field names of ``SubmitRequest`` in
``proto/qlm/v1/qlm.proto`` — from gRPC (translated by the servicer), from a Kafka
``qlm.batch.requests`` record (JSON) or from a line of a JSONL batch file (the CLI).
:func:`parse_submission` turns it into a :class:`Submission` or raises
:class:`InvalidInput` naming the field and the problem. It is pure (no I/O, no clock).

Record schema (JSON object; only ``model``, one prompt field and ``max_tokens`` required)::

    {"request_id": str, "tenant": str, "model": str,
     "prompt": str | "prompt_token_ids": [int, ...]
        | "messages": [{"role": str, "content": str}, ...],
     "max_tokens": int, "slo_class": "interactive" | "batch-1" | "batch-2" | "custom",
     "ttft_slo_s": number, "tpot_slo_s": number,
     "sampling": {"temperature": number, "top_p": number, "top_k": int, "seed": int,
                  "stop": [str, ...], "ignore_eos": bool}}

``prompt_text`` is accepted as a synonym of ``prompt`` (the proto's name). ``messages``
is a chat prompt: the worker renders it with the model's chat template and tokenizer
(:mod:`qlm.engine.text`); until then it is sized like text, by the bytes of its contents.
Unknown fields are rejected so that a misspelt field never passes silently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final

from qlm.core.errors import InvalidInput, UnknownModel
from qlm.core.fit import SequenceLimit, check_fits
from qlm.core.types import DEFAULT_TENANT, DEFAULT_TTFT_SLO_S, SLO, Request, SLOClass
from qlm.engine.text import chat_messages

MAX_REQUEST_ID_LEN: Final = 128
MAX_TENANT_LEN: Final = 128
#: Characters of a client-chosen request id: they appear in Redis keys and log lines.
REQUEST_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
#: Prompt text is sized as ~4 UTF-8 bytes per token until a tokenizer is consulted.
BYTES_PER_TOKEN_ESTIMATE: Final = 4
#: Range of every count and token id: what the proto's int32 fields (and the engines)
#: hold. Checked here, before anything narrows a number; the wire carries int64 so that
#: a larger value arrives whole and is refused naming its field.
INT32_MAX: Final = 2**31 - 1
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1

_TOP_LEVEL_FIELDS: Final = frozenset({
    "request_id", "tenant", "model", "prompt", "prompt_text", "prompt_token_ids", "messages",
    "max_tokens", "slo_class", "ttft_slo_s", "tpot_slo_s", "sampling",
})
_SAMPLING_FIELDS: Final = frozenset({"temperature", "top_p", "top_k", "seed", "stop", "ignore_eos"})


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """A served model and the longest prompt + output it accepts (tokens).

    ``max_model_len`` is the deployment's: the largest a worker of the model takes.
    ``gpu_limits``, when known (from the profiles), holds one
    :class:`~qlm.core.fit.SequenceLimit` per GPU type of ``gpus`` (its ``max_model_len``
    and KV cache): a request is refused when it fits no worker serving the model
    (:func:`qlm.core.fit.refusal`, the check the simulator applies too)."""

    name: str
    max_model_len: int
    gpus: tuple[str, ...] = ()
    gpu_limits: tuple[SequenceLimit, ...] = ()

    def __post_init__(self) -> None:
        if self.gpu_limits and len(self.gpu_limits) != len(self.gpus):
            raise InvalidInput(f"models.{self.name}.gpu_limits", "needs one limit per GPU type")

    def sequence_limits(self, gpus: Iterable[str] | None = None) -> tuple[SequenceLimit, ...]:
        """The limits of workers of ``gpus`` (default: every GPU type of the model)
        serving this model, under ``max_model_len``; without per-GPU limits (a models file),
        ``max_model_len`` alone."""
        if not self.gpu_limits:
            return (SequenceLimit(self.max_model_len),)
        wanted = set(self.gpus if gpus is None else gpus)
        return tuple(limit.capped(self.max_model_len)
                     for gpu, limit in zip(self.gpus, self.gpu_limits, strict=True)
                     if gpu in wanted)


@dataclass(frozen=True, slots=True)
class SubmissionLimits:
    """Server-side caps that do not depend on the model."""

    max_prompt_bytes: int = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Submission:
    """A validated submission. ``request_id`` is empty when the client chose none."""

    request_id: str
    tenant: str
    model: str
    prompt_text: str | None
    prompt_token_ids: tuple[int, ...] | None
    num_prompt_tokens: int
    max_tokens: int
    slo_class: SLOClass
    slo: SLO
    sampling: Mapping[str, Any] = field(default_factory=dict)
    prompt_messages: tuple[Mapping[str, str], ...] | None = None

    def with_id(self, request_id: str) -> Submission:
        return replace(self, request_id=request_id)

    def stored_prompt(self) -> Any:
        """The prompt as the request record keeps it for the worker: text, a list of token
        ids, or ``{"messages": [...]}``."""
        if self.prompt_text is not None:
            return self.prompt_text
        if self.prompt_messages is not None:
            return {"messages": [dict(m) for m in self.prompt_messages]}
        return list(self.prompt_token_ids or ())

    def to_request(self, arrival_at: float) -> Request:
        """The scheduler's view of this submission, arriving at ``arrival_at``."""
        return Request(
            id=self.request_id, model=self.model, prompt_tokens=self.num_prompt_tokens,
            max_tokens=self.max_tokens, slo_class=self.slo_class, slo=self.slo,
            arrival_at=arrival_at, tenant=self.tenant,
        )

    def to_record(self) -> dict[str, Any]:
        """This submission in the record schema above (round-trips through parse_submission)."""
        record: dict[str, Any] = {
            "request_id": self.request_id, "tenant": self.tenant, "model": self.model,
            "max_tokens": self.max_tokens, "slo_class": self.slo_class.value,
            "ttft_slo_s": self.slo.ttft_s,
        }
        if self.prompt_text is not None:
            record["prompt"] = self.prompt_text
        elif self.prompt_messages is not None:
            record["messages"] = [dict(m) for m in self.prompt_messages]
        else:
            record["prompt_token_ids"] = list(self.prompt_token_ids or ())
        if self.slo.tpot_s is not None:
            record["tpot_slo_s"] = self.slo.tpot_s
        if self.sampling:
            record["sampling"] = dict(self.sampling)
        return record


# ------------------------------------------------------------------ type checks
def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _str(record: Mapping[str, Any], name: str, default: str = "") -> str:
    value = record.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidInput(name, f"must be a string, got {_type_name(value)}")
    return value


def _int(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``low..high`` (inclusive, when given), or InvalidInput
    naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(name, f"must be an integer, got {_type_name(value)}")
    if low is not None and value < low:
        raise InvalidInput(name, f"must be >= {low}, got {_short(value)}")
    if high is not None and value > high:
        raise InvalidInput(name, f"must be <= {high}, got {_short(value)}")
    return value


def _short(value: int) -> str:
    """An integer for an error message: its digits, or their count when there are many."""
    if -(10**30) < value < 10**30:
        return str(value)
    sign = "-" if value < 0 else ""
    return f"{sign}an integer of about {int(abs(value).bit_length() * 0.30103) + 1} digits"


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(name, f"must be a number, got {_type_name(value)}")
    if not math.isfinite(value):
        raise InvalidInput(name, f"must be finite, got {value}")
    return float(value)


# ------------------------------------------------------------------ fields
def _request_id(record: Mapping[str, Any]) -> str:
    request_id = _str(record, "request_id")
    if request_id and not REQUEST_ID_PATTERN.fullmatch(request_id):
        raise InvalidInput(
            "request_id",
            f"must be 1..{MAX_REQUEST_ID_LEN} characters of [A-Za-z0-9._:-], "
            f"got {request_id[:40]!r}",
        )
    return request_id


def _tenant(record: Mapping[str, Any]) -> str:
    tenant = _str(record, "tenant") or DEFAULT_TENANT
    if len(tenant) > MAX_TENANT_LEN or not tenant.isprintable():
        raise InvalidInput("tenant", f"must be 1..{MAX_TENANT_LEN} printable characters")
    return tenant


def _model(record: Mapping[str, Any], models: Mapping[str, ModelLimits] | None) -> str:
    model = _str(record, "model")
    if not model:
        raise InvalidInput("model", "is required")
    if models is not None and model not in models:
        known = ", ".join(sorted(models)) or "none"
        raise UnknownModel("model", f"unknown model {model!r}; served models: {known}", model)
    return model


def _prompt(
    record: Mapping[str, Any], limits: SubmissionLimits
) -> tuple[str | None, tuple[int, ...] | None, tuple[dict[str, str], ...] | None, int]:
    """(text, token ids, chat messages, number of prompt tokens): exactly one is set."""
    text_field = "prompt" if "prompt" in record else "prompt_text"
    has_text = record.get(text_field) is not None
    has_ids = record.get("prompt_token_ids") is not None
    has_messages = record.get("messages") is not None
    if "prompt" in record and "prompt_text" in record:
        raise InvalidInput("prompt_text", "give either 'prompt' or 'prompt_text', not both")
    if has_text + has_ids + has_messages > 1:
        raise InvalidInput("prompt", "give one of prompt text, prompt_token_ids or messages, "
                           "not both")
    if has_messages:
        messages = chat_messages(record["messages"])
        num_bytes = sum(len(m["content"].encode("utf-8", errors="surrogatepass"))
                        for m in messages)
        if num_bytes > limits.max_prompt_bytes:
            raise InvalidInput("messages", f"hold {num_bytes} bytes, over the limit of "
                               f"{limits.max_prompt_bytes} bytes")
        return None, None, messages, max(1, math.ceil(num_bytes / BYTES_PER_TOKEN_ESTIMATE))
    if has_ids:
        ids = record["prompt_token_ids"]
        if not isinstance(ids, list | tuple):
            raise InvalidInput(
                "prompt_token_ids", f"must be a list of integers, got {_type_name(ids)}"
            )
        if not ids:
            raise InvalidInput("prompt_token_ids", "must not be empty")
        for i, token in enumerate(ids):
            _int(token, f"prompt_token_ids[{i}]", 0, INT32_MAX)
        return None, tuple(ids), None, len(ids)
    text = _str(record, text_field)
    if not text:
        raise InvalidInput("prompt", "must not be empty (give prompt text or prompt_token_ids)")
    num_bytes = len(text.encode("utf-8", errors="surrogatepass"))
    if num_bytes > limits.max_prompt_bytes:
        raise InvalidInput(
            "prompt", f"is {num_bytes} bytes, over the limit of {limits.max_prompt_bytes} bytes"
        )
    return text, None, None, max(1, math.ceil(num_bytes / BYTES_PER_TOKEN_ESTIMATE))


def _max_tokens(record: Mapping[str, Any]) -> int:
    if record.get("max_tokens") is None:
        raise InvalidInput("max_tokens", "is required")
    max_tokens = _int(record["max_tokens"], "max_tokens", high=INT32_MAX)
    if max_tokens <= 0:
        raise InvalidInput("max_tokens", f"must be > 0, got {_short(max_tokens)}")
    return max_tokens


def _slo_class(record: Mapping[str, Any]) -> SLOClass:
    value = record.get("slo_class")
    if value is None or value == "":
        return SLOClass.INTERACTIVE
    if not isinstance(value, str):
        raise InvalidInput("slo_class", f"must be one of {_class_names()}, got {value!r}")
    try:
        return SLOClass(value)
    except ValueError:
        raise InvalidInput("slo_class", f"must be one of {_class_names()}, got {value!r}") from None


def _class_names() -> str:
    return ", ".join(c.value for c in SLOClass)


def _slo(record: Mapping[str, Any], slo_class: SLOClass) -> SLO:
    ttft = record.get("ttft_slo_s")
    if ttft is None:
        if slo_class is SLOClass.CUSTOM:
            raise InvalidInput("ttft_slo_s", "is required for slo_class 'custom'")
        ttft_s = DEFAULT_TTFT_SLO_S[slo_class]
    else:
        ttft_s = _number(ttft, "ttft_slo_s")
        if ttft_s <= 0:
            raise InvalidInput("ttft_slo_s", f"must be > 0, got {ttft_s}")
    tpot = record.get("tpot_slo_s")
    tpot_s = None
    if tpot is not None:
        tpot_s = _number(tpot, "tpot_slo_s")
        if tpot_s <= 0:
            raise InvalidInput("tpot_slo_s", f"must be > 0 when set, got {tpot_s}")
    return SLO.of(ttft_s, tpot_s)


def _sampling(record: Mapping[str, Any]) -> dict[str, Any]:
    raw = record.get("sampling")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise InvalidInput("sampling", f"must be an object, got {_type_name(raw)}")
    _reject_unknown(raw, _SAMPLING_FIELDS, "sampling.")
    out: dict[str, Any] = {}
    if raw.get("temperature") is not None:
        out["temperature"] = _number(raw["temperature"], "sampling.temperature")
        if out["temperature"] < 0:
            raise InvalidInput("sampling.temperature", f"must be >= 0, got {out['temperature']}")
    if raw.get("top_p") is not None:
        out["top_p"] = _number(raw["top_p"], "sampling.top_p")
        if not 0 < out["top_p"] <= 1:
            raise InvalidInput("sampling.top_p", f"must be in (0, 1], got {out['top_p']}")
    if raw.get("top_k"):
        out["top_k"] = _int(raw["top_k"], "sampling.top_k", 0, INT32_MAX)
    if raw.get("seed") is not None:
        out["seed"] = _int(raw["seed"], "sampling.seed", INT64_MIN, INT64_MAX)
    if raw.get("stop"):
        stop = raw["stop"]
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidInput("sampling.stop", "must be a list of non-empty strings")
        out["stop"] = list(stop)
    ignore_eos = raw.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise InvalidInput("sampling.ignore_eos", f"must be true or false, got {ignore_eos!r}")
    if ignore_eos:
        out["ignore_eos"] = True
    return out


def _reject_unknown(record: Mapping[str, Any], known: frozenset[str], prefix: str = "") -> None:
    for name in record:
        if name not in known:  # an empty, unprintable or huge name is shown quoted and cut
            shown = name if name and str(name).isprintable() else repr(name)
            raise InvalidInput(f"{prefix}{str(shown)[:100]}", "unknown field")


# ------------------------------------------------------------------ entry point
def parse_submission(
    record: Any,
    models: Mapping[str, ModelLimits] | None,
    limits: SubmissionLimits = SubmissionLimits(),
) -> Submission:
    """Validate ``record`` (schema in the module docstring) into a :class:`Submission`.

    ``models`` maps served model names to their limits; None skips the model checks
    (a client that does not know the catalogue). Raises InvalidInput on the first problem.
    """
    if not isinstance(record, Mapping):
        raise InvalidInput("record", f"must be a JSON object, got {_type_name(record)}")
    _reject_unknown(record, _TOP_LEVEL_FIELDS)
    request_id = _request_id(record)
    tenant = _tenant(record)
    model = _model(record, models)
    prompt_text, prompt_ids, messages, num_prompt_tokens = _prompt(record, limits)
    model_limits = models.get(model) if models is not None else None
    max_tokens = _max_tokens(record)
    if model_limits is not None:
        check_fits(model, num_prompt_tokens, max_tokens, model_limits.sequence_limits())
    slo_class = _slo_class(record)
    return Submission(
        request_id=request_id, tenant=tenant, model=model, prompt_text=prompt_text,
        prompt_token_ids=prompt_ids, num_prompt_tokens=num_prompt_tokens, max_tokens=max_tokens,
        slo_class=slo_class, slo=_slo(record, slo_class), sampling=_sampling(record),
        prompt_messages=messages,
    )
