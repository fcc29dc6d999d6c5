"""Command line of the local stack (``make up`` / ``make down`` / ``make kafka-jars``).

``up`` starts Redis and Kafka, then the four services (estimator, ingest, scheduler with
``--policy``, simulated workers from ``--workers-file``) unless ``--brokers-only``, and
writes how to reach them to ``<dir>/stack.env`` (``QLM_INGEST_ADDR`` for gRPC,
``QLM_OPENAI_BASE_URL`` for the OpenAI-compatible front door, ending in ``/v1``);
``down`` stops the services first, then the brokers; ``status`` lists all of them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from qlm.core.errors import QlmError, Unavailable
from qlm.localstack.kafka import (
    DEFAULT_CONTROLLER_PORT,
    DEFAULT_KAFKA_PORT,
    fetch_kafka_jars,
    kafka_version,
)
from qlm.localstack.process import ServerProcess
from qlm.localstack.redis import DEFAULT_REDIS_PORT
from qlm.localstack.services import (
    DEFAULT_WORKERS_FILE,
    POLICIES,
    ServiceOptions,
    ServiceStack,
)
from qlm.localstack.stack import LocalStack, StackPorts
from qlm.localstack.supervisor import STATE_FILE, describe, read_state


def _port_from_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"{name}: must be an integer port, got {raw!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """Flags: ``--dir`` and the ports (0 = any free port; environment variables as defaults)."""
    parser = argparse.ArgumentParser(prog="python -m qlm.localstack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "fetch-jars"])
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(os.environ.get("QLM_DIR", ".qlm")),
        help="where data, logs and pid files live (default .qlm, env QLM_DIR)",
    )
    parser.add_argument(
        "--redis-port", type=int, default=_port_from_env("QLM_REDIS_PORT", DEFAULT_REDIS_PORT)
    )
    parser.add_argument(
        "--kafka-port", type=int, default=_port_from_env("QLM_KAFKA_PORT", DEFAULT_KAFKA_PORT)
    )
    parser.add_argument(
        "--controller-port",
        type=int,
        default=_port_from_env("QLM_KAFKA_CONTROLLER_PORT", DEFAULT_CONTROLLER_PORT),
    )
    parser.add_argument("--policy", choices=POLICIES,
                        default=os.environ.get("QLM_POLICY", "qlm"), help="scheduler policy")
    parser.add_argument("--workers-file", type=Path, default=DEFAULT_WORKERS_FILE,
                        help="YAML of the simulated workers (GPU type and models per worker)")
    parser.add_argument("--time-scale", type=float, default=1.0,
                        help="simulated workers run this many times faster than their GPUs")
    parser.add_argument("--admission", default="interactive=reject",
                        help="ingest's admission rules per class")
    parser.add_argument("--brokers-only", action="store_true",
                        help="up: start Redis and Kafka only")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS, no API keys, no broker users (default: TLS on every gRPC "
                        "listener with a local CA under <dir>/tls, a development tenant's key, "
                        "Redis ACL users and Kafka SASL/SCRAM with ACLs)")
    return parser


def service_stack(args: argparse.Namespace, stack: LocalStack) -> ServiceStack:
    """The services of ``args.dir``: as recorded by an earlier ``up``, else from the flags."""
    env = stack.environment()
    recorded = ServiceStack.recorded(args.dir, env["QLM_REDIS_URL"], env["QLM_KAFKA_BOOTSTRAP"])
    recorded.prefer_standard_ports = True  # ingest on 50051 when free: the client's default
    recorded.redis_users, recorded.kafka_users = stack.redis_users, stack.kafka_users
    if args.command == "up" and all(s.pid is None for s in recorded.status()):
        recorded.options = ServiceOptions(
            policy=args.policy, workers_file=args.workers_file, time_scale=args.time_scale,
            admission=args.admission, secure=not args.insecure)
    return recorded


def run(args: argparse.Namespace) -> int:
    """Carry out one command; prints what it did. Returns the exit status."""
    if args.command == "fetch-jars":
        started_at = time.monotonic()
        libs = fetch_kafka_jars()
        print(f"kafka {kafka_version()} jars in {libs} ({time.monotonic() - started_at:.1f} s)")
        return 0
    stack = LocalStack.open(
        args.dir, StackPorts(args.redis_port, args.kafka_port, args.controller_port),
        # down/status: secure when an earlier up made broker users
        secure=(not args.insecure if args.command == "up"
                else (args.dir / "kafka" / "users.json").exists()),
    )
    services = service_stack(args, stack)
    if args.command == "up":
        for line in stack.up():
            print(line, flush=True)
        if not args.brokers_only:
            for line in supervised_up(services):
                print(line, flush=True)
            client_env = {"QLM_INGEST_ADDR": services.ingest_addr,
                          "QLM_OPENAI_BASE_URL": services.openai_base_url,
                          "QLM_TARGET": services.ingest_addr, **services.client_environment()}
            with (stack.stack_dir / "stack.env").open("a") as env:
                env.writelines(f"{key}={value}\n" for key, value in client_env.items())
        print(f"environment: {stack.stack_dir / 'stack.env'}")
        return 0
    if args.command == "down":
        stopped = supervisor_process(services).stop(timeout_s=10)
        print(f"{'supervisor':10} {'stopped' if stopped else 'was not running'}")
        for line in [*services.down(), *stack.down()]:
            print(line)
        return 0
    num_down = 0
    for status in stack.status():
        state = f"pid {status.pid}" if status.pid is not None else "not running"
        answers = "answers" if status.answers else "no answer"
        print(f"{status.name:6} {status.address:28} {state:14} {answers}")
        num_down += status.pid is None
    supervisor_pid = supervisor_process(services).running_pid()
    print(f"{'supervisor':18} {f'pid {supervisor_pid}' if supervisor_pid else 'not running'}")
    supervised = (read_state(services.run_dir) or {}).get("services", {})
    for service in services.status():
        state = f"pid {service.pid}" if service.pid is not None else "not running"
        ready = "ready" if service.ready else "not ready"
        print(f"{service.name:18} {state:14} {ready:9} {service.detail:40} "
              f"{describe(supervised.get(service.name)) if supervisor_pid else ''}".rstrip())
    return 0 if num_down == 0 else 3


def supervisor_process(services: ServiceStack) -> ServerProcess:
    """The supervisor of ``services`` (:mod:`qlm.localstack.supervisor`)."""
    # its command line names the stack directory (--dir), the marker of its pid file
    return ServerProcess("supervisor", services.run_dir, str(services.stack_dir))


def supervised_up(services: ServiceStack, timeout_s: float = 300.0) -> list[str]:
    """Start the supervisor, which starts the services; returns once every one is ready
    (Unavailable with the supervisor's log when one is not)."""
    process = supervisor_process(services)
    if process.running_pid() is not None:
        return [*services.up(), f"supervisor already running (pid {process.running_pid()})"]
    services.prepare()
    (services.run_dir / STATE_FILE).unlink(missing_ok=True)
    process.start([sys.executable, "-m", "qlm.localstack.supervisor", "--dir",
                   str(services.stack_dir), "--redis-url", services.redis_url,
                   "--kafka-bootstrap", services.kafka_bootstrap], env=services.env())

    def started() -> bool:
        phase = str((read_state(services.run_dir) or {}).get("phase", ""))
        if phase.startswith("failed"):
            raise Unavailable(f"the supervisor could not start the services: {phase}")
        return phase == "running"

    process.wait_until(started, timeout_s, "services ready")
    lines = [f"{s.name:9} pid {s.pid} {'ready' if s.ready else 'not ready'} ({s.detail})"
             for s in services.status()]
    return [*lines, f"supervisor pid {process.running_pid()} restarts a service that dies"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; errors become one line on stderr and status 1."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except QlmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
