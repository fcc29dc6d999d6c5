"""Text in and out of a model: its tokenizer, chat template, end-of-sequence ids and stop strings.

One implementation, used by every engine that serves a checkpoint (the vLLM engine and
the simulated engine when its model names a checkpoint directory):

* :class:`TextModel` is a Hugging Face-format checkpoint's text side, loaded from the
  directory (``tokenizer.json`` / ``tokenizer_config.json``, the chat template in
  ``chat_template.jinja`` or the tokenizer config, ``generation_config.json``) with
  transformers' ``AutoTokenizer`` (no torch needed). Text prompts are encoded with the
  tokenizer's own special tokens (a BOS where the model adds one); chat prompts (a list of
  ``{"role", "content"}`` messages) are rendered by the model's chat template with the
  generation prompt and encoded without adding special tokens again (as vLLM's chat
  endpoint does). The end-of-sequence ids are the union of ``generation_config.json``'s
  ``eos_token_id`` (one id or a list) and the tokenizer's EOS token.
* :class:`OutputText` follows one request's output: token ids in, text out. Text is
  detokenized incrementally (``tokenizers``' ``DecodeStream``: a character split over
  several tokens, e.g. multi-byte UTF-8 in byte-level BPE, is emitted once complete;
  special tokens are skipped). An EOS id ends the output unless ``ignore_eos``: the id
  counts as output, its text does not. A stop string ends it where it appears, also
  across chunk boundaries; the stop string and what follows are not in the text, and the
  token ids run up to the one that completed it (vLLM's and OpenAI's behaviour). Text
  that could be the start of a stop string is held back until it is known not to be
  (only the longest such suffix, so output is not delayed by more than needed);
  :meth:`OutputText.flush` releases it when output ends otherwise (length, abort).

Pure apart from reading the checkpoint directory in :meth:`TextModel.load`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from qlm.core.errors import InvalidInput
from qlm.engine.base import EngineRequest

#: Files whose presence makes a directory a checkpoint with a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True, slots=True)
class TextDelta:
    """What one :meth:`OutputText.feed` produced: the token ids that count as output (all
    fed ids, or those up to and including the one that ended the output), the new text,
    and ``"stop"`` when an EOS id or a stop string ended the output."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: Literal["stop"] | None = None


