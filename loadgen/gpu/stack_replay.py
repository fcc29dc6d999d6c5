"""The mixed interactive + batch replay of :mod:`loadgen.gpu.qlm_vs_fcfs`, through the real stack.

Same requests as that harness (its :func:`~loadgen.gpu.qlm_vs_fcfs.build_workload`, its
defaults for every workload flag, prompts drawn by its ``draw_prompts``), so the result
compares with its ``bare`` (vLLM alone) variant. What runs instead of its in-process
stand-ins:

* Redis + Kafka by :mod:`qlm.localstack` on free loopback ports under ``--dir``;
* one worker service per model, started first (``--engine vllm``: both on the one GPU,
  each with ``--gpu-memory-utilization`` of it, one after the other so that the second
  one's memory profiling sees the first one's memory taken; ``--engine sim``: the
  simulated engine in real time, KV capacity ``--sim-kv-tokens``, for any machine);
* then the estimator, ingest and scheduler services (``--policy``) as processes
  (:class:`qlm.localstack.services.ServiceStack`, ingest admission ``interactive=queue``),
  reading profiles whose KV capacity is the one each engine has (vLLM's logged ``GPU KV
  cache size``), as qlm_vs_fcfs's policies see their engines';
* the replay of :mod:`loadgen.demo`: interactive requests by gRPC ``Submit`` +
  ``StreamTokens`` (TTFT at the client), batch requests as records on
  ``qlm.batch.requests`` (TTFT from the worker's ``first_token`` event); evictions and
  swaps counted from ``qlm.lso``.

Writes ``OUT/<--name>.json`` in qlm_vs_fcfs's schema (one variant, ``stack-<policy>``)
with the device, the command and the code version. Everything stops within
``--budget-s``, and every process started here is stopped on any exit.

GPU host (after ``loadgen/gpu/unpack_stack.sh`` and ``. /tmp/stack/env.sh``)::

    python3 -m loadgen.gpu.stack_replay --slice .stage/azure_conv_0_400.csv --out $OUT

``--slice a.csv,b.csv --repeat 3`` replays each slice three times on one running stack
(the engines start once; each run's requests carry their own ids, its evictions, swaps
and decision times are its own), as variants ``stack-<policy> <slice> run <k>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from loadgen.gpu import qlm_vs_fcfs
from loadgen.gpu.common import HOST_DEVICE, device_facts, percentile, write_json
from loadgen.gpu.qlm_vs_fcfs import Outcome, Workload, build_workload, draw_prompts, summarise
from qlm.core.errors import Unavailable
from qlm.core.perf import PROFILE_DIR
from qlm.core.policies.base import options_from_json
from qlm.core.types import SLO, Request, SLOClass

#: The top-level keys this program writes into its JSON (checked against the committed
#: results by tests/unit/test_results_keys.py).
RESULT_KEYS: Final = frozenset({
    "args", "code_version", "command", "device", "engine", "error", "kv_capacity_tokens",
    "skipped", "slos_s", "startup_s", "total_s", "variants", "vllm_version", "workload",
    "workloads", "logs",
})

REPO_ROOT = Path(__file__).resolve().parents[2]
#: qlm_vs_fcfs's defaults: the workload flags here default to the same values.
HARNESS_DEFAULTS = qlm_vs_fcfs.parse_args([])
#: Longest wait for the warm-up requests.
WARMUP_TIMEOUT_S = 60.0
#: Time kept back from the budget for stopping everything.
STOP_RESERVE_S = 45.0
#: Ingest admits every request to the queue: the replay compares with vLLM, which rejects none.
ADMISSION = "interactive=queue"
#: The services of :class:`~qlm.localstack.services.ServiceStack` started here (workers apart).
SERVICES = ("estimator", "ingest", "scheduler")


class OutOfTime(BaseException):
    """The budget ran out (a BaseException, so no handler on the way swallows it)."""


@dataclass(frozen=True, slots=True)
class Budget:
    """Seconds left of ``budget_s`` from ``started_at`` (monotonic), less the stop reserve."""

    started_at: float
    budget_s: float

    def left_s(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        return self.budget_s - STOP_RESERVE_S - (now - self.started_at)

    def within(self, wanted_s: float, what: str, now: float | None = None) -> float:
        """``wanted_s`` capped by what is left; Unavailable when nothing is left for ``what``."""
        left = self.left_s(now)
        if left <= 1.0:
            raise Unavailable(f"no time left in --budget-s for {what}")
        return min(wanted_s, left)


# ------------------------------------------------------------------ files
def worker_id(model: str) -> str:
    return f"w-{model}"


def workers_yaml(models: Sequence[str], gpu: str) -> str:
    """The workers file the scheduler and estimator read: one worker per model, all on the
    host's one GPU (``device``: their engines share it)."""
    lines = ["workers:"]
    for model in models:
        lines += [f"  - id: {worker_id(model)}", f"    gpu: {gpu}", f"    device: {HOST_DEVICE}",
                  f"    models: [{model}]"]
    return "\n".join(lines) + "\n"


