"""Keeps the services of a local stack running: a service that dies is started again.

``python -m qlm.localstack.supervisor --dir D --redis-url R --kafka-bootstrap K`` (what
``make up`` starts, as its own process ``supervisor`` next to the services) starts the
services of ``D`` (:meth:`ServiceStack.up`, so they are its children and it learns how
each one exits), then checks them every ``poll_s``:

* a service whose process is gone (each worker is a process of its own, one per GPU) is
  started again after a backoff of
  ``base_s · 2^(n-1)`` seconds (n = deaths in a row, at most ``max_s``); a service that
  stayed up ``stable_s`` seconds starts again from n = 1;
* every death and restart is written to ``D/services/supervisor.json`` (restarts, last
  exit status, when, the next attempt), which ``make status`` prints.

SIGTERM ends the supervisor and leaves the services running; ``make down`` stops the
supervisor first, then the services, so nothing it stops is started again.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from qlm.core.errors import QlmError, Unavailable
from qlm.localstack.services import ServiceStack

STATE_FILE: Final = "supervisor.json"


@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait before restarting a service that died ``num_deaths`` times in a
    row: ``base_s · 2^(n-1)``, at most ``max_s``."""

    base_s: float = 1.0
    max_s: float = 30.0
    stable_s: float = 60.0

    def delay_s(self, num_deaths_in_a_row: int) -> float:
        return min(self.max_s, self.base_s * 2 ** max(0, min(num_deaths_in_a_row - 1, 30)))


@dataclass(slots=True)
class ServiceRecord:
    """What the supervisor knows of one service (a row of ``supervisor.json``)."""

    pid: int | None = None
    restarts: int = 0
    deaths_in_a_row: int = 0
    last_exit: int | str | None = None
    last_exit_at: float | None = None
    started_at: float | None = None
    next_start_at: float | None = None
    last_error: str | None = None


@dataclass
class Supervisor:
    """Restarts the dead services of ``stack`` (module docstring). ``check_once`` is one
    round; ``run`` loops until ``stop()``."""

    stack: ServiceStack
    backoff: Backoff = field(default_factory=Backoff)
    clock: Callable[[], float] = time.time
    poll_s: float = 0.5

    def __post_init__(self) -> None:
        #: By process name (one per service, one per worker).
        self.records: dict[str, ServiceRecord] = {
            name: ServiceRecord() for name in self.stack.process_names()}
        self._stopping = False

    @property
    def state_path(self) -> Path:
        return self.stack.run_dir / STATE_FILE

    def start(self) -> list[str]:
        """Start every service (each ready before the next); returns ``up``'s lines."""
        lines = self.stack.up()
        now = self.clock()
        for name, record in self.records.items():
            record.pid = self.stack.processes[name].running_pid()
            record.started_at = now
        self.write_state("running")
        return lines

    def check_once(self) -> None:
        """Note the services that died; start again those whose backoff has passed."""
        now = self.clock()
        for name in self.stack.process_names():
            record = self.records.setdefault(name, ServiceRecord())
            process = self.stack.processes[name]
            if process.running_pid() is not None:
                if record.started_at is not None and now - record.started_at >= (
                        self.backoff.stable_s):
                    record.deaths_in_a_row = 0
                continue
            if record.next_start_at is None:  # died since the last round
                status = process.exited_with()
                record.last_exit = status if status is not None else "unknown"
                record.last_exit_at = now
                record.deaths_in_a_row += 1
                record.pid = None
                record.next_start_at = now + self.backoff.delay_s(record.deaths_in_a_row)
                self.write_state("running")
            if now >= record.next_start_at:
                self._restart(name, record)

    def _restart(self, name: str, record: ServiceRecord) -> None:
        process = self.stack.processes[name]
        process.stop(timeout_s=1.0, kill=True)  # forget the old pid file
        try:
            self.stack.start_one(name)
        except QlmError as error:
            record.last_error = str(error)[:500]
            record.last_exit = process.exited_with() if process.exited_with() is not None else (
                record.last_exit)
            record.deaths_in_a_row += 1
            record.next_start_at = self.clock() + self.backoff.delay_s(record.deaths_in_a_row)
        else:
            record.restarts += 1
            record.pid = process.running_pid()
            record.started_at = self.clock()
            record.next_start_at = None
            record.last_error = None
        self.write_state("running")

    def write_state(self, phase: str) -> None:
        state = {"phase": phase, "pid": _own_pid(), "at": self.clock(),
                 "backoff": asdict(self.backoff),
                 "services": {name: asdict(r) for name, r in self.records.items()}}
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_path)  # readers never see half a file

    def run(self) -> None:
        while not self._stopping:
            self.check_once()
            time.sleep(self.poll_s)
        self.write_state("stopped")

    def stop(self) -> None:
        self._stopping = True


def _own_pid() -> int:
    import os

    return os.getpid()


def read_state(run_dir: Path) -> Mapping[str, Any] | None:
    """The supervisor's last state file in ``run_dir`` (None when there is none)."""
    try:
        data = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(record: Mapping[str, Any] | None) -> str:
    """``restarts N, last exit S`` for ``make status``."""
    if not record:
        return "not supervised"
    text = f"restarts {record.get('restarts', 0)}"
    if record.get("last_exit") is not None:
        at = record.get("last_exit_at")
        when = time.strftime("%H:%M:%S", time.localtime(at)) if at else "?"
        text += f", last exit {record['last_exit']} at {when}"
    if record.get("next_start_at"):
        text += f", next start in {max(0.0, record['next_start_at'] - time.time()):.0f} s"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlm.localstack.supervisor")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--kafka-bootstrap", required=True)
    parser.add_argument("--backoff-base-s", type=float, default=1.0)
    parser.add_argument("--backoff-max-s", type=float, default=30.0)
    args = parser.parse_args(argv)
    stack = ServiceStack.recorded(args.dir, args.redis_url, args.kafka_bootstrap)
    # the broker users an earlier up made: each service it starts gets its own credentials
    from qlm.localstack.stack import LocalStack, StackPorts

    brokers = LocalStack.open(args.dir, StackPorts(0, 0, 0),
                              secure=(args.dir / "kafka" / "users.json").exists())
    stack.redis_users, stack.kafka_users = brokers.redis_users, brokers.kafka_users
    supervisor = Supervisor(stack, Backoff(args.backoff_base_s, args.backoff_max_s))
    signal.signal(signal.SIGTERM, lambda *_: supervisor.stop())
    signal.signal(signal.SIGINT, lambda *_: supervisor.stop())
    try:
        for line in supervisor.start():
            print(line, flush=True)
    except Unavailable as error:
        supervisor.write_state(f"failed: {error}"[:2000])
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    supervisor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
