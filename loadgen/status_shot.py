"""Screenshot of the status page while traffic flows: ``docs/status.png``.

Starts a local stack (Redis, Kafka, the services, the simulated workers of
``docker/workers.cpu.yaml`` ``--time-scale`` times faster than their GPUs) in a temporary
directory, sends interactive chat requests and a batch of another model through the
OpenAI API (the ``openai`` package) so that the queue, the workers and a model swap
show, takes the screenshot with headless chromium, and stops everything::

    python -m loadgen.status_shot --out docs/status.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai

from qlm.localstack.services import DEFAULT_WORKERS_FILE, ServiceOptions, ServiceStack
from qlm.localstack.stack import LocalStack, StackPorts


def _traffic(base_url: str, stop: threading.Event) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    i = 0
    while not stop.is_set():
        i += 1
        try:
            client.chat.completions.create(
                model="mistral-7b", max_tokens=64 + (i % 5) * 40,
                messages=[{"role": "user", "content": f"question {i}"}])
        except openai.APIError:
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/status.png"))
    parser.add_argument("--time-scale", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=20.0, help="traffic before the shot")
    parser.add_argument("--batch-lines", type=int, default=3000)
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        parser.error("chromium not found (apt-get install -y chromium)")
    work = Path(tempfile.mkdtemp(prefix="qlm-status-"))
    brokers = LocalStack.open(work, StackPorts(0, 0, 0))
    brokers.up()
    env = brokers.environment()
    services = ServiceStack(work, env["QLM_REDIS_URL"], env["QLM_KAFKA_BOOTSTRAP"],
                            ServiceOptions(workers_file=DEFAULT_WORKERS_FILE,
                                           time_scale=args.time_scale,
                                           admission="interactive=queue"))
    stop = threading.Event()
    try:
        services.up()
        base = services.openai_base_url
        client = openai.OpenAI(base_url=base, api_key="unused")
        rows = "".join(json.dumps({
            "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "vicuna-13b", "max_tokens": 300,
                     "messages": [{"role": "user", "content": f"summarise document {i}"}]},
        }) + "\n" for i in range(args.batch_lines))
        uploaded = client.files.create(file=("docs.jsonl", rows.encode()), purpose="batch")
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
        threads = [threading.Thread(target=_traffic, args=(base, stop)) for _ in range(12)]
        for thread in threads:
            thread.start()
        time.sleep(args.seconds)
        root = base.removesuffix("/v1")
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                        "--virtual-time-budget=3000", "--window-size=1400,1000",
                        "--hide-scrollbars", f"--screenshot={args.out.resolve()}",
                        f"{root}/status"], check=True, capture_output=True, timeout=120)
        print(f"wrote {args.out}")
    finally:
        stop.set()
        services.down()
        brokers.down()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
