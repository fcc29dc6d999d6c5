"""The ``qlm`` command line.

    qlm submit --model M --prompt TEXT --max-tokens N [--slo-class C] [--ttft-slo-s S] [--stream]
    qlm status ID          qlm cancel ID          qlm models
    qlm batch submit FILE.jsonl [--id-prefix P]     (through Kafka qlm.batch.requests)
    qlm tenants add NAME | list | revoke NAME      (API keys, kept hashed in Redis)
    qlm tenants limit NAME --max-queued N --tokens-per-minute M    (quotas; 0 = none)
    qlm up | down | stack-status                    (the local Redis + Kafka, qlm.localstack)

Answers are printed as JSON. The gRPC target is ``--target`` or ``QLM_TARGET``
(default 127.0.0.1:50051); Kafka is ``--kafka-bootstrap`` or ``QLM_KAFKA_BOOTSTRAP``.
The API key is ``--api-key`` or ``QLM_API_KEY``, the CA to trust ``--tls-ca`` or
``QLM_TLS_CA`` (``make up`` writes both to ``.qlm/stack.env``).
Exit status: 0 ok, 1 server or connection error, 2 invalid input (nothing was sent).

Batch files: one JSON object per line with the submission schema of
:mod:`qlm.submission`; blank lines are skipped. A line without ``request_id`` gets
``<id-prefix>-<line number>`` (the prefix defaults to the file's name), so submitting
the same file again is a no-op for the lines already queued. Every line is validated
before anything is sent; the first bad one is reported as ``FILE:LINE: field: problem``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from qlm.core.errors import InvalidInput, QlmError
from qlm.submission import Submission, parse_submission

EXIT_OK, EXIT_ERROR, EXIT_INVALID = 0, 1, 2


def _print_message(message: Message) -> None:
    as_dict = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    print(json.dumps(as_dict, indent=2))


# ------------------------------------------------------------------ batch files
@dataclass(frozen=True, slots=True)
class BatchLine:
    line_number: int
    submission: Submission


def id_prefix_for(path: Path) -> str:
    """The default id prefix of a batch file: its name without suffix, in id characters."""
    return re.sub(r"[^A-Za-z0-9._:-]", "_", path.stem)[:100] or "batch"


def read_batch_file(path: Path, id_prefix: str | None = None,
                    tenant: str | None = None) -> list[BatchLine]:
    """Every submission in ``path``; InvalidInput("FILE:LINE: field", problem) on a bad line.
    ``tenant`` fills the lines that name none."""
    prefix = id_prefix or id_prefix_for(path)
    lines: list[BatchLine] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                problem = f"not valid JSON ({exc.msg} at column {exc.colno})"
                raise InvalidInput(where, problem) from None
            if isinstance(record, dict) and not record.get("request_id"):
                record["request_id"] = f"{prefix}-{number}"
            if isinstance(record, dict) and tenant and not record.get("tenant"):
                record["tenant"] = tenant
            try:
                submission = parse_submission(record, models=None)
            except InvalidInput as exc:
                raise InvalidInput(f"{where}: {exc.field}", exc.problem) from None
            if submission.request_id in seen:
                raise InvalidInput(
                    f"{where}: request_id",
                    f"{submission.request_id!r} repeats line {seen[submission.request_id]}",
                )
            seen[submission.request_id] = number
            lines.append(BatchLine(number, submission))
    return lines


def kafka_auth_from_env() -> Any:
    """The client's Kafka credentials from ``QLM_KAFKA_SECURITY_PROTOCOL``,
    ``QLM_KAFKA_SASL_MECHANISM``, ``QLM_KAFKA_SASL_USERNAME``, ``QLM_KAFKA_SASL_PASSWORD``
    (``make up`` writes them to .qlm/stack.env)."""
    from qlm.bus.security import KafkaAuth

    env = os.environ
    return KafkaAuth(env.get("QLM_KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT",  # type: ignore[arg-type]
                     env.get("QLM_KAFKA_SASL_MECHANISM") or None,
                     env.get("QLM_KAFKA_SASL_USERNAME") or None,
                     env.get("QLM_KAFKA_SASL_PASSWORD") or None)


async def send_batch(
    lines: Sequence[BatchLine], bootstrap: str, topic_prefix: str = "", chunk: int = 500,
    api_key: str | None = None, kafka_auth: Any = None,
) -> int:
    """Produce every line to ``qlm.batch.requests`` (keyed by request id, acks=all).

    With ``api_key`` each record is signed with the tenant's signing key (qlm.tenants);
    the tenant of each line must then be the key's tenant (the server checks it)."""
    from qlm.bus.producer import BusProducer
    from qlm.bus.records import encode_batch_request
    from qlm.bus.topics import TopicNames
    from qlm.tenants import SIGNATURE_HEADER, sign_record, signing_key

    topic = TopicNames(topic_prefix).batch_requests
    key = signing_key(api_key) if api_key else None

    def headers(value: bytes) -> list[tuple[str, bytes]] | None:
        return [(SIGNATURE_HEADER, sign_record(value, key).encode())] if key else None

    options = kafka_auth.client_options() if kafka_auth is not None else {}
    async with BusProducer(bootstrap, client_id="qlm-cli", **options) as producer:
        for start in range(0, len(lines), chunk):
            values = [encode_batch_request(line.submission) for line in lines[start:start + chunk]]
            await asyncio.gather(*(
                producer.publish_raw(topic, value, line.submission.request_id.encode(),
                                     headers(value))
                for line, value in zip(lines[start:start + chunk], values, strict=True)
            ))
    return len(lines)


