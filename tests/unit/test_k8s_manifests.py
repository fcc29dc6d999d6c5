"""The Kubernetes manifests in deploy/k8s are valid, wire the stack together and run it
secured (TLS, Redis ACL users, Kafka SASL/SCRAM with ACLs, API keys).

Every manifest is validated offline against the Kubernetes OpenAPI schemas bundled by
``kubernetes-validate`` (strict: unknown fields are errors). Each overlay (``gpu``,
``cpu``) is then resolved the way kustomize lists resources (files and directories,
recursively) and checked as a whole: every ConfigMap and Service selector resolves,
every container has resource requests and probes, the services' flags and the shared
ConfigMap load as qlm settings, and the workers file matches the worker pods. The
Secrets come from the files of the ``credentials write`` command that
base/kustomization.yaml documents: the tests write them with that very command and read
every Secret's files from there.
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


def generated_secrets(directory: Path) -> dict[str, list[Path]]:
    """Secret name → its files, of kustomize's ``secretGenerator`` in ``directory``'s
    kustomization and the kustomizations it includes."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    secrets: dict[str, list[Path]] = {}
    for entry in kustomization["resources"]:
        target = (directory / entry).resolve()
        if target.is_dir():
            secrets.update(generated_secrets(target))
    for generator in kustomization.get("secretGenerator", []):
        secrets[generator["name"]] = [directory / f for f in generator["files"]]
    return secrets


