"""Submit throughput and latency through the whole front door: gRPC → ingest → Redis → Kafka.

Starts a local ``redis-server`` (AOF on) and Apache Kafka (KRaft) on free loopback ports
(or uses ``--redis-url`` / ``--kafka-bootstrap``), runs the ingest service as its own
process (``python -m services.ingest``, exactly as deployed), waits until its health
check says SERVING, then drives it with ``--concurrency`` concurrent calls (default
64) for ``--duration`` seconds after a ``--warmup``. Every Submit is a new request
(unique id), so each one is one Redis script (record + group entry) and one
``admitted`` event.

The load comes from ``--load``:

* ``python``: grpc.aio clients over ``--channels`` channels from ``--client-procs``
  load processes;
* ``ghz``: the ``ghz`` gRPC load tool (Go; ``make ghz`` installs it), over
  ``--channels`` connections with ``--ghz-cpus`` cores, request ids from its
  ``{{.RequestNumber}}`` template: a standard load tool on a client stack other
  than the server's.

Afterwards it checks that Redis holds exactly the requests that were acknowledged
(with ghz: its count of OK statuses) and counts the ``admitted`` events on Kafka. The
same invocation measures the floor: an empty Submit handler driven by the same load.
Writes submits/s, latency percentiles, and CPU seconds used by each process as JSON
(``--out``), with the exact command line::

    python -m loadgen.bench_submit --load ghz --out docs/results/bench_submit_ghz.json

``--secure on`` runs ingest as ``make up`` does: TLS on its listener (a local CA made for
the run) and API keys required (one tenant; ghz sends ``authorization: Bearer`` and
trusts the CA). ``--secure both`` measures off, on, off, on in one run, on the same
servers, and reports the ratio of the medians (ghz only)::

    python -m loadgen.bench_submit --load ghz --secure both \
        --out docs/results/bench_submit_secure.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from loadgen.results import emit

#: The top-level keys this program writes into its JSON (loadgen.results).
RESULT_KEYS: Final = frozenset({
    "admitted_events_in_kafka", "benchmark", "channels", "client_procs", "command",
    "concurrency", "cpu_ms_per_submit", "cpu_s", "cpus", "date_utc", "duration_s", "errors",
    "first_error", "grpc_floor_empty_handler", "ingest_cpu_ms_per_submit_split",
    "ingest_processes", "latency_ms", "load", "load_detail", "machine", "median_off",
    "median_on", "order", "ratio_on_over_off", "requests_in_redis", "runs", "secure",
    "secure_on", "submits_acknowledged_incl_warmup", "submits_measured", "submits_per_s",
    "submits_per_s_if_2_cores_ran_only_ingest_redis_kafka",
    "submits_per_s_if_2_cores_were_ours", "submits_per_s_off", "submits_per_s_on",
    "target_ratio", "target_submits_per_s", "warmup_s",
})


ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench-7b"
PROMPT = "Summarise the following support ticket in two sentences. " * 4
#: Where ``make ghz`` installs the ghz binary.
GHZ_DEFAULT = Path.home() / ".cache" / "qlm" / "bin" / "ghz"


# ------------------------------------------------------------------ load process
@dataclass(frozen=True)
class LoadResult:
    latencies_s: list[float]
    num_ok: int
    num_errors: int
    first_error: str
    cpu_s: float


def _load_process(target: str, concurrency: int, channels: int, warmup_s: float,
                  duration_s: float, start_at: float, tag: str, out: Any) -> None:
    """Runs in a child process; sends its LoadResult through ``out`` (a Pipe end)."""
    result = asyncio.run(_drive(target, concurrency, channels, warmup_s, duration_s, start_at, tag))
    out.send(result)
    out.close()


async def _drive(target: str, concurrency: int, channels: int, warmup_s: float,
                 duration_s: float, start_at: float, tag: str) -> LoadResult:
    import grpc

    from qlm.api.v1 import qlm_pb2 as pb
    from qlm.api.v1 import qlm_pb2_grpc

    open_channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channels)
    ]
    stubs = [qlm_pb2_grpc.QueueManagerStub(c) for c in open_channels]
    latencies: list[float] = []
    errors: list[str] = []
    num_ok = 0
    measure_from = start_at + warmup_s
    stop_at = measure_from + duration_s
    await asyncio.sleep(max(0.0, start_at - time.time()))

    async def client(index: int) -> None:
        nonlocal num_ok
        stub = stubs[index % len(stubs)]
        n = 0
        while (now := time.time()) < stop_at:
            n += 1
            message = pb.SubmitRequest(
                request_id=f"{tag}-{index}-{n}", tenant="bench", model=MODEL,
                prompt_text=PROMPT, max_tokens=128, slo_class=pb.SLO_CLASS_BATCH_1,
            )
            began = time.perf_counter()
            try:
                await stub.Submit(message, timeout=10)
            except grpc.aio.AioRpcError as error:
                errors.append(f"{error.code()}: {error.details()}")
                continue
            num_ok += 1
            if now >= measure_from:
                latencies.append(time.perf_counter() - began)

    async def cpu_at_measure_start() -> float:
        await asyncio.sleep(max(0.0, measure_from - time.time()))
        return time.process_time()

    cpu_mark = asyncio.create_task(cpu_at_measure_start())
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    cpu = time.process_time() - await cpu_mark  # the measured window only
    for channel in open_channels:
        await channel.close()
    return LoadResult(latencies, num_ok, len(errors), errors[0] if errors else "", cpu)


# ------------------------------------------------------------------ ghz load
def ghz_binary(given: str | None) -> str:
    """The ghz executable: ``given``, else ``ghz`` on PATH, else :data:`GHZ_DEFAULT`."""
    found = given or shutil.which("ghz") or (str(GHZ_DEFAULT) if GHZ_DEFAULT.exists() else None)
    if found is None:
        raise SystemExit("ghz not found: run `make ghz` (go install github.com/bojand/ghz) "
                         "or pass --ghz PATH")
    return found


@dataclass(frozen=True)
class GhzRun:
    """One ghz invocation: OK latencies, error count, CPU of ghz and how long it ran."""

    latencies_s: list[float]
    num_ok: int
    num_errors: int
    first_error: str
    cpu_s: float
    elapsed_s: float


@dataclass(frozen=True)
class Secure:
    """What a secured ingest needs from the load: the CA to trust and the API key."""

    ca: Path
    api_key: str
    tenant: str


def run_ghz(ghz: str, target: str, concurrency: int, connections: int, cpus: int,
            duration_s: float, tag: str, work: Path,
            affinity: frozenset[int] | None = None, secure: Secure | None = None) -> GhzRun:
    """Submit for ``duration_s`` with ids ``<tag>-<n>``; calls in flight at the end are
    waited for (``--duration-stop wait``), so every call is either OK or an error.
    ``affinity``: the cores ghz runs on (default: this process's)."""
    data = {
        "request_id": f"{tag}-{{{{.RequestNumber}}}}",
        "tenant": secure.tenant if secure is not None else "bench", "model": MODEL,
        "prompt_text": PROMPT, "max_tokens": 128, "slo_class": "SLO_CLASS_BATCH_1",
    }
    report = work / f"ghz-{tag}.json"
    transport = (["--cacert", str(secure.ca), "--cname", "localhost",
                  "--metadata", json.dumps({"authorization": f"Bearer {secure.api_key}"})]
                 if secure is not None else ["--insecure"])
    command = [
        ghz, *transport, "--import-paths", str(ROOT / "proto"),
        "--proto", str(ROOT / "proto" / "qlm" / "v1" / "qlm.proto"),
        "--call", "qlm.v1.QueueManager.Submit", "--data", json.dumps(data),
        "--concurrency", str(concurrency), "--connections", str(connections),
        "--cpus", str(cpus), "--duration", f"{duration_s:g}s", "--duration-stop", "wait",
        "--timeout", "10s", "--format", "json", "--output", str(report), target,
    ]
    before = os.times()
    completed = subprocess.run(
        command, capture_output=True, text=True,
        preexec_fn=_pinned(affinity))
    after = os.times()
    if completed.returncode != 0 or not report.exists():
        raise SystemExit(f"ghz failed ({completed.returncode}): {completed.stderr.strip()}")
    summary = json.loads(report.read_text())
    statuses: dict[str, int] = summary.get("statusCodeDistribution") or {}
    errors: dict[str, int] = summary.get("errorDistribution") or {}
    latencies = [d["latency"] / 1e9 for d in summary.get("details") or ()
                 if d.get("status") == "OK"]
    return GhzRun(
        latencies_s=latencies,
        num_ok=statuses.get("OK", 0),
        num_errors=sum(n for status, n in statuses.items() if status != "OK"),
        first_error=next(iter(errors), ""),
        cpu_s=(after.children_user - before.children_user)
        + (after.children_system - before.children_system),
        elapsed_s=summary["total"] / 1e9,
    )


# ------------------------------------------------------------------ gRPC floor
def _trivial_server(port: int) -> None:
    """A QueueManager whose Submit does nothing: what gRPC alone costs per call."""
    import grpc

    from qlm.api.v1 import qlm_pb2 as pb
    from services.ingest.app import run_on_fastest_loop

    async def submit(request: Any, context: Any) -> Any:
        return pb.SubmitResponse(request_id=request.request_id, state=pb.REQUEST_STATE_QUEUED)

    handler = grpc.method_handlers_generic_handler("qlm.v1.QueueManager", {
        "Submit": grpc.unary_unary_rpc_method_handler(
            submit,
            request_deserializer=pb.SubmitRequest.FromString,
            response_serializer=pb.SubmitResponse.SerializeToString,
        )
    })

    async def serve() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    run_on_fastest_loop(serve())  # the event loop ingest runs on


def measure_grpc_floor(args: argparse.Namespace, work: Path,
                       duration_s: float) -> dict[str, Any]:
    """Submits/s and CPU per call of load + server with an empty Submit handler, driven
    by the same ``--load`` as the real measurement."""
    from qlm.localstack import free_loopback_port

    port = free_loopback_port()
    target = f"127.0.0.1:{port}"
    server = mp.get_context("spawn").Process(target=_trivial_server, args=(port,), daemon=True)
    server.start()
    try:
        _wait_ready(target)
        if args.load == "ghz":
            ghz = ghz_binary(args.ghz)
            run_ghz(ghz, target, args.concurrency, args.channels, args.ghz_cpus, 1.0,
                    "floor-warmup", work, args.load_cpus)
            cpu_before = _cpu_seconds(server.pid or 0)
            measured = run_ghz(ghz, target, args.concurrency, args.channels, args.ghz_cpus,
                               duration_s, "floor", work, args.load_cpus)
            latencies, num_calls = measured.latencies_s, measured.num_ok
            load_cpu, window_s = measured.cpu_s, measured.elapsed_s
        else:
            cpu_before = _cpu_seconds(server.pid or 0)
            result = asyncio.run(_drive(target, args.concurrency, args.channels, 1.0,
                                        duration_s, time.time() + 0.2, "floor"))
            # the Python clients count CPU over the measured window only; the server's
            # count includes the 1 s warmup, as it always has in these results
            latencies, num_calls = result.latencies_s, result.num_ok
            load_cpu, window_s = result.cpu_s, duration_s
        server_cpu = _cpu_seconds(server.pid or 0) - cpu_before
    finally:
        server.terminate()
        server.join(10)
    return {
        "submits_per_s": round(len(latencies) / window_s, 1),
        "latency_ms": _percentiles_ms(latencies),
        "cpu_ms_per_call": {
            "server": round(server_cpu * 1000 / max(1, num_calls), 4),
            "load_clients": round(load_cpu * 1000 / max(1, len(latencies)), 4),
        },
    }


def _wait_ready(target: str, timeout_s: float = 30.0) -> None:
    import grpc

    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)


