"""The trace reader (qlm/traces.py): every public format as it ships, gzip, detection,
and a clear error naming the field and line for every kind of bad input. The files
are small ones written by the tests in each format's exact layout."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

import pytest

from loadgen.sim import main as sim_main
from qlm.core.errors import InvalidInput
from qlm.traces import detect_format, load_trace, read_trace

AZURE_2023 = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    "2023-11-16 18:15:46.6805900,374,44\n"
    "2023-11-16 18:15:50.9951690,396,109\n"
    "2023-11-16 18:15:48.0000000,879,20\n"
)
AZURE_2024 = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    "2024-05-10 00:00:00.009930+00:00,2048,28\n"
    "2024-05-10 00:00:01+00:00,512,7\n"
    "2024-05-10T02:00:02.5+02:00,100,1\n"
)
EPOCH = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    "1700158546.5,10,5\n"
    "1700158548,20,6\n"
)
BURSTGPT = (
    "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
    "5,ChatGPT,472,18,490,Conversation log\n"
    "45,ChatGPT,1087,0,1087,Conversation log\n"
    "118,GPT-4,417,30,447,API log\n"
)
MOONCAKE = [
    {"timestamp": 0, "input_length": 6955, "output_length": 52, "hash_ids": [46, 47, 48]},
    {"timestamp": 27482, "input_length": 6472, "output_length": 26, "hash_ids": [46, 47]},
    {"timestamp": 30535, "input_length": 6478, "output_length": 194, "hash_ids": []},
]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def jsonl(records: list[dict[str, object]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def table(rows: tuple) -> list[tuple[float, int, int]]:  # type: ignore[type-arg]
    return [(round(r.arrival_s, 6), r.context_tokens, r.generated_tokens) for r in rows]


# ------------------------------------------------------------------ formats
def test_azure_2023_sorted_and_rebased(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, "conv.csv", AZURE_2023))
    assert trace.trace_format == "azure"
    assert table(trace.rows) == [(0.0, 374, 44), (1.31941, 879, 20), (4.314579, 396, 109)]


def test_azure_2024_utc_offsets_and_seconds_without_fraction(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, "code_1week.csv", AZURE_2024))
    assert trace.trace_format == "azure"
    # 02:00:02.5+02:00 is 00:00:02.5 UTC
    assert table(trace.rows) == [(0.0, 2048, 28), (0.99007, 512, 7), (2.49007, 100, 1)]


def test_naive_and_offset_timestamps_mix_as_utc(tmp_path: Path) -> None:
    text = ("TIMESTAMP,ContextTokens,GeneratedTokens\n"
            "2024-05-10 00:00:00,1,1\n2024-05-10 00:00:03Z,2,2\n")
    assert table(load_trace(write(tmp_path, "t.csv", text))) == [(0.0, 1, 1), (3.0, 2, 2)]


def test_epoch_seconds(tmp_path: Path) -> None:
    assert table(load_trace(write(tmp_path, "e.csv", EPOCH))) == [(0.0, 10, 5), (1.5, 20, 6)]


def test_burstgpt_skips_failed_requests(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, "BurstGPT_1.csv", BURSTGPT))
    assert trace.trace_format == "burstgpt"
    assert trace.num_skipped == 1
    assert table(trace.rows) == [(0.0, 472, 18), (113.0, 417, 30)]


def test_burstgpt_extra_columns_of_newer_releases_are_ignored(tmp_path: Path) -> None:
    text = ("Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,"
            "Total tokens,Log Type\n0.5,s1,1.2,ChatGPT,10,3,13,Conversation log\n")
    assert table(load_trace(write(tmp_path, "b.csv", text))) == [(0.0, 10, 3)]


def test_mooncake_milliseconds(tmp_path: Path) -> None:
    trace = read_trace(write(tmp_path, "conversation_trace.jsonl", jsonl(MOONCAKE)))
    assert trace.trace_format == "mooncake"
    assert table(trace.rows) == [(0.0, 6955, 52), (27.482, 6472, 26), (30.535, 6478, 194)]


@pytest.mark.parametrize("name, text", [
    ("conv.csv.gz", AZURE_2023), ("b.csv.gz", BURSTGPT), ("m.jsonl.gz", jsonl(MOONCAKE)),
    ("no_suffix", AZURE_2024),
])
def test_gzip_is_read_whatever_the_name(tmp_path: Path, name: str, text: str) -> None:
    plain = load_trace(write(tmp_path, "plain.txt", text))
    packed = tmp_path / name
    packed.write_bytes(gzip.compress(text.encode()))
    assert load_trace(packed) == plain


def test_explicit_format_is_used(tmp_path: Path) -> None:
    path = write(tmp_path, "b.csv", BURSTGPT)
    assert read_trace(path, "burstgpt").trace_format == "burstgpt"
    with pytest.raises(InvalidInput) as err:
        read_trace(path, "azure")
    assert err.value.field == "b.csv.TIMESTAMP"
    assert "missing column" in err.value.problem
    with pytest.raises(InvalidInput) as err:
        read_trace(path, "mooncake")
    assert err.value.field == "b.csv (line 1)"


def test_detection() -> None:
    assert detect_format("TIMESTAMP,ContextTokens,GeneratedTokens\n") == "azure"
    assert detect_format("\ufeffTIMESTAMP,ContextTokens,GeneratedTokens\r\n") == "azure"
    assert detect_format("Timestamp,Model,Request tokens,Response tokens,Total tokens,"
                         "Log Type") == "burstgpt"
    assert detect_format('{"timestamp": 0}') == "mooncake"
    with pytest.raises(InvalidInput) as err:
        detect_format("time,prompt,output", "x.csv")
    assert err.value.field == "x.csv"
    assert "unrecognised trace format" in err.value.problem
    assert "--trace-format" in err.value.problem


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize("text, field, problem", [
    (AZURE_2024 + "2024-05-10 00:00:03+00:00,0,1\n",
     "t.csv.ContextTokens (line 5)", "must be >= 1"),
    (AZURE_2024 + "2024-05-10 00:00:03+00:00,12,-3\n",
     "t.csv.GeneratedTokens (line 5)", "negative"),
    (AZURE_2024 + "2024-05-10 00:00:03+99:00,12,3\n", "t.csv.TIMESTAMP (line 5)", "unparsable"),
    (AZURE_2024 + ",12,3\n", "t.csv.TIMESTAMP (line 5)", "empty timestamp"),
    (EPOCH + "nan,1,1\n", "t.csv.TIMESTAMP (line 4)", "unparsable"),
    (EPOCH + "17e400,1,1\n", "t.csv.TIMESTAMP (line 4)", "unparsable"),
    (BURSTGPT + "130,ChatGPT,,5,5,API log\n", "t.csv.Request tokens (line 5)", "empty"),
    (BURSTGPT + "130,ChatGPT,9,x,5,API log\n", "t.csv.Response tokens (line 5)",
     "not an integer"),
    (BURSTGPT + "soon,ChatGPT,9,5,14,API log\n", "t.csv.Timestamp (line 5)", "unparsable"),
    ("Timestamp,Model,Request tokens,Total tokens\n1,a,2,3\n", "t.csv.Response tokens",
     "missing column"),
    ("TIMESTAMP,ContextTokens\n2024-05-10 00:00:00,1\n", "t.csv.GeneratedTokens",
     "missing column"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "t.csv", "no rows"),
    ("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
     "1,a,5,0,5,API log\n", "t.csv", "no rows"),
    ("", "t.csv", "empty file"),
    ("\n", "t.csv", "unrecognised trace format"),
])
def test_csv_errors_name_the_field_and_line(
    tmp_path: Path, text: str, field: str, problem: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        load_trace(write(tmp_path, "t.csv", text))
    assert err.value.field == field
    assert problem in err.value.problem


@pytest.mark.parametrize("line, field, problem", [
    ("{not json", "m.jsonl (line 4)", "not JSON"),
    ("[1, 2]", "m.jsonl (line 4)", "JSON object"),
    ('{"input_length": 5, "output_length": 1}', "m.jsonl.timestamp (line 4)", "missing field"),
    ('{"timestamp": 1, "output_length": 1}', "m.jsonl.input_length (line 4)", "missing field"),
    ('{"timestamp": 1, "input_length": 5}', "m.jsonl.output_length (line 4)", "missing field"),
    ('{"timestamp": "1s", "input_length": 5, "output_length": 1}',
     "m.jsonl.timestamp (line 4)", "milliseconds"),
    ('{"timestamp": true, "input_length": 5, "output_length": 1}',
     "m.jsonl.timestamp (line 4)", "milliseconds"),
    ('{"timestamp": 1, "input_length": 5.5, "output_length": 1}',
     "m.jsonl.input_length (line 4)", "not an integer"),
    ('{"timestamp": 1, "input_length": 5, "output_length": 0}',
     "m.jsonl.output_length (line 4)", "must be >= 1"),
    ('{"timestamp": 1, "input_length": -5, "output_length": 2}',
     "m.jsonl.input_length (line 4)", "negative"),
])
def test_jsonl_errors_name_the_field_and_line(
    tmp_path: Path, line: str, field: str, problem: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        load_trace(write(tmp_path, "m.jsonl", jsonl(MOONCAKE) + line + "\n"))
    assert err.value.field == field
    assert problem in err.value.problem


def test_blank_jsonl_lines_are_skipped(tmp_path: Path) -> None:
    text = jsonl(MOONCAKE[:1]) + "\n" + jsonl(MOONCAKE[1:])
    assert len(load_trace(write(tmp_path, "m.jsonl", text))) == 3


def test_unreadable_corrupt_and_non_text_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as err:
        load_trace(tmp_path / "absent.csv")
    assert "cannot read" in err.value.problem
    truncated = tmp_path / "cut.csv.gz"
    truncated.write_bytes(gzip.compress(AZURE_2023.encode() * 50)[:60])
    with pytest.raises(InvalidInput) as err:
        load_trace(truncated)
    assert "cannot read" in err.value.problem
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"TIMESTAMP,\xff\xfe\n")
    with pytest.raises(InvalidInput) as err:
        load_trace(binary)
    assert "UTF-8" in err.value.problem


def test_unknown_format_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as err:
        load_trace(write(tmp_path, "t.csv", AZURE_2023), "sharegpt")
    assert err.value.field == "trace-format"


def test_simulator_replays_each_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``loadgen.sim --trace`` reads every format (a tiny run: 3 requests, one rate)."""
    for name, text in (("a.csv.gz", AZURE_2024), ("b.csv", BURSTGPT),
                       ("m.jsonl", jsonl(MOONCAKE))):
        out = tmp_path / name.replace(".", "_")
        rc = sim_main(["--workload", "WA", "--trace", str(write(tmp_path, name, text)),
                       "--policies", "fcfs", "--rates", "1", "--jobs", "1", "--no-records",
                       "--num-requests", "2", "--out", str(out)])
        assert rc == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["policies"]["fcfs"]["slo_attainment"][0] == 1.0
    rc = sim_main(["--workload", "WA", "--trace", str(write(tmp_path, "bad.csv", "x,y\n1,2\n")),
                   "--policies", "fcfs", "--rates", "1", "--out", str(tmp_path / "bad")])
    assert rc == 2
    assert "unrecognised trace format" in capsys.readouterr().err


