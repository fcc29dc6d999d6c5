"""The four qlm services as local processes: estimator, ingest, scheduler, simulated workers.

:class:`ServiceStack` starts them under ``<dir>/services`` (one pid file and one log per
process, ``services.json`` with their ports) against an already running Redis + Kafka,
and waits until each is ready. Each worker of the workers file runs in a process of its
own, ``worker-<id>`` (one per GPU, as on a GPU host: one crash takes one GPU).

* ingest, estimator, worker: the standard ``grpc.health.v1`` check answers SERVING;
* scheduler (no gRPC server): its Prometheus endpoint says ``qlm_scheduler_is_leader 1``.

Start order: estimator → ingest (asks the estimator for predicted waits) → scheduler
→ workers; ``down`` stops them in the reverse order (workers drain first).

**Time scale.** With ``time_scale = X`` the simulated workers run X times faster than
the GPUs of their profiles (``--time-scale X``). The scheduler, the estimator and ingest
then read a copy of the profiles with every time divided by X (``<dir>/services/profiles``,
:func:`scaled_profile_json`), so that their predictions are in the same wall-clock
seconds the workers take. A client that wants the SLOs of the paper's time divides
them by X too (``ttft_slo_s``). With X = 1 the copy equals the profiles.

Process management and I/O only; nothing in ``qlm.core`` depends on this module.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qlm.core.errors import InvalidInput, Unavailable
from qlm.core.perf import PROFILE_DIR
from qlm.core.policies.base import check_policy_options
from qlm.localstack.kafka import KafkaUsers
from qlm.localstack.process import (
    PortTaken,
    ServerProcess,
    ensure_port_free,
    free_loopback_port,
    port_is_open,
)
from qlm.localstack.redis import RedisUsers
from qlm.roster import read_workers_file
from qlm.tls import LocalPki, ensure_local_pki

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
DEFAULT_WORKERS_FILE: Final = REPO_ROOT / "docker" / "workers.cpu.yaml"
SERVICES_FILE: Final = "services.json"
SERVICE_NAMES: Final = ("estimator", "ingest", "scheduler", "worker")
#: Process name of one worker: ``worker-<worker id>`` (one process per GPU).
WORKER_PREFIX: Final = "worker-"


def kind_of(process_name: str) -> str:
    """The service a process belongs to: ``worker`` for every ``worker-<id>``."""
    return "worker" if process_name.startswith(WORKER_PREFIX) else process_name
#: The ingest port a client tries first; another free port when it is taken.
PREFERRED_INGEST_PORT: Final = 50051
#: The HTTP (OpenAI-compatible) port a client tries first, likewise.
PREFERRED_HTTP_PORT: Final = 8000
START_TIMEOUT_S: Final = 90.0
#: How many times ``ServiceStack.up`` chooses a port again that another process took.
PORT_ATTEMPTS: Final = 3
DEV_TENANT: Final = "dev"
POLICIES: Final = ("qlm", "fcfs", "edf", "shepherd", "priority", "static", "vllm-swap")


@dataclass(frozen=True, slots=True)
class ServiceOptions:
    """How the services run. Validated on construction (InvalidInput names the field).

    * ``policy``: the scheduler's policy; ``policy_options``: its options (JSON object);
    * ``workers_file``: YAML ``{"workers": [{id, gpu, models}, ...]}`` of simulated workers;
    * ``time_scale``: the workers run this many times faster than their GPUs (see module);
    * ``admission``: ingest's per-class admission rules (``interactive=reject`` ...);
    * ``group_window_s``, ``tick_s``: ingest's group window, the scheduler's tick (wall s);
    * ``debounce_s``: how long the scheduler gathers events before deciding (wall s);
    * ``shutdown_grace_s``: how long a stopping service may finish in-flight work;
    * ``topic_prefix``: prefix of every Kafka topic (tests: unique per test);
    * ``secure``: TLS on every gRPC listener and on the HTTP front door (a local CA and
      certificates under ``<dir>/tls``, :func:`qlm.tls.ensure_local_pki`) and API keys
      required by ingest,
      with a development tenant whose key is in ``<dir>/services/dev.key``
      (``make up`` turns it on).
    """

    policy: str = "qlm"
    policy_options: Mapping[str, Any] = field(default_factory=dict)
    workers_file: Path = DEFAULT_WORKERS_FILE
    time_scale: float = 1.0
    admission: str = "interactive=reject"
    group_window_s: float = 1.0
    tick_s: float = 1.0
    debounce_s: float = 0.02
    shutdown_grace_s: float = 2.0
    log_level: str = "info"
    topic_prefix: str = ""
    secure: bool = False

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            allowed = ", ".join(POLICIES)
            raise InvalidInput("policy", f"must be one of {allowed}, got {self.policy!r}")
        for name in ("time_scale", "group_window_s", "tick_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise InvalidInput(name, f"must be a finite number > 0, got {value!r}")
        if not self.shutdown_grace_s >= 0:
            raise InvalidInput("shutdown_grace_s", "must be >= 0")
        if not (math.isfinite(self.debounce_s) and self.debounce_s >= 0):
            raise InvalidInput("debounce_s",
                               f"must be a finite number >= 0, got {self.debounce_s!r}")
        if not isinstance(self.policy_options, Mapping):
            raise InvalidInput("policy_options", "must be a JSON object")
        check_policy_options(self.policy, self.policy_options)  # names the bad option
        read_workers_file(self.workers_file)  # InvalidInput names the bad entry

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["workers_file"] = str(self.workers_file)
        d["policy_options"] = dict(self.policy_options)
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServiceOptions:
        return cls(**{**data, "workers_file": Path(data["workers_file"])})


@dataclass(frozen=True, slots=True)
class ServicePorts:
    """Loopback ports of one service set (0 = not chosen yet). ``workers`` holds
    ``(worker id, health port, metrics port)`` of each worker process."""

    ingest: int = 0
    estimator: int = 0
    estimator_metrics: int = 0
    scheduler_metrics: int = 0
    ingest_metrics: int = 0
    #: The OpenAI-compatible HTTP front door (served by the ingest process).
    http: int = 0
    workers: tuple[tuple[str, int, int], ...] = ()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServicePorts:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["workers"] = tuple((str(w), int(h), int(m)) for w, h, m in data.get("workers", ()))
        return cls(**known)

    def of_worker(self, worker_id: str) -> tuple[int, int]:
        """(health port, metrics port) of one worker process (0, 0 when not chosen)."""
        for found, health, metrics in self.workers:
            if found == worker_id:
                return health, metrics
        return 0, 0

    def without(self, port: int) -> ServicePorts:
        """These ports with ``port`` unchosen (0) wherever it stands."""
        fields = {name: 0 if getattr(self, name) == port else getattr(self, name)
                  for name in ("ingest", "estimator", "estimator_metrics", "scheduler_metrics",
                               "ingest_metrics", "http")}
        workers = tuple((w, 0 if h == port else h, 0 if m == port else m)
                        for w, h, m in self.workers)
        return ServicePorts(**fields, workers=workers)

    def resolved(self, prefer_standard: bool = False,
                 worker_ids: tuple[str, ...] = ()) -> ServicePorts:
        """Every 0 replaced by a free port, and ports for every worker of ``worker_ids``;
        with ``prefer_standard``, ingest gets 50051 and the HTTP front door 8000 (what
        clients try first) when those are free."""
        chosen: dict[str, Any] = {}
        for name in ("ingest", "estimator", "estimator_metrics", "scheduler_metrics",
                     "ingest_metrics", "http"):
            port = getattr(self, name)
            if port:
                chosen[name] = port
            elif (prefer_standard and name == "ingest"
                  and not port_is_open("127.0.0.1", PREFERRED_INGEST_PORT)):
                chosen[name] = PREFERRED_INGEST_PORT
            elif (prefer_standard and name == "http"
                  and not port_is_open("127.0.0.1", PREFERRED_HTTP_PORT)):
                chosen[name] = PREFERRED_HTTP_PORT
            else:
                chosen[name] = free_loopback_port()
        workers = []
        for worker_id in worker_ids:
            health, metrics = self.of_worker(worker_id)
            workers.append((worker_id, health or free_loopback_port(),
                            metrics or free_loopback_port()))
        chosen["workers"] = tuple(workers)
        return ServicePorts(**chosen)


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """What ``status`` reports for one service."""

    name: str
    pid: int | None
    ready: bool
    detail: str = ""


@dataclass
class ServiceStack:
    """The services of one stack directory, talking to ``redis_url`` and ``kafka_bootstrap``."""

    stack_dir: Path
    redis_url: str
    kafka_bootstrap: str
    options: ServiceOptions = field(default_factory=ServiceOptions)
    ports: ServicePorts = field(default_factory=ServicePorts)
    python: str = sys.executable
    prefer_standard_ports: bool = False
    #: Where the profiles the services read (scaled by the time scale) are copied from.
    profiles_source: Path = PROFILE_DIR
    #: Broker users (``make up``): each service connects as ``qlm-<name>`` with its own
    #: password, passed in its environment (not on its command line).
    redis_users: RedisUsers | None = None
    kafka_users: KafkaUsers | None = None

    def __post_init__(self) -> None:
        self.stack_dir = self.stack_dir.resolve()
        self.run_dir = self.stack_dir / "services"
        self._processes: dict[str, ServerProcess] = {}

    # ---------------------------------------------------------------- processes
    @property
    def worker_ids(self) -> tuple[str, ...]:
        return tuple(w.id for w in read_workers_file(self.options.workers_file))

    def process_names(self) -> tuple[str, ...]:
        """One process per service, and one per worker (per GPU): ``worker-<id>``."""
        return (*(n for n in SERVICE_NAMES if n != "worker"),
                *(f"{WORKER_PREFIX}{w}" for w in self.worker_ids))

    @property
    def processes(self) -> dict[str, ServerProcess]:
        """The processes of :meth:`process_names`, by name (each object kept across calls:
        it remembers the exit status of what it started)."""
        for name in self.process_names():
            if name not in self._processes:
                self._processes[name] = ServerProcess(name, self.run_dir, str(self.run_dir))
        return {name: self._processes[name] for name in self.process_names()}

    # ---------------------------------------------------------------- files
    @property
    def profiles_dir(self) -> Path:
        return self.run_dir / "profiles"

    @property
    def workers_copy(self) -> Path:
        return self.run_dir / "workers.yaml"

    @property
    def workers_dir(self) -> Path:
        return self.run_dir / "workers"

    @property
    def ingest_addr(self) -> str:
        return f"127.0.0.1:{self.ports.ingest}"

    @property
    def openai_base_url(self) -> str:
        """Base URL of the OpenAI-compatible front door (what ``openai.OpenAI`` takes):
        ``https`` when the stack is secure (the certificate names 127.0.0.1; clients trust
        ``QLM_TLS_CA``)."""
        scheme = "https" if self.options.secure else "http"
        return f"{scheme}://127.0.0.1:{self.ports.http}/v1"

    @classmethod
    def recorded(cls, stack_dir: Path, redis_url: str, kafka_bootstrap: str) -> ServiceStack:
        """The services an earlier ``up`` recorded in ``stack_dir`` (defaults when none)."""
        path = stack_dir.resolve() / "services" / SERVICES_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return cls(stack_dir, redis_url, kafka_bootstrap)
        return cls(stack_dir, redis_url, kafka_bootstrap,
                   ServiceOptions.from_json(data["options"]), ServicePorts.from_json(data["ports"]))

    def _write_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.options.workers_file, self.workers_copy)
        self.workers_dir.mkdir(exist_ok=True)
        for worker in read_workers_file(self.workers_copy):  # one file per worker process
            (self.workers_dir / f"{worker.id}.yaml").write_text(yaml.safe_dump(
                {"workers": [{"id": worker.id, "gpu": worker.gpu,
                              "models": list(worker.models)}]}))
        write_scaled_profiles(self.profiles_source, self.profiles_dir, self.options.time_scale)
        record = {"options": self.options.to_json(), "ports": asdict(self.ports),
                  "ingest_addr": self.ingest_addr, "openai_base_url": self.openai_base_url}
        (self.run_dir / SERVICES_FILE).write_text(json.dumps(record, indent=2) + "\n")

    # ---------------------------------------------------------------- argv
    @property
    def pki(self) -> LocalPki:
        return LocalPki(self.stack_dir / "tls")

    @property
    def dev_key_file(self) -> Path:
        return self.run_dir / "dev.key"

    def client_environment(self) -> dict[str, str]:
        """What a client of these services needs (``QLM_API_KEY``, ``QLM_TLS_CA``)."""
        if not self.options.secure:
            return {}
        return {"QLM_API_KEY": self.dev_key_file.read_text().strip(),
                "QLM_TLS_CA": str(self.pki.ca), "QLM_TENANT": DEV_TENANT}

    def _common(self) -> list[str]:
        tls = (["--tls-cert-file", str(self.pki.server_cert),
                "--tls-key-file", str(self.pki.server_key), "--tls-ca-file", str(self.pki.ca)]
               if self.options.secure else [])
        redis = [] if self.redis_users is not None else ["--redis-url", self.redis_url]
        return [*redis, "--kafka-bootstrap", self.kafka_bootstrap,
                "--log-level", self.options.log_level, "--topic-prefix", self.options.topic_prefix,
                *tls]

    def _secure_files(self) -> None:
        """The local CA and certificates, and the development tenant's key."""
        ensure_local_pki(self.pki.directory)
        self.dev_key_file.write_text(ensure_dev_tenant(self.redis_url, self.dev_key_file) + "\n")
        self.dev_key_file.chmod(0o600)

    def argv(self, name: str) -> list[str]:
        """The command line of one service (the run directory appears in each: pid marker)."""
        o, p = self.options, self.ports
        module = [self.python, "-m", f"services.{name}"]
        if name == "estimator":
            return [*module, *self._common(), "--host", "127.0.0.1", "--port", str(p.estimator),
                    "--metrics-port", str(p.estimator_metrics),
                    "--profiles-dir", str(self.profiles_dir),
                    "--workers-file", str(self.workers_copy), "--policy", o.policy,
                    "--shutdown-grace-s", str(o.shutdown_grace_s)]
        if name == "ingest":
            return [*module, *self._common(), "--host", "127.0.0.1", "--port", str(p.ingest),
                    "--profiles-dir", str(self.profiles_dir),
                    "--metrics-port", str(p.ingest_metrics),
                    "--http-host", "127.0.0.1", "--http-port", str(p.http),
                    "--estimator-addr", f"127.0.0.1:{p.estimator}",
                    "--admission", o.admission,
                    "--auth", "required" if o.secure else "off",
                    "--group-window-s", str(o.group_window_s),
                    "--shutdown-grace-s", str(o.shutdown_grace_s)]
        if name == "scheduler":
            return [*module, *self._common(), "--policy", o.policy, "--host", "127.0.0.1",
                    "--metrics-port", str(p.scheduler_metrics),
                    "--profiles-dir", str(self.profiles_dir),
                    "--workers-file", str(self.workers_copy),
                    "--tick-s", str(o.tick_s), "--debounce-s", str(o.debounce_s),
                    *(["--policy-options", json.dumps(dict(o.policy_options))]
                      if o.policy_options else [])]
        if kind_of(name) == "worker":
            worker_id = name.removeprefix(WORKER_PREFIX)
            health, metrics = p.of_worker(worker_id)
            # the unscaled profiles: a simulated worker divides its times by the time scale
            return [self.python, "-m", "services.worker", *self._common(), "--engine", "sim",
                    "--workers-file", str(self.workers_dir / f"{worker_id}.yaml"),
                    "--profiles-dir", str(self.profiles_source),
                    "--time-scale", str(o.time_scale), "--host", "127.0.0.1",
                    "--health-port", str(health), "--metrics-port", str(metrics),
                    "--shutdown-grace-s", str(o.shutdown_grace_s)]
        raise InvalidInput("service", f"unknown {name!r}; expected one of {SERVICE_NAMES}")

    def env(self, name: str | None = None) -> dict[str, str]:
        """The environment of process ``name`` (None: a process of the stack that is no
        service, the supervisor): the repository on PYTHONPATH, the service's broker
        credentials and no client's."""
        env = dict(os.environ)
        path = env.get("PYTHONPATH", "")
        env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
        for key in [k for k in env if k.startswith(("QLM_KAFKA_S", "QLM_REDIS_URL"))]:
            del env[key]  # a client's credentials must not leak into a service
        if name is not None:
            env.update(self.broker_environment(f"qlm-{kind_of(name)}"))
        return env

    def broker_environment(self, user: str) -> dict[str, str]:
        """``QLM_REDIS_URL`` and ``QLM_KAFKA_*`` of one broker user (empty without users)."""
        env: dict[str, str] = {}
        if self.redis_users is not None and user in self.redis_users.passwords:
            where = urlsplit(self.redis_url)
            env["QLM_REDIS_URL"] = self.redis_users.url(user, where.hostname or "127.0.0.1",
                                                        where.port or 6379)
        if self.kafka_users is not None and user in self.kafka_users.passwords:
            auth = self.kafka_users.auth(user)
            env.update(QLM_KAFKA_SECURITY_PROTOCOL=auth.security_protocol,
                       QLM_KAFKA_SASL_MECHANISM=str(auth.sasl_mechanism),
                       QLM_KAFKA_SASL_USERNAME=user, QLM_KAFKA_SASL_PASSWORD=str(auth.password))
        return env

    # ---------------------------------------------------------------- readiness
    def is_ready(self, name: str) -> bool:
        """Whether the service answers as ready (module docstring)."""
        p = self.ports
        if name == "scheduler":
            return scheduler_is_leader(p.scheduler_metrics)
        if kind_of(name) == "worker":
            port = p.of_worker(name.removeprefix(WORKER_PREFIX))[0]
        else:
            port = {"estimator": p.estimator, "ingest": p.ingest}[name]
        return grpc_serving(f"127.0.0.1:{port}",
                            ca=self.pki.ca if self.options.secure else None)

    # ---------------------------------------------------------------- lifecycle
    def up(self, names: tuple[str, ...] = SERVICE_NAMES) -> list[str]:
        """Start every service of ``names`` that is not running, in the order of
        :data:`SERVICE_NAMES`, each ready before the next (leave ``"worker"`` out to run
        workers of another kind, e.g. one vLLM worker per GPU).

        A service that does not become ready is stopped, with its log's tail in the
        Unavailable raised; the ones started before it keep running (``down`` stops them).
        A port chosen by this call and taken by another process before its service bound
        it is chosen again (everything started is stopped first), up to PORT_ATTEMPTS times.
        """
        for attempt in range(1, PORT_ATTEMPTS + 1):
            chose = self.prepare()
            try:
                return [self.start_one(name) for name in self.process_names()
                        if kind_of(name) in names]
            except PortTaken as taken:
                if not chose or attempt == PORT_ATTEMPTS:
                    raise
                self.down()
                self.ports = self.ports.without(taken.port)
        raise AssertionError("unreachable")

    def prepare(self) -> bool:
        """When no service runs: choose the ports and write the run directory's files
        (``services.json``, the workers and profiles the services read). Whether it did."""
        if any(p.running_pid() is not None for p in self.processes.values()):
            return False
        self.ports = self.ports.resolved(self.prefer_standard_ports, self.worker_ids)
        self._write_files()
        if self.options.secure:
            self._secure_files()
        return True

    def start_one(self, name: str, timeout_s: float = START_TIMEOUT_S) -> str:
        """Start one service (unless running) and wait until it is ready."""
        process = self.processes[name]
        if process.running_pid() is not None:
            return f"{name:9} already running (pid {process.running_pid()})"
        for port in self.ports_of(name):  # else a health check could reach another process
            ensure_port_free("127.0.0.1", port, name)
        pid = process.start(self.argv(name), env=self.env(name))
        try:
            seconds = process.wait_until(
                lambda: process.running_pid() is not None and self.is_ready(name),
                timeout_s, "ready")
        except Unavailable:
            process.stop(timeout_s=2.0, kill=True)
            raise
        return f"{name:9} pid {pid} ready in {seconds:.1f} s ({self.describe(name)})"

    def ports_of(self, name: str) -> tuple[int, ...]:
        """The ports one service listens on."""
        p = self.ports
        if kind_of(name) == "worker":
            return p.of_worker(name.removeprefix(WORKER_PREFIX))
        return {"estimator": (p.estimator, p.estimator_metrics),
                "ingest": (p.ingest, p.ingest_metrics, p.http),
                "scheduler": (p.scheduler_metrics,)}[name]

    def describe(self, name: str) -> str:
        p, o = self.ports, self.options
        if kind_of(name) == "worker":
            worker_id = name.removeprefix(WORKER_PREFIX)
            gpu = next((w.gpu for w in read_workers_file(o.workers_file) if w.id == worker_id),
                       "?")
            return (f"simulated {gpu}, time scale {o.time_scale:g}, metrics "
                    f":{p.of_worker(worker_id)[1]}")
        return {
            "estimator": f"grpc 127.0.0.1:{p.estimator}",
            "ingest": f"grpc {self.ingest_addr}, OpenAI HTTP {self.openai_base_url}",
            "scheduler": f"policy {o.policy}, metrics :{p.scheduler_metrics}",
        }[name]

    def restart_one(self, name: str, options: ServiceOptions | None = None) -> str:
        """Stop one service and start it again (with new options, e.g. another policy)."""
        self.processes[name].stop(timeout_s=self.options.shutdown_grace_s + 10)
        if options is not None:
            self.options = options
            self._write_files()
        return self.start_one(name)

    def down(self) -> list[str]:
        """Stop workers, scheduler, ingest, estimator (SIGTERM, SIGKILL after the grace)."""
        lines = []
        for name in reversed(self.process_names()):
            stopped = self.processes[name].stop(timeout_s=self.options.shutdown_grace_s + 10)
            lines.append(f"{name:9} {'stopped' if stopped else 'was not running'}")
        return lines

    def status(self) -> list[ServiceStatus]:
        out = []
        for name in self.process_names():
            pid = self.processes[name].running_pid()
            ready = pid is not None and self.ports.ingest != 0 and self.is_ready(name)
            out.append(ServiceStatus(name, pid, ready, self.describe(name) if pid else ""))
        return out

    def log_path(self, name: str) -> Path:
        return self.processes[name].log_path