# ------------------------------------------------------------------ helpers
def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def _children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def _cpu_of(ingest_pid: int, servers: Sequence[Any]) -> dict[str, float]:
    """CPU seconds so far of ingest (with its child processes) and of each server."""
    cpu = {"ingest": sum(_cpu_seconds(p) for p in (ingest_pid, *_children_of(ingest_pid)))}
    for server in servers:
        pid = server.process.running_pid()
        if pid is not None:
            cpu[type(server).__name__] = _cpu_seconds(pid)
    return cpu


def _wait_serving(target: str, ca: Path | None = None, timeout_s: float = 60.0) -> None:
    from qlm.localstack.services import grpc_serving

    deadline = time.monotonic() + timeout_s
    while not grpc_serving(target, ca=ca):
        if time.monotonic() > deadline:
            raise SystemExit(f"ingest at {target} did not become SERVING in {timeout_s} s")
        time.sleep(0.2)


def _wait_listening(log_path: Path, num_processes: int, timeout_s: float = 60.0) -> None:
    """Until every ingest process has logged that it listens (connections spread only
    over the processes that listen when a channel connects)."""
    deadline = time.monotonic() + timeout_s
    while log_path.read_text().count('"ingest_listening"') < num_processes:
        if time.monotonic() > deadline:
            raise SystemExit(f"not all {num_processes} ingest processes listen; see {log_path}")
        time.sleep(0.1)


