"""The simulator's copy of the GPU burst replay: its scenario and its command line's checks."""

from __future__ import annotations

import pytest

from loadgen.sim_burst import KV_TOKENS, main, parse_kv_tokens, scenario
from qlm.core.errors import InvalidInput
from qlm.core.types import SLOClass


def test_kv_pools_are_given_per_model() -> None:
    assert parse_kv_tokens("") == {}
    assert parse_kv_tokens(" mistral-7b=120000 ") == {"mistral-7b": 120_000}
    assert set(KV_TOKENS) == {"mistral-7b", "qwen2.5-1.5b"}


@pytest.mark.parametrize("text, problem", [
    ("mistral-7b", "expected MODEL=TOKENS"),
    ("llama=5", "expected MODEL=TOKENS"),
    ("mistral-7b=0", "positive integer"),
    ("mistral-7b=lots", "positive integer"),
])
def test_a_bad_kv_pool_is_refused_by_name(text: str, problem: str) -> None:
    with pytest.raises(InvalidInput, match=problem) as info:
        parse_kv_tokens(text)
    assert info.value.field == "kv_tokens"


@pytest.mark.parametrize("argv, message", [
    (["--kv-tokens", "mistral-7b=-1"], "kv_tokens"),
    (["--policy-options", "[1]"], "policy_options: must be a JSON object"),
    (["--policy-options", "{"], "policy_options: not JSON"),
])
def test_the_command_line_names_the_bad_argument_and_runs_nothing(
        argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_interactive_only_leaves_the_batch_jobs_out() -> None:
    jobs, workers, _, _ = scenario(0, 2.0, 400)
    alone, same_workers, _, _ = scenario(0, 2.0, 400, interactive_only=True)
    interactive = [j for j in jobs if j.request.slo_class is SLOClass.INTERACTIVE]
    assert 0 < len(alone) == len(interactive) < len(jobs)
    assert [j.request.id for j in alone] == [j.request.id for j in interactive]
    assert same_workers == workers