# -------------------------------------------------------------------- checks
def grpc_serving(target: str, timeout_s: float = 1.0, ca: Path | None = None) -> bool:
    """Whether ``grpc.health.v1.Health/Check`` (service "") answers SERVING (over TLS
    trusting ``ca`` when given)."""
    try:
        with (grpc.secure_channel(target, grpc.ssl_channel_credentials(ca.read_bytes()))
              if ca is not None else grpc.insecure_channel(target)) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def scheduler_is_leader(metrics_port: int, timeout_s: float = 1.0) -> bool:
    """Whether the scheduler's Prometheus endpoint reports ``qlm_scheduler_is_leader 1``."""
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{metrics_port}/metrics", timeout=timeout_s
        ) as reply:
            text = reply.read().decode()
    except OSError:
        return False
    return any(line.startswith("qlm_scheduler_is_leader ") and float(line.split()[1]) >= 1
               for line in text.splitlines())


# -------------------------------------------------------------------- profiles
#: Every key of a profile JSON whose value is seconds (see qlm.core.perf).
_TIME_FIELDS: Final[tuple[tuple[str, ...], ...]] = (
    ("decode", "base_s"), ("decode", "per_seq_s"), ("decode", "per_ctx_token_s"),
    ("swap", "sleep_s"), ("swap", "wake_s"), ("cold_load_s",),
)


