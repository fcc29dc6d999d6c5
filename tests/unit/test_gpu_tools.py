"""The GPU measurement tooling's pure parts: trace slices, statistics, the decode fit, the
step model, and the measured profiles they produced."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from loadgen.gpu.common import (
    RequestTiming,
    TraceRequest,
    gpu_label,
    latency_summary,
    load_trace_slice,
    percentile,
    read_slice_csv,
    write_slice_csv,
)
from loadgen.gpu.profile_fit import fit_decode, profile_from_raw
from loadgen.gpu.step_model import StepModel
from qlm.core.errors import InvalidInput
from qlm.core.perf import PROFILE_DIR, PerfProfile, load_profile

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results" / "gpu"


def _trace(tmp_path: Path) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:51.2224670,20000,55\n"
        "2023-11-16 18:15:51.3910170,91,0\n"
    )
    return path


def test_trace_slice_scales_arrivals_and_clips_to_the_context_limit(tmp_path: Path) -> None:
    reqs = load_trace_slice(_trace(tmp_path), start=1, count=3, speedup=2.0, max_model_len=4096)
    assert [r.arrival_s for r in reqs] == pytest.approx([0.0, 0.113649, 0.197924])
    assert reqs[1] == TraceRequest(reqs[1].arrival_s, 4096 - 55, 55)  # prompt clipped
    assert reqs[2].output_tokens == 1  # zero generated tokens become one
    out = tmp_path / "slice.csv"
    write_slice_csv(reqs, out)
    assert read_slice_csv(out) == reqs


def test_trace_slice_refuses_what_the_file_does_not_hold(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        load_trace_slice(_trace(tmp_path), start=2, count=5, speedup=1.0, max_model_len=4096)
    with pytest.raises(InvalidInput) as err:
        load_trace_slice(_trace(tmp_path), start=0, count=2, speedup=0.0, max_model_len=4096)
    assert err.value.field == "speedup"


def test_percentile_interpolates_and_summary_counts_tokens() -> None:
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert percentile([1.0, 2.0], 100) == 2.0
    timings = [RequestTiming(0.0, 0.1, 1.1, 11), RequestTiming(1.0, 1.3, 1.3, 1)]
    summary = latency_summary(timings)
    assert summary["ttft_p50_s"] == pytest.approx(0.2)
    assert summary["tpot_p50_s"] == pytest.approx(0.1)  # one-token output has no TPOT
    assert summary["output_tok_per_s"] == pytest.approx(12 / 1.3, rel=1e-3)


def test_gpu_label_names_the_profile_gpu() -> None:
    assert gpu_label("NVIDIA H100 80GB HBM3") == "H100-80GB"
    assert gpu_label("NVIDIA H200") == "H200-141GB"


def test_decode_fit_recovers_a_linear_model() -> None:
    points = [{"batch": b, "context_tokens": b * c, "step_s": 0.006 + 2e-5 * b + 4e-8 * b * c}
              for b in (1, 8, 64, 256) for c in (128, 2048)]
    fit = fit_decode(points)
    assert fit["base_s"] == pytest.approx(0.006, rel=1e-4)
    assert fit["per_seq_s"] == pytest.approx(2e-5, rel=1e-3)
    assert fit["per_ctx_token_s"] == pytest.approx(4e-8, rel=1e-3)
    assert fit["max_abs_rel_residual"] < 1e-3
    with pytest.raises(InvalidInput):
        fit_decode(points[:2])


@pytest.mark.parametrize("model", ["mistral-7b", "vicuna-13b", "qwen2.5-1.5b"])
def test_shipped_h100_profile_is_the_fit_of_the_raw_measurements(model: str) -> None:
    raw = json.loads((RESULTS / f"h100_profile_raw_{model}.json").read_text())
    profile, _ = profile_from_raw(raw)
    shipped = load_profile(PROFILE_DIR / f"{model}@H100-80GB.json")
    assert shipped == PerfProfile.from_json(profile.to_json())
    assert shipped.source.startswith("measured: vLLM 0.25.0 on NVIDIA H100")


def _profile() -> PerfProfile:
    return PerfProfile(model="m", gpu="g", num_gpus=1, prefill_tokens=(16, 1016),
                       prefill_seconds=(0.013, 0.038), decode_base_s=0.006,
                       decode_per_seq_s=0.0, decode_per_ctx_token_s=0.0,
                       kv_capacity_tokens=100_000, max_batch_size=256, sleep_s=0.3, wake_s=0.5,
                       cold_load_s=30.0)


def test_step_model_single_request_reproduces_the_profile() -> None:
    model = StepModel(_profile())
    assert model.output_latency_s == pytest.approx(0.007)
    (t,) = model.run([TraceRequest(0.0, 1016, 3)])
    assert t.ttft_s == pytest.approx(0.038)  # the measured single-request TTFT
    assert t.tpot_s == pytest.approx(0.006)  # then one decode step per token


def test_step_model_mixes_a_prefill_into_the_decode_step_one_step_late() -> None:
    model = StepModel(_profile())
    # B arrives 1 ms into A's second decode step: with async scheduling it cannot join
    # the step that was already scheduled, only the one after; that step carries A's
    # decode and B's whole prefill (25 ms of marginal work over a bare step).
    a_first_step_end = 0.038 - 0.007
    timings = model.run([TraceRequest(0.0, 1016, 10),
                         TraceRequest(a_first_step_end + 0.001, 1016, 2)])
    a, b = timings
    assert b.first_token_s == pytest.approx(a_first_step_end + 2 * 0.006 + 0.031 + 0.007)
    assert a.finish_s - a.first_token_s == pytest.approx(8 * 0.006 + 0.031)  # 8 bare + 1 mixed
    sync = StepModel(_profile(), async_scheduling=False).run(
        [TraceRequest(0.0, 1016, 10), TraceRequest(a_first_step_end + 0.001, 1016, 2)])
    assert sync[1].first_token_s < b.first_token_s


def _chunked_simulator_timings(requests: list[TraceRequest], profile: PerfProfile,
                               budget: int) -> list[RequestTiming]:
    from loadgen.gpu.fidelity import jobs_of, simulated_timings
    from qlm.core.perf import ProfileBook

    records = [{"arrival_s": r.arrival_s, "prompt_tokens": r.prompt_tokens,
                "max_tokens": r.output_tokens, "output_tokens": r.output_tokens}
               for r in requests]
    jobs = jobs_of(records, profile.model)
    timings = simulated_timings(jobs, profile.gpu, ProfileBook.of([profile]), budget, "chunked")
    return sorted(timings, key=lambda t: t.arrival_s)


@pytest.mark.parametrize("budget", [8192, 1000])
def test_chunked_simulator_agrees_with_the_step_model_per_request(budget: int) -> None:
    """The simulator's ``prefill_mode="chunked"`` is the step model, in segments."""
    import random

    rng = random.Random(7)
    at = 0.0
    requests = []
    for _ in range(80):
        at += rng.expovariate(40.0) if rng.random() < 0.8 else 0.0  # bursts share an instant
        requests.append(TraceRequest(round(at, 6), rng.choice([20, 300, 1016, 3000, 9000]),
                                     rng.randint(1, 120)))
    # KV capacity out of reach: the simulator admits by the backpressure pull's reservation
    # (prompt + expected output), the step model by the tokens held now.
    profile = dataclasses.replace(_profile(), kv_capacity_tokens=10_000_000)
    want = StepModel(profile, budget).run(requests)
    got = _chunked_simulator_timings(requests, profile, budget)
    assert len(got) == len(want)
    for w, g in zip(sorted(want, key=lambda t: t.arrival_s), got, strict=True):
        assert g.first_token_s == pytest.approx(w.first_token_s, abs=1e-9)
        assert g.finish_s == pytest.approx(w.finish_s, abs=1e-9)


