"""The decision-time benchmark's policy entries and its count of full collections."""

from __future__ import annotations

import gc

import pytest

from loadgen.bench_decide import FullCollections, policy_entry
from qlm.core.errors import InvalidInput


def test_an_entry_names_a_policy_and_its_options() -> None:
    assert policy_entry("fcfs") == ("fcfs", {})
    assert policy_entry("qlm:fair_share=false") == ("qlm", {"fair_share": False})
    assert policy_entry("qlm:evict_budget=8:class_weights={\"batch-1\": 2}") == (
        "qlm", {"evict_budget": 8, "class_weights": {"batch-1": 2}})
    assert policy_entry("qlm:output_stats=x") == ("qlm", {"output_stats": "x"})


@pytest.mark.parametrize("bad", ["qlm:fair_share", "qlm:=1", "qlm:"])
def test_a_bad_entry_names_the_field_and_the_entry(bad: str) -> None:
    with pytest.raises(InvalidInput, match="policies") as info:
        policy_entry(bad)
    assert repr(bad) in str(info.value)


def test_full_collections_are_counted_only_while_active() -> None:
    counter = FullCollections()
    gc.collect()
    with counter:
        gc.collect(0)  # a young collection: not counted
        gc.collect()
    gc.collect()
    assert counter.count == 1
    assert counter.ms >= 0.0
    assert counter not in gc.callbacks