def scaled_profile_json(data: Mapping[str, Any], time_scale: float) -> dict[str, Any]:
    """A profile (JSON form) of a GPU ``time_scale`` times faster: every time divided by it.

    Prefill seconds, decode step coefficients, sleep/wake and cold-load times scale;
    token counts (KV capacity, batch and length limits) do not.
    """
    if not time_scale > 0:
        raise InvalidInput("time_scale", f"must be > 0, got {time_scale}")
    out: dict[str, Any] = json.loads(json.dumps(data))
    out["prefill"]["seconds"] = [s / time_scale for s in data["prefill"]["seconds"]]
    for path in _TIME_FIELDS:
        holder: Any = out
        for key in path[:-1]:
            holder = holder.get(key) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and isinstance(holder.get(path[-1]), int | float):
            holder[path[-1]] = holder[path[-1]] / time_scale
    if time_scale != 1:
        out["source"] = f"{data.get('source', '')} [times / {time_scale:g}]"
    return out


def write_scaled_profiles(source: Path, target: Path, time_scale: float) -> int:
    """Write every ``*.json`` profile of ``source`` into ``target``, scaled; returns how many."""
    target.mkdir(parents=True, exist_ok=True)
    num = 0
    for path in sorted(source.glob("*.json")):
        data = json.loads(path.read_text())
        (target / path.name).write_text(json.dumps(scaled_profile_json(data, time_scale),
                                                   indent=1) + "\n")
        num += 1
    return num


