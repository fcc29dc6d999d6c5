"""The shared data model's own behaviour (qlm/core/types.py)."""

from __future__ import annotations

import dataclasses

import pytest

from qlm.core.errors import InvalidInput
from qlm.core.types import SLO, Request, SLOClass


def test_with_generated_equals_replace_in_every_field() -> None:
    request = Request("r1", "m", 12, 34, SLOClass.CUSTOM, SLO(0.3, 0.05), 5.5, "acme", 2)
    moved = request.with_generated(7)
    assert moved == dataclasses.replace(request, num_generated=7)
    for f in dataclasses.fields(Request):  # every slot set (a new field must be copied)
        expected = 7 if f.name == "num_generated" else getattr(request, f.name)
        assert getattr(moved, f.name) == expected, f.name
    assert request.num_generated == 2  # the original is left as it was


@pytest.mark.parametrize("num_generated", [-1, 35])
def test_with_generated_checks_the_progress_as_the_constructor_does(num_generated: int) -> None:
    request = Request("r1", "m", 12, 34, SLOClass.INTERACTIVE, SLO.of(20.0), 5.5)
    with pytest.raises(InvalidInput, match="num_generated"):
        request.with_generated(num_generated)