def _count_redis(url: str, prefix: str) -> int:
    import redis

    from qlm.store.keys import Keys

    client = redis.Redis.from_url(url)
    try:  # the record keys as the store names them (hash-tagged prefix)
        return sum(1 for _ in client.scan_iter(match=Keys(prefix).request("*"), count=5000))
    finally:
        client.close()


async def _count_events(bootstrap: str, topic: str, expected: int, timeout_s: float) -> int:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=f"bench-count-{uuid.uuid4().hex}",
        auto_offset_reset="earliest", enable_auto_commit=False,
    )
    await consumer.start()
    seen = 0
    try:
        deadline = time.monotonic() + timeout_s
        while seen < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            seen += sum(len(b) for b in batches.values())
    finally:
        await consumer.stop()
    return seen


def _capacity(cpu_ms_per_submit: dict[str, float], include_clients: bool) -> float | None:
    """Submits/s that 2 otherwise idle cores would sustain at the measured CPU per submit."""
    total = sum(ms for name, ms in cpu_ms_per_submit.items()
                if include_clients or name != "load_clients")
    return round(2000.0 / total, 1) if total > 0 else None


def _percentiles_ms(latencies: Sequence[float]) -> dict[str, float]:
    if not latencies:
        return {}
    values = np.asarray(latencies) * 1e3
    return {
        name: round(float(np.percentile(values, q)), 3)
        for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))
    } | {"max": round(float(values.max()), 3), "mean": round(float(values.mean()), 3)}