def write_profiles(target: Path, gpu: str, kv_capacity_tokens: Mapping[str, int]) -> Path:
    """A copy of the shipped profiles in which the (model, ``gpu``) profile of each model of
    ``kv_capacity_tokens`` holds that many KV tokens: the simulated engine's capacity
    (qlm_vs_fcfs's ``--sim-kv-tokens``), or the one vLLM found on the GPU, which the
    scheduler must plan with as qlm_vs_fcfs's policies do."""
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(PROFILE_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        if data["gpu"] == gpu and data["model"] in kv_capacity_tokens:
            data["kv_capacity_tokens"] = int(kv_capacity_tokens[data["model"]])
        (target / path.name).write_text(json.dumps(data, indent=1) + "\n")
    return target


#: What vLLM logs once its KV cache is sized (vllm/v1/core/kv_cache_utils.py).
KV_CACHE_LINE = re.compile(r"GPU KV cache size: ([\d,]+) tokens")


def logged_kv_tokens(log_text: str) -> int | None:
    """The KV capacity (tokens) in the last ``GPU KV cache size`` line of a log, or None."""
    found = KV_CACHE_LINE.findall(log_text)
    return int(found[-1].replace(",", "")) if found else None


# ------------------------------------------------------------------ workers
@dataclass(frozen=True, slots=True)
class WorkerPorts:
    health: int
    metrics: int


def worker_argv(args: argparse.Namespace, model: str, ports: WorkerPorts, redis_url: str,
                bootstrap: str, profiles_dir: Path) -> list[str]:
    """The command line of the worker service that serves ``model`` alone."""
    argv = [sys.executable, "-m", "services.worker", "--redis-url", redis_url,
            "--kafka-bootstrap", bootstrap, "--topic-prefix", "", "--log-level", "info",
            "--engine", args.engine, "--worker-id", worker_id(model), "--gpu", args.gpu,
            "--models", model, "--profiles-dir", str(profiles_dir), "--host", "127.0.0.1",
            "--health-port", str(ports.health), "--metrics-port", str(ports.metrics),
            "--shutdown-grace-s", "2"]
    if args.engine == "vllm":
        argv += ["--vllm-gpu-memory-utilization", str(args.gpu_memory_utilization),
                 "--vllm-max-model-len", str(args.max_model_len),
                 "--vllm-load-format", "dummy"]  # random weights of the shapes: a benchmark
        if args.enforce_eager:
            argv += ["--vllm-enforce-eager", "true"]
    return argv


@dataclass
class WorkerFleet:
    """One worker service per model, started one after the other (each ready before the
    next), stopped together."""

    run_dir: Path
    #: A string in every worker's command line (its profiles directory): a pid file is
    #: believed only for a process whose command line has it.
    marker: str
    processes: dict[str, Any] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    def process(self, model: str) -> Any:
        from qlm.localstack.process import ServerProcess

        return ServerProcess(f"worker-{model}", self.run_dir, marker=self.marker)

    def leftovers(self, models: Sequence[str]) -> list[str]:
        """Workers of an earlier run in this directory that still run."""
        return [f"worker-{m}" for m in models if self.process(m).running_pid() is not None]

    def start(self, model: str, argv: Sequence[str], health_port: int, timeout_s: float
              ) -> float:
        """Start the worker of ``model``; returns the seconds until its health is SERVING."""
        from qlm.localstack.services import grpc_serving

        process = self.process(model)
        self.processes[model] = process
        self.pids[model] = process.start(argv, env=service_env())
        return process.wait_until(lambda: grpc_serving(f"127.0.0.1:{health_port}"),
                                  timeout_s, "health SERVING", poll_s=0.5)

    def logged_kv_tokens(self) -> dict[str, int]:
        """Each worker's KV capacity as its engine logged it (models that logged none left
        out: the scheduler then plans with the profile's)."""
        found = {m: logged_kv_tokens(p.log_path.read_text(errors="replace"))
                 for m, p in self.processes.items()}
        return {m: n for m, n in found.items() if n is not None}

    def check_alive(self) -> None:
        from qlm.localstack.process import tail

        for model, process in self.processes.items():
            if process.exited_with() is not None:
                raise Unavailable(f"the worker of {model} exited; log {process.log_path}:\n"
                                  f"{tail(process.log_path, 8)}")

    def stop(self) -> list[str]:
        """SIGTERM each worker (SIGKILL after its grace), then SIGKILL whatever is left of
        its process group (vLLM's engine processes)."""
        lines = []
        for model, process in self.processes.items():
            stopped = process.stop(timeout_s=20.0)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pids[model], signal.SIGKILL)
            lines.append(f"worker-{model} {'stopped' if stopped else 'was not running'}")
        return lines


