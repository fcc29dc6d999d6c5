"""The demo: a trace slice replayed through the whole local stack, once per policy.

    python -m loadgen.demo [--trace CSV] [--num-requests 600] [--rate 8] [--time-scale 2]
        [--workers-file docker/workers.demo.yaml] [--policies qlm,fcfs] [--no-sim]
        [--dir .qlm/demo] [--out out/demo]

What it does (``make demo``):

1. **The requests** (:func:`loadgen.plan.build_plan`): ``--num-requests`` consecutive rows of the
   Azure LLM 2023 conversation trace (prompt and output tokens; arrival times rescaled
   to a mean of ``--rate`` req/s), each given a class (50% interactive, 25% batch-1,
   25% batch-2, SLOs 20 s / 60 s / 1 h) and a model (``--models``, equal shares) by a
   seeded generator. Times here are the GPUs' own ("paper") seconds.
2. **The stack** (:mod:`qlm.localstack`): Redis + Kafka in ``--dir`` on free ports; per
   policy the four services start (scheduler ``--policy``; simulated workers of
   ``--workers-file`` running ``--time-scale`` times faster than their GPUs), the
   requests are replayed at ``arrival / time_scale`` wall seconds with SLOs divided by
   the time scale — interactive ones by gRPC ``Submit`` + ``StreamTokens`` (TTFT at the
   client), batch ones as records on ``qlm.batch.requests`` (TTFT from the worker's
   ``first_token`` event) — until every request has a terminal event on ``qlm.events``;
   then the services stop and Redis is flushed. Brokers and services are stopped on any
   exit (error, Ctrl-C, SIGTERM).
3. **The report**: measured times are converted back to paper seconds (× time scale),
   so the table (:mod:`loadgen.report`, the simulator's format) compares directly with
   the discrete-event simulator run on the same requests and workers (step 4). Swaps
   and evictions are counted from ``qlm.lso``; decision time from the scheduler's
   Prometheus histogram; ``R²`` is the **last prediction before the request started**
   against the realised wait to first token, both from arrival: once every request has
   ended, GetRequest gives each one's predicted first token as the scheduler's forecast
   last had it before the request started (refreshed at every decision); a request
   pulled before any forecast keeps ingest's prediction at admission (``admitted``
   events), the one its client saw last. ``wait_r2_forecast_only`` is the same over the
   requests that had a forecast (the simulator's population); GPU utilisation is not
   measured on the stack (—).
4. **The simulator** (unless ``--no-sim``): :func:`qlm.sim.simulate` on the same
   requests, workers and policies (``--sim-only``: just this).

Writes ``OUT/summary.json`` (``{"stack": summary, "sim": summary, ...}``, each in the
format of :mod:`loadgen.report`), ``OUT/records.csv`` (one row per request and policy)
and ``OUT/attainment.png``, ``OUT/ttft_cdf.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import math
import signal
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadgen.plan import DemoPlan, build_plan, estimator_forecaster, sim_workers
from loadgen.report import ENTRY_KEYS as report_entry_keys
from loadgen.report import markdown_table, num, policy_entry, print_table
from loadgen.results import write_json
from qlm.core.errors import InvalidInput, QlmError
from qlm.core.perf import ProfileBook
from qlm.core.types import SLO, SLOClass
from qlm.sim.cluster import Job, SimConfig, WorkerSpec
from qlm.sim.metrics import RequestRecord, RunMetrics, summarise, wait_prediction_r2

#: The top-level keys of the demo's ``summary.json`` (loadgen.results): the stack's and the
#: simulator's summaries (each like loadgen.sim's) and the wall time.
RESULT_KEYS = frozenset({"stack", "sim", "wall_s"})
#: The keys of one policy's entry in those summaries: the report's, and on the stack the
#: requests finished twice and never finished.
ENTRY_KEYS = frozenset({*report_entry_keys, "num_duplicate_finished", "num_unfinished",
                        "wait_r2_forecast_only", "num_with_forecast"})

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = REPO_ROOT / "loadgen" / "traces" / "azure_llm_2023_conv.csv"
DEFAULT_WORKERS = REPO_ROOT / "docker" / "workers.demo.yaml"
TERMINAL_EVENTS = frozenset({"finished", "failed", "cancelled"})


# ===================================================================== simulator
def simulate_policy(plan: DemoPlan, workers: Sequence[WorkerSpec], policy: str
                    ) -> tuple[RunMetrics, float, float, tuple[RequestRecord, ...]]:
    """The discrete-event simulator on the plan: (metrics, wait R², wall s, records)."""
    from qlm.core.policies import make_policy
    from qlm.sim import simulate

    profiles = ProfileBook.load()
    started = time.perf_counter()
    result = simulate(plan.jobs, workers, profiles, make_policy(policy), SimConfig(),
                      seed=plan.seed, timer=time.perf_counter,
                      forecaster=estimator_forecaster(profiles))
    r2, _ = wait_prediction_r2(result.records)
    return (result.metrics, r2, time.perf_counter() - started, result.records)


# ===================================================================== stack run
@dataclass
class Tracked:
    """What the demo saw of one request (wall-clock Unix seconds)."""

    job: Job
    request_id: str
    sent_at: float | None = None
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    num_finished_events: int = 0
    num_evictions: int = 0
    num_streamed_tokens: int = 0
    predicted_wait_s: float | None = None
    #: When ingest admitted it (the ``admitted`` event; its prediction counts from then).
    admitted_at: float | None = None
    #: GetRequest's predicted first token (wall s; the last forecast before it started).
    forecast_first_token_at: float | None = None
    forecast_at: float | None = None
    rejected: bool = False
    terminal: str | None = None
    #: The prompt to send (None: the fixed pattern of :func:`submission`).
    prompt_token_ids: tuple[int, ...] | None = None
    #: Output tokens the ``finished`` event reports.
    num_output_tokens: int | None = None


@dataclass
class StackRun:
    """One policy's run on the stack."""

    policy: str
    tracked: dict[str, Tracked]
    t0: float
    time_scale: float
    wall_s: float = 0.0
    num_swaps: int = 0
    num_evicted: int = 0
    decision_s: list[float] = field(default_factory=list)

    def paper(self, at: float | None) -> float | None:
        return None if at is None else (at - self.t0) * self.time_scale

    def records(self, forecasts_only: bool = False) -> tuple[RequestRecord, ...]:
        """Per-request records in paper seconds (the simulator's record type). The last
        prediction is the forecast GetRequest returned, else (unless ``forecasts_only``)
        the prediction at admission."""
        out = []
        for t in self.tracked.values():
            r = t.job.request
            arrival = self.paper(t.sent_at)
            arrival = r.arrival_at if arrival is None else arrival
            # admission's prediction counts from admission (a Kafka record is admitted
            # when ingest consumes it, which can be seconds after it was sent)
            admitted = self.paper(t.admitted_at)
            admitted = arrival if admitted is None else admitted
            predicted = None if t.predicted_wait_s is None else (
                admitted + t.predicted_wait_s * self.time_scale)
            last_at, last = admitted if predicted is not None else None, predicted
            if t.forecast_first_token_at is not None:
                last_at, last = self.paper(t.forecast_at), self.paper(t.forecast_first_token_at)
            elif forecasts_only:
                last_at, last = None, None
            out.append(RequestRecord(
                id=t.request_id, model=r.model, slo_class=r.slo_class.value,
                arrival_at=arrival, deadline_at=arrival + r.slo.ttft_s,
                prompt_tokens=r.prompt_tokens, output_tokens=t.job.output_tokens,
                started_at=self.paper(t.started_at), first_token_at=self.paper(t.first_token_at),
                finished_at=self.paper(t.finished_at), worker_id=t.worker,
                num_evictions=t.num_evictions, rejected=t.rejected,
                predicted_at=admitted if predicted is not None else None,
                predicted_first_token_at=predicted,
                last_predicted_at=last_at, last_predicted_first_token_at=last,
            ))
        return tuple(out)

    def metrics(self, num_gpus: int) -> RunMetrics:
        return summarise(self.records(), busy_gpu_s=float("nan"), num_gpus=num_gpus,
                         swaps=self.num_swaps, evictions=self.num_evicted,
                         decision_s=self.decision_s)

    def num_done(self) -> int:
        return sum(1 for t in self.tracked.values() if t.terminal is not None or t.rejected)


