"""The Kubernetes manifests in deploy/k8s are valid and wire the stack together.

Every manifest is validated offline against the Kubernetes OpenAPI schemas bundled by
``kubernetes-validate`` (strict: unknown fields are errors). Each overlay (``gpu``,
``cpu``) is then resolved the way kustomize lists resources (files and directories,
recursively) and checked as a whole: every ConfigMap and Service selector resolves,
every container has resource requests and probes, the services' flags and the shared
ConfigMap load as qlm settings, and the workers file matches the worker pods.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from qlm.bus.topics import TopicLayout
from qlm.roster import workers_from
from services.common.settings import load_settings
from services.estimator.settings import EstimatorSettings
from services.ingest.settings import IngestSettings
from services.scheduler.settings import SchedulerSettings
from services.worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
#: The Kubernetes version the manifests are written for (and validated against).
K8S_VERSION = "1.34.0"
OVERLAYS = ("gpu", "cpu")
SETTINGS = {
    "services.ingest": IngestSettings,
    "services.estimator": EstimatorSettings,
    "services.scheduler": SchedulerSettings,
    "services.worker": WorkerSettings,
}

Doc = dict[str, Any]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def docs_of(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def resolve(directory: Path) -> Iterator[Path]:
    """The manifest files of a kustomization, its bases' first (as kustomize lists them)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    for entry in kustomization["resources"]:
        target = (directory / entry).resolve()
        assert target.exists(), f"{directory}/kustomization.yaml: {entry} does not exist"
        yield from resolve(target) if target.is_dir() else [target]


def overlay_docs(overlay: str) -> list[Doc]:
    return [doc for path in resolve(K8S / overlay) for doc in docs_of(path)]


def named(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[Doc]) -> dict[str, Doc]:
    return {**named(docs, "Deployment"), **named(docs, "StatefulSet")}


def containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    for workload in workloads(docs).values():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            yield workload, container


def qlm_module(container: Doc) -> str | None:
    """``services.<name>`` when the container runs a qlm service, else None."""
    command = container.get("command", [])
    return command[2] if command[:2] == ["python", "-m"] and len(command) > 2 else None