def services_alive(services: Any, names: Sequence[str]) -> None:
    """Unavailable (naming the service and its log) once one of ``names`` has exited."""
    from qlm.localstack.process import tail

    for name in names:
        process = services.processes[name]
        if process.running_pid() is None:
            raise Unavailable(f"the {name} service exited; log {process.log_path}:\n"
                              f"{tail(process.log_path, 8)}")


def service_env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    return env


# ------------------------------------------------------------------ outcomes
@dataclass(eq=False)
class CountedOutcome(Outcome):
    """An :class:`Outcome` that knows how many tokens were generated, not which."""

    num_tokens: int = 0

    @property
    def num_generated(self) -> int:
        return self.num_tokens


def outcomes_of(run: Any) -> list[Outcome]:
    """The replay's requests as qlm_vs_fcfs outcomes: seconds from the replay's start
    (``run.t0``), on which the workload's arrival times are laid out too."""

    def since_start(at: float | None) -> float | None:
        return None if at is None else at - run.t0

    out: list[Outcome] = []
    for t in run.tracked.values():
        done = t.terminal in ("finished", "streamed")
        error = ("rejected" if t.rejected else
                 None if done or t.terminal is None else f"ended {t.terminal}")
        out.append(CountedOutcome(
            t.job.request, first_token_at=since_start(t.first_token_at),
            finished_at=since_start(t.finished_at) if done else None,
            num_evictions=t.num_evictions, error=error,
            num_tokens=max(t.num_output_tokens or 0, t.num_streamed_tokens)))
    return out


