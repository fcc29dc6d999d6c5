"""Policy options: one typed dataclass per policy, one parser (``parse_options``) used by
every entry point, and each policy's own queue order. Pure logic."""

from __future__ import annotations

import dataclasses

import pytest

from qlm.core.errors import InvalidInput
from qlm.core.perf import PerfProfile, ProfileBook
from qlm.core.policies import PolicyContext, make_policy, policy_names
from qlm.core.policies.base import (
    GroupOrder,
    check_policy_options,
    options_doc,
    order_key,
    parse_options,
    policy_class,
)
from qlm.core.policies.qlm import QlmOptions, QlmPolicy
from qlm.core.types import SLO, QueueSnapshot, Request, SLOClass, WorkerView, group_requests


@pytest.mark.parametrize("name", ["qlm", "shepherd", "fcfs", "edf", "priority", "static",
                                  "vllm-swap"])
def test_every_policy_declares_frozen_documented_options(name: str) -> None:
    options_type = policy_class(name).options_type
    params = options_type.__dataclass_params__
    assert params.frozen
    assert hasattr(options_type, "__slots__")
    docs = options_doc(options_type)
    assert docs and all(docs.values()), docs
    defaults = parse_options(options_type, {}, policy=name)
    assert defaults == options_type()
    with pytest.raises(dataclasses.FrozenInstanceError):
        defaults.__setattr__(next(iter(docs)), None)


@pytest.mark.parametrize(("name", "given", "field", "words"), [
    ("qlm", {"no_such": 1}, "policy-options", "no option 'no_such'"),
    ("qlm", {"evict": "yes"}, "options.evict", "true or false"),
    ("qlm", {"milp_max_cells": 1.5}, "options.milp_max_cells", "integer"),
    ("qlm", {"evict_rate_credit": "0.5"}, "options.evict_rate_credit", "number"),
    ("qlm", {"evict_rate_credit": -0.1}, "options.evict_rate_credit", ">= 0"),
    ("qlm", {"hopeless_p": 2}, "options.hopeless_p", "<= 1"),
    ("qlm", {"service_scale": 0}, "options.service_scale", "> 0"),
    ("qlm", {"class_weights": {"interactive": -1}}, "options.class_weights.interactive", ">= 0"),
    ("qlm", {"class_weights": {"gold": 1}}, "options.class_weights.gold", "unknown SLO class"),
    ("qlm", {"class_weights": [1]}, "options.class_weights", "object"),
    ("qlm", {"output_stats": {"m": "long"}}, "options.output_stats.m", "(mean, std)"),
    ("shepherd", {"window": 0}, "options.window", ">= 1"),
    ("shepherd", {"evict": True}, "policy-options", "no option 'evict'"),
    ("fcfs", {"expected_output_tokens": 0}, "options.expected_output_tokens", "> 0"),
    ("vllm-swap", {"drain_first": 1}, "options.drain_first", "true or false"),
    ("static", {"shares": {"a": True}}, "options.shares.a", "number"),
])
def test_a_bad_option_is_named_with_its_problem(name: str, given: dict[str, object],
                                                field: str, words: str) -> None:
    with pytest.raises(InvalidInput) as err:
        check_policy_options(name, given)
    assert err.value.field == field
    assert words in err.value.problem
    with pytest.raises(InvalidInput):  # the constructor path parses the same way
        make_policy(name, **given)


def test_values_arrive_typed() -> None:
    options = parse_options(QlmOptions, {"evict_rate_credit": 1, "milp_max_cells": 24.0,
                                         "class_weights": {"interactive": 2},
                                         "output_stats": {"m": [100, 10]}}, policy="qlm")
    assert isinstance(options.evict_rate_credit, float) and options.evict_rate_credit == 1.0
    assert options.milp_max_cells == 24 and isinstance(options.milp_max_cells, int)
    assert options.weights == {SLOClass.INTERACTIVE: 2.0}
    assert options.output_stats["m"].mean == 100.0
    assert "*" in options.output_stats  # the default for every other model
    assert QlmPolicy(evict=False).options == dataclasses.replace(QlmOptions(), evict=False)


