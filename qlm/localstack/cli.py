"""Command line of the local broker stack (``make up`` / ``make down`` / ``make kafka-jars``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from qlm.core.errors import QlmError
from qlm.localstack.kafka import (
    DEFAULT_CONTROLLER_PORT,
    DEFAULT_KAFKA_PORT,
    fetch_kafka_jars,
    kafka_version,
)
from qlm.localstack.redis import DEFAULT_REDIS_PORT
from qlm.localstack.stack import LocalStack, StackPorts


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
    return parser


def run(args: argparse.Namespace) -> int:
    """Carry out one command; prints what it did. Returns the exit status."""
    if args.command == "fetch-jars":
        started_at = time.monotonic()
        libs = fetch_kafka_jars()
        print(f"kafka {kafka_version()} jars in {libs} ({time.monotonic() - started_at:.1f} s)")
        return 0
    stack = LocalStack.open(
        args.dir, StackPorts(args.redis_port, args.kafka_port, args.controller_port)
    )
    if args.command == "up":
        for line in stack.up():
            print(line)
        print(f"environment: {stack.stack_dir / 'stack.env'}")
        return 0
    if args.command == "down":
        for line in stack.down():
            print(line)
        return 0
    num_down = 0
    for status in stack.status():
        state = f"pid {status.pid}" if status.pid is not None else "not running"
        answers = "answers" if status.answers else "no answer"
        print(f"{status.name:6} {status.address:28} {state:14} {answers}")
        num_down += status.pid is None
    return 0 if num_down == 0 else 3


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; errors become one line on stderr and status 1."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except QlmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
