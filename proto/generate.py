"""Generate the Python code of ``proto/qlm/v1`` into ``qlm/api/v1`` (``make proto``).

protoc names generated imports after the proto path (``from qlm.v1 import ...``);
the code lives in the ``qlm.api.v1`` package, so those imports are rewritten.
``--out DIR`` writes somewhere else (the freshness test diffs against the committed copy).

Usage: python proto/generate.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
SOURCES = ("qlm/v1/qlm.proto", "qlm/v1/estimator.proto")
DEFAULT_OUT = ROOT / "qlm" / "api" / "v1"


def _rewrite_imports(text: str) -> str:
    return text.replace("from qlm.v1 import", "from qlm.api.v1 import")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every source and write the rewritten files to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *SOURCES,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        for path in sorted((Path(tmp) / "qlm" / "v1").iterdir()):
            target = out_dir / path.name
            target.write_text(_rewrite_imports(path.read_text()))
            written.append(target)
    init = out_dir / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated gRPC and protobuf code of proto/qlm/v1 (make proto)."""\n')
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out.parent) if args.out == DEFAULT_OUT else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
