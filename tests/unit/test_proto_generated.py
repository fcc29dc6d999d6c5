"""The committed code in qlm/api/v1 is what `make proto` generates from proto/qlm/v1."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "qlm" / "api" / "v1"
#: Lines that only record the generator's version (they change with grpcio-tools upgrades).
_VERSION_LINE = re.compile(
    r"Protobuf Python Version|GRPC_GENERATED_VERSION =|^\s+\d+,\s*$|ValidateProtobufRuntimeVersion"
)


def _normalised(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not _VERSION_LINE.search(line)]


def test_committed_code_matches_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in COMMITTED.iterdir() if p.suffix in {".py", ".pyi"})
    assert fresh == committed
    stale = [n for n in fresh if _normalised(tmp_path / n) != _normalised(COMMITTED / n)]
    assert not stale, f"qlm/api/v1 is out of date for {stale}: run `make proto`"


def test_generated_code_imports_as_a_package() -> None:
    from qlm.api.v1 import estimator_pb2, estimator_pb2_grpc, qlm_pb2, qlm_pb2_grpc

    request = qlm_pb2.SubmitRequest(model="m", prompt_text="hi", max_tokens=1)
    assert qlm_pb2.SubmitRequest.FromString(request.SerializeToString()) == request
    assert estimator_pb2.PredictWaitRequest(slo_class=qlm_pb2.SLO_CLASS_CUSTOM).slo_class == 4
    assert hasattr(qlm_pb2_grpc, "QueueManagerStub")
    assert hasattr(estimator_pb2_grpc, "EstimatorServicer")