class EventWatch:
    """Follows ``qlm.events`` and ``qlm.lso`` from their current end into a :class:`StackRun`."""

    def __init__(self, bootstrap: str, run: StackRun) -> None:
        from aiokafka import AIOKafkaConsumer

        from qlm.bus.topics import TopicNames

        self.topics = TopicNames("")
        self.run = run
        self.since = time.time()  # commands issued before belong to earlier runs
        self.consumer = AIOKafkaConsumer(
            self.topics.events, self.topics.lso, bootstrap_servers=bootstrap, group_id=None,
            enable_auto_commit=False, auto_offset_reset="earliest", client_id="qlm-demo")
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read both topics from their start (ids are unique to the run: older records
        are skipped), so no record of this run can be missed."""
        await self.consumer.start()
        self._task = asyncio.create_task(self._follow(), name="demo-events")

    async def _follow(self) -> None:
        from qlm.bus.records import Event, LsoCommand

        async for record in self.consumer:
            if record.value is None:
                continue
            try:
                if record.topic == self.topics.lso:
                    self.on_command(LsoCommand.from_json(record.value))
                else:
                    self.on_event(Event.from_json(record.value))
            except InvalidInput:
                continue

    def on_event(self, event: Any) -> None:
        t = self.run.tracked.get(event.request_id)
        if t is None:
            return
        if event.type == "admitted":
            t.predicted_wait_s = event.predicted_wait_s
            t.admitted_at = event.at
        elif event.type == "started":
            t.started_at = t.started_at or event.at
            t.worker = event.worker
        elif event.type == "first_token":
            if t.job.request.slo_class is not SLOClass.INTERACTIVE and t.first_token_at is None:
                t.first_token_at = event.at
        elif event.type == "evicted":
            t.num_evictions += 1
        elif event.type in TERMINAL_EVENTS:
            t.num_finished_events += event.type == "finished"
            if event.type == "finished" and event.num_output_tokens is not None:
                t.num_output_tokens = event.num_output_tokens
            t.terminal = t.terminal or event.type
            if t.job.request.slo_class is not SLOClass.INTERACTIVE or t.finished_at is None:
                t.finished_at = t.finished_at or event.at
            t.worker = event.worker or t.worker

    def on_command(self, command: Any) -> None:
        if command.issued_at < self.since:
            return
        if command.type == "swap":
            self.run.num_swaps += 1
        elif command.type == "evict":
            self.run.num_evicted += sum(1 for r in command.request_ids if r in self.run.tracked)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.consumer.stop()


def submission(t: Tracked, time_scale: float) -> dict[str, Any]:
    """The submission record of a request: token-id prompt (``t.prompt_token_ids``, else a
    fixed pattern shared by every request), SLO divided by the time scale."""
    r = t.job.request
    prompt = (list(t.prompt_token_ids) if t.prompt_token_ids is not None
              else [1 + (i * 7919) % 30000 for i in range(r.prompt_tokens)])
    return {
        "request_id": t.request_id, "model": r.model, "prompt_token_ids": prompt,
        "max_tokens": r.max_tokens, "slo_class": r.slo_class.value,
        "ttft_slo_s": r.slo.ttft_s / time_scale,
        "sampling": {"ignore_eos": True},
    }


async def send_interactive(client: Any, t: Tracked, time_scale: float) -> None:
    """Submit by gRPC and read the token stream; the first chunk with tokens is the TTFT."""
    from qlm.core.errors import Overloaded

    t.sent_at = time.time()
    try:
        await client.submit(submission(t, time_scale))
        async for chunk in client.stream_tokens(t.request_id):
            if chunk.token_ids and t.first_token_at is None:
                t.first_token_at = time.time()
            t.num_streamed_tokens += len(chunk.token_ids)
            if chunk.HasField("final"):
                t.finished_at = time.time()
                t.terminal = t.terminal or "streamed"
    except Overloaded:
        t.rejected = True
    except QlmError as error:
        print(f"  {t.request_id}: {error}", file=sys.stderr)
        t.rejected = True


async def replay(run: StackRun, ingest_addr: str, bootstrap: str, timeout_s: float,
                 progress: Any = None, check_alive: Any = None) -> None:
    """Send every request at its time; return once every one has ended (or ``timeout_s``).

    ``check_alive()`` is called every quarter second while waiting; it raises when a
    service has died (there is no point in waiting then)."""
    from qlm.bus.producer import BusProducer
    from qlm.bus.topics import TopicNames
    from qlm.client import QlmClient

    topic = TopicNames("").batch_requests
    tasks: list[asyncio.Task[None]] = []
    pending_sends: list[asyncio.Task[Any]] = []
    async with QlmClient(ingest_addr, timeout_s=60.0) as client, \
            BusProducer(bootstrap, client_id="qlm-demo") as producer:
        for t in sorted(run.tracked.values(), key=lambda x: x.job.request.arrival_at):
            due = run.t0 + t.job.request.arrival_at / run.time_scale
            await asyncio.sleep(max(0.0, due - time.time()))
            if t.job.request.slo_class is SLOClass.INTERACTIVE:
                tasks.append(asyncio.create_task(send_interactive(client, t, run.time_scale)))
            else:
                t.sent_at = time.time()
                value = json.dumps(submission(t, run.time_scale)).encode()
                pending_sends.append(asyncio.create_task(
                    producer.publish_raw(topic, value, t.request_id.encode())))
            if progress is not None:
                progress(True)
        await asyncio.gather(*pending_sends)
        deadline = time.time() + timeout_s
        next_poll = time.time() + 2.0
        while run.num_done() < len(run.tracked) and time.time() < deadline:
            if progress is not None:
                progress(False)
            if check_alive is not None:
                check_alive()
            if time.time() >= next_poll:
                await poll_unfinished(client, run)
                next_poll = time.time() + 2.0
            await asyncio.sleep(0.25)
        if progress is not None:
            progress(False)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await collect_forecasts(client, run)


async def collect_forecasts(client: Any, run: StackRun, batch: int = 64) -> None:
    """GetRequest for every request sent: its predicted first token, which for a request
    that has started is the scheduler's last forecast before it started."""
    sent = [t for t in run.tracked.values() if t.sent_at is not None and not t.rejected]
    for i in range(0, len(sent), batch):
        chunk = sent[i:i + batch]
        infos = await asyncio.gather(*(client.get(t.request_id) for t in chunk),
                                     return_exceptions=True)
        for t, info in zip(chunk, infos, strict=True):
            if isinstance(info, BaseException) or info.predicted_first_token_at <= 0:
                continue
            t.forecast_first_token_at = info.predicted_first_token_at
            t.forecast_at = info.predicted_at