def warmup_workload(models: Sequence[str], slos: Mapping[str, float]) -> Workload:
    """What runs before the measured replay, as qlm_vs_fcfs's ``warm_up`` (8 short requests
    per model, prompts of 64 to 1,856 tokens), half by gRPC and half through Kafka."""
    requests = []
    for model in models:
        for i in range(8):
            cls = SLOClass.INTERACTIVE if i % 2 == 0 else SLOClass.BATCH_2
            requests.append(Request(f"warm-{model}-{i}", model, 64 + 256 * i, 16, cls,
                                    SLO(60.0), round(0.05 * i, 3)))
    return Workload(tuple(requests), slos, {"num_requests": len(requests)})


def replay_plan(workload: Workload, trace: str, seed: int) -> Any:
    """The workload as a :class:`loadgen.plan.DemoPlan` (every request at its own length)."""
    from loadgen.plan import DemoPlan
    from qlm.sim.cluster import Job

    return DemoPlan(tuple(Job(r, r.max_tokens) for r in workload.requests), trace, 0,
                    math.nan, seed)


def variant_result(run: Any, workload: Workload, decide_s: Sequence[float],
                   timed_out: bool) -> dict[str, Any]:
    outcomes = outcomes_of(run)
    tracked = list(run.tracked.values())
    return {
        "summary": summarise(outcomes, workload.slos),
        "timed_out": timed_out, "evictions": run.num_evicted, "swaps": run.num_swaps,
        "num_rejected": sum(1 for t in tracked if t.rejected),
        "num_unfinished": sum(1 for t in tracked if t.terminal is None and not t.rejected),
        "num_duplicate_finished": sum(1 for t in tracked if t.num_finished_events > 1),
        "num_decisions": len(decide_s),
        "decide_s_p50": round(percentile(decide_s, 50), 5),
        "decide_s_p99": round(percentile(decide_s, 99), 5),
        "wall_s": round(run.wall_s, 2),
        "requests": [[o.request.id, o.request.arrival_at,
                      o.first_token_at and round(o.first_token_at, 4),
                      o.finished_at and round(o.finished_at, 4),
                      o.num_generated, o.num_evictions] for o in outcomes],
    }


def replays(workloads: Mapping[str, Workload], repeat: int, policy: str,
            alone: Mapping[str, Workload] | None = None) -> list[tuple[str, str, Workload]]:
    """(variant name, slice, workload) in the order they are replayed: each slice's
    interactive stream alone first (``alone``: the slices' workloads without their batch
    jobs, ``--interactive-only-first``), then each slice's runs back to back."""
    alone = alone or {}
    single = len(workloads) == 1 and repeat == 1 and not alone
    return [
        *((f"stack-{policy} {Path(label).stem} interactive only", label, w)
          for label, w in alone.items()),
        *((variant_name(policy, label, k, single), label, w)
          for label, w in workloads.items() for k in range(1, repeat + 1)),
    ]


def variant_name(policy: str, label: str, k: int, single: bool = False) -> str:
    """``stack-<policy>`` for the one run of a replay of one slice (``single``: the
    schema of single runs), else ``stack-<policy> <slice file stem> run <k>``."""
    if single:
        return f"stack-{policy}"
    return f"stack-{policy} {Path(label).stem} run {k}"


def samples_since(before: Sequence[float], after: Sequence[float]) -> list[float]:
    """The decision-time samples of ``after`` (a cumulative histogram read now) that
    ``before`` (read earlier) did not have: one run's decisions on a running scheduler."""
    from collections import Counter

    return sorted((Counter(after) - Counter(before)).elements())


