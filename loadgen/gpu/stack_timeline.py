"""Where the time of a stack replay's evictions goes, from its saved logs.

``stack_replay --save-logs`` keeps the Kafka log segments of ``qlm.events`` (every
request's admitted / started / first_token / evicted / finished) and ``qlm.lso`` (every
evict and swap command the scheduler sent). This reads them back with aiokafka's record
batch parser, lines them up with the replay's result (request ids and arrival times)
and reports, per evict command: when the scheduler issued it, when the worker had
aborted each request (``evicted``), when the worker next started a request of the
group the eviction was for, and that request's first token. Then every interactive
request that missed its SLO, with its group and the first eviction issued for that
group. ::

    python -m loadgen.gpu.stack_timeline docs/results/gpu/h100_stack_replay_qlm_run3.json.gz \\
        run3-logs.tar.gz --out docs/results/gpu/h100_stack_timeline_run3.json

Times are seconds since the replay's start (the result's arrival times), latencies ms.
A result of several runs (``--repeat``, several ``--slice``) holds one variant per run and
one logs archive for all: ``--variant NAME`` picks the run (default: the first); its
requests are told from the other runs' by their id prefix (``qlm-<pid>-``), the k-th
prefix to appear in the logs being the k-th variant's.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import tarfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
from aiokafka.record.default_records import DefaultRecordBatch

from loadgen.gpu.common import read_json
from loadgen.results import emit
from qlm.core.types import GroupKey, SLOClass

#: The top-level keys this program writes into its JSON (loadgen.results).
RESULT_KEYS: Final = frozenset({
    "result", "logs", "command", "evictions", "interactive_misses", "issued_to_aborted_ms",
    "num_evict_commands", "num_evicted", "variant",
})

#: Record batch header: base offset (int64) and batch length (int32), then the batch.
_BATCH_HEADER = struct.Struct(">qi")


def segment_records(data: bytes) -> Iterator[tuple[int, bytes | None, bytes | None]]:
    """(timestamp ms, key, value) of every record in a Kafka log segment's bytes."""
    pos = 0
    while pos + _BATCH_HEADER.size <= len(data):
        _, length = _BATCH_HEADER.unpack_from(data, pos)
        end = pos + _BATCH_HEADER.size + length
        if length <= 0 or end > len(data):
            break  # preallocated zeros or a batch cut short at the end of the segment
        for record in DefaultRecordBatch(bytearray(data[pos:end])):
            yield record.timestamp, record.key, record.value
        pos = end


def topic_payloads(archive: Path, topic: str) -> list[tuple[float, dict[str, Any]]]:
    """(append time s, JSON payload) of every record of ``topic`` in a logs archive."""
    out = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if (member.isfile() and member.name.endswith(".log") and len(parts) >= 2
                    and parts[-2].rsplit("-", 1)[0] == topic):
                f = tar.extractfile(member)
                assert f is not None
                for ts, _, value in segment_records(f.read()):
                    if value is not None:
                        out.append((ts / 1000.0, json.loads(value)))
    out.sort(key=lambda tp: tp[0])
    return out


def short_id(request_id: str) -> str:
    """The replay's own id (``i123``, ``bmist7``) of a stack request id (``qlm-…-i123``)."""
    return request_id.rsplit("-", 1)[-1]


def run_prefix(request_id: str) -> str:
    """The id prefix one replay run gave its requests (``qlm-123-`` of ``qlm-123-i7``)."""
    return request_id[:len(request_id) - len(short_id(request_id))]


def of_run(result: dict[str, Any], variant: str, events: Sequence[dict[str, Any]],
           commands: Sequence[tuple[float, dict[str, Any]]]
           ) -> tuple[list[dict[str, Any]], list[tuple[float, dict[str, Any]]]]:
    """The events and evict commands of ``variant``'s run (module docstring)."""
    names = list(result["variants"])
    if variant not in names:
        raise ValueError(f"variant {variant!r} is not in the result: {names}")
    ids = {r[0] for v in result["variants"].values() for r in v["requests"]}
    prefixes: list[str] = []
    for e in events:
        rid = e.get("request_id")
        if rid and short_id(rid) in ids and run_prefix(rid) not in prefixes:
            prefixes.append(run_prefix(rid))
    if len(prefixes) != len(names):
        raise ValueError(f"{len(names)} runs in the result but {len(prefixes)} id prefixes "
                         "in the logs")
    prefix = prefixes[names.index(variant)]
    return ([e for e in events if str(e.get("request_id", "")).startswith(prefix)],
            [(t, c) for t, c in commands
             if any(str(r).startswith(prefix) for r in c.get("request_ids", ()))])