def credentials_command() -> list[str]:
    """The ``credentials write`` command that base/kustomization.yaml documents."""
    text = (K8S / "base" / "kustomization.yaml").read_text()
    lines = [line.removeprefix("#").strip() for line in text.splitlines()]
    start = next(i for i, line in enumerate(lines) if "qlm.localstack.credentials write" in line)
    command = ""
    for line in lines[start:]:
        command += line.removesuffix("\\").strip() + " "
        if not line.endswith("\\"):
            break
    return command.split()


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The files the documented command writes, written here (in place of credentials/)."""
    from qlm.localstack.credentials import main

    command = credentials_command()
    assert command[:4] == ["python", "-m", "qlm.localstack.credentials", "write"]
    args = command[4:]
    assert args[args.index("--dir") + 1] == "deploy/k8s/base/credentials"
    directory = tmp_path_factory.mktemp("k8s-credentials")
    args[args.index("--dir") + 1] = str(directory)
    assert main(["write", *args]) == 0
    return directory


def written(path: Path, credentials: Path) -> Path:
    """Where ``credentials`` holds the file a secretGenerator names (``credentials/...``)."""
    relative = path.relative_to(K8S / "base" / "credentials")
    return credentials / relative


def secret_data(name: str, overlay: str, credentials: Path) -> dict[str, str]:
    """The keys and values of a generated Secret (its files' names and contents)."""
    return {path.name: written(path, credentials).read_text()
            for path in generated_secrets(K8S / overlay)[name]}


def env_of(container: Doc, config_maps: dict[str, Doc],
           secrets: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
    """The container's environment: its ConfigMaps and Secrets, then its literal values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]]["data"])
        elif secrets is not None:
            env.update(secrets[source["secretRef"]["name"]])
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
    secrets = generated_secrets(K8S / overlay)
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
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets
    for job in named(docs, "Job").values():
        for volume in job["spec"]["template"]["spec"].get("volumes", []):
            assert volume["secret"]["secretName"] in secrets
    jobs = [(j, c) for j in named(docs, "Job").values()
            for c in j["spec"]["template"]["spec"]["containers"]]
    for _, container in [*containers(docs), *jobs]:
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in config_maps
            else:
                assert source["secretRef"]["name"] in secrets


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_probes(overlay: str) -> None:
    for workload, container in containers(overlay_docs(overlay)):
        where = f"{workload['metadata']['name']}/{container['name']}"
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), where
        assert "memory" in container["resources"]["limits"], where
        assert "readinessProbe" in container and "livenessProbe" in container, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_answer_grpc_health_probes_on_their_grpc_port(overlay: str) -> None:
    """Over TLS: kubelet's own gRPC probe speaks no TLS, so qlm's probe runs in the pod
    (it trusts QLM_TLS_CA_FILE)."""
    checked = 0
    for workload, container in containers(overlay_docs(overlay)):
        if qlm_module(container) in ("services.ingest", "services.estimator", "services.worker"):
            ports = {p["containerPort"] for p in container["ports"]}
            for probe in ("startupProbe", "readinessProbe"):
                command = container[probe]["exec"]["command"]
                assert command[:5] == ["python", "-m", "qlm.localstack.probe", "grpc",
                                       command[4]], workload["metadata"]["name"]
                host, port = command[4].rsplit(":", 1)
                assert host == "127.0.0.1" and int(port) in ports
                assert container[probe]["timeoutSeconds"] >= 5
            checked += 1
    assert checked == 3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_flags_and_environment_load_as_secured_qlm_settings(
    overlay: str, monkeypatch: pytest.MonkeyPatch, credentials: Path
) -> None:
    """Each service, with its ConfigMap, its own credentials Secret and its TLS mount,
    loads as a service that connects as its own Redis and Kafka user over SASL and
    serves TLS with the certificates of the qlm-tls Secret."""
    docs = overlay_docs(overlay)
    config_maps = named(docs, "ConfigMap")
    secrets = {name: secret_data(name, overlay, credentials)
               for name in generated_secrets(K8S / overlay)}
    for key in [k for k in os.environ if k.startswith("QLM_")]:
        monkeypatch.delenv(key)
    loaded = set()
    for workload, container in containers(docs):
        module = qlm_module(container)
        if module is None:
            continue
        who = module.removeprefix("services.")
        refs = [s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s]
        assert refs == [f"qlm-{who}-credentials"], workload["metadata"]["name"]
        with monkeypatch.context() as env:
            for key, value in env_of(container, config_maps, secrets).items():
                env.setenv(key, value)
            settings = load_settings(SETTINGS[module], container.get("args", []))
        where = workload["metadata"]["name"]
        assert settings.kafka_replication_factor == 3, where
        assert settings.kafka_security_protocol == "SASL_PLAINTEXT", where
        assert settings.kafka_sasl_username == f"qlm-{who}", where
        assert settings.redis_url.startswith(f"redis://qlm-{who}:"), where
        assert settings.redis_url.endswith("@qlm-redis:6379/0"), where
        pod = workload["spec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        tls = next(v for v in pod["volumes"] if v["name"] == mounts["/run/qlm/tls"])
        keys = set(secrets[tls["secret"]["secretName"]])
        for path in (settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file):
            assert path is not None and path.parent == Path("/run/qlm/tls"), where
            assert path.name in keys, where
        assert pod["securityContext"]["fsGroup"] == 10001, where  # qlm's image user
        if module == "services.ingest":
            assert settings.auth == "required"  # type: ignore[attr-defined]
        loaded.add(module)
    assert loaded == set(SETTINGS)


def test_the_documented_credentials_match_the_manifests(credentials: Path) -> None:
    docs = overlay_docs("gpu")
    args = credentials_command()
    kafka = named(docs, "StatefulSet")["qlm-kafka"]
    pods = [f"qlm-kafka-{i}.{kafka['spec']['serviceName']}"
            for i in range(kafka["spec"]["replicas"])]
    assert args[args.index("--kafka-nodes") + 1].split(",") == pods
    assert args[args.index("--redis-host") + 1] in named(docs, "Service")
    ingest = named(docs, "Deployment")["qlm-ingest"]["spec"]["template"]["spec"]
    estimator = ingest["containers"][0]["args"][
        ingest["containers"][0]["args"].index("--estimator-addr") + 1].split(":")[0]
    assert {"qlm-ingest", estimator} <= set(args[args.index("--tls-names") + 1].split(","))
    for overlay in OVERLAYS:
        for name, files in generated_secrets(K8S / overlay).items():
            for path in files:
                assert written(path, credentials).is_file(), (name, path)
    assert (K8S / "base" / "credentials").relative_to(ROOT).as_posix() + "/" in (
        ROOT / ".gitignore").read_text().splitlines()


def test_redis_runs_with_the_acl_users_of_its_secret(credentials: Path) -> None:
    redis = named(overlay_docs("cpu"), "StatefulSet")["qlm-redis"]
    pod = redis["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    acl = Path(args[args.index("--aclfile") + 1])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[str(acl.parent)])
    data = secret_data(volume["secret"]["secretName"], "cpu", credentials)
    users = {line.split()[1] for line in data[acl.name].splitlines()}
    assert users == {"default", "qlm-ingest", "qlm-scheduler", "qlm-worker", "qlm-estimator"}
    assert "admin-password" in data and "admin-password" in " ".join(
        container["readinessProbe"]["exec"]["command"])
    assert pod["securityContext"]["fsGroup"] == 999


def test_grant_job_creates_topics_and_acls_as_the_admin(credentials: Path) -> None:
    docs = overlay_docs("cpu")
    job = named(docs, "Job")["qlm-grant"]
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = container["command"]
    assert command[:4] == ["python", "-m", "qlm.localstack.credentials", "grant"]
    directory = Path(command[command.index("--dir") + 1])
    (volume,) = pod["volumes"]
    assert volume["secret"]["secretName"] == "qlm-admin-credentials"
    (mount,) = container["volumeMounts"]
    assert Path(mount["mountPath"]) == directory / "admin"
    data = secret_data("qlm-admin-credentials", "cpu", credentials)
    assert data["QLM_KAFKA_SASL_USERNAME"] == "qlm-admin"
    assert {"configMapRef": {"name": "qlm-env"}} in container["envFrom"]  # the topic layout


def test_redis_keeps_the_queue_in_an_append_only_file_on_a_persistent_volume() -> None:
    redis = named(overlay_docs("cpu"), "StatefulSet")["qlm-redis"]
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    data_dir = args[args.index("--dir") + 1]
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == data_dir


def test_kafka_is_a_three_node_kraft_quorum_with_sasl_and_acls(credentials: Path) -> None:
    docs = overlay_docs("gpu")
    kafka = named(docs, "StatefulSet")["qlm-kafka"]
    pod = kafka["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    replicas = kafka["spec"]["replicas"]
    assert replicas == 3
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert container["command"][0] == "sh"
    start = Path(container["command"][1])
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[str(start.parent)])
    data = secret_data(volume["secret"]["secretName"], "gpu", credentials)
    assert start.name in data
    (claim,) = kafka["spec"]["volumeClaimTemplates"]
    deployment = named(docs, "ConfigMap")["qlm-env"]["data"]
    layout = TopicLayout(replication_factor=int(deployment["QLM_KAFKA_REPLICATION_FACTOR"]))
    assert layout.replication_factor == replicas
    for i in range(replicas):
        properties = dict(line.split("=", 1)
                          for line in data[f"server-{i}.properties"].splitlines())
        assert properties["node.id"] == str(i)
        assert properties["process.roles"] == "broker,controller"
        voters = properties["controller.quorum.voters"].split(",")
        assert voters == [f"{n}@qlm-kafka-{n}.qlm-kafka:9093" for n in range(replicas)]
        assert properties["advertised.listeners"] == f"SASL_PLAINTEXT://qlm-kafka-{i}.qlm-kafka:9092"
        assert properties["offsets.topic.replication.factor"] == str(replicas)
        assert properties["transaction.state.log.min.isr"] == str(layout.min_isr)
        assert properties["allow.everyone.if.no.acl.found"] == "false"
        assert properties["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
        assert properties["log.dirs"] == mounts_path(container, claim["metadata"]["name"])
    assert pod["securityContext"]["fsGroup"] == 1000
    bootstrap = secret_data("qlm-ingest-credentials", "gpu", credentials)["QLM_KAFKA_BOOTSTRAP"]
    assert bootstrap.split(",") == [f"qlm-kafka-{i}.qlm-kafka:9092" for i in range(replicas)]


def mounts_path(container: Doc, volume: str) -> str:
    return next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume)


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