# ------------------------------------------------------------------ run
def run_stack(args: argparse.Namespace, workloads: Mapping[str, Workload],
              result: dict[str, Any], budget: Budget) -> None:
    """Brokers, services, workers up; each workload replayed ``--repeat`` times, one after
    the other on the same running stack; everything down (on any exit)."""
    from loadgen.demo import decision_seconds, fresh_stack, run_one_policy
    from qlm.localstack.process import free_loopback_port
    from qlm.localstack.services import ServiceOptions, ServiceStack

    models = args.models.split(",")
    run_dir = args.dir.resolve() / "services"
    worker_profiles = args.dir.resolve() / "profiles"
    fleet = WorkerFleet(run_dir, marker=str(worker_profiles))
    if leftovers := fleet.leftovers(models):
        raise Unavailable(f"{', '.join(leftovers)} of an earlier run still run in {run_dir}")
    stack = fresh_stack(args.dir)
    services: ServiceStack | None = None
    startup: dict[str, Any] = {}
    result["startup_s"] = startup
    try:
        started = time.monotonic()
        for line in stack.up():
            print(line, flush=True)
        startup["brokers"] = round(time.monotonic() - started, 1)
        env = stack.environment()
        redis_url, bootstrap = env["QLM_REDIS_URL"], env["QLM_KAFKA_BOOTSTRAP"]
        workers_file = args.dir.resolve() / "workers.yaml"
        workers_file.write_text(workers_yaml(models, args.gpu))
        sim_kv = {m: args.sim_kv_tokens for m in models} if args.engine == "sim" else {}
        write_profiles(worker_profiles, args.gpu, sim_kv)
        for model in models:  # first, so that the scheduler can plan with their KV capacity
            ports = WorkerPorts(free_loopback_port(), free_loopback_port())
            argv = worker_argv(args, model, ports, redis_url, bootstrap, worker_profiles)
            seconds = fleet.start(model, argv, ports.health, budget.within(
                args.worker_start_timeout_s, f"starting the worker of {model}"))
            startup[f"worker {model}"] = round(seconds, 1)
            print(f"worker-{model} ready in {seconds:.1f} s ({args.engine})", flush=True)
        kv = dict(sim_kv) if args.engine == "sim" else fleet.logged_kv_tokens()
        result["kv_capacity_tokens"] = kv
        options = ServiceOptions(
            policy=args.policy, policy_options=options_from_json(args.policy_options),
            workers_file=workers_file, admission=ADMISSION,
            group_window_s=args.group_window_s, tick_s=args.tick_s, shutdown_grace_s=2.0,
            **({} if args.debounce_s is None else {"debounce_s": args.debounce_s}))
        services = ServiceStack(args.dir, redis_url, bootstrap, options, profiles_source=(
            write_profiles(args.dir.resolve() / "profiles-planned", args.gpu, kv)))
        started = time.monotonic()
        for line in services.up(names=SERVICES):
            print(line, flush=True)
        startup["services"] = round(time.monotonic() - started, 1)

        def check_alive() -> None:
            services_alive(services, SERVICES)
            fleet.check_alive()

        started = time.monotonic()
        slos = next(iter(workloads.values())).slos
        warm = warmup_workload(models, slos)
        asyncio.run(run_one_policy(
            replay_plan(warm, "warm-up", args.seed), "warmup", services.ingest_addr, bootstrap,
            1.0, budget.within(WARMUP_TIMEOUT_S, "the warm-up"), check_alive,
            draw_prompts(warm.requests, args.seed + 7)))
        startup["warmup"] = round(time.monotonic() - started, 1)
        alone = (slice_workloads(args, interactive_only=True)
                 if args.interactive_only_first else None)
        for name, label, workload in replays(workloads, args.repeat, args.policy, alone):
            plan = replay_plan(workload, label, args.seed)
            span_s = plan.span_s
            wait_s = budget.within(args.replay_timeout_s, "the replay") - span_s
            if wait_s <= 0:
                raise Unavailable(f"the arrivals take {span_s:.0f} s; only "
                                  f"{budget.left_s():.0f} s of --budget-s are left")
            prompts = draw_prompts(workload.requests, args.seed + 1000)
            decided_before = decision_seconds(services.ports.scheduler_metrics)
            run = asyncio.run(run_one_policy(plan, args.policy, services.ingest_addr,
                                             bootstrap, 1.0, wait_s, check_alive, prompts))
            timed_out = run.num_done() < len(run.tracked)
            decide_s = samples_since(decided_before,
                                     decision_seconds(services.ports.scheduler_metrics))
            result["variants"][name] = variant_result(run, workload, decide_s, timed_out)
            result["variants"][name]["slice"] = label
            result["variants"][name]["interactive_only"] = (alone is not None
                                                            and alone.get(label) is workload)
    finally:
        with stop_signals_deferred():
            stop_all(fleet, services, stack, run_dir, result)