def test_context_options_override_the_policys_own() -> None:
    policy = QlmPolicy(evict_rate_credit=0.5, evict=False)
    ctx = PolicyContext(ProfileBook.of([]), {"evict": True})
    options = policy.options_for(ctx)
    assert (options.evict_rate_credit, options.evict) == (0.5, True)
    assert policy.options_for(PolicyContext(ProfileBook.of([]))) is policy.options
    with pytest.raises(InvalidInput) as err:
        policy.options_for(PolicyContext(ProfileBook.of([]), {"evict": "no"}))
    assert err.value.field == "options.evict"


def _profile(model: str) -> PerfProfile:
    return PerfProfile(
        model=model, gpu="g", num_gpus=1, prefill_tokens=(1, 4096), prefill_seconds=(0.002, 0.5),
        decode_base_s=0.02, decode_per_seq_s=1e-4, decode_per_ctx_token_s=1e-7,
        kv_capacity_tokens=60_000, max_batch_size=16, sleep_s=0.5, wake_s=1.0, cold_load_s=20.0,
    )


def test_a_baseline_reads_options_from_the_context_as_from_its_constructor() -> None:
    """``static``'s ``shares`` given to the scheduler (as PolicyContext.options) plan the
    split exactly as when given to the constructor."""
    book = ProfileBook.of([_profile("a"), _profile("b")])
    workers = tuple(WorkerView(f"w{i}", "g", ("a", "b"), "a", 60_000, 16) for i in range(4))
    requests = [Request(f"q{i}", m, 200, 256, SLOClass.BATCH_1, SLO.for_class(SLOClass.BATCH_1),
                        990.0) for i, m in enumerate("abab")]
    snap = QueueSnapshot(1000.0, group_requests(requests, 10.0), workers)
    shares = {"a": 1, "b": 3}
    by_constructor = make_policy("static", shares=shares).decide(snap, PolicyContext(book))
    by_context = make_policy("static").decide(snap, PolicyContext(book, {"shares": shares}))
    plain = make_policy("static").decide(snap, PolicyContext(book))
    assert by_context == by_constructor
    assert len([s for s in by_context.swaps if s.to_model == "b"]) == 3
    assert by_context != plain


def test_each_policy_says_its_order_and_the_estimator_asks_it() -> None:
    early_deadline = GroupOrder(earliest_deadline_at=10.0, first_arrival_at=5.0, level=1)
    early_arrival = GroupOrder(earliest_deadline_at=20.0, first_arrival_at=1.0, level=1)
    interactive = GroupOrder(earliest_deadline_at=30.0, first_arrival_at=9.0, level=0)
    first = {name: min((early_deadline, early_arrival, interactive), key=order_key(name))
             for name in policy_names()}
    assert first == {"qlm": early_deadline, "edf": early_deadline, "shepherd": early_deadline,
                     "fcfs": early_arrival, "static": early_arrival, "vllm-swap": early_arrival,
                     "priority": interactive}
    for name in policy_names():
        assert order_key(name) is policy_class(name).queue_order
    with pytest.raises(InvalidInput) as err:
        order_key("lifo")
    assert err.value.field == "policy"


def test_scheduler_settings_refuse_a_bad_option_when_they_load() -> None:
    from pydantic import ValidationError

    from services.scheduler.settings import SchedulerSettings

    with pytest.raises(ValidationError) as err:
        SchedulerSettings(policy="qlm", policy_options={"evict_rate_credit": -1})
    assert "options.evict_rate_credit" in str(err.value)
    ok = SchedulerSettings(policy="static", policy_options={"shares": {"a": 1}})
    assert ok.policy_options == {"shares": {"a": 1}}