TRACES = Path(__file__).resolve().parents[2] / "loadgen" / "traces"


@pytest.mark.parametrize("name, trace_format, num_rows", [
    ("azure_llm_2023_conv.csv", "azure", 19_366), ("azure_llm_2023_code.csv", "azure", 8_819),
    ("mooncake_conversation_trace.jsonl.gz", "mooncake", 12_031),
])
def test_shipped_traces_are_as_documented(name: str, trace_format: str, num_rows: int) -> None:
    """Each shipped trace loads and is byte for byte the file its README names by checksum."""
    readme = (TRACES / "README.md").read_text()
    section = readme[readme.index(f"`{name}`"):]
    checksum = re.search(r"`([0-9a-f]{64})`", section)
    assert checksum is not None
    assert hashlib.sha256((TRACES / name).read_bytes()).hexdigest() == checksum.group(1)
    trace = read_trace(TRACES / name)
    assert trace.trace_format == trace_format
    assert len(trace.rows) == num_rows


def test_limit_reads_only_the_first_requests(tmp_path: Path) -> None:
    """A week-long trace needs only its head: ``limit`` stops reading (a bad row after the
    limit is never reached); failed BurstGPT rows do not count."""
    azure = write(tmp_path, "a.csv", AZURE_2023 + "garbage,x,y\n")
    assert table(load_trace(azure, limit=2)) == [(0.0, 374, 44), (4.314579, 396, 109)]
    burst = write(tmp_path, "b.csv", BURSTGPT + "soon,x,1,1,2,API log\n")
    assert table(load_trace(burst, limit=2)) == [(0.0, 472, 18), (113.0, 417, 30)]
    moon = write(tmp_path, "m.jsonl", jsonl(MOONCAKE) + "{not json\n")
    assert len(load_trace(moon, limit=3)) == 3
    with pytest.raises(InvalidInput) as err:
        load_trace(azure, limit=0)
    assert err.value.field == "limit"