def kafka_segment(payloads: list[dict[str, object]], at_ms: int) -> bytes:
    """The bytes of a Kafka log segment holding ``payloads`` as JSON records (one batch
    each, timestamps from ``at_ms``), as a stack run's saved logs hold them."""
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    out = b""
    for i, payload in enumerate(payloads):  # one batch per record, as a linger of 0 writes
        builder = DefaultRecordBatchBuilder(
            magic=2, compression_type=0, is_transactional=False, producer_id=-1,
            producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
        builder.append(0, timestamp=at_ms + i, key=None, value=json.dumps(payload).encode(),
                       headers=[])
        out += bytes(builder.build())
    return out


def test_stack_timeline_reads_kafka_segments_and_times_an_eviction(tmp_path: Path) -> None:
    """Events and an evict command as a stack run's saved Kafka segments: the report
    times the command (issued → aborted → the group's next start → its first token) and
    lists the interactive request that missed its SLO with its group."""
    import io
    import tarfile

    from loadgen.gpu.stack_timeline import analyse, topic_payloads

    t0 = 1000.0
    group = "m|interactive|1001"

    def event(kind: str, rid: str, at: float, arrival: float, cls: str = "interactive"
              ) -> dict[str, object]:
        return {"type": kind, "request_id": f"qlm-1-{rid}", "model": "m", "slo_class": cls,
                "at": t0 + at, "arrival_at": t0 + arrival}

    events = [event("admitted", "b0", 0.1, 0.1, "batch-1"), event("started", "b0", 0.2, 0.1,
                                                                  "batch-1"),
              event("admitted", "i0", 1.2, 1.2), event("evicted", "b0", 1.35, 0.1, "batch-1"),
              event("started", "i0", 1.4, 1.2), event("first_token", "i0", 3.5, 1.2)]
    command = {"type": "evict", "issued_at": t0 + 1.3, "request_ids": ["qlm-1-b0"],
               "reason": f"slo:{group}"}
    archive = tmp_path / "logs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in (("kafka/data/qlm.events-0/00000000000000000000.log",
                            kafka_segment(events, 1_000_000)),
                           ("kafka/data/qlm.lso-1/00000000000000000000.log",
                            kafka_segment([command], int((t0 + 1.3) * 1000)))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = {"slos_s": {"interactive": 2.0, "batch-1": 60.0}, "args": {"group_window_s": 1.0},
              "variants": {"stack-qlm": {"requests": [["b0", 0.1, 0.3, 9.0, 10, 1],
                                                      ["i0", 1.2, 3.5, 4.0, 10, 0]]}}}
    found = [p for _, p in topic_payloads(archive, "qlm.events")]
    assert [e["type"] for e in found] == [e["type"] for e in events]
    report = analyse(result, sorted(found, key=lambda e: e["at"]),
                     topic_payloads(archive, "qlm.lso"))
    (evict,) = report["evictions"]
    assert evict["group"] == group and evict["num_requests"] == 1
    assert evict["last_aborted_ms"] == pytest.approx(50.0, abs=0.2)
    assert evict["group_started_ms"] == pytest.approx(100.0, abs=0.2)
    assert evict["its_first_token_ms"] == pytest.approx(2200.0, abs=0.2)
    (miss,) = report["interactive_misses"]
    assert miss["id"] == "i0" and miss["group"] == group and miss["ttft_s"] == pytest.approx(2.3)
    assert miss["group_first_evict_s"] == pytest.approx(1.3)


