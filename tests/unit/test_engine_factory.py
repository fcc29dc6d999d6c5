"""Engines are chosen by name; the vLLM one is built without importing vLLM."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlm.core.errors import InvalidInput, NotFound
from qlm.core.perf import ProfileBook
from qlm.engine.factory import make_engine
from qlm.engine.simulated import SimulatedEngine
from qlm.engine.vllm_engine import (
    VllmEngine,
    VllmOptions,
    checkpoint_problem,
    engine_arguments,
    model_path,
)
from qlm.roster import ModelEntry

ROOT = Path(__file__).resolve().parents[2]


def test_sim_engine_holds_the_models_with_the_first_awake() -> None:
    engine = make_engine("sim", "A100-80GB", ["vicuna-13b", "mistral-7b"], ProfileBook.load(),
                         time_scale=10)
    assert isinstance(engine, SimulatedEngine)
    assert engine.models == ("vicuna-13b", "mistral-7b") and engine.active_model == "vicuna-13b"
    assert engine.time_scale == 10


def test_unknown_engine_model_or_profile_is_named() -> None:
    with pytest.raises(InvalidInput, match="unknown engine"):
        make_engine("tpu", "A100-80GB", ["mistral-7b"], ProfileBook.load())
    with pytest.raises(NotFound, match="nope@A100-80GB"):
        make_engine("sim", "A100-80GB", ["nope"], ProfileBook.load())


def test_vllm_engine_is_built_without_importing_vllm() -> None:
    code = (
        "import sys\n"
        "from qlm.core.perf import ProfileBook\n"
        "from qlm.engine.factory import make_engine\n"
        "import services.worker.app\n"
        "e = make_engine('vllm', 'H100-80GB', ['mistral-7b'], ProfileBook.load())\n"
        "assert type(e).__name__ == 'VllmEngine' and e.active_model is None\n"
        "print('vllm' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_vllm_options_and_model_paths(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="gpu_memory_utilization"):
        VllmOptions(gpu_memory_utilization=1.5)
    with pytest.raises(InvalidInput, match="sleep_level"):
        VllmOptions(sleep_level=3)
    options = VllmOptions(model_dir=tmp_path)
    path = Path(model_path("mistral-7b", options))  # a known shape: its config.json is written
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 32
    entry = ModelEntry("org-model", tmp_path / "ckpt")
    assert model_path("org-model", options, entry) == tmp_path / "ckpt"  # the file's path wins
    assert model_path("unknown", options) == tmp_path / "unknown"
    with pytest.raises(InvalidInput, match="distinct"):
        VllmEngine("H100-80GB", ["a", "a"])


def test_engine_arguments_come_from_the_options_then_the_workers_file(tmp_path: Path) -> None:
    entry = ModelEntry("m", tmp_path, {"tensor_parallel_size": 2, "max_model_len": 4096,
                                       "quantization": "fp8", "kv_cache_dtype": "fp8"})
    args = engine_arguments("m", tmp_path, VllmOptions(max_model_len=8192), 2, entry)
    assert args["model"] == str(tmp_path) and args["skip_tokenizer_init"] is True
    assert args["enable_sleep_mode"] is True and args["gpu_memory_utilization"] == 0.425
    assert args["max_model_len"] == 4096 and args["tensor_parallel_size"] == 2
    assert args["quantization"] == "fp8" and args["kv_cache_dtype"] == "fp8"
    assert "load_format" not in args  # vLLM's own default: the checkpoint's weights
    dummy = engine_arguments("m", tmp_path, VllmOptions(load_format="dummy"), 1)
    assert dummy["load_format"] == "dummy"


def test_a_checkpoint_needs_weights_unless_dummy_is_asked_for(tmp_path: Path,
                                                              tiny_checkpoint: Path) -> None:
    assert checkpoint_problem("t", tiny_checkpoint, None) is None
    shape = Path(model_path("mistral-7b", VllmOptions(model_dir=tmp_path)))
    problem = checkpoint_problem("mistral-7b", shape, None)
    assert problem is not None and "no weights" in problem and "load_format: dummy" in problem
    assert checkpoint_problem("mistral-7b", shape, "dummy") is None
    problem = checkpoint_problem("x", tmp_path / "nothing", "dummy")
    assert problem is not None and "no config.json" in problem


def test_sim_engine_gets_the_tokenizer_of_a_named_checkpoint(tmp_path: Path,
                                                             tiny_checkpoint: Path) -> None:
    entries = {"mistral-7b": ModelEntry("mistral-7b", tiny_checkpoint)}
    engine = make_engine("sim", "A100-80GB", ["mistral-7b"], ProfileBook.load(), entries=entries)
    assert isinstance(engine, SimulatedEngine)
    with pytest.raises(InvalidInput, match=r"models\.mistral-7b\.path.*no tokenizer"):
        make_engine("sim", "A100-80GB", ["mistral-7b"], ProfileBook.load(),
                    entries={"mistral-7b": ModelEntry("mistral-7b", tmp_path)})


class _RecordingLLM:
    """Stands in for an ``AsyncLLM``: records when its sleep / wake_up start and end."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    async def sleep(self, level: int = 1) -> None:
        self.log.append(f"sleep {self.name} start")
        await asyncio.sleep(0.01)
        self.log.append(f"sleep {self.name} end")

    async def wake_up(self) -> None:
        self.log.append(f"wake {self.name} start")
        await asyncio.sleep(0.01)
        self.log.append(f"wake {self.name} end")


@pytest.mark.parametrize(("shares", "overlapped"), [((0.42, 0.42), True), ((0.9, 0.9), False)])
async def test_vllm_swap_overlaps_sleep_and_wake_only_when_both_models_fit(
        shares: tuple[float, float], overlapped: bool) -> None:
    engine = VllmEngine("H100-80GB", ["a", "b"])
    log: list[str] = []
    engine._llms = {"a": _RecordingLLM("a", log), "b": _RecordingLLM("b", log)}
    engine._shares = dict(zip(("a", "b"), shares, strict=True))
    engine._active = "a"
    assert engine.overlapped_swaps("a", "b") is overlapped
    await engine.swap("b")
    assert engine.active_model == "b" and engine._num_swaps == 1
    if overlapped:  # the wake starts before the sleep ends
        assert log.index("wake b start") < log.index("sleep a end")
    else:
        assert log == ["sleep a start", "sleep a end", "wake b start", "wake b end"]
    await engine.swap("b")  # already active: nothing happens
    assert len(log) == 4
    with pytest.raises(InvalidInput, match="not one of"):
        await engine.swap("c")
