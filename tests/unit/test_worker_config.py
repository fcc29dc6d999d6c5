"""Worker settings, the workers file and the queue-notification flags (no servers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlm.core.errors import InvalidInput
from services.common.settings import load_settings
from services.worker.app import WorkerSpec, read_workers_file, worker_specs
from services.worker.settings import WorkerSettings
from services.worker.wakeup import merged_flags


def test_flags_name_one_worker_and_its_models_in_order() -> None:
    settings = load_settings(WorkerSettings, [
        "--worker-id", "g0", "--gpu", "H100-80GB", "--models", "mistral-7b,vicuna-13b",
        "--time-scale", "10",
    ])
    assert worker_specs(settings) == (WorkerSpec("g0", "H100-80GB", ("mistral-7b", "vicuna-13b")),)
    assert settings.time_scale == 10.0


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        ([], "worker_id, gpu and models are required"),
        (["--worker-id", "w", "--gpu", "g", "--models", "a,a"], "appears twice"),
        (["--workers-file", "x.yaml", "--worker-id", "w"], "not both"),
        (["--workers-file", "x.yaml", "--engine", "vllm"], "simulated workers only"),
        (["--worker-id", "w", "--gpu", "g", "--models", "a", "--time-scale", "0"], "time_scale"),
    ],
)
def test_bad_settings_are_named(argv: list[str], problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem):
        load_settings(WorkerSettings, argv)


def test_the_cpu_profile_workers_file_reads() -> None:
    specs = read_workers_file(Path(__file__).resolve().parents[2] / "docker/workers.cpu.yaml")
    assert len(specs) >= 2 and all(s.models for s in specs)


def test_workers_file_errors_name_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("workers:\n  - {id: a, gpu: G, models: []}\n")
    with pytest.raises(InvalidInput, match=r"w.yaml.workers\[0\].models"):
        read_workers_file(path)
    entry = "  - {id: a, gpu: G, models: [m]}\n"
    path.write_text("workers:\n" + entry + entry)
    with pytest.raises(InvalidInput, match="unique"):
        read_workers_file(path)


@pytest.mark.parametrize(
    ("current", "wanted"), [("", "Kz"), ("Ex", "ExKz"), ("KA", "KA"), ("Kz", "Kz"), ("AE", "AEK")]
)
def test_notification_flags_are_added_not_replaced(current: str, wanted: str) -> None:
    assert merged_flags(current) == wanted
