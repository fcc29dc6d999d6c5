"""Performance profiles: JSON format, validation, interpolation, and the roofline model."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from qlm.core import roofline
from qlm.core.errors import InvalidInput, NotFound
from qlm.core.perf import PROFILE_DIR, PerfProfile, ProfileBook, load_profile, save_profile


def make_profile(**overrides: Any) -> PerfProfile:
    fields: dict[str, Any] = dict(
        model="m", gpu="g", num_gpus=1,
        prefill_tokens=(16, 512, 4096), prefill_seconds=(0.01, 0.02, 0.10),
        decode_base_s=0.01, decode_per_seq_s=1e-4, decode_per_ctx_token_s=1e-7,
        kv_capacity_tokens=100_000, max_batch_size=64,
        sleep_s=0.3, wake_s=0.5, cold_load_s=30.0, source="test",
    )
    fields.update(overrides)
    return PerfProfile(**fields)


# ------------------------------------------------------------------ format
def test_json_round_trip_is_identity(tmp_path: Path) -> None:
    profile = make_profile(notes={"tensor_parallel": 1})
    assert PerfProfile.from_json(json.loads(json.dumps(profile.to_json()))) == profile
    path = save_profile(profile, tmp_path)
    assert path.name == "m@g.json"
    assert load_profile(path) == profile
    assert ProfileBook.load(tmp_path).get("m", "g") == profile


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.pop("decode"), "decode"),
        (lambda d: d["swap"].pop("wake_s"), "wake_s"),
        (lambda d: d.pop("kv_capacity_tokens"), "kv_capacity_tokens"),
        (lambda d: d.__setitem__("format_version", 99), "format_version"),
        (lambda d: d["prefill"].__setitem__("tokens", [512, 16, 4096]), "prefill.tokens"),
        (lambda d: d["prefill"].__setitem__("seconds", [0.1, -0.2, 0.3]), "prefill.seconds"),
        (lambda d: d["prefill"].__setitem__("seconds", [0.1]), "prefill"),
        (lambda d: d["decode"].__setitem__("base_s", 0.0), "decode_base_s"),
        (lambda d: d["swap"].__setitem__("sleep_s", -1.0), "sleep_s"),
    ],
)
def test_bad_profile_names_the_field(mutate: Any, field: str) -> None:
    data = copy.deepcopy(make_profile().to_json())
    mutate(data)
    with pytest.raises(InvalidInput) as err:
        PerfProfile.from_json(data, where="x.json")
    assert field in err.value.field


def test_unknown_profile_is_not_found() -> None:
    with pytest.raises(NotFound):
        ProfileBook.of([make_profile()]).get("m", "other-gpu")


# ------------------------------------------------------------------ timings
def test_prefill_interpolates_between_points() -> None:
    p = make_profile()
    assert p.prefill_s(16) == pytest.approx(0.01)
    assert p.prefill_s(264) == pytest.approx(0.015)  # halfway 16 → 512
    assert p.prefill_s(2304) == pytest.approx(0.06)  # halfway 512 → 4096


def test_prefill_extrapolates_linearly_and_never_negative() -> None:
    p = make_profile()
    slope = (0.10 - 0.02) / (4096 - 512)
    assert p.prefill_s(8192) == pytest.approx(0.10 + slope * 4096)
    assert p.prefill_s(0) == 0.0
    steep = make_profile(prefill_seconds=(0.0001, 0.05, 0.10))
    assert steep.prefill_s(1) >= 0.0


def test_decode_step_is_the_linear_roofline() -> None:
    p = make_profile()
    assert p.decode_step_s(0, 0) == 0.0
    assert p.decode_step_s(8, 4000) == pytest.approx(0.01 + 8e-4 + 4e-4)
    assert p.decode_tokens_per_s(8, 500.0) == pytest.approx(8 / (0.01 + 8e-4 + 4e-4))
    assert p.swap_in_s(True) == 0.5 and p.swap_in_s(False) == 30.0


# ------------------------------------------------------------------ roofline
def test_every_shipped_pair_loads_and_says_where_it_comes_from() -> None:
    book = ProfileBook.load(PROFILE_DIR)
    for (model, gpu), num_gpus in roofline.TENSOR_PARALLEL.items():
        profile = book.get(model, gpu)
        assert profile.num_gpus == num_gpus
        assert profile.kv_capacity_tokens >= 4096
        assert profile.max_batch_size == roofline.MAX_BATCH_SIZE


def test_shipped_roofline_files_match_the_model() -> None:
    """The JSON files are what ``python -m loadgen.profiles`` writes (measured ones excepted)."""
    for profile in roofline.shipped_profiles():
        path = PROFILE_DIR / f"{profile.model}@{profile.gpu}.json"
        on_disk = load_profile(path)
        if not on_disk.source.startswith("roofline"):
            continue
        assert on_disk == PerfProfile.from_json(profile.to_json())


def test_kv_capacity_is_memory_left_over_kv_bytes() -> None:
    model, gpu = roofline.MODELS["mistral-7b"], roofline.GPUS["A100-80GB"]
    usable = 80 * 2**30 * 0.9
    left = usable - model.weight_bytes - roofline.activation_reserve_bytes(model)
    assert roofline.kv_capacity_tokens(model, gpu, 1) == int(left // (2 * 32 * 8 * 128 * 2))


def test_a_model_that_does_not_fit_is_refused() -> None:
    with pytest.raises(InvalidInput) as err:
        roofline.roofline_profile(roofline.MODELS["llama-70b"], roofline.GPUS["A100-80GB"], 1)
    assert err.value.field == "num_gpus"
    with pytest.raises(InvalidInput):  # 8 KV heads cannot be split 3 ways
        roofline.roofline_profile(roofline.MODELS["llama-70b"], roofline.GPUS["H100-80GB"], 3)


def test_tensor_parallel_speeds_up_decode_and_adds_kv() -> None:
    model, gpu = roofline.MODELS["llama-70b"], roofline.GPUS["H100-80GB"]
    two, four = (roofline.roofline_profile(model, gpu, k) for k in (2, 4))
    assert four.decode_step_s(32, 32_000) < two.decode_step_s(32, 32_000)
    assert four.kv_capacity_tokens > 2 * two.kv_capacity_tokens


def test_faster_gpus_are_faster() -> None:
    model = roofline.MODELS["mistral-7b"]
    a10, a100, h100 = (roofline.roofline_profile(model, roofline.GPUS[g], 1)
                       for g in ("A10-24GB", "A100-80GB", "H100-80GB"))
    for batch in (1, 32, 128):
        assert a10.decode_step_s(batch, batch * 1000) > a100.decode_step_s(batch, batch * 1000)
        assert a100.decode_step_s(batch, batch * 1000) > h100.decode_step_s(batch, batch * 1000)
    assert a10.prefill_s(2048) > a100.prefill_s(2048) > h100.prefill_s(2048)


def test_calibration_stays_within_five_percent_of_the_measurements() -> None:
    h100 = roofline.GPUS["H100-80GB"]
    rows = roofline.calibration_rows(h100, roofline.H100_MEASURED)
    rows += roofline.calibration_rows(roofline.H200, roofline.H200_MEASURED)
    assert len(rows) == 16
    assert max(abs(r.error) for r in rows) < 0.05
    steady = [r for r in roofline.swap_calibration_rows() if "first" not in r.what]
    assert max(abs(r.error) for r in steady) < 0.05
