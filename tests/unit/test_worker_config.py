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
        (["--workers-file", "x.yaml", "--gpu", "g"], "not both"),
        (["--workers-file", "x.yaml", "--models", "m"], "not both"),
        (["--worker-id", "w", "--gpu", "g", "--models", "a", "--vllm-load-format", ""],
         "vllm_load_format"),
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


WORKERS = """
workers:
  - id: gpu0
    gpu: H100-80GB
    models:
      - name: qwen2.5-1.5b
        path: /models/qwen
        engine_args: {tensor_parallel_size: 2, max_model_len: 8192, gpu_memory_utilization: 0.4,
                      quantization: fp8, dtype: bfloat16, enforce_eager: true, kv_cache_dtype: fp8}
      - mistral-7b
  - {id: gpu1, gpu: H100-80GB, models: [{name: mistral-7b, engine_args: {load_format: dummy}}]}
"""


def test_workers_file_names_checkpoints_and_engine_arguments(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(WORKERS)
    gpu0, gpu1 = read_workers_file(path)
    assert gpu0.models == ("qwen2.5-1.5b", "mistral-7b")  # profiles stay keyed by name
    qwen, mistral = gpu0.entries
    assert qwen.path == Path("/models/qwen") and mistral.path is None
    assert qwen.engine_args == {"tensor_parallel_size": 2, "max_model_len": 8192,
                                "gpu_memory_utilization": 0.4, "quantization": "fp8",
                                "dtype": "bfloat16", "enforce_eager": True,
                                "kv_cache_dtype": "fp8"}
    assert gpu1.entries[0].engine_args == {"load_format": "dummy"}
    settings = load_settings(WorkerSettings, ["--workers-file", str(path), "--worker-id", "gpu1",
                                              "--engine", "vllm"])
    assert [s.id for s in worker_specs(settings)] == ["gpu1"]
    both = load_settings(WorkerSettings, ["--workers-file", str(path)])
    assert [s.id for s in worker_specs(both)] == ["gpu0", "gpu1"]
    with pytest.raises(InvalidInput, match="one worker per process"):
        worker_specs(load_settings(WorkerSettings, ["--workers-file", str(path),
                                                    "--engine", "vllm"]))
    with pytest.raises(InvalidInput, match=r"worker_id: 'gpu9' is not in w\.yaml"):
        worker_specs(load_settings(WorkerSettings, ["--workers-file", str(path),
                                                    "--worker-id", "gpu9"]))


@pytest.mark.parametrize(("model", "where"), [
    ("{name: m, engine_args: {tensor_parallel_size: 0}}", "engine_args.tensor_parallel_size"),
    ("{name: m, engine_args: {gpu_memory_utilization: 1.5}}",
     r"engine_args.gpu_memory_utilization: must be in \(0, 1\]"),
    ("{name: m, engine_args: {max_model_len: '4k'}}", "engine_args.max_model_len: must be an int"),
    ("{name: m, engine_args: {dtype: fp7}}", "engine_args.dtype"),
    ("{name: m, engine_args: {quantization: ''}}", "engine_args.quantization"),
    ("{name: m, engine_args: {enforce_eager: 'yes'}}", "engine_args.enforce_eager"),
    ("{name: m, engine_args: {model: /x}}", "engine_args.model: is set by the worker"),
    ("{name: m, engine_args: [1]}", r"models\[0\].engine_args: must be a mapping"),
    ("{name: m, weights: /x}", r"models\[0\].weights: unknown field"),
    ("{path: /x}", r"models\[0\].name"),
    ("{name: m, path: 3}", r"models\[0\].path"),
])
def test_bad_model_entries_are_named(tmp_path: Path, model: str, where: str) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(f"workers:\n  - {{id: a, gpu: G, models: [{model}]}}\n")
    with pytest.raises(InvalidInput, match=where):
        read_workers_file(path)


def test_engine_argument_names_are_checked_against_vllms() -> None:
    from qlm.engine.engine_args import check_known_to_vllm

    check_known_to_vllm(["max_model_len"], {"max_model_len", "dtype"}, "models.m.engine_args")
    with pytest.raises(InvalidInput, match=r"models.m.engine_args.max_len: is not an engine "
                                           r"argument of vLLM 0.25.0"):
        check_known_to_vllm(["max_len"], {"max_model_len"}, "models.m.engine_args", "0.25.0")


@pytest.mark.parametrize(
    ("current", "wanted"), [("", "Kz"), ("Ex", "ExKz"), ("KA", "KA"), ("Kz", "Kz"), ("AE", "AEK")]
)
def test_notification_flags_are_added_not_replaced(current: str, wanted: str) -> None:
    assert merged_flags(current) == wanted


def test_the_gpu_workers_file_reads() -> None:
    specs = read_workers_file(Path(__file__).resolve().parents[2] / "docker/workers.gpu.yaml")
    (gpu0,) = specs
    assert gpu0.models == ("qwen2.5-1.5b", "mistral-7b")
    assert all(e.path is not None and e.engine_args for e in gpu0.entries)
