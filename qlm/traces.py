"""Request traces as the public datasets ship them: read, detect the format, validate.

A trace is a sequence of requests with an arrival time and token counts; the
simulator and the demos replay its arrivals (rescaled to a rate) and its lengths
(:class:`TraceRow`: seconds since the first request, prompt tokens, output tokens).
Reading a file (:func:`load_trace`) is the only I/O; parsing and validation
(:func:`parse_trace`, :func:`parse_jsonl_trace`) are pure. Files may be gzip
compressed (detected from their first bytes, whatever their name).

**Formats** (``trace_format``; detected from the CSV header or the first JSON record
when not given):

``azure`` — the Azure LLM inference traces, 2023 (``AzureLLMInferenceTrace_{conv,code}.csv``)
    and 2024 (``AzureLLMInferenceTrace_{conv,code}_1week.csv``): CSV with ``TIMESTAMP``,
    ``ContextTokens``, ``GeneratedTokens``. ``TIMESTAMP`` is a date-time, naive (2023:
    ``2023-11-16 18:15:46.6805900``, any number of fractional digits) or with a UTC
    offset (2024: ``2024-05-10 00:00:00.009930+00:00``, ``Z`` too); naive times are
    taken as UTC, so a file mixing both still gives the right gaps. A plain number is
    taken as seconds (epoch seconds, or seconds from any origin).
``burstgpt`` — BurstGPT (``BurstGPT_*.csv``): CSV with ``Timestamp`` (seconds from the
    trace's start, or epoch seconds), ``Request tokens``, ``Response tokens`` (other
    columns — ``Model``, ``Total tokens``, ``Log Type``, ``Session ID``, ``Elapsed
    time`` — are ignored). Rows with ``Response tokens`` = 0 are requests that failed
    in the traced service (BurstGPT ships them in its ``*_with_fails`` files): they
    produced no output, so there is nothing to replay and they are **skipped**
    (:attr:`Trace.num_skipped` counts them). Every other value must be valid.
``mooncake`` — Mooncake (``*_trace.jsonl``): one JSON object per line with
    ``timestamp`` (milliseconds from the trace's start), ``input_length``,
    ``output_length``; ``hash_ids`` (prefix-cache block hashes) and any other field are
    ignored.

Errors are :class:`~qlm.core.errors.InvalidInput` naming the file, the column or
field, and the line of the first problem: an unrecognised header, a missing column or
field, a timestamp that does not parse, token counts that are not integers or not >= 1,
a line that is not a JSON object, an empty or unreadable file.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

from qlm.core.errors import InvalidInput

TRACE_FORMATS: Final = ("azure", "burstgpt", "mooncake")
#: The CSV columns an Azure trace must have (kept for callers that name them).
TRACE_COLUMNS: Final = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
_GZIP_MAGIC: Final = b"\x1f\x8b"
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_FRACTION = re.compile(r"\.(\d+)")


@dataclass(frozen=True, slots=True)
class TraceRow:
    arrival_s: float  # seconds since the first row
    context_tokens: int
    generated_tokens: int


@dataclass(frozen=True, slots=True)
class CsvFormat:
    """Which CSV columns hold the arrival time and token counts of one trace format."""

    name: str
    time_column: str
    prompt_column: str
    output_column: str
    #: rows whose output column is 0 are failed requests, skipped (BurstGPT)
    skip_failed: bool = False

    @property
    def columns(self) -> tuple[str, str, str]:
        return (self.time_column, self.prompt_column, self.output_column)


CSV_FORMATS: Final = {
    "azure": CsvFormat("azure", "TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    "burstgpt": CsvFormat("burstgpt", "Timestamp", "Request tokens", "Response tokens",
                          skip_failed=True),
}
MOONCAKE_FIELDS: Final = ("timestamp", "input_length", "output_length")


@dataclass(frozen=True, slots=True)
class Trace:
    """A parsed trace: its rows sorted by time, the format read, failed rows skipped."""

    rows: tuple[TraceRow, ...]
    trace_format: str
    num_skipped: int = 0


# ================================================================ parsing
def parse_trace(
    rows: Iterable[Mapping[str, str | None]], source: str = "trace", trace_format: str = "azure"
) -> tuple[TraceRow, ...]:
    """Validate and convert CSV rows (dicts) of ``trace_format`` to rows sorted by time."""
    return parse_csv_trace(rows, source, _csv_format(trace_format)).rows


def parse_csv_trace(
    rows: Iterable[Mapping[str, str | None]], source: str, fmt: CsvFormat,
    limit: int | None = None,
) -> Trace:
    """The pure part of reading a CSV trace (module docstring). Line 1 is the header.
    ``limit``: stop after that many rows are kept (file order)."""
    parsed: list[tuple[float, int, int]] = []
    skipped = 0
    for line, row in enumerate(rows, start=2):
        if limit is not None and len(parsed) >= limit:
            break
        if line == 2:
            _require_columns(row, fmt, source)
        where = f"(line {line})"
        at = parse_timestamp(row.get(fmt.time_column), f"{source}.{fmt.time_column} {where}")
        output_where = f"{source}.{fmt.output_column} {where}"
        if fmt.skip_failed and _is_zero(row.get(fmt.output_column)):
            skipped += 1
            continue
        ctx = _tokens(row.get(fmt.prompt_column), f"{source}.{fmt.prompt_column} {where}")
        gen = _tokens(row.get(fmt.output_column), output_where)
        parsed.append((at, ctx, gen))
    return Trace(_rebased(parsed, source), fmt.name, skipped)


def parse_jsonl_trace(
    lines: Iterable[str], source: str = "trace", limit: int | None = None
) -> Trace:
    """Mooncake JSONL lines (one object per line; blank lines ignored) to a :class:`Trace`;
    ``limit`` as for :func:`parse_csv_trace`."""
    parsed: list[tuple[float, int, int]] = []
    for line, text in enumerate(lines, start=1):
        if limit is not None and len(parsed) >= limit:
            break
        if not text.strip():
            continue
        where = f"(line {line})"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{source} {where}", f"not JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise InvalidInput(f"{source} {where}", "must be a JSON object")
        for name in MOONCAKE_FIELDS:
            if name not in record:
                raise InvalidInput(f"{source}.{name} {where}", "missing field")
        ms = record["timestamp"]
        if isinstance(ms, bool) or not isinstance(ms, int | float) or not math.isfinite(ms):
            raise InvalidInput(f"{source}.timestamp {where}",
                               f"must be a number of milliseconds, got {ms!r}")
        ctx = _json_tokens(record["input_length"], f"{source}.input_length {where}")
        gen = _json_tokens(record["output_length"], f"{source}.output_length {where}")
        parsed.append((ms / 1000.0, ctx, gen))
    return Trace(_rebased(parsed, source), "mooncake")


def parse_timestamp(text: str | None, where: str) -> float:
    """Seconds of a CSV timestamp: a plain number as is, a date-time as epoch seconds
    (naive = UTC; fractional digits beyond microseconds dropped)."""
    if text is None or not text.strip():
        raise InvalidInput(where, "empty timestamp")
    value = text.strip()
    if _NUMBER.fullmatch(value):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise InvalidInput(where, f"unparsable timestamp {value!r}")
        return seconds
    normalised = _FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), value, count=1)
    if normalised.endswith(("Z", "z")):
        normalised = normalised[:-1] + "+00:00"
    try:
        at = datetime.fromisoformat(normalised)
    except ValueError:
        raise InvalidInput(where, f"unparsable timestamp {value!r}") from None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.timestamp()


def _rebased(parsed: list[tuple[float, int, int]], source: str) -> tuple[TraceRow, ...]:
    if not parsed:
        raise InvalidInput(source, "no rows")
    parsed.sort(key=lambda r: r[0])
    first = parsed[0][0]
    return tuple(TraceRow(at - first, c, g) for at, c, g in parsed)


def _require_columns(row: Mapping[str, Any], fmt: CsvFormat, source: str) -> None:
    missing = [c for c in fmt.columns if c not in row]
    if missing:
        raise InvalidInput(f"{source}.{missing[0]}", "missing column")


def _is_zero(text: str | None) -> bool:
    return text is not None and text.strip() in ("0", "+0", "-0")


def _tokens(text: str | None, where: str) -> int:
    if text is None or not text.strip():
        raise InvalidInput(where, "empty token count")
    try:
        value = int(text.strip())
    except ValueError:
        raise InvalidInput(where, f"not an integer: {text.strip()!r}") from None
    return _positive(value, where)


def _json_tokens(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(where, f"not an integer: {value!r}")
    return _positive(value, where)


def _positive(value: int, where: str) -> int:
    if value < 0:
        raise InvalidInput(where, f"negative token count {value}")
    if value == 0:
        raise InvalidInput(where, "token count must be >= 1")
    return value


def _csv_format(name: str) -> CsvFormat:
    try:
        return CSV_FORMATS[name]
    except KeyError:
        raise InvalidInput("trace-format", f"unknown or not CSV: {name!r}; expected one of "
                           f"{', '.join(CSV_FORMATS)}") from None


# ============================================================ detection
def detect_format(first_line: str, source: str = "trace") -> str:
    """The format of a trace from its first line (CSV header or JSON record)."""
    text = first_line.strip().lstrip("\ufeff")
    if text.startswith("{"):
        return "mooncake"
    header = set(next(csv.reader([text]), []))
    for name, fmt in CSV_FORMATS.items():
        if set(fmt.columns) <= header:
            return name
    if "TIMESTAMP" in header or "ContextTokens" in header or "GeneratedTokens" in header:
        return "azure"  # a partial Azure header: report its missing column
    if "Request tokens" in header or "Response tokens" in header:
        return "burstgpt"
    expected = "; ".join(f"{n}: {', '.join(f.columns)}" for n, f in CSV_FORMATS.items())
    raise InvalidInput(source, f"unrecognised trace format (header {text[:80]!r}); expected "
                       f"CSV columns ({expected}) or Mooncake JSON lines "
                       f"({', '.join(MOONCAKE_FIELDS)}), or name it with --trace-format")


def check_format(trace_format: str | None) -> str | None:
    """``trace_format`` if known (None or "auto" = detect), else InvalidInput."""
    if trace_format is None or trace_format == "auto":
        return None
    if trace_format not in TRACE_FORMATS:
        raise InvalidInput("trace-format", f"unknown {trace_format!r}; expected auto or one of "
                           f"{', '.join(TRACE_FORMATS)}")
    return trace_format


# ================================================================ reading
def read_trace(path: Path, trace_format: str | None = None, limit: int | None = None) -> Trace:
    """Read, detect (unless ``trace_format`` names one) and validate a trace file.

    ``limit`` reads only the first that many requests in file order (the public traces
    are in time order; the Azure 2024 week files hold 17 and 27 million rows).
    """
    fmt_name = check_format(trace_format)
    if limit is not None and limit <= 0:
        raise InvalidInput("limit", f"must be > 0, got {limit}")
    source = path.name
    try:
        with _open_text(path) as f:
            first = f.readline()
            if not first:
                raise InvalidInput(source, "empty file")
            fmt_name = fmt_name or detect_format(first, source)
            body = _chain(first, f)
            if fmt_name == "mooncake":
                return parse_jsonl_trace(body, source, limit)
            fmt = CSV_FORMATS[fmt_name]
            reader = csv.DictReader(body)
            if reader.fieldnames is None:
                raise InvalidInput(source, "empty file")
            missing = [c for c in fmt.columns if c not in reader.fieldnames]
            if missing:
                raise InvalidInput(f"{source}.{missing[0]}", "missing column")
            return parse_csv_trace(reader, source, fmt, limit)
    except (OSError, EOFError) as exc:  # EOFError: a truncated gzip stream
        reason = getattr(exc, "strerror", None) or exc
        raise InvalidInput(str(path), f"cannot read: {reason}") from None
    except UnicodeDecodeError as exc:
        raise InvalidInput(source, f"not UTF-8 text: {exc.reason}") from None
    except csv.Error as exc:
        raise InvalidInput(source, f"malformed CSV: {exc}") from None


def load_trace(
    path: Path, trace_format: str | None = None, limit: int | None = None
) -> tuple[TraceRow, ...]:
    """The rows of :func:`read_trace`."""
    return read_trace(path, trace_format, limit).rows


def _open_text(path: Path) -> IO[str]:
    with path.open("rb") as probe:
        magic = probe.read(2)
    if magic == _GZIP_MAGIC:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return path.open(encoding="utf-8-sig", newline="")


def _chain(first: str, rest: Iterable[str]) -> Iterator[str]:
    yield first
    yield from rest


def slice_trace(
    rows: Sequence[TraceRow], num_requests: int | None, start: int = 0
) -> tuple[TraceRow, ...]:
    """``num_requests`` consecutive rows from ``start``, times re-based to 0."""
    if start < 0 or (num_requests is not None and num_requests <= 0):
        raise InvalidInput("num_requests", "must be > 0 (and start >= 0)")
    chosen = rows[start : None if num_requests is None else start + num_requests]
    if not chosen:
        raise InvalidInput("num_requests", f"trace has only {len(rows)} rows")
    t0 = chosen[0].arrival_s
    return tuple(TraceRow(r.arrival_s - t0, r.context_tokens, r.generated_tokens) for r in chosen)
