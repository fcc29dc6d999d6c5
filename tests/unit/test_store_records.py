"""The store's record encoding and key names, without a server."""

from __future__ import annotations

import json

import pytest
from redis.crc import key_slot

from qlm.core.errors import InvalidInput
from qlm.core.types import SLO, GroupKey, Request, RequestState, SLOClass
from qlm.store.keys import Keys
from qlm.store.records import (
    IDENTITY_FIELDS,
    encode_json,
    identity_pairs,
    initial_pairs,
    record_from_fields,
)
from qlm.store.scripts import SCRIPT_NAMES, script_source


def make_request(**overrides: object) -> Request:
    fields: dict[str, object] = {
        "id": "r1",
        "model": "m|with|bars",
        "prompt_tokens": 12,
        "max_tokens": 34,
        "slo_class": SLOClass.CUSTOM,
        "slo": SLO(ttft_s=0.1 + 0.2, tpot_s=0.05),
        "arrival_at": 1_700_000_000.123456789,
        "tenant": "t",
    }
    fields.update(overrides)
    return Request(**fields)  # type: ignore[arg-type]


def test_a_new_record_round_trips_exactly() -> None:
    request = make_request()
    group = GroupKey(request.model, request.slo_class, 170_000_000)
    prompt, params = encode_json([1, 2, 3], "prompt"), encode_json({"top_p": 0.9}, "params")
    fields = dict(identity_pairs(request, prompt, params) + initial_pairs(request, group, 5.5))

    record = record_from_fields(fields)

    assert record.request == request  # floats written with repr come back equal
    assert record.group == group
    assert record.state is RequestState.QUEUED
    assert record.prompt == [1, 2, 3] and record.params == {"top_p": 0.9}
    assert record.enqueued_at == 5.5
    assert record.worker_id is None and record.started_at is None
    assert float(fields["deadline_at"]) == request.deadline_at


def test_requests_read_back_share_one_slo_object_per_distinct_slo() -> None:
    """A mirror of 100k queued requests holds a few SLO objects, not one per request for
    every full garbage collection to walk."""
    group = GroupKey("m", SLOClass.CUSTOM, 1)
    slos = []
    for i in range(3):
        request = make_request(id=f"r{i}")
        fields = dict(identity_pairs(request, "[]", "{}") + initial_pairs(request, group, 1.0))
        slos.append(record_from_fields(fields).request.slo)
    assert slos[0] is slos[1] is slos[2] == SLO(0.1 + 0.2, 0.05)
    assert SLO.for_class(SLOClass.BATCH_1) is SLO.for_class(SLOClass.BATCH_1)
    assert SLO.of(20, None) is not SLO.of(20.0, None)  # equal, but each keeps its own type
    with pytest.raises(InvalidInput, match=r"slo\.ttft_s"):
        SLO.of(-1.0)
    with pytest.raises(InvalidInput, match=r"slo\.ttft_s"):
        SLO.of([1.0])  # type: ignore[arg-type]


def test_identity_covers_the_payload_in_a_fixed_order() -> None:
    pairs = identity_pairs(make_request(slo=SLO(ttft_s=2.0)), "null", "{}")
    assert [name for name, _ in pairs] == list(IDENTITY_FIELDS)
    assert dict(pairs)["tpot_s"] == ""


def test_json_fields_are_canonical_and_validated() -> None:
    assert encode_json({"b": 1, "a": [1.5]}, "params") == '{"a":[1.5],"b":1}'
    assert json.loads(encode_json("héllo", "prompt")) == "héllo"
    with pytest.raises(InvalidInput, match="params"):
        encode_json({"x": float("nan")}, "params")


def test_key_names_share_one_hash_tagged_prefix_and_so_one_cluster_slot() -> None:
    keys = Keys("app:")
    group = GroupKey("m", SLOClass.BATCH_1, 7)
    names = [
        keys.request("r"),
        keys.group(group),
        keys.groups,
        keys.virtual_queue("w"),
        keys.workers,
        keys.running("w"),
        keys.leases,
        keys.stream("r"),
        keys.scheduler_leader,
        keys.scheduler_fence,
        keys.request("id-{with}-braces"),
        keys.group(GroupKey("{m}", SLOClass.BATCH_1, 7)),
    ]
    assert all(name.startswith("{app:}") for name in names)
    assert keys.group(group) == "{app:}group:m|batch-1|7"
    assert {key_slot(name.encode()) for name in names} == {key_slot(b"app:")}
    assert key_slot(Keys("other:").groups.encode()) != key_slot(keys.groups.encode())
    assert Keys("{app:}") == keys and keys.name == "app:"
    for bad in ("has space", "", "a{b", "x}", "{a}b"):
        with pytest.raises(InvalidInput, match="prefix"):
            Keys(bad)


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_script_header_lists_its_keys_and_argv(name: str) -> None:
    body = script_source(name).split("-- End of shared helpers.", 1)[1]
    header = [line for line in body.splitlines() if line.startswith("--")]
    assert any("KEYS[1" in line for line in header)
    assert any("ARGV[1" in line for line in header)
    assert any("Returns" in line for line in header)