def with_policy(options: ServiceOptions, policy: str) -> ServiceOptions:
    """The same options with another scheduler policy."""
    return replace(options, policy=policy)


__all__ = [
    "DEFAULT_WORKERS_FILE",
    "ServiceOptions",
    "ServicePorts",
    "ServiceStack",
    "ServiceStatus",
    "grpc_serving",
    "scaled_profile_json",
    "scheduler_is_leader",
    "with_policy",
    "write_scaled_profiles",
]



def ensure_dev_tenant(redis_url: str, key_file: Path, prefix: str = "qlm:") -> str:
    """The API key of the development tenant: the one in ``key_file`` while it still
    authenticates, else a new tenant ``dev`` (``dev-2``, ... when the name is taken: names
    are never reused)."""
    import asyncio

    from qlm.store.client import redis_client
    from qlm.tenants import TenantRegistry

    async def ensure() -> str:
        client = redis_client(redis_url, decode_responses=True)
        try:
            tenants = TenantRegistry(client, prefix)
            if key_file.exists():
                key = key_file.read_text().strip()
                if await tenants.authenticate(key) is not None:
                    return key
            taken = {t.name for t in await tenants.list()}
            name = next(n for n in (DEV_TENANT, *(f"{DEV_TENANT}-{i}" for i in range(2, 10**6)))
                        if n not in taken)
            return await tenants.add(name)
        finally:
            await client.aclose()

    return asyncio.run(ensure())
