"""Engines are chosen by name; the vLLM one is built without importing vLLM."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlm.core.errors import InvalidInput, NotFound
from qlm.core.perf import ProfileBook
from qlm.engine.factory import make_engine
from qlm.engine.simulated import SimulatedEngine
from qlm.engine.vllm_engine import VllmEngine, VllmOptions, model_path

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
    assert model_path("org/some-model", options) == "org/some-model"  # a name is left as is
    with pytest.raises(InvalidInput, match="distinct"):
        VllmEngine("H100-80GB", ["a", "a"])
