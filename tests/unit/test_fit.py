"""The one admission check of a request's size (qlm.core.fit), and the catalogue's
per-GPU limits that ingest feeds it."""

from __future__ import annotations

import pytest

from qlm.core.errors import InvalidInput
from qlm.core.fit import SequenceLimit, can_serve, check_fits, refusal, serving_limits
from qlm.core.perf import PerfProfile, ProfileBook
from qlm.roster import WorkerInfo
from qlm.submission import ModelLimits, parse_submission
from services.ingest.fleet import served_models
from services.ingest.plane import load_models


def profile(model: str, gpu: str, *, max_model_len: int, kv: int, num_gpus: int = 1
            ) -> PerfProfile:
    return PerfProfile(
        model=model, gpu=gpu, num_gpus=num_gpus, prefill_tokens=(1, 8192),
        prefill_seconds=(0.001, 8.0), decode_base_s=0.02, decode_per_seq_s=0.0,
        decode_per_ctx_token_s=0.0, kv_capacity_tokens=kv, max_batch_size=8, sleep_s=1.0,
        wake_s=1.0, cold_load_s=10.0, max_model_len=max_model_len,
    )


def test_a_request_that_fits_one_worker_is_not_refused() -> None:
    limits = [SequenceLimit(4096, 60_000), SequenceLimit(32768, 40_000)]
    assert refusal("m", 30_000, 2048, limits) is None
    assert refusal("m", 4000, 96, limits[:1]) is None  # exactly max_model_len


def test_beyond_every_max_model_len_names_max_tokens_with_the_sizes() -> None:
    error = refusal("vicuna-13b", 3000, 2048, [SequenceLimit(4096, 60_000)] * 2)
    assert isinstance(error, InvalidInput) and error.field == "max_tokens"
    assert error.problem == ("prompt + max_tokens too long for every worker serving model "
                             "'vicuna-13b': 3000 + 2048 = 5048 tokens > max_model_len 4096")


def test_a_prompt_that_leaves_no_room_names_prompt() -> None:
    error = refusal("m", 4096, 1, [SequenceLimit(4096)])
    assert error is not None and error.field == "prompt"
    assert "prompt too long for every worker serving model 'm': 4096 prompt tokens" in (
        error.problem)


def test_the_kv_cache_binds_when_smaller_than_max_model_len() -> None:
    error = refusal("m", 20_000, 1000, [SequenceLimit(32768, 16_712)])
    assert error is not None and error.problem.endswith("> KV capacity 16712")
    with pytest.raises(InvalidInput, match="KV capacity 16712"):
        check_fits("m", 20_000, 1000, [SequenceLimit(32768, 16_712)])


def test_no_known_limit_refuses_nothing() -> None:
    assert refusal("m", 10**6, 10**6, []) is None


def test_serving_limits_keep_only_workers_able_to_run_the_model() -> None:
    book = ProfileBook.of([profile("big", "A100", max_model_len=4096, kv=500_000, num_gpus=4),
                           profile("big", "A10", max_model_len=8192, kv=50_000)])
    assert not can_serve(book, "big", "A100", 1) and can_serve(book, "big", "A100", 4)
    assert not can_serve(book, "big", "H100", 8)
    assert serving_limits(book, "big", [("A100", 1), ("H100", 1)]) == ()
    assert serving_limits(book, "big", [("A100", 4), ("A10", 1)]) == (
        SequenceLimit(4096, 500_000), SequenceLimit(8192, 50_000))


# ------------------------------------------------------------------ ingest's catalogue
def test_catalogue_from_profiles_refuses_only_what_fits_no_gpu() -> None:
    models = load_models()
    mistral = models["mistral-7b"]
    # H100's profile stops at 16384 tokens, the A10's and A100's at 32768
    assert mistral.max_model_len == 32768
    accepted = parse_submission({"model": "mistral-7b", "prompt_token_ids": [1] * 20_000,
                                 "max_tokens": 2048}, models)
    assert accepted.num_prompt_tokens == 20_000
    with pytest.raises(InvalidInput, match="serving model 'mistral-7b': 31000 \\+ 2048"):
        parse_submission({"model": "mistral-7b", "prompt_token_ids": [1] * 31_000,
                          "max_tokens": 2048}, models)


def test_live_workers_gpus_decide_what_ingest_accepts() -> None:
    limits = ModelLimits("m", 32768, ("A10", "H100"),
                         (SequenceLimit(32768, 3000), SequenceLimit(16384, 100_000)))
    assert limits.sequence_limits(["A10"]) == (SequenceLimit(32768, 3000),)
    assert limits.sequence_limits() == (SequenceLimit(32768, 3000),
                                        SequenceLimit(16384, 100_000))
    capped = ModelLimits("m", 8192, ("H100",), (SequenceLimit(16384, 100_000),))
    assert capped.sequence_limits() == (SequenceLimit(8192, 100_000),)
    served = served_models((WorkerInfo("w1", "A10", ("m",), "m"),
                            WorkerInfo("w2", "A10", ("m",), None)), {"m": limits})
    assert served[0].gpus == ("A10",)
    error = refusal("m", 4000, 16, served[0].limits.sequence_limits(served[0].gpus))
    assert error is not None and error.problem.endswith("> KV capacity 3000")
    with pytest.raises(InvalidInput, match="one limit per GPU type"):
        ModelLimits("m", 10, ("A10", "H100"), (SequenceLimit(10),))