def stop_all(fleet: WorkerFleet, services: Any, stack: Any, run_dir: Path,
             result: dict[str, Any]) -> None:
    """Workers, services, brokers down (each bounded by its stop timeout)."""
    try:
        if not result["variants"]:
            result["logs"] = log_tails(run_dir)
    finally:
        for line in fleet.stop():
            print(line, flush=True)
        if services is not None:
            for line in services.down():
                print(line, flush=True)
        for line in stack.down():
            print(line, flush=True)


@contextlib.contextmanager
def stop_signals_deferred() -> Any:
    """While stopping: no budget alarm, and SIGTERM / SIGINT only noted (raised after), so
    that stopping is never cut short with processes left running."""
    received: list[int] = []
    signal.alarm(0)
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise KeyboardInterrupt(f"signal {received[0]} while stopping")


def save_logs(stack_dir: Path, archive: Path) -> Path:
    """Every ``*.log`` under ``stack_dir`` (brokers, services, workers) in one tar.gz, for
    timing a run's decisions, commands and pulls afterwards."""
    import tarfile

    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(stack_dir.rglob("*.log")):
            tar.add(path, arcname=str(path.relative_to(stack_dir)))
    return archive


def log_tails(run_dir: Path, num_lines: int = 15) -> dict[str, str]:
    from qlm.localstack.process import tail

    return {path.name: tail(path, num_lines) for path in sorted(run_dir.glob("*.log"))}


def code_version(given: str) -> str:
    """``given``, else the checkout's commit (``+dirty`` with local changes), else ''."""
    if given:
        return given
    try:
        commit = subprocess.check_output(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                                         text=True, stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "-C", str(REPO_ROOT), "status", "--porcelain",
                                         "--untracked-files=no"], text=True).strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if dirty else "")


# ------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    d = HARNESS_DEFAULTS
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--engine", choices=("vllm", "sim"), default="vllm")
    p.add_argument("--policy", default="qlm", help="the scheduler service's policy")
    p.add_argument("--debounce-s", type=float, default=None,
                   help="the scheduler's --debounce-s: how long it gathers events before "
                        "deciding (each decision waits this long after its trigger; "
                        "default: the scheduler's)")
    p.add_argument("--save-logs", action="store_true",
                   help="also write OUT/<name>-logs.tar.gz with every log of the stack")
    p.add_argument("--policy-options", default="{}",
                   help="the scheduler's policy options (JSON object), e.g. "
                        "'{\"evict_rate_credit\": 0.5}'")
    p.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                   help="vllm: each worker's share of the GPU")
    p.add_argument("--enforce-eager", action="store_true", help="vllm: no CUDA graphs")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--sim-kv-tokens", type=int, default=d.sim_kv_tokens,
                   help="sim: KV capacity of each simulated worker")
    p.add_argument("--worker-start-timeout-s", type=float, default=300.0)
    p.add_argument("--replay-timeout-s", type=float, default=d.variant_timeout_s,
                   help="longest replay, from its start (qlm_vs_fcfs's --variant-timeout-s)")
    p.add_argument("--budget-s", type=float, default=d.budget_s)
    p.add_argument("--dir", type=Path, default=Path("/tmp/qlm-stack-replay"),
                   help="the stack's data, pid files and logs (emptied first)")
    p.add_argument("--code-version", default="", help="default: the checkout's git commit")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    p.add_argument("--name", default="stack_replay")
    # The workload, exactly as qlm_vs_fcfs builds it (same flags, same defaults).
    for flag in ("models", "gpu", "slice", "num_interactive", "speedup", "second_model_every",
                 "num_batch", "batch_at_s", "warmup_s", "interactive_slo_s", "batch1_slo_s",
                 "batch2_slo_s", "group_window_s", "tick_s", "seed"):
        default = getattr(d, flag)
        p.add_argument("--" + flag.replace("_", "-"), type=type(default), default=default)
    p.add_argument("--repeat", type=int, default=1,
                   help="replay each --slice this many times, one after the other, on the "
                        "same running stack (engines start once)")
    p.add_argument("--interactive-only-first", action="store_true",
                   help="before those runs, replay each slice's interactive stream alone "
                        "(its batch jobs left out) once on the same stack: what the card "
                        "gives the stream by itself, the bound of the runs beside batch work")
    args = p.parse_args(argv)
    if len(args.models.split(",")) != 2:
        p.error("--models: two models, comma-separated")
    if args.repeat < 1:
        p.error("--repeat: at least 1")
    if not all(args.slice.split(",")):
        p.error("--slice: comma-separated slice files, none empty")
    return args