async def poll_unfinished(client: Any, run: StackRun, limit: int = 64) -> None:
    """Ask ingest (GetRequest) about requests with no terminal event yet: the record in
    Redis is the truth when an event is late."""
    from qlm.client import STATE_NAMES

    waiting = [t for t in run.tracked.values()
               if t.terminal is None and not t.rejected and t.sent_at is not None][:limit]
    infos = await asyncio.gather(*(client.get(t.request_id) for t in waiting),
                                 return_exceptions=True)
    for t, info in zip(waiting, infos, strict=True):
        if isinstance(info, BaseException):
            continue
        state = STATE_NAMES.get(info.state)
        if state not in TERMINAL_EVENTS:
            continue
        if t.first_token_at is None and info.first_token_at > 0:
            t.first_token_at = info.first_token_at
        t.finished_at = t.finished_at or (info.finished_at or None)
        t.worker = t.worker or info.worker_id or None
        t.terminal = state


def decision_seconds(metrics_port: int) -> list[float]:
    """Approximate per-step decision times from the scheduler's histogram (phase decide):
    each observation is placed at the middle of its bucket (the samples of
    :func:`summarise`'s percentiles)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return []
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith("qlm_scheduler_decision_seconds_bucket") and 'phase="decide"' in line:
            le = line.split('le="')[1].split('"')[0]
            buckets.append((math.inf if le == "+Inf" else float(le), float(line.split()[-1])))
    buckets.sort()
    samples: list[float] = []
    lower, seen = 0.0, 0.0
    for upper, cumulative in buckets:
        mid = (lower + upper) / 2 if math.isfinite(upper) else lower
        samples += [mid] * int(cumulative - seen)
        lower, seen = (upper if math.isfinite(upper) else lower), cumulative
    return samples


# ===================================================================== orchestration
def run_stack_policies(args: argparse.Namespace, plan: DemoPlan) -> dict[str, StackRun]:
    """Brokers up once; per policy: services up, replay, services down, Redis flushed."""
    import redis

    from qlm.localstack.services import ServiceOptions, ServiceStack

    stack = fresh_stack(args.dir)
    runs: dict[str, StackRun] = {}
    services: ServiceStack | None = None
    try:
        for line in stack.up():
            print(line, flush=True)
        env = stack.environment()
        for policy in args.policies:
            options = ServiceOptions(
                policy=policy, workers_file=args.workers_file, time_scale=args.time_scale,
                admission=args.admission, group_window_s=max(0.2, 1.0 / args.time_scale),
                tick_s=max(0.25, 1.0 / args.time_scale))
            services = ServiceStack(args.dir, env["QLM_REDIS_URL"], env["QLM_KAFKA_BOOTSTRAP"],
                                    options)
            print(f"\n== policy {policy}", flush=True)
            for line in services.up():
                print(line, flush=True)
            runs[policy] = asyncio.run(run_one_policy(
                plan, policy, services.ingest_addr, env["QLM_KAFKA_BOOTSTRAP"],
                args.time_scale, args.timeout_s, services_alive(services)))
            runs[policy].decision_s = decision_seconds(services.ports.scheduler_metrics)
            for line in services.down():
                print(line, flush=True)
            services = None
            client = redis.Redis.from_url(env["QLM_REDIS_URL"])
            client.flushall()
            client.close()
    finally:
        if services is not None:
            for line in services.down():
                print(line, flush=True)
        for line in stack.down():
            print(line, flush=True)
    return runs


def fresh_stack(stack_dir: Path) -> Any:
    """A new stack in ``stack_dir`` on free ports (the directory's old data is removed);
    Unavailable when something from an earlier start still runs there."""
    import shutil

    from qlm.core.errors import Unavailable
    from qlm.localstack.services import ServiceStack
    from qlm.localstack.stack import LocalStack, StackPorts

    old = LocalStack.open(stack_dir, StackPorts(0, 0, 0), secure=False)
    old_services = ServiceStack(stack_dir, "", "")
    running = [s.name for s in old.status() if s.pid is not None] + [
        name for name, p in old_services.processes.items() if p.running_pid() is not None]
    if running:
        raise Unavailable(f"{', '.join(running)} still run in {stack_dir}; stop them with "
                          f"python -m qlm.localstack down --dir {stack_dir}")
    shutil.rmtree(stack_dir, ignore_errors=True)
    # Brokers without users or ACLs, services without API keys or TLS (ServiceOptions'
    # default): the demo measures scheduling; `make up` is the secured stack.
    return LocalStack(stack_dir, StackPorts(0, 0, 0).resolved(), secure=False)


def services_alive(services: Any) -> Any:
    """A check that raises Unavailable (naming the service and its log) once one has exited."""
    from qlm.core.errors import Unavailable
    from qlm.localstack.process import tail

    def check() -> None:
        for name, process in services.processes.items():
            if process.running_pid() is None:
                raise Unavailable(f"the {name} service exited; log {process.log_path}:\n"
                                  f"{tail(process.log_path, 5)}")

    return check


async def run_one_policy(plan: DemoPlan, policy: str, ingest_addr: str, bootstrap: str,
                         time_scale: float, timeout_s: float, check_alive: Any = None,
                         prompts: Mapping[str, tuple[int, ...]] | None = None) -> StackRun:
    """Replay ``plan`` on running services (see :func:`replay`). ``prompts``: the prompt
    token ids per plan request id (default: one fixed pattern for every request)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    run_tag = f"{policy}-{int(time.time()) % 100000:05d}"
    prompts = prompts or {}
    tracked = {f"{run_tag}-{j.request.id}": Tracked(j, f"{run_tag}-{j.request.id}",
                                                    prompt_token_ids=prompts.get(j.request.id))
               for j in plan.jobs}
    run = StackRun(policy, tracked, t0=0.0, time_scale=time_scale)
    watch = EventWatch(bootstrap, run)
    await watch.start()
    run.t0 = time.time() + 0.5
    started = time.perf_counter()
    n = len(tracked)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=False) as bar:
        sent = bar.add_task(f"{policy}: sent", total=n)
        done = bar.add_task(f"{policy}: ended", total=n)

        def progress(sent_one: bool) -> None:
            if sent_one:
                bar.advance(sent)
            bar.update(done, completed=run.num_done())

        try:
            await replay(run, ingest_addr, bootstrap, timeout_s, progress, check_alive)
        finally:
            await watch.stop()
    run.wall_s = time.perf_counter() - started
    return run