def chat_messages(value: Any, where: str = "messages") -> tuple[dict[str, str], ...]:
    """``value`` as chat messages (a non-empty list of ``{"role": str, "content": str}``),
    or InvalidInput naming the bad entry."""
    if not isinstance(value, list | tuple) or not value:
        raise InvalidInput(where, "must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise InvalidInput(f"{where}[{i}]", "must be an object with role and content")
        unknown = set(message) - {"role", "content"}
        if unknown:
            raise InvalidInput(f"{where}[{i}].{sorted(unknown)[0]}", "unknown field")
        for name in ("role", "content"):
            if not isinstance(message.get(name), str):
                raise InvalidInput(f"{where}[{i}].{name}", "must be a string")
        if not message["role"]:
            raise InvalidInput(f"{where}[{i}].role", "must not be empty")
        out.append({"role": message["role"], "content": message["content"]})
    return tuple(out)


def has_tokenizer(path: Path) -> bool:
    """Whether ``path`` holds a tokenizer :meth:`TextModel.load` can read."""
    return any((Path(path) / name).is_file() for name in TOKENIZER_FILES)


class TextModel:
    """The tokenizer, chat template and EOS ids of one checkpoint (module docstring)."""

    def __init__(self, tokenizer: Any, eos_token_ids: Iterable[int], name: str = "") -> None:
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer  # a tokenizers.Tokenizer
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        if not self.eos_token_ids:
            raise InvalidInput("eos_token_id", f"{name or 'the checkpoint'} names no EOS token")
        self.name = name
        self.special_ids = frozenset(int(t) for t in tokenizer.all_special_ids)

    @classmethod
    def load(cls, path: Path) -> TextModel:
        """The text side of the checkpoint at ``path``; InvalidInput names what is missing."""
        path = Path(path)
        if not path.is_dir():
            raise InvalidInput("path", f"{path} is not a directory")
        if not has_tokenizer(path):
            raise InvalidInput("path", f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
        import logging

        from transformers import AutoTokenizer

        logging.getLogger("transformers").setLevel(logging.ERROR)  # "PyTorch was not found"
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as error:  # transformers raises many types for a bad directory
            raise InvalidInput("path", f"cannot load the tokenizer of {path}: {error}") from None
        if not hasattr(tokenizer, "backend_tokenizer"):
            raise InvalidInput("path", f"{path}: only fast (tokenizer.json) tokenizers are served")
        eos = set(_generation_eos(path))
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        return cls(tokenizer, eos, path.name)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    # ---------------------------------------------------------------- prompts
    def encode(self, text: str) -> tuple[int, ...]:
        """``text`` as a prompt: the model's special tokens (BOS) added as its tokenizer does."""
        return tuple(self.tokenizer.encode(text, add_special_tokens=True))

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """``messages`` through the model's chat template, ending with the generation prompt."""
        if not self.tokenizer.chat_template:
            raise InvalidInput("messages", f"model {self.name!r} has no chat template")
        try:
            text = self.tokenizer.apply_chat_template(
                [dict(m) for m in messages], tokenize=False, add_generation_prompt=True)
        except Exception as error:  # jinja's TemplateError and the template's own raise_exception
            raise InvalidInput("messages", f"the chat template refused them: {error}") from None
        return str(text)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> tuple[int, ...]:
        """A chat prompt's ids: the rendered template, no special tokens added again."""
        return tuple(self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False))

    def encode_prompt(self, text: str | None = None,
                      messages: Sequence[Mapping[str, str]] | None = None) -> tuple[int, ...]:
        """The ids of a text or a chat prompt (exactly one given)."""
        if (text is None) == (messages is None):
            raise InvalidInput("prompt", "give exactly one of text or messages")
        ids = self.encode(text) if text is not None else self.encode_chat(messages or ())
        if not ids:
            raise InvalidInput("prompt", "encodes to no tokens")
        return ids

    # ---------------------------------------------------------------- output
    def decode(self, token_ids: Sequence[int]) -> str:
        """Whole-sequence text of ``token_ids``, special tokens skipped."""
        return str(self.backend.decode(list(token_ids), skip_special_tokens=True))

    def output(self, *, stop: Sequence[str] = (), ignore_eos: bool = False,
               kept_ids: Sequence[int] = (), kept_text: str = "") -> OutputText:
        """A follower of one request's output; ``kept_ids`` / ``kept_text``: output it
        already had (a resumed request), so decoding and stop matching continue from it."""
        return OutputText(self, stop, ignore_eos, kept_ids, kept_text)


class OutputText:
    """Incremental detokenizer and stop matcher of one request (module docstring)."""

    def __init__(self, model: TextModel, stop: Sequence[str], ignore_eos: bool,
                 kept_ids: Sequence[int] = (), kept_text: str = "") -> None:
        from tokenizers.decoders import DecodeStream

        if any(not isinstance(s, str) or not s for s in stop):
            raise InvalidInput("stop", "stop strings must be non-empty strings")
        self.model = model
        self.stop = tuple(dict.fromkeys(stop))
        self.ignore_eos = ignore_eos
        self._longest = max((len(s) for s in self.stop), default=0)
        self._stream = DecodeStream(skip_special_tokens=True)
        for token in kept_ids:  # one by one: a kept output may end inside a character
            self._stream.step(model.backend, int(token))
        self._tail = kept_text[-self._longest + 1:] if self._longest > 1 else ""
        self._held = ""
        self.finished = False

    def feed(self, token_ids: Sequence[int]) -> TextDelta:
        """Follow ``token_ids`` (the next output tokens); after a ``"stop"`` nothing more."""
        if self.finished:
            return TextDelta((), "")
        out: list[str] = []
        for n, token in enumerate(token_ids, start=1):
            if not self.ignore_eos and token in self.model.eos_token_ids:
                out.append(self._release())
                return self._end(token_ids[:n], out)
            piece = self._stream.step(self.model.backend, int(token))
            if not piece:
                continue
            text, stopped = self._match(piece)
            out.append(text)
            if stopped:
                return self._end(token_ids[:n], out)
        return TextDelta(tuple(token_ids), "".join(out))

    def flush(self) -> str:
        """The text held back for a stop string that did not come (output ends otherwise)."""
        return self._release()

    def _end(self, ids: Sequence[int], out: list[str]) -> TextDelta:
        self.finished = True
        return TextDelta(tuple(ids), "".join(out), "stop")

    def _release(self) -> str:
        held, self._held = self._held, ""
        self._remember(held)
        return held

    def _remember(self, emitted: str) -> None:
        if self._longest > 1 and emitted:
            self._tail = (self._tail + emitted)[-self._longest + 1:]

    def _match(self, piece: str) -> tuple[str, bool]:
        """Text to emit now after ``piece`` was decoded, and whether a stop string ended it."""
        pending = self._held + piece
        if not self.stop:
            self._held = ""
            return pending, False
        window = self._tail + pending
        found = [i for i in (window.find(s) for s in self.stop) if i >= 0]
        if found:
            cut = min(found) - len(self._tail)  # < 0: it began in text already sent
            self._held = ""
            return pending[:max(0, cut)], True
        keep = self._prefix_suffix(pending)
        emit, self._held = pending[:len(pending) - keep], pending[len(pending) - keep:]
        self._remember(emit)
        return emit, False

    def _prefix_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that begins some stop string."""
        for k in range(min(len(text), self._longest - 1), 0, -1):
            suffix = text[-k:]
            if any(s.startswith(suffix) for s in self.stop):
                return k
        return 0


def tokenized(request: EngineRequest, text: TextModel | None) -> EngineRequest:
    """``request`` with its prompt as token ids of ``text`` (the model's tokenizer and chat
    template); InvalidInput when it needs a tokenizer the model does not have."""
    if request.prompt_token_ids is not None:
        if request.stop and text is None:
            raise InvalidInput("stop", f"model {request.model!r} has no tokenizer to match "
                               "stop strings with")
        return request
    if text is None:
        raise InvalidInput("prompt", f"model {request.model!r} has no tokenizer (dummy weights "
                           "of a shape): send prompt_token_ids")
    ids = text.encode_prompt(request.prompt_text, request.prompt_messages)
    return replace(request, prompt_token_ids=ids, prompt_tokens=len(ids))


def _generation_eos(path: Path) -> list[int]:
    """``eos_token_id`` of ``generation_config.json`` (else ``config.json``): [] if neither."""
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as error:
            raise InvalidInput("path", f"{file} is not valid JSON: {error}") from None
        eos = data.get("eos_token_id") if isinstance(data, dict) else None
        if eos is None:
            continue
        ids = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise InvalidInput(f"{name}.eos_token_id", f"must be token ids, got {eos!r}")
        return [int(i) for i in ids]
    return []