def slice_workloads(args: argparse.Namespace, interactive_only: bool = False
                    ) -> dict[str, Workload]:
    """The workload of each comma-separated ``--slice``, as qlm_vs_fcfs builds it
    (``interactive_only``: without its batch jobs)."""
    extra = {"num_batch": 0} if interactive_only else {}
    return {label: build_workload(argparse.Namespace(**{**vars(args), "slice": label, **extra}))
            for label in args.slice.split(",")}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(time.monotonic(), args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "device": device_facts(), "engine": args.engine,
        "command": " ".join(["python3 -m loadgen.gpu.stack_replay",
                             *(sys.argv[1:] if argv is None else argv)]),
        "code_version": code_version(args.code_version),
        "args": vars(args), "variants": {}, "skipped": [], "error": None,
    }
    started = time.time()

    def out_of_time(signum: int, frame: Any) -> None:
        raise OutOfTime(f"--budget-s {args.budget_s:g} ran out")

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(max(1, int(args.budget_s - STOP_RESERVE_S)))
    try:
        workloads = slice_workloads(args)
        first = next(iter(workloads.values()))
        result["workload"] = dict(first.description)
        result["workloads"] = {label: dict(w.description) for label, w in workloads.items()}
        result["slos_s"] = dict(first.slos)
        if args.engine == "vllm":
            import vllm

            result["vllm_version"] = vllm.__version__
        run_stack(args, workloads, result, budget)
    except BaseException as error:  # keep what was measured, say what broke
        result["error"] = "".join(traceback.format_exception(error))[-4000:]
        traceback.print_exc()
    finally:
        signal.alarm(0)
    result["total_s"] = round(time.time() - started, 1)
    write_json(out / f"{args.name}.json", result)
    if args.save_logs:
        print("logs:", save_logs(args.dir.resolve(), out / f"{args.name}-logs.tar.gz"))
    for name, variant in result["variants"].items():
        s = variant["summary"]
        for cls, c in s["classes"].items():
            print(f"{name} | {cls} | SLO {c['slo_ttft_s']} s | attainment "
                  f"{c['slo_attainment']:.3f} | TTFT p50 {c['ttft_p50_s']:.3f} p99 "
                  f"{c['ttft_p99_s']:.3f} | evicted {c['num_evicted']}", flush=True)
        print(f"{name}: {s['output_tok_per_s']} tok/s, makespan {s['makespan_s']} s, "
              f"exact length {s['num_exact_length']}/{s['num_requests']}, evictions "
              f"{variant['evictions']}, swaps {variant['swaps']}", flush=True)
    print("DONE", "ok" if result["error"] is None else "FAILED", result["total_s"],
          f"-> {out / (args.name + '.json')}", flush=True)
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