# ------------------------------------------------------------------ commands
def _submission_record(args: argparse.Namespace) -> dict[str, Any]:
    record: dict[str, Any] = {"model": args.model, "max_tokens": args.max_tokens}
    if args.prompt_token_ids is not None:
        try:
            record["prompt_token_ids"] = [int(t) for t in args.prompt_token_ids.split(",") if t]
        except ValueError:
            raise InvalidInput("prompt_token_ids", "must be comma-separated integers") from None
    else:
        record["prompt"] = args.prompt
    for name in ("request_id", "tenant", "slo_class", "ttft_slo_s", "tpot_slo_s"):
        if getattr(args, name) is not None:
            record[name] = getattr(args, name)
    return record


def _client(args: argparse.Namespace) -> Any:
    from qlm.client import SyncQlmClient

    return SyncQlmClient(args.target, api_key=args.api_key or None,
                         tls_ca=args.tls_ca or None, tls_client_cert=args.tls_client_cert or None,
                         tls_client_key=args.tls_client_key or None)


def cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reply = client.submit(_submission_record(args))
        _print_message(reply)
        if args.stream:
            for chunk in client.stream_tokens(reply.request_id):
                if chunk.text:
                    print(chunk.text, end="", flush=True)
                if chunk.HasField("final"):
                    print()
                    _print_message(chunk.final)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_message(client.get(args.request_id))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_message(client.cancel(args.request_id))
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        models = client.list_models()
    as_dicts = [MessageToDict(m, preserving_proto_field_name=True) for m in models]
    print(json.dumps(as_dicts, indent=2))
    return EXIT_OK


def cmd_batch_submit(args: argparse.Namespace) -> int:
    lines = read_batch_file(args.file, args.id_prefix, tenant=args.tenant)
    sent = asyncio.run(send_batch(lines, args.kafka_bootstrap, args.topic_prefix,
                                  api_key=args.api_key or None,
                                  kafka_auth=kafka_auth_from_env()))
    first = lines[0].submission.request_id if lines else ""
    last = lines[-1].submission.request_id if lines else ""
    summary = {"file": str(args.file), "num_sent": sent, "first_id": first, "last_id": last}
    print(json.dumps(summary))
    return EXIT_OK


async def _with_tenants(args: argparse.Namespace, action: Any) -> Any:
    from qlm.store.client import redis_client
    from qlm.tenants import TenantRegistry

    client = redis_client(args.redis_url, decode_responses=True)
    try:
        return await action(TenantRegistry(client, args.key_prefix))
    except OSError as error:
        raise QlmError(f"redis at {args.redis_url}: {error}") from None
    finally:
        await client.aclose()


def cmd_tenants_add(args: argparse.Namespace) -> int:
    key = asyncio.run(_with_tenants(args, lambda tenants: tenants.add(args.name)))
    print(json.dumps({"tenant": args.name, "api_key": key}))
    return EXIT_OK


def cmd_tenants_revoke(args: argparse.Namespace) -> int:
    asyncio.run(_with_tenants(args, lambda tenants: tenants.revoke(args.name)))
    print(json.dumps({"tenant": args.name, "revoked": True}))
    return EXIT_OK


def cmd_tenants_limit(args: argparse.Namespace) -> int:
    from qlm.tenants import TenantLimits

    limits = TenantLimits(args.max_queued, args.tokens_per_minute)
    asyncio.run(_with_tenants(args, lambda tenants: tenants.set_limits(args.name, limits)))
    print(json.dumps({"tenant": args.name, "max_queued": limits.max_queued,
                      "tokens_per_minute": limits.tokens_per_minute}))
    return EXIT_OK


def cmd_tenants_list(args: argparse.Namespace) -> int:
    infos = asyncio.run(_with_tenants(args, lambda tenants: tenants.list()))
    print(json.dumps([{"tenant": i.name, "created_at": i.created_at, "active": i.active}
                      for i in infos], indent=2))
    return EXIT_OK


