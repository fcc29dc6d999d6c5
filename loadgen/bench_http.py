"""HTTP admissions (OpenAI API) against gRPC Submit, in the same run, on the same ingest process.

Starts ``redis-server`` and Apache Kafka on free loopback ports and one ingest process
(``python -m services.ingest`` serving gRPC and ``--http-port``, exactly as deployed, no
estimator: both paths skip the prediction alike), pinned with ``--ingest-cpus``; Kafka on
``--kafka-cpus``. Then, in alternating rounds, drives

* **gRPC**: ``ghz`` calling ``qlm.v1.QueueManager/Submit`` (as ``loadgen.bench_submit``);
* **HTTP**: ``wrk`` (Debian's ``wrk``) posting ``/v1/chat/completions`` with
  ``"background": true``: the OpenAI request is validated, admitted and queued, and the
  202 answer comes back once it is durable in Redis — the HTTP equivalent of ``Submit``
  (a request without ``background`` would also wait for a worker to run it);

both with the same model, prompt, ``max_tokens`` and class (``batch-1``), the same
concurrency and connection count, each load tool pinned to ``--load-cpus`` (off the
server's cores). Every call is a new request. Afterwards Redis must hold exactly the
requests both tools saw acknowledged. Writes admissions/s and latency per transport
per round, their medians and the HTTP/gRPC ratio as JSON (``--out``) with the command::

    python -m loadgen.bench_http --ingest-cpus 0 --kafka-cpus 1 --load-cpus 1 \\
        --out docs/results/bench_http.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from loadgen.bench_submit import (
    MODEL,
    PROMPT,
    ROOT,
    _affinity,
    _count_redis,
    _cpu_list,
    _ghz_version,
    _percentiles_ms,
    _pinned,
    _wait_serving,
    ghz_binary,
    run_ghz,
)
from loadgen.results import emit

#: The top-level keys this program writes into its JSON (loadgen.results).
RESULT_KEYS: Final = frozenset({
    "acknowledged_incl_warmup", "benchmark", "command", "concurrency", "cpus", "date_utc",
    "duration_s_per_round", "grpc_admissions_per_s_median", "http_admissions_per_s_median",
    "http_over_grpc", "http_over_grpc_by_ingest_cpu", "http_over_grpc_per_round",
    "ingest_cpu_ms_per_admission_median", "load", "machine", "niceness", "note_in_redis",
    "requests_in_redis", "rounds", "target_http_over_grpc",
})


#: wrk script: POST the body, report the summary as one JSON line (latencies in µs).
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = %s
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %%d, "duration_us": %%d, "status_errors": %%d, "socket_errors": %%d, ' ..
    '"p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def http_body() -> dict[str, Any]:
    """The OpenAI request every HTTP call sends (same model, prompt, length, class as gRPC)."""
    return {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 128, "slo_class": "batch-1", "background": True, "user": "bench"}


def run_wrk(url: str, concurrency: int, duration_s: float, work: Path,
            affinity: frozenset[int] | None) -> dict[str, Any]:
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT % json.dumps(json.dumps(http_body())))
    before = os.times()
    completed = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{duration_s:g}s", "--timeout", "10s",
         "-s", str(script), url],
        capture_output=True, text=True, preexec_fn=_pinned(affinity))
    after = os.times()
    if completed.returncode != 0:
        raise SystemExit(f"wrk failed: {completed.stderr.strip()}")
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    summary["cpu_s"] = (after.children_user - before.children_user) + (
        after.children_system - before.children_system)
    return summary


def _wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer")
        time.sleep(0.2)


def cpu_pressure() -> float | None:
    """The host's CPU pressure now (``/proc/pressure/cpu``, "some", avg10, %): the share of
    time some runnable task waited for a core; None where the kernel does not say."""
    try:
        first = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(item.split("=") for item in first.split()[1:])
    return float(fields["avg10"])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from qlm.localstack import KafkaServer, RedisServer, free_loopback_port

    work = Path(tempfile.mkdtemp(prefix="qlm-bench-http-"))
    servers: list[Any] = []
    ingest: subprocess.Popen[bytes] | None = None
    try:
        redis_server = RedisServer(work / "redis", free_loopback_port())
        with _affinity(args.kafka_cpus):
            redis_server.start()
            servers.append(redis_server)
            kafka_server = KafkaServer(work / "kafka", free_loopback_port(), free_loopback_port())
            kafka_server.start()
            servers.append(kafka_server)
        prefix = f"bench{uuid.uuid4().hex[:6]}:"
        models = work / "models.yaml"
        models.write_text(f"models:\n  - {{name: {MODEL}, max_model_len: 8192}}\n")
        grpc_port, http_port = free_loopback_port(), free_loopback_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "QLM_REDIS_URL": redis_server.url,
               "QLM_KAFKA_BOOTSTRAP": kafka_server.bootstrap_servers, "QLM_KEY_PREFIX": prefix,
               "QLM_TOPIC_PREFIX": f"bench{uuid.uuid4().hex[:6]}.",
               "QLM_MODELS_FILE": str(models), "QLM_HOST": "127.0.0.1",
               "QLM_PORT": str(grpc_port), "QLM_HTTP_PORT": str(http_port),
               "QLM_BATCH_CONSUMER": "false", "QLM_SERVE_METRICS": "false",
               # both transports alike: no API keys, and no workers (every catalogue
               # model counts as served), as in bench_submit
               "QLM_AUTH": "off", "QLM_SERVED_MODELS_TIMEOUT_S": "0"}
        with (work / "ingest.log").open("wb") as log_file:
            ingest = subprocess.Popen([sys.executable, "-m", "services.ingest"], cwd=ROOT,
                                      env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                      preexec_fn=_pinned(args.ingest_cpus))
        target, base = f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}"
        _wait_serving(target)
        _wait_http(f"{base}/health")
        url = f"{base}/v1/chat/completions"
        ghz = ghz_binary(args.ghz)
        rounds: list[dict[str, Any]] = []
        acknowledged = 0
        # warm both paths (imports, JIT of the broker, connection pools)
        acknowledged += run_ghz(ghz, target, args.concurrency, args.connections, 1,
                                args.warmup, "w", work, args.load_cpus).num_ok
        acknowledged += run_wrk(url, args.concurrency, args.warmup, work,
                                args.load_cpus)["requests"]
        for number in range(args.rounds):
            pressure_grpc = cpu_pressure()
            cpu_before = _cpu_seconds(ingest.pid)
            grpc = run_ghz(ghz, target, args.concurrency, args.connections, 1, args.duration,
                           f"r{number}", work, args.load_cpus)
            cpu_mid = _cpu_seconds(ingest.pid)
            pressure_http = cpu_pressure()
            http = run_wrk(url, args.concurrency, args.duration, work, args.load_cpus)
            cpu_after = _cpu_seconds(ingest.pid)
            acknowledged += grpc.num_ok + http["requests"] - http["status_errors"]
            num_http = http["requests"] - http["status_errors"] - http["socket_errors"]
            rounds.append({
                "grpc": {"admissions_per_s": round(grpc.num_ok / grpc.elapsed_s, 1),
                         "errors": grpc.num_errors, "latency_ms": _percentiles_ms(
                             grpc.latencies_s),
                         "ingest_cpu_ms_per_admission": round(
                             (cpu_mid - cpu_before) * 1000 / max(1, grpc.num_ok), 4),
                         "host_cpu_pressure_pct_before": pressure_grpc},
                "http": {"admissions_per_s": round(num_http / (http["duration_us"] / 1e6), 1),
                         "errors": http["status_errors"] + http["socket_errors"],
                         "latency_ms": {"p50": http["p50_us"] / 1000,
                                        "p90": http["p90_us"] / 1000,
                                        "p99": http["p99_us"] / 1000,
                                        "max": http["max_us"] / 1000},
                         "ingest_cpu_ms_per_admission": round(
                             (cpu_after - cpu_mid) * 1000 / max(1, num_http), 4),
                         "host_cpu_pressure_pct_before": pressure_http},
            })
            print(json.dumps(rounds[-1]), file=sys.stderr)
        grpc_rate = statistics.median(r["grpc"]["admissions_per_s"] for r in rounds)
        http_rate = statistics.median(r["http"]["admissions_per_s"] for r in rounds)
        grpc_cpu = statistics.median(r["grpc"]["ingest_cpu_ms_per_admission"] for r in rounds)
        http_cpu = statistics.median(r["http"]["ingest_cpu_ms_per_admission"] for r in rounds)
        stored = _count_redis(redis_server.url, prefix)
        # wrk does not count the calls in flight when it stops; the server still queues them
        in_flight_max = (args.rounds + 1) * args.concurrency
        if not acknowledged <= stored <= acknowledged + in_flight_max:
            raise SystemExit(f"Redis holds {stored} requests, {acknowledged} acknowledged")
        return {
            "benchmark": "admissions: OpenAI HTTP (POST /v1/chat/completions, background) vs "
                         "gRPC Submit, one ingest process → Redis → Kafka",
            "command": "python -m loadgen.bench_http " + shlex.join(sys.argv[1:]),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                        "note": "shared host: other processes ran beside the benchmark"},
            "load": {"grpc": f"ghz {_ghz_version(ghz)} --cpus 1, {args.connections} "
                             "connections",
                     "http": f"wrk ({_wrk_version()}) -t1, {args.concurrency} connections"},
            "niceness": os.getpriority(os.PRIO_PROCESS, 0),
            "concurrency": args.concurrency,
            "duration_s_per_round": args.duration,
            "rounds": rounds,
            "grpc_admissions_per_s_median": grpc_rate,
            "http_admissions_per_s_median": http_rate,
            "http_over_grpc": round(http_rate / grpc_rate, 3) if grpc_rate else None,
            "http_over_grpc_per_round": [
                round(r["http"]["admissions_per_s"] / r["grpc"]["admissions_per_s"], 3)
                for r in rounds],
            "ingest_cpu_ms_per_admission_median": {"grpc": grpc_cpu, "http": http_cpu},
            "http_over_grpc_by_ingest_cpu": round(grpc_cpu / http_cpu, 3),
            "target_http_over_grpc": 0.8,
            "acknowledged_incl_warmup": acknowledged,
            "requests_in_redis": stored,
            "note_in_redis": "at most (rounds + 1) x concurrency more than acknowledged: the "
                             "calls wrk had in flight when it stopped",
            "cpus": {"ingest": sorted(args.ingest_cpus or ()), "kafka_and_redis": sorted(
                args.kafka_cpus or ()), "load": sorted(args.load_cpus or ()),
                "host": os.cpu_count()},
        }
    finally:
        if ingest is not None:
            ingest.terminate()
            ingest.wait(30)
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


def _wrk_version() -> str:
    completed = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return (completed.stdout or completed.stderr).strip().splitlines()[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--connections", type=int, default=4,
                        help="gRPC connections of ghz (wrk: one per concurrent call)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per round")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3, help="gRPC then HTTP, this many times")
    parser.add_argument("--ingest-cpus", type=_cpu_list)
    parser.add_argument("--kafka-cpus", type=_cpu_list, help="Kafka and Redis")
    parser.add_argument("--load-cpus", type=_cpu_list, help="ghz and wrk")
    parser.add_argument("--ghz", help="ghz executable (default: PATH, then ~/.cache/qlm/bin)")
    parser.add_argument("--nice", type=int, default=0,
                        help="run this benchmark and everything it starts at this niceness "
                        "(e.g. -10 on a shared host, so that other work does not take the "
                        "pinned cores; needs the right to lower it)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # the servers and tools inherit it
    if shutil.which("wrk") is None:
        parser.error("wrk not found: apt-get install -y wrk")
    emit(run(args), args.out, keys=RESULT_KEYS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