# ------------------------------------------------------------------ the two loads
CpuReader = Callable[[], dict[str, float]]
Driven = tuple[list[LoadResult], float, dict[str, float], dict[str, float]]


def _drive_python(args: argparse.Namespace, work: Path, target: str,
                  read_cpu: CpuReader) -> Driven:
    """grpc.aio clients in ``--client-procs`` processes; CPU of the servers is read over
    the measured window (after the warmup: JIT, caches)."""
    start_at = time.time() + 1.0
    pipes, procs = [], []
    per_proc = [args.concurrency // args.client_procs] * args.client_procs
    per_proc[0] += args.concurrency - sum(per_proc)
    channels = max(args.channels, 4 * args.ingest_processes)
    for i, concurrency in enumerate(per_proc):
        receive, send = mp.Pipe(duplex=False)
        proc = mp.get_context("spawn").Process(
            target=_load_process,
            args=(target, concurrency, max(1, channels // args.client_procs),
                  args.warmup, args.duration, start_at, f"c{i}", send),
        )
        proc.start()
        pipes.append(receive)
        procs.append(proc)
    time.sleep(max(0.0, start_at + args.warmup - time.time()))
    cpu_before = read_cpu()
    results: list[LoadResult] = [p.recv() for p in pipes]
    for proc in procs:
        proc.join()
    return results, args.duration, cpu_before, read_cpu()


def _drive_ghz(args: argparse.Namespace, work: Path, target: str,
               read_cpu: CpuReader, secure: Secure | None = None) -> Driven:
    """ghz for ``--warmup`` seconds, then again for ``--duration`` (the measured window;
    its length is what ghz reports, the in-flight calls at the end included)."""
    ghz = ghz_binary(args.ghz)
    connections = max(args.channels, 4 * args.ingest_processes)
    tag = uuid.uuid4().hex[:6]
    warmup = run_ghz(ghz, target, args.concurrency, connections, args.ghz_cpus,
                     args.warmup, f"w{tag}", work, args.load_cpus, secure)
    cpu_before = read_cpu()
    measured = run_ghz(ghz, target, args.concurrency, connections, args.ghz_cpus,
                       args.duration, f"m{tag}", work, args.load_cpus, secure)
    cpu_after = read_cpu()
    result = LoadResult(
        latencies_s=measured.latencies_s,
        num_ok=warmup.num_ok + measured.num_ok,
        num_errors=warmup.num_errors + measured.num_errors,
        first_error=warmup.first_error or measured.first_error,
        cpu_s=measured.cpu_s,
    )
    return [result], measured.elapsed_s, cpu_before, cpu_after


def _load_detail(args: argparse.Namespace) -> str:
    if args.load == "ghz":
        return (f"ghz {_ghz_version(ghz_binary(args.ghz))}, --cpus {args.ghz_cpus}, "
                f"{max(args.channels, 4 * args.ingest_processes)} connections")
    return f"grpc.aio {_grpc_version()} clients in {args.client_procs} process(es)"


def _ghz_version(ghz: str) -> str:
    """ghz's own version, or the module version Go recorded at ``go install``."""
    completed = subprocess.run([ghz, "--version"], capture_output=True, text=True)
    version = (completed.stdout or completed.stderr).strip()
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if version in ("", "dev") and Path(go).exists():
        info = subprocess.run([go, "version", "-m", ghz], capture_output=True, text=True)
        for line in info.stdout.splitlines():
            parts = line.split()
            if parts[:2] == ["mod", "github.com/bojand/ghz"] and len(parts) > 2:
                return parts[2]
    return version


def _grpc_version() -> str:
    import grpc

    return str(grpc.__version__)


# ------------------------------------------------------------------ main
def run(args: argparse.Namespace) -> dict[str, Any]:
    from qlm.localstack import KafkaServer, RedisServer, free_loopback_port

    work = Path(tempfile.mkdtemp(prefix="qlm-bench-submit-"))
    servers: list[Any] = []
    try:
        redis_url, kafka = args.redis_url, args.kafka_bootstrap
        if redis_url is None:
            redis_server = RedisServer(work / "redis", free_loopback_port())
            redis_server.start()
            servers.append(redis_server)
            redis_url = redis_server.url
        if kafka is None:
            kafka_server = KafkaServer(work / "kafka", free_loopback_port(), free_loopback_port())
            with _affinity(args.kafka_cpus):  # the broker's threads inherit it
                kafka_server.start()
            servers.append(kafka_server)
            kafka = kafka_server.bootstrap_servers
        if args.secure == "both":
            return _compare_secure(args, work, redis_url, kafka, servers)
        return _measure(args, work, redis_url, kafka, servers, args.secure == "on")
    finally:
        for server in reversed(servers):
            server.stop()
        if args.keep_work:
            print(f"servers' data, ingest log and ghz reports kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def _pinned(cpus: frozenset[int] | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that puts a child process on ``cpus`` (None: where this one runs)."""
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


@contextlib.contextmanager
def _affinity(cpus: frozenset[int] | None) -> Iterator[None]:
    """This process (and what it starts meanwhile) on ``cpus``; the old set afterwards."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _compare_secure(args: argparse.Namespace, work: Path, redis_url: str, kafka: str,
                    servers: list[Any]) -> dict[str, Any]:
    """Off, on, off, on (same servers, same load); the ratio of the medians."""
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for mode in ("off", "on"):
            result = _measure(args, work, redis_url, kafka, servers, mode == "on",
                              with_floor=False)
            runs[mode].append(result)
            print(f"{mode}: {result['submits_per_s']} submits/s, errors {result['errors']}",
                  file=sys.stderr)
    medians = {mode: float(np.median([r["submits_per_s"] for r in rs]))
               for mode, rs in runs.items()}
    return {
        "benchmark": "Submit throughput with authentication (API key) and TLS on vs off",
        "command": "python -m loadgen.bench_submit " + shlex.join(sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "secure_on": "ingest --auth required (Bearer API key, tenant cached 5 s) + TLS "
                     "(ECDSA P-256 server certificate); brokers the same in both modes",
        "order": "off, on, repeated --rounds times on the same Redis and Kafka",
        "submits_per_s_off": [r["submits_per_s"] for r in runs["off"]],
        "submits_per_s_on": [r["submits_per_s"] for r in runs["on"]],
        "median_off": medians["off"],
        "median_on": medians["on"],
        "ratio_on_over_off": round(medians["on"] / medians["off"], 3),
        "target_ratio": 0.85,
        "runs": runs,
    }


def _secure_ingest(work: Path, redis_url: str, prefix: str) -> tuple[dict[str, str], Secure]:
    """Certificates, a tenant and its key; the environment that turns ingest's TLS on."""
    from qlm.store.client import redis_client
    from qlm.tenants import TenantRegistry
    from qlm.tls import ensure_local_pki

    pki = ensure_local_pki(work / "tls")

    tenant = f"bench-{uuid.uuid4().hex[:6]}"

    async def add_tenant() -> str:
        client = redis_client(redis_url, decode_responses=True)
        try:
            return await TenantRegistry(client, prefix).add(tenant)
        finally:
            await client.aclose()

    env = {"QLM_AUTH": "required", "QLM_TLS_CERT_FILE": str(pki.server_cert),
           "QLM_TLS_KEY_FILE": str(pki.server_key)}
    return env, Secure(pki.ca, asyncio.run(add_tenant()), tenant)


def _measure(args: argparse.Namespace, work: Path, redis_url: str, kafka: str,
             servers: list[Any], secure: bool = False,
             with_floor: bool = True) -> dict[str, Any]:
    from qlm.localstack import free_loopback_port

    load_at_start = round(os.getloadavg()[0], 2)
    prefix = f"bench{uuid.uuid4().hex[:6]}:"
    topic_prefix = f"bench{uuid.uuid4().hex[:6]}."
    models = work / "models.yaml"
    models.write_text(f"models:\n  - {{name: {MODEL}, max_model_len: 8192}}\n")
    port = free_loopback_port()
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "QLM_REDIS_URL": redis_url,
        "QLM_KAFKA_BOOTSTRAP": kafka, "QLM_KEY_PREFIX": prefix, "QLM_TOPIC_PREFIX": topic_prefix,
        "QLM_MODELS_FILE": str(models), "QLM_HOST": "127.0.0.1", "QLM_PORT": str(port),
        "QLM_BATCH_CONSUMER": "false", "QLM_LOG_LEVEL": "info",
        "QLM_SERVED_MODELS_TIMEOUT_S": "0",  # no workers: every catalogue model counts
        "QLM_PROCESSES": str(args.ingest_processes), "QLM_AUTH": "off",
    }
    credentials: Secure | None = None
    if secure:
        secure_env, credentials = _secure_ingest(work, redis_url, prefix)
        env.update(secure_env)
    log_path = work / "ingest.log"
    with log_path.open("wb") as log_file:
        ingest = subprocess.Popen([sys.executable, "-m", "services.ingest"], cwd=ROOT, env=env,
                                  stdout=log_file, stderr=subprocess.STDOUT,
                                  preexec_fn=_pinned(args.ingest_cpus))
    target = f"127.0.0.1:{port}"
    try:
        _wait_serving(target, credentials.ca if credentials else None)
        _wait_listening(log_path, args.ingest_processes)
        if args.load == "ghz":
            results, measured_window, cpu_before, cpu_after = _drive_ghz(
                args, work, target, lambda: _cpu_of(ingest.pid, servers), credentials)
        else:
            results, measured_window, cpu_before, cpu_after = _drive_python(
                args, work, target, lambda: _cpu_of(ingest.pid, servers))
    finally:
        ingest.terminate()
        ingest.wait(30)
    latencies = [x for r in results for x in r.latencies_s]
    num_errors = sum(r.num_errors for r in results)
    num_stored = _count_redis(redis_url, prefix)
    num_ok_total = sum(r.num_ok for r in results)
    num_events = asyncio.run(
        _count_events(kafka, f"{topic_prefix}qlm.events", num_ok_total, timeout_s=30)
    )
    cpu = {name: cpu_after[name] - cpu_before[name] for name in cpu_before}
    cpu["load_clients"] = sum(r.cpu_s for r in results)
    # CPU milliseconds per submit, every process over the measured window
    cpu_per_submit = {
        name: round(seconds * 1000 / len(latencies), 4) for name, seconds in cpu.items()
    } if latencies else {}
    floor = measure_grpc_floor(args, work, 8.0) if with_floor else {}
    return {
        "benchmark": "Submit: gRPC → ingest → Redis (one Lua script) → Kafka (admitted event)",
        "command": "python -m loadgen.bench_submit " + shlex.join(sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_1m_at_start": load_at_start,
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "note": "ingest, redis-server, Kafka and the load processes share these cores",
        },
        "load": args.load,
        "load_detail": _load_detail(args),
        "concurrency": args.concurrency,
        "ingest_processes": args.ingest_processes,
        "client_procs": args.client_procs if args.load == "python" else None,
        "channels": args.channels,
        "warmup_s": args.warmup,
        "duration_s": round(measured_window, 3),
        "submits_measured": len(latencies),
        "submits_per_s": round(len(latencies) / measured_window, 1),
        "latency_ms": _percentiles_ms(latencies),
        "errors": num_errors,
        "first_error": next((r.first_error for r in results if r.first_error), ""),
        "submits_acknowledged_incl_warmup": num_ok_total,
        "requests_in_redis": num_stored,
        "admitted_events_in_kafka": num_events,
        "cpu_s": {name: round(seconds, 2) for name, seconds in cpu.items()},
        "cpu_ms_per_submit": cpu_per_submit,
        "submits_per_s_if_2_cores_were_ours": _capacity(cpu_per_submit, include_clients=True),
        "submits_per_s_if_2_cores_ran_only_ingest_redis_kafka": _capacity(
            cpu_per_submit, include_clients=False
        ),
        "target_submits_per_s": 3000,
        "grpc_floor_empty_handler": floor,
        "ingest_cpu_ms_per_submit_split": _ingest_split(cpu_per_submit, floor) if floor else {},
        "secure": secure,
    }


def _ingest_split(cpu_per_submit: dict[str, float], floor: dict[str, Any]) -> dict[str, float]:
    """Ingest's CPU per submit as the gRPC server's own cost (the empty handler's, same
    load and loop) and the rest: validation, Redis and Kafka clients, the plane."""
    if "ingest" not in cpu_per_submit:
        return {}
    grpc_ms = floor["cpu_ms_per_call"]["server"]
    return {"grpc_server_floor": grpc_ms,
            "beyond_grpc": round(cpu_per_submit["ingest"] - grpc_ms, 4)}


def _cpu_list(text: str) -> frozenset[int]:
    """``0,1`` or ``2-5`` or a mix: the cores named (argparse type)."""
    bad = argparse.ArgumentTypeError(f"not a core list like 0,1 or 2-5: {text!r}")
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise bad
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise bad
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", choices=("python", "ghz"), default="python",
                        help="load generator: grpc.aio clients or the ghz tool")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent calls")
    parser.add_argument("--client-procs", type=int, default=1,
                        help="load processes (--load python)")
    parser.add_argument("--channels", type=int, default=4,
                        help="gRPC channels (python) or connections (ghz) in all; at least "
                        "4 per ingest process")
    parser.add_argument("--ghz", help="ghz executable (default: PATH, then ~/.cache/qlm/bin)")
    parser.add_argument("--ghz-cpus", type=int, default=1, help="cores ghz may use")
    parser.add_argument("--server-cpus", type=_cpu_list,
                        help="cores for Redis, Kafka and ingest, e.g. 0,1 (default: all); "
                        "with --load-cpus the load runs beside, not on, the measured cores")
    parser.add_argument("--kafka-cpus", type=_cpu_list,
                        help="cores for the Kafka broker alone (default: --server-cpus)")
    parser.add_argument("--ingest-cpus", type=_cpu_list,
                        help="cores for ingest alone (default: --server-cpus)")
    parser.add_argument("--load-cpus", type=_cpu_list,
                        help="cores for ghz (--load ghz), e.g. 2-5 (default: all)")
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring")
    parser.add_argument("--ingest-processes", type=int, default=1,
                        help="ingest processes on the port (python -m services.ingest --processes)")
    parser.add_argument("--redis-url")
    parser.add_argument("--kafka-bootstrap")
    parser.add_argument("--secure", choices=("off", "on", "both"), default="off",
                        help="ingest with TLS + API keys (on), without (off), or both in "
                        "one run (ghz)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="--secure both: off/on pairs measured")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the working directory (Redis/Kafka data, ingest log, "
                        "ghz reports); default: removed")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.client_procs < 1 or args.duration <= 0:
        parser.error("--concurrency, --client-procs must be >= 1 and --duration > 0")
    if args.secure != "off" and args.load != "ghz":
        parser.error("--secure on/both needs --load ghz")
    if args.load_cpus and args.load != "ghz":
        parser.error("--load-cpus needs --load ghz")
    if args.server_cpus:  # the servers and ingest are started from here: they inherit it
        os.sched_setaffinity(0, args.server_cpus)
    result = run(args)
    result["cpus"] = {"server": sorted(args.server_cpus or os.sched_getaffinity(0)),
                      "ingest": sorted(args.ingest_cpus) if args.ingest_cpus else "server",
                      "kafka": sorted(args.kafka_cpus) if args.kafka_cpus else "server",
                      "load": sorted(args.load_cpus) if args.load_cpus else "same",
                      "host": os.cpu_count()}
    emit(result, args.out, keys=RESULT_KEYS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