def analyse(result: dict[str, Any], events: Sequence[dict[str, Any]],
            commands: Sequence[tuple[float, dict[str, Any]]], name: str | None = None
            ) -> dict[str, Any]:
    variant = result["variants"][name or next(iter(result["variants"]))]
    slo_s = result["slos_s"]
    rows = {r[0]: r for r in variant["requests"]}  # id, arrival, first token, finish, ...
    t0 = None
    for e in events:
        rid = short_id(e["request_id"])
        if rid in rows and "arrival_at" in e:
            t0 = e["arrival_at"] - rows[rid][1]
            break
    if t0 is None:
        raise ValueError("no event of the replay's requests in the logs")
    window_s = float(result.get("args", {}).get("group_window_s", 1.0))
    started: dict[str, list[float]] = defaultdict(list)
    first_token_at: dict[str, float] = {}
    evicted_at: dict[str, list[float]] = defaultdict(list)  # a request can be evicted again
    members: dict[str, set[str]] = defaultdict(set)  # group key -> replay ids
    for e in events:
        rid = short_id(e["request_id"])
        if e["type"] == "admitted":
            key = GroupKey(e["model"], SLOClass(e["slo_class"]),
                           math.floor(e["arrival_at"] / window_s))
            members[str(key)].add(rid)
        elif e["type"] == "started":
            started[rid].append(e["at"] - t0)
        elif e["type"] == "first_token":
            first_token_at.setdefault(rid, e["at"] - t0)
        elif e["type"] == "evicted":
            evicted_at[rid].append(e["at"] - t0)

    evictions = []
    first_eviction_for: dict[str, float] = {}
    for appended_at, c in commands:
        if c.get("type") != "evict":
            continue
        issued = c["issued_at"] - t0
        done = [min(t for t in evicted_at[short_id(r)] if t >= issued - 1e-3)
                for r in c["request_ids"]
                if any(t >= issued - 1e-3 for t in evicted_at.get(short_id(r), ()))]
        reason = str(c.get("reason", ""))
        group = reason.removeprefix("slo:")
        first_eviction_for.setdefault(group, issued)
        # the first request of that group the worker started after the command
        after = [(s, rid) for rid in members.get(group, ()) for s in started.get(rid, ())
                 if s >= issued]
        next_start, next_rid = min(after) if after else (None, None)
        evictions.append({
            "issued_s": round(issued, 3),
            "num_requests": len(c["request_ids"]),
            "group": group,
            "to_kafka_ms": round((appended_at - t0 - issued) * 1e3, 1),
            "first_aborted_ms": _ms(min(done) - issued) if done else None,
            "last_aborted_ms": _ms(max(done) - issued) if done else None,
            "group_started_ms": _ms(next_start - issued) if next_start is not None else None,
            "its_first_token_ms": (_ms(first_token_at[next_rid] - issued)
                                   if next_rid in first_token_at else None),
        })
    aborted = [e["last_aborted_ms"] for e in evictions if e["last_aborted_ms"] is not None]

    group_of = {rid: g for g, rids in members.items() for rid in rids}
    misses = []
    for rid, row in rows.items():
        if not rid.startswith("i") or row[2] is None or row[2] - row[1] <= slo_s["interactive"]:
            continue
        in_group = group_of.get(rid)
        first_evict = first_eviction_for.get(in_group) if in_group else None
        misses.append({
            "id": rid, "group": in_group, "arrival_s": round(row[1], 3),
            "started_s": [round(s, 3) for s in started.get(rid, [])],
            "first_token_s": round(row[2], 3), "ttft_s": round(row[2] - row[1], 3),
            "group_first_evict_s": round(first_evict, 3) if first_evict is not None else None,
        })
    return {
        "num_evict_commands": len(evictions),
        "num_evicted": sum(e["num_requests"] for e in evictions),
        "issued_to_aborted_ms": {
            "p50": round(float(np.percentile(aborted, 50)), 1) if aborted else None,
            "max": round(max(aborted), 1) if aborted else None,
        },
        "evictions": evictions,
        "interactive_misses": misses,
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 1)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", type=Path, help="stack_replay's result JSON (.json or .json.gz)")
    p.add_argument("logs", type=Path, help="its --save-logs archive (<name>-logs.tar.gz)")
    p.add_argument("--variant", help="the run to read, by its name in the result "
                   "(default: the first)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    result = dict(read_json(args.result))
    events = [payload for _, payload in topic_payloads(args.logs, "qlm.events")]
    events.sort(key=lambda e: e["at"])
    commands = topic_payloads(args.logs, "qlm.lso")
    variant = args.variant or next(iter(result["variants"]))
    try:
        events, commands = of_run(result, variant, events, commands)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = analyse(result, events, commands, variant)
    report = {"result": str(args.result), "logs": args.logs.name, "variant": variant,
              "command": "python -m loadgen.gpu.stack_timeline " + " ".join(sys.argv[1:]),
              **report}
    for e in report["evictions"]:
        print(f"{e['issued_s']:8.3f} s  evict {e['num_requests']:3d} for {e['group']}: on Kafka "
              f"+{e['to_kafka_ms']} ms, aborted +{e['first_aborted_ms']}…{e['last_aborted_ms']} "
              f"ms, group's next start +{e['group_started_ms']} ms, its first token "
              f"+{e['its_first_token_ms']} ms")
    for m in report["interactive_misses"]:
        print(f"miss {m['id']:>6} ({m['group']}): arrival {m['arrival_s']:.3f} s, started "
              f"{m['started_s']}, TTFT {m['ttft_s']:.3f} s, first eviction for its group at "
              f"{m['group_first_evict_s']}")
    emit(report, args.out, shown={k: report[k] for k in ("num_evict_commands", "num_evicted",
                                                          "issued_to_aborted_ms")},
         keys=RESULT_KEYS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