def env_of(container: Doc, config_maps: dict[str, Doc]) -> dict[str, str]:
    """The container's environment: its ConfigMaps, then its literal values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value", f"from-{variable['name'].lower()}")
    return env


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_is_valid_against_the_kubernetes_schemas(path: Path) -> None:
    docs = docs_of(path)
    assert docs, f"{path} has no resource"
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_refuses_a_misspelt_field() -> None:
    (_, deployment) = docs_of(K8S / "base" / "ingest.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["prots"] = []
    with pytest.raises(kubernetes_validate.ValidationError, match="prots"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_every_manifest_belongs_to_a_kustomization() -> None:
    listed = {path for overlay in OVERLAYS for path in resolve(K8S / overlay)}
    assert set(manifest_files()) == listed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve_within_the_overlay(overlay: str) -> None:
    docs = overlay_docs(overlay)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "a resource is defined twice"
    config_maps = named(docs, "ConfigMap")
    labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads(docs).values()]
    for service in named(docs, "Service").values():
        selector = service["spec"]["selector"].items()
        assert any(selector <= pod.items() for pod in labels), service["metadata"]["name"]
    for workload in workloads(docs).values():
        spec = workload["spec"]
        assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"][
            "labels"].items()  # fmt: skip
        if workload["kind"] == "StatefulSet":
            assert spec["serviceName"] in named(docs, "Service")
        for volume in spec["template"]["spec"].get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
    for _, container in containers(docs):
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] in config_maps


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_probes(overlay: str) -> None:
    for workload, container in containers(overlay_docs(overlay)):
        where = f"{workload['metadata']['name']}/{container['name']}"
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), where
        assert "memory" in container["resources"]["limits"], where
        assert "readinessProbe" in container and "livenessProbe" in container, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_answer_grpc_health_probes_on_their_grpc_port(overlay: str) -> None:
    checked = 0
    for workload, container in containers(overlay_docs(overlay)):
        if qlm_module(container) in ("services.ingest", "services.estimator", "services.worker"):
            ports = {p["containerPort"] for p in container["ports"]}
            for probe in ("startupProbe", "readinessProbe"):
                assert container[probe]["grpc"]["port"] in ports, workload["metadata"]["name"]
            checked += 1
    assert checked == 3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_flags_and_environment_load_as_qlm_settings(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = overlay_docs(overlay)
    config_maps = named(docs, "ConfigMap")
    for key in [k for k in os.environ if k.startswith("QLM_")]:
        monkeypatch.delenv(key)
    loaded = set()
    for workload, container in containers(docs):
        module = qlm_module(container)
        if module is None:
            continue
        with monkeypatch.context() as env:
            for key, value in env_of(container, config_maps).items():
                env.setenv(key, value)
            settings = load_settings(SETTINGS[module], container.get("args", []))
        assert settings.kafka_replication_factor == 3, workload["metadata"]["name"]
        loaded.add(module)
    assert loaded == set(SETTINGS)


def test_redis_keeps_the_queue_in_an_append_only_file_on_a_persistent_volume() -> None:
    redis = named(overlay_docs("cpu"), "StatefulSet")["qlm-redis"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == data_dir


def test_kafka_is_a_three_node_kraft_quorum_matching_the_topic_replication() -> None:
    docs = overlay_docs("gpu")
    kafka = named(docs, "StatefulSet")["qlm-kafka"]
    (container,) = kafka["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    replicas = kafka["spec"]["replicas"]
    assert replicas == 3
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert [v.split("@")[0] for v in voters] == [str(i) for i in range(replicas)]
    assert all(f"qlm-kafka-{i}.qlm-kafka:" in voters[i] for i in range(replicas))
    deployment = named(docs, "ConfigMap")["qlm-env"]["data"]
    layout = TopicLayout(replication_factor=int(deployment["QLM_KAFKA_REPLICATION_FACTOR"]))
    assert layout.replication_factor == replicas
    assert env["KAFKA_MIN_INSYNC_REPLICAS"] == str(layout.min_isr)
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == str(replicas)
    brokers = deployment["QLM_KAFKA_BOOTSTRAP"].split(",")
    assert brokers == [f"qlm-kafka-{i}.qlm-kafka:9092" for i in range(replicas)]


def test_two_scheduler_replicas_each_name_their_lease_by_pod() -> None:
    scheduler = named(overlay_docs("gpu"), "Deployment")["qlm-scheduler"]
    assert scheduler["spec"]["replicas"] == 2
    (container,) = scheduler["spec"]["template"]["spec"]["containers"]
    (instance,) = [e for e in container["env"] if e["name"] == "QLM_INSTANCE_ID"]
    assert instance["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_gpu_workers_take_one_gpu_each_and_are_the_workers_file() -> None:
    docs = overlay_docs("gpu")
    worker = named(docs, "StatefulSet")["qlm-worker"]
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    (worker_id,) = [e for e in container["env"] if e["name"] == "QLM_WORKER_ID"]
    assert worker_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    fleet = workers_from(yaml.safe_load(
        named(docs, "ConfigMap")["qlm-workers"]["data"]["workers.yaml"]
    ))  # fmt: skip
    pods = [f"qlm-worker-{i}" for i in range(worker["spec"]["replicas"])]
    assert [w.id for w in fleet] == pods
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert {w.gpu for w in fleet} == {env["QLM_GPU"]}
    assert {tuple(w.models) for w in fleet} == {tuple(yaml.safe_load(env["QLM_MODELS"]))}


def test_simulated_workers_run_the_workers_file_the_scheduler_plans_for() -> None:
    docs = overlay_docs("cpu")
    fleet = workers_from(yaml.safe_load(
        named(docs, "ConfigMap")["qlm-workers"]["data"]["workers.yaml"]
    ))  # fmt: skip
    assert fleet
    mounted = {
        w["metadata"]["name"] for w, c in containers(docs)
        if "/etc/qlm/workers.yaml" in c.get("args", [])
    }  # fmt: skip
    assert mounted == {"qlm-worker-sim", "qlm-estimator", "qlm-scheduler"}
