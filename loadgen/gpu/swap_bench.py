"""Model swaps through the worker service on one GPU, against a cold restart of the engine.

One worker service (``python -m services.worker``) holds two models (the second asleep,
vLLM sleep mode level 1: weights in CPU memory). Each round puts one request of the
asleep model in the worker's virtual queue and publishes the scheduler's command,
``{"type": "swap", "to_model": ...}`` on ``qlm.lso``; the swap time is from the command's
``issued_at`` to the first token of that request in its Redis token stream (the worker
reads the command, requeues what runs, sleeps one model, wakes the other and pulls the
request). The worker's own ``swapped`` event (sleep + wake) is recorded beside it. Rounds
alternate the models, ``--swaps`` of them (>= 20) after ``--warmup-swaps`` unmeasured
ones (the first sleep of a model allocates its pinned CPU buffers).

Then ``--cold-restarts`` times: SIGTERM the worker, start a new worker service holding
only the other model, and time from the stop to the first token of a request of that
model (process start, vLLM import, engine start with a warm compile cache, first token).

Redis and Kafka come from :mod:`qlm.localstack` under ``--dir`` unless ``--redis-url`` /
``--kafka-bootstrap`` name running ones. Writes ``OUT/<--name>.json``: device, vLLM
version, commit, exact command, every round, p50 / p99 of both. ``--engine sim`` runs
the same on any machine (the simulated engine's swap is the profile's sleep + wake).

GPU host (vLLM unpacked, then ``loadgen/gpu/unpack_stack.sh`` and ``. /tmp/stack/env.sh``)::

    python3 -m loadgen.gpu.swap_bench --models mistral-7b,qwen2.5-1.5b --out $OUT
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from loadgen.gpu.common import MODEL_SHAPES, device_facts, percentile, write_json
from loadgen.gpu.stack_replay import (
    Budget,
    OutOfTime,
    WorkerFleet,
    code_version,
    service_env,
    stop_signals_deferred,
)
from qlm.core.errors import Unavailable
from qlm.core.perf import PROFILE_DIR
from qlm.core.types import SLO, Request, SLOClass

#: The top-level keys this program writes into its JSON (checked against the committed
#: results by tests/unit/test_results_keys.py).
RESULT_KEYS: Final = frozenset({
    "args", "code_version", "command", "cold_restarts", "device", "engine", "error",
    "summary", "swaps", "total_s", "vllm_version", "worker_start_s",
})

WORKER_ID = "gpu0"
#: Seconds kept back from --budget-s for stopping everything.
STOP_RESERVE_S = 30.0
TARGET_P50_S = 0.5


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--engine", choices=("vllm", "sim"), default="vllm")
    p.add_argument("--models", default="mistral-7b,qwen2.5-1.5b",
                   help="two models, the first awake at start")
    p.add_argument("--gpu", default="H100-80GB", help="the profiles' GPU label")
    p.add_argument("--swaps", type=int, default=24, help="measured swaps (at least 20)")
    p.add_argument("--warmup-swaps", type=int, default=2)
    p.add_argument("--cold-restarts", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.42,
                   help="vllm: each model's share of the GPU")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--load-format", default="dummy",
                   help="vllm: weights of the models ('dummy': random, of their shapes; a "
                        "level-1 sleep moves the same bytes either way)")
    p.add_argument("--time-scale", type=float, default=1.0, help="sim: x times faster")
    p.add_argument("--worker-start-timeout-s", type=float, default=300.0)
    p.add_argument("--round-timeout-s", type=float, default=60.0)
    p.add_argument("--budget-s", type=float, default=560.0)
    p.add_argument("--redis-url", default="", help="a running Redis (default: start one)")
    p.add_argument("--kafka-bootstrap", default="", help="a running Kafka (default: start one)")
    p.add_argument("--topic-prefix", default="")
    p.add_argument("--dir", type=Path, default=Path("/tmp/qlm-swap-bench"),
                   help="brokers' data, the worker's pid file and logs (emptied first)")
    p.add_argument("--code-version", default="", help="default: the checkout's git commit")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    p.add_argument("--name", default="swap_bench")
    args = p.parse_args(argv)
    models = args.models.split(",")
    if len(models) != 2 or models[0] == models[1]:
        p.error("--models: two different models, comma-separated")
    if args.swaps < 1 or args.warmup_swaps < 0 or args.cold_restarts < 0:
        p.error("--swaps must be >= 1, --warmup-swaps and --cold-restarts >= 0")
    if bool(args.redis_url) != bool(args.kafka_bootstrap):
        p.error("give both --redis-url and --kafka-bootstrap, or neither")
    return args


def worker_argv(args: argparse.Namespace, models: Sequence[str], health_port: int,
                metrics_port: int, redis_url: str, bootstrap: str) -> list[str]:
    """The worker service holding ``models`` (the first awake)."""
    argv = [sys.executable, "-m", "services.worker", "--redis-url", redis_url,
            "--kafka-bootstrap", bootstrap, "--topic-prefix", args.topic_prefix,
            "--engine", args.engine, "--worker-id", WORKER_ID, "--gpu", args.gpu,
            "--models", ",".join(models), "--profiles-dir", str(PROFILE_DIR),
            "--host", "127.0.0.1", "--health-port", str(health_port),
            "--metrics-port", str(metrics_port), "--shutdown-grace-s", "1",
            "--lso-group", f"swap-bench-{os.getpid()}-{time.time_ns()}"]
    if args.engine == "vllm":
        argv += ["--vllm-gpu-memory-utilization", str(args.gpu_memory_utilization),
                 "--vllm-max-model-len", str(args.max_model_len),
                 "--vllm-load-format", args.load_format]
    else:
        argv += ["--time-scale", str(args.time_scale)]
    return argv


def prompt_ids(model: str, n: int, seed: int) -> list[int]:
    vocab = int(MODEL_SHAPES[model]["vocab_size"]) if model in MODEL_SHAPES else 32000
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(100, vocab - 100, size=n)]


def summary(seconds: Sequence[float]) -> dict[str, float]:
    return {"n": len(seconds), "p50_s": round(percentile(seconds, 50), 4),
            "p99_s": round(percentile(seconds, 99), 4),
            "mean_s": round(sum(seconds) / len(seconds), 4) if seconds else float("nan"),
            "max_s": round(max(seconds), 4) if seconds else float("nan")}


class Bench:
    """The worker service, the requests and the commands (module docstring)."""

    def __init__(self, args: argparse.Namespace, redis_url: str, bootstrap: str,
                 fleet: WorkerFleet, budget: Budget) -> None:
        self.args = args
        self.models = args.models.split(",")
        self.redis_url, self.bootstrap = redis_url, bootstrap
        self.fleet = fleet
        self.budget = budget
        self.num_requests = 0

    def start_worker(self, models: Sequence[str]) -> float:
        from qlm.localstack.process import free_loopback_port

        health, metrics = free_loopback_port(), free_loopback_port()
        argv = worker_argv(self.args, models, health, metrics, self.redis_url, self.bootstrap)
        return self.fleet.start("swap", argv, health, self.budget.within(
            self.args.worker_start_timeout_s, "starting the worker"))

    async def serve_one(self, store: Any, model: str, then: Any = None) -> tuple[float, float]:
        """Queue one request of ``model`` for the worker, run ``then()`` (publish a command),
        and return (when ``then`` began, when the first token was in the stream), Unix s."""
        self.num_requests += 1
        rid = f"r{self.num_requests}-{model}"
        request = Request(rid, model, self.args.prompt_tokens, self.args.max_tokens,
                          SLOClass.BATCH_1, SLO(600.0), arrival_at=time.time())
        await store.enqueue(request, prompt=prompt_ids(model, self.args.prompt_tokens,
                                                        self.num_requests),
                            params={"ignore_eos": True})
        await store.set_virtual_queue(WORKER_ID, [store.group_of(request)])
        began = time.time()
        if then is not None:
            await then()
        first: float | None = None
        reader = store.read_tokens(rid, block_ms=50)
        try:
            async with asyncio.timeout(self.budget.within(self.args.round_timeout_s, rid)):
                async for chunk in reader:
                    if first is None and chunk.token_ids:
                        first = time.time()
                    if chunk.final_state is not None:
                        break
        except TimeoutError:
            raise Unavailable(f"{rid}: no end within {self.args.round_timeout_s} s; worker log:"
                              f"\n{self.fleet.processes['swap'].log_path}") from None
        finally:
            await reader.aclose()
        if first is None:
            raise Unavailable(f"{rid} ended without a token")
        return began, first

    async def swaps(self, result: dict[str, Any]) -> None:
        from qlm.bus.producer import BusProducer
        from qlm.bus.records import Event, LsoCommand, lso_command_id
        from qlm.bus.topics import TopicNames
        from qlm.store import RedisQueueStore

        topics = TopicNames(self.args.topic_prefix)
        store = RedisQueueStore.from_url(self.redis_url, group_window_s=600.0)
        swapped: list[Event] = []
        events = asyncio.create_task(self._read_swapped(topics.events, swapped))
        rows: list[dict[str, Any]] = result["swaps"]
        try:
            # the bench stands in for the scheduler: its commands carry the current term's
            # fencing token (a new term when no scheduler ever led), or the worker drops them
            fence = await store.scheduler_fence() or int(
                await store.client.incr(store.keys.scheduler_fence))
            async with BusProducer(self.bootstrap) as producer:
                await self.serve_one(store, self.models[0])  # the awake model serves first
                total = self.args.warmup_swaps + self.args.swaps
                for i in range(total):
                    target = self.models[(i + 1) % 2]

                    async def command(i: int = i, target: str = target) -> None:
                        await producer.publish(topics.lso, LsoCommand(
                            type="swap", command_id=lso_command_id(fence, i), worker=WORKER_ID,
                            issued_at=time.time(), to_model=target, reason="swap_bench"))

                    began, first = await self.serve_one(store, target, command)
                    row = {"round": i, "to_model": target, "warmup": i < self.args.warmup_swaps,
                           "command_to_first_token_s": round(first - began, 4)}
                    rows.append(row)
                    print("SWAP", row, flush=True)
                    self.fleet.check_alive()
            await asyncio.sleep(1.0)  # the last swapped events
        finally:
            events.cancel()
            await store.aclose()
        for row, event in zip(rows, swapped, strict=False):
            if event.model == row["to_model"]:
                row["worker_sleep_wake_s"] = round(event.duration_s or 0.0, 4)

    async def _read_swapped(self, topic: str, into: list[Any]) -> None:
        from aiokafka import AIOKafkaConsumer

        from qlm.bus.records import Event

        consumer = AIOKafkaConsumer(topic, bootstrap_servers=self.bootstrap,
                                    auto_offset_reset="earliest",
                                    group_id=f"swap-bench-{time.time_ns()}")
        await consumer.start()
        try:
            async for message in consumer:
                event = Event.from_json(message.value)
                if event.type == "swapped" and event.worker == WORKER_ID:
                    into.append(event)
        finally:
            await consumer.stop()

    async def cold_restart(self, to_model: str, store: Any) -> dict[str, Any]:
        """Stop the worker, start one holding only ``to_model``, serve one request."""
        stop_at = time.time()
        self.fleet.stop()
        stopped_s = time.time() - stop_at
        await asyncio.sleep(2.0 if self.args.engine == "vllm" else 0.0)  # GPU memory freed
        start_s = await asyncio.to_thread(self.start_worker, [to_model])
        _, first = await self.serve_one(store, to_model)
        return {"to_model": to_model, "stop_s": round(stopped_s, 3),
                "start_s": round(start_s, 3),
                "stop_to_first_token_s": round(first - stop_at, 3)}

    async def cold_restarts(self, result: dict[str, Any]) -> None:
        from qlm.store import RedisQueueStore

        store = RedisQueueStore.from_url(self.redis_url, group_window_s=600.0)
        try:
            for i in range(self.args.cold_restarts):
                row = await self.cold_restart(self.models[i % 2], store)
                result["cold_restarts"].append(row)
                print("COLD", row, flush=True)
        finally:
            await store.aclose()


def summarise(result: dict[str, Any]) -> None:
    measured = [r["command_to_first_token_s"] for r in result["swaps"] if not r["warmup"]]
    worker = [r["worker_sleep_wake_s"] for r in result["swaps"]
              if not r["warmup"] and "worker_sleep_wake_s" in r]
    cold = [r["stop_to_first_token_s"] for r in result["cold_restarts"]]
    result["summary"] = {
        "swap_command_to_first_token": summary(measured) if measured else None,
        "worker_sleep_wake": summary(worker) if worker else None,
        "cold_restart_to_first_token": summary(cold) if cold else None,
        "target_p50_s": TARGET_P50_S,
        "target_met": bool(measured) and percentile(measured, 50) <= TARGET_P50_S,
    }


def run(args: argparse.Namespace, result: dict[str, Any], budget: Budget) -> None:
    from loadgen.demo import fresh_stack

    stack = None
    redis_url, bootstrap = args.redis_url, args.kafka_bootstrap
    fleet = WorkerFleet(args.dir.resolve() / "worker", marker=str(PROFILE_DIR))
    try:
        if not redis_url:
            stack = fresh_stack(args.dir)
            for line in stack.up():
                print(line, flush=True)
            env = stack.environment()
            redis_url, bootstrap = env["QLM_REDIS_URL"], env["QLM_KAFKA_BOOTSTRAP"]
        bench = Bench(args, redis_url, bootstrap, fleet, budget)
        started = time.monotonic()
        bench.start_worker(bench.models)
        result["worker_start_s"] = round(time.monotonic() - started, 1)
        print(f"worker ready in {result['worker_start_s']} s", flush=True)
        asyncio.run(bench.swaps(result))
        asyncio.run(bench.cold_restarts(result))
    finally:
        with stop_signals_deferred():
            for line in fleet.stop():
                print(line, flush=True)
            if stack is not None:
                for line in stack.down():
                    print(line, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    given = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(given)
    budget = Budget(time.monotonic(), args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "device": device_facts(), "engine": args.engine,
        "command": " ".join(["python3 -m loadgen.gpu.swap_bench", *given]),
        "code_version": code_version(args.code_version), "args": vars(args),
        "swaps": [], "cold_restarts": [], "error": None,
    }
    started = time.time()

    def out_of_time(signum: int, frame: Any) -> None:
        raise OutOfTime(f"--budget-s {args.budget_s:g} ran out")

    signal.signal(signal.SIGALRM, out_of_time)
    signal.alarm(max(1, int(args.budget_s - STOP_RESERVE_S)))
    os.environ.update({k: v for k, v in service_env().items() if k == "PYTHONPATH"})
    try:
        if args.engine == "vllm":
            import vllm

            result["vllm_version"] = vllm.__version__
        run(args, result, budget)
    except BaseException as error:  # keep what was measured, say what broke
        result["error"] = "".join(traceback.format_exception(error))[-4000:]
        traceback.print_exc()
    finally:
        signal.alarm(0)
    summarise(result)
    result["total_s"] = round(time.time() - started, 1)
    write_json(out / f"{args.name}.json", result)
    print("SUMMARY", result["summary"], flush=True)
    print("DONE", "ok" if result["error"] is None else "FAILED", result["total_s"],
          f"-> {out / (args.name + '.json')}", flush=True)
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
