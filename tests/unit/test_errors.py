"""qlm's errors keep their fields when they cross a process boundary (a pool of
simulations, a pickled result)."""

from __future__ import annotations

import pickle

from qlm.core.errors import InvalidInput, NotFound, Overloaded


def test_errors_survive_pickling_with_their_fields() -> None:
    invalid = pickle.loads(pickle.dumps(InvalidInput("options", "unknown qlm option(s): x")))
    assert isinstance(invalid, InvalidInput)
    assert (invalid.field, invalid.problem) == ("options", "unknown qlm option(s): x")
    missing = pickle.loads(pickle.dumps(NotFound("model", "llama")))
    assert (missing.what, missing.name) == ("model", "llama")
    assert str(missing) == "model 'llama' not found"
    busy = pickle.loads(pickle.dumps(Overloaded("queue full", 2.5, {"queued": "10"})))
    assert (str(busy), busy.retry_after_s, busy.details) == ("queue full", 2.5, {"queued": "10"})
