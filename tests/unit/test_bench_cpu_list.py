"""The core lists the submit benchmark pins its processes to (--server-cpus and friends)."""

from __future__ import annotations

import argparse

import pytest

from loadgen.bench_submit import _cpu_list


@pytest.mark.parametrize(("text", "cores"), [
    ("0", {0}), ("0,1", {0, 1}), ("2-5", {2, 3, 4, 5}), ("0,2-3", {0, 2, 3}),
])
def test_core_lists_name_each_core(text: str, cores: set[int]) -> None:
    assert _cpu_list(text) == frozenset(cores)


@pytest.mark.parametrize("text", ["", "a", "1-", "-1", "0,,1", "3-x"])
def test_a_bad_core_list_is_refused_with_the_text(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="core list"):
        _cpu_list(text)


def test_a_range_that_runs_backwards_is_refused() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="core list"):
        _cpu_list("5-2")