def test_stack_timeline_picks_one_run_of_several_by_its_id_prefix() -> None:
    """Two runs of the same replay in one result and one log: each variant reads only
    the events and commands of its own id prefix, in the order the runs appeared."""
    from loadgen.gpu.stack_timeline import of_run

    def event(pid: int, rid: str, at: float) -> dict[str, object]:
        return {"type": "admitted", "request_id": f"qlm-{pid}-{rid}", "at": at}

    events = [event(7, "i0", 1.0), event(7, "b0", 1.5), event(3, "i0", 9.0)]
    commands = [(1.6, {"type": "evict", "request_ids": ["qlm-7-b0"]}),
                (9.5, {"type": "evict", "request_ids": ["qlm-3-b0"]})]
    rows = [["i0", 0.0, 0.5, 1.0, 1, 0], ["b0", 0.5, 1.0, 2.0, 1, 1]]
    result = {"variants": {"run 1": {"requests": rows}, "run 2": {"requests": rows}}}
    second, its_commands = of_run(result, "run 2", events, commands)
    assert [e["request_id"] for e in second] == ["qlm-3-i0"]
    assert [t for t, _ in its_commands] == [9.5]
    with pytest.raises(ValueError, match="run 3"):
        of_run(result, "run 3", events, commands)
    with pytest.raises(ValueError, match="2 runs in the result but 1"):
        of_run(result, "run 1", events[:2], commands)