def cmd_stack(args: argparse.Namespace) -> int:
    from qlm.localstack.cli import main as localstack_main

    command = {"up": "up", "down": "down", "stack-status": "status"}[args.command]
    return localstack_main([command, *args.rest])


# ------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qlm", description="SLO-oriented LLM queue manager")
    parser.add_argument("--target", default=os.environ.get("QLM_TARGET", "127.0.0.1:50051"),
                        help="ingest gRPC address (env QLM_TARGET)")
    parser.add_argument("--api-key", default=os.environ.get("QLM_API_KEY", ""),
                        help="API key of your tenant (env QLM_API_KEY; qlm tenants add)")
    parser.add_argument("--tls-ca", default=os.environ.get("QLM_TLS_CA", ""),
                        help="CA file (PEM) to trust: TLS to ingest (env QLM_TLS_CA)")
    parser.add_argument("--tls-client-cert", default=os.environ.get("QLM_TLS_CLIENT_CERT", ""),
                        help="client certificate (PEM) for mTLS (env QLM_TLS_CLIENT_CERT)")
    parser.add_argument("--tls-client-key", default=os.environ.get("QLM_TLS_CLIENT_KEY", ""),
                        help="its private key (env QLM_TLS_CLIENT_KEY)")
    parser.add_argument("--redis-url", default=os.environ.get("QLM_REDIS_URL",
                                                              "redis://127.0.0.1:6379/0"),
                        help="tenants: the Redis of the queue (env QLM_REDIS_URL)")
    parser.add_argument("--key-prefix", default=os.environ.get("QLM_KEY_PREFIX", "qlm:"),
                        help="tenants: prefix of the queue's Redis keys (env QLM_KEY_PREFIX)")
    commands = parser.add_subparsers(dest="command", required=True)

    submit = commands.add_parser("submit", help="queue one request")
    submit.add_argument("--model", required=True)
    prompt = submit.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-token-ids", help="comma-separated token ids")
    submit.add_argument("--max-tokens", type=int, required=True)
    submit.add_argument("--slo-class", choices=["interactive", "batch-1", "batch-2", "custom"])
    submit.add_argument("--ttft-slo-s", type=float)
    submit.add_argument("--tpot-slo-s", type=float)
    submit.add_argument("--tenant")
    submit.add_argument("--id", dest="request_id", help="idempotency key")
    submit.add_argument("--stream", action="store_true", help="then print the tokens as they come")
    submit.set_defaults(run=cmd_submit)

    for name, run, text in (("status", cmd_status, "show a request"),
                            ("cancel", cmd_cancel, "cancel a request")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("request_id")
        sub.set_defaults(run=run)
    commands.add_parser("models", help="list served models").set_defaults(run=cmd_models)

    batch = commands.add_parser("batch", help="batch submission through Kafka")
    batch_commands = batch.add_subparsers(dest="batch_command", required=True)
    batch_submit = batch_commands.add_parser("submit", help="send a JSONL file")
    batch_submit.add_argument("file", type=Path)
    batch_submit.add_argument("--id-prefix", help="prefix of line-number ids (default: file name)")
    batch_submit.add_argument("--kafka-bootstrap",
                              default=os.environ.get("QLM_KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    batch_submit.add_argument("--topic-prefix", default=os.environ.get("QLM_TOPIC_PREFIX", ""))
    batch_submit.add_argument("--tenant", default=os.environ.get("QLM_TENANT"),
                              help="tenant of the lines that name none (env QLM_TENANT); "
                              "records are signed with --api-key")
    batch_submit.set_defaults(run=cmd_batch_submit)

    tenants = commands.add_parser("tenants", help="tenants and their API keys (in Redis)")
    tenant_commands = tenants.add_subparsers(dest="tenants_command", required=True)
    add = tenant_commands.add_parser("add", help="make a tenant; prints its API key once")
    add.add_argument("name")
    add.set_defaults(run=cmd_tenants_add)
    revoke = tenant_commands.add_parser("revoke", help="revoke a tenant's API key")
    revoke.add_argument("name")
    revoke.set_defaults(run=cmd_tenants_revoke)
    tenant_commands.add_parser("list", help="every tenant").set_defaults(run=cmd_tenants_list)
    limit = tenant_commands.add_parser("limit", help="set a tenant's quotas (0: none)")
    limit.add_argument("name")
    limit.add_argument("--max-queued", type=int, default=0,
                       help="requests queued or running at once")
    limit.add_argument("--tokens-per-minute", type=int, default=0,
                       help="prompt + max_tokens of the requests admitted per minute")
    limit.set_defaults(run=cmd_tenants_limit)

    for name in ("up", "down", "stack-status"):
        stack = commands.add_parser(name, help=f"local Redis + Kafka: {name}")
        stack.add_argument("rest", nargs=argparse.REMAINDER)
        stack.set_defaults(run=cmd_stack)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except InvalidInput as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INVALID
    except (QlmError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