# ===================================================================== report
def write_records(path: Path, by_source: Mapping[str, Mapping[str, Sequence[RequestRecord]]]
                  ) -> None:
    fields = ("source", "policy", "id", "model", "slo_class", "arrival_at", "deadline_at",
              "prompt_tokens", "output_tokens", "started_at", "first_token_at", "finished_at",
              "worker_id", "num_evictions", "rejected", "predicted_first_token_at",
              "last_predicted_first_token_at")
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(fields)
        for source, policies in by_source.items():
            for policy, records in policies.items():
                for rec in records:
                    d = rec.to_dict()
                    w.writerow([source, policy, *(d[k] for k in fields[2:])])


def plot(out: Path, summaries: Mapping[str, Mapping[str, Any]],
         records: Mapping[str, Mapping[str, Sequence[RequestRecord]]]) -> None:
    """attainment.png (bars: overall and per class, stack vs simulator, per policy) and
    ttft_cdf.png (interactive TTFT per policy and source)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = ["overall", *sorted({c for s in summaries.values() for p in s["policies"].values()
                                   for c in p["slo_attainment_by_class"]})]
    bars = [(src, pol) for src, s in summaries.items() for pol in s["policies"]]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / max(1, len(bars))
    for k, (src, pol) in enumerate(bars):
        p = summaries[src]["policies"][pol]
        ys = [p["slo_attainment"][0] if c == "overall"
              else p["slo_attainment_by_class"].get(c, [None])[0] for c in classes]
        xs = np.arange(len(classes)) + (k - (len(bars) - 1) / 2) * width
        ax.bar(xs, [np.nan if y is None else y for y in ys], width,
               label=f"{pol} ({src})", hatch="//" if src == "sim" else None, alpha=0.85)
    ax.set_xticks(np.arange(len(classes)), classes)
    ax.set_ylim(0, 1.22)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("SLO attainment")
    ax.set_title("demo: stack vs simulator, same requests and workers")
    ax.legend(fontsize=8, ncols=max(1, len(bars)), loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "attainment.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for src, policies in records.items():
        for pol, recs in policies.items():
            ttfts = sorted(r.ttft_s for r in recs
                           if r.slo_class == "interactive" and r.ttft_s is not None)
            if ttfts:
                ax.plot(ttfts, np.arange(1, len(ttfts) + 1) / len(ttfts),
                        linestyle="--" if src == "sim" else "-", label=f"{pol} ({src})")
    ax.axvline(SLO.for_class(SLOClass.INTERACTIVE).ttft_s, color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("interactive TTFT (paper s)")
    ax.set_ylabel("CDF")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "ttft_cdf.png", dpi=110)
    plt.close(fig)


def summary_for(name: str, plan: DemoPlan, workers: Sequence[WorkerSpec],
                entries: Mapping[str, dict[str, Any]], extra: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "workload": name, "rates": [plan.rate], "policies": dict(entries),
        "cluster": "+".join(f"{w.gpu}[{','.join(w.models)}]" for w in workers),
        "workers": [f"{w.id}:{w.gpu}x{w.num_gpus}:{w.active_model}" for w in workers],
        "num_requests": len(plan.jobs), "seed": plan.seed, "trace": plan.trace,
        "trace_start": plan.start, **extra,
    }


# ===================================================================== main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadgen.demo",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    p.add_argument("--num-requests", type=int, default=600)
    p.add_argument("--start", type=int, default=0, help="first trace row of the slice")
    p.add_argument("--rate", type=float, default=8.0, help="mean arrivals per paper second")
    p.add_argument("--models", default="mistral-7b,vicuna-13b")
    p.add_argument("--workers-file", type=Path, default=DEFAULT_WORKERS)
    p.add_argument("--time-scale", type=float, default=2.0,
                   help="simulated workers run this many times faster than their GPUs")
    p.add_argument("--policies", default="qlm,fcfs")
    p.add_argument("--admission", default="interactive=queue",
                   help="ingest's admission rules (queue: comparable with the simulator)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout-s", type=float, default=240.0,
                   help="wall seconds to wait for the last request after the last send")
    p.add_argument("--dir", type=Path, default=Path(".qlm/demo"))
    p.add_argument("--out", type=Path, default=Path("out/demo"))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--no-sim", action="store_true", help="skip the simulator run")
    mode.add_argument("--sim-only", action="store_true", help="only the simulator run")
    args = p.parse_args(argv)
    args.policies = tuple(x.strip() for x in args.policies.split(",") if x.strip())
    args.models = tuple(x.strip() for x in args.models.split(",") if x.strip())
    return args


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    started = time.perf_counter()
    try:
        plan = build_plan(args.trace, args.num_requests, args.rate, args.models, args.seed,
                          args.start)
        workers = sim_workers(args.workers_file)
        from qlm.core.policies import policy_names

        unknown = [p for p in args.policies if p not in policy_names()]
        if unknown or not args.policies:
            raise InvalidInput("policies", f"unknown or empty: {unknown}")
    except InvalidInput as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"demo: {len(plan.jobs)} requests over {plan.span_s:.0f} paper s "
          f"({plan.span_s / args.time_scale:.0f} wall s at time scale {args.time_scale:g}), "
          f"workers {', '.join(w.id for w in workers)}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict[str, Any]] = {}
    records: dict[str, dict[str, Sequence[RequestRecord]]] = {}
    extra = {"time_scale": args.time_scale, "admission": args.admission,
             "command": "python -m loadgen.demo " + " ".join(
                 sys.argv[1:] if argv is None else argv)}
    try:
        if not args.sim_only:
            runs = run_stack_policies(args, plan)
            entries = {}
            records["stack"] = {}
            for policy, run in runs.items():
                recs = run.records()
                r2, _ = wait_prediction_r2(recs)
                entries[policy] = policy_entry([(run.metrics(len(workers)), r2, run.wall_s)])
                r2_forecast, num_forecast = wait_prediction_r2(run.records(forecasts_only=True))
                entries[policy]["wait_r2_forecast_only"] = [num(r2_forecast)]
                entries[policy]["num_with_forecast"] = [num_forecast]
                records["stack"][policy] = recs
                dup = [t.request_id for t in run.tracked.values() if t.num_finished_events > 1]
                missing = [t.request_id for t in run.tracked.values()
                           if t.terminal is None and not t.rejected]
                entries[policy]["num_duplicate_finished"] = [len(dup)]
                entries[policy]["num_unfinished"] = [len(missing)]
            summaries["stack"] = summary_for("demo-stack", plan, workers, entries, extra)
        if not args.no_sim:
            entries = {}
            records["sim"] = {}
            for policy in args.policies:
                metrics, r2, wall, recs = simulate_policy(plan, workers, policy)
                entries[policy] = policy_entry([(metrics, r2, wall)])
                records["sim"][policy] = recs
            summaries["sim"] = summary_for("demo-sim", plan, workers, entries, extra)
    except KeyboardInterrupt:
        print("demo: interrupted; the stack was stopped", file=sys.stderr)
        return 130
    except QlmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    wall = round(time.perf_counter() - started, 1)
    write_json(args.out / "summary.json", {**summaries, "wall_s": wall}, RESULT_KEYS, indent=1)
    write_records(args.out / "records.csv", records)
    plot(args.out, summaries, records)
    titles = {"stack": "local stack (times in paper seconds)", "sim": "simulator"}
    for source, summary in summaries.items():
        print_table(summary, title=f"{titles[source]}: {summary['num_requests']} requests of "
                                   f"{Path(plan.trace).name} at {plan.rate:g} req/s on "
                                   f"{summary['cluster']}")
    (args.out / "tables.md").write_text("".join(
        f"### {titles[s]}\n\n{markdown_table(summary)}\n" for s, summary in summaries.items()))
    print(f"wrote {args.out}/summary.json, records.csv, attainment.png, ttft_cdf.png "
          f"(demo wall time {wall} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
