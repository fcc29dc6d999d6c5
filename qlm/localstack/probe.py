"""``python -m qlm.localstack.probe grpc HOST:PORT`` or ``... http URL``: exit 0 when the
service answers as healthy (gRPC health SERVING; HTTP 200), 1 otherwise. Over TLS when
``QLM_TLS_CA_FILE`` (the CA a service trusts, set with TLS on) names a CA file.

The health check of every qlm container in compose.yaml (the images have no curl or
grpc_health_probe; they have Python and qlm).
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from qlm.localstack.services import grpc_serving


def http_ok(url: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in ("grpc", "http"):
        print("usage: python -m qlm.localstack.probe grpc HOST:PORT | http URL", file=sys.stderr)
        return 2
    kind, target = args
    ca_file = os.environ.get("QLM_TLS_CA_FILE")
    ca = Path(ca_file) if ca_file else None
    healthy = (grpc_serving(target, timeout_s=2.0, ca=ca) if kind == "grpc"
               else http_ok(target))
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main())
