"""Tenants on real Redis and Kafka: API keys, TLS, and isolation between tenants over gRPC.

Ingest runs in process with ``auth=required`` and TLS (certificates from
:func:`qlm.tls.ensure_local_pki`); the clients are :class:`qlm.client.QlmClient`.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from qlm.api.v1 import qlm_pb2 as pb
from qlm.api.v1 import qlm_pb2_grpc
from qlm.bus.producer import BusProducer
from qlm.bus.records import DeadLetter
from qlm.bus.topics import TopicNames, ensure_topics, topic_specs
from qlm.cli import main as cli_main
from qlm.client import QlmClient
from qlm.core.errors import InvalidInput, NotFound, Unauthenticated
from qlm.store.keys import Keys
from qlm.submission import ModelLimits
from qlm.tenants import SIGNATURE_HEADER, TenantRegistry, key_digest, sign_record, signing_key
from qlm.tls import LocalPki, ensure_local_pki
from services.ingest.app import IngestApp
from services.ingest.settings import IngestSettings
from tests.integration.test_ingest import read_topic

pytestmark = [pytest.mark.redis, pytest.mark.kafka]

MODELS = {"m7b": ModelLimits("m7b", max_model_len=2048, gpus=("H100-80GB",))}


def good(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"model": "m7b", "prompt": "Tell me a story.", "max_tokens": 64,
                              "slo_class": "batch-1"}
    record.update(changes)
    return record


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPki:
    return ensure_local_pki(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def redis_strings(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def tenants(redis_strings: aioredis.Redis) -> TenantRegistry:
    return TenantRegistry(redis_strings)


@pytest.fixture
async def ingest(redis_url: str, kafka_bootstrap: str, topic_prefix: str,
                 pki: LocalPki) -> AsyncIterator[IngestApp]:
    settings = IngestSettings(
        redis_url=redis_url, kafka_bootstrap=kafka_bootstrap, topic_prefix=topic_prefix,
        host="127.0.0.1", port=0, batch_consumer=True, consumer_group=f"{topic_prefix}ingest",
        shutdown_grace_s=0.5, log_json=False, auth="required", auth_cache_s=0.0,
        tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
    )  # fmt: skip
    app = IngestApp(settings, models=MODELS)
    await app.start()
    yield app
    await app.stop()


def client_for(app: IngestApp, pki: LocalPki, api_key: str | None) -> QlmClient:
    return QlmClient(f"localhost:{app.port}", timeout_s=10, api_key=api_key, tls_ca=pki.ca)


async def test_keys_are_stored_hashed_and_revocable(
    tenants: TenantRegistry, redis_strings: aioredis.Redis
) -> None:
    key = await tenants.add("acme")
    assert key.startswith("qlm_") and len(key) > 40
    keys = Keys()
    everything = {k: await redis_strings.dump(k) async for k in redis_strings.scan_iter()}
    assert all(key.encode() not in (dump or b"") for dump in everything.values())
    assert await redis_strings.get(keys.api_key(key_digest(key))) == "acme"
    assert await tenants.authenticate(key) == "acme"
    assert await tenants.authenticate(key + "x") is None
    with pytest.raises(InvalidInput, match="already exists"):
        await tenants.add("acme")
    with pytest.raises(InvalidInput, match="tenant"):
        await tenants.add("Not/A/Name")
    await tenants.revoke("acme")
    assert await tenants.authenticate(key) is None
    assert [(t.name, t.active) for t in await tenants.list()] == [("acme", False)]


async def test_no_key_bad_key_and_revoked_key_are_unauthenticated(
    ingest: IngestApp, pki: LocalPki, tenants: TenantRegistry
) -> None:
    key = await tenants.add("acme")
    for api_key in (None, "qlm_not-a-real-key", "Basic abc"):
        async with client_for(ingest, pki, api_key) as client:
            with pytest.raises(Unauthenticated, match="missing or invalid API key"):
                await client.submit(good())
            with pytest.raises(Unauthenticated):
                await client.get("anything")
            with pytest.raises(Unauthenticated):
                async for _ in client.stream_tokens("anything"):
                    pass
            with pytest.raises(Unauthenticated):
                await client.list_models()
    async with client_for(ingest, pki, key) as client:
        assert (await client.submit(good(request_id="r1"))).request_id == "r1"
        await tenants.revoke("acme")  # auth_cache_s=0: refused at once
        with pytest.raises(Unauthenticated):
            await client.get("r1")


async def test_health_is_open_and_plaintext_is_refused(ingest: IngestApp, pki: LocalPki) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ca = pki.ca.read_bytes()
    async with grpc.aio.secure_channel(f"localhost:{ingest.port}",
                                       grpc.ssl_channel_credentials(ca)) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ingest.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await qlm_pb2_grpc.QueueManagerStub(channel).ListModels(
                pb.ListModelsRequest(), timeout=3)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_tenant_b_cannot_read_stream_or_cancel_tenant_a_requests(
    ingest: IngestApp, pki: LocalPki, tenants: TenantRegistry
) -> None:
    key_a, key_b = await tenants.add("team-a"), await tenants.add("team-b")
    async with client_for(ingest, pki, key_a) as a, client_for(ingest, pki, key_b) as b:
        mine = await a.submit(good(request_id="shared-id"))
        generated = await a.submit(good())
        assert mine.request_id == "shared-id" and not mine.duplicate
        info = await a.get("shared-id")
        assert info.request_id == "shared-id" and info.tenant == "team-a"

        async def not_found_message(call: Any) -> str:
            with pytest.raises(NotFound) as caught:
                await call
            return str(caught.value)

        unknown = await not_found_message(b.get("never-used"))
        for request_id in ("shared-id", generated.request_id, "team-a/shared-id"):
            assert await not_found_message(b.get(request_id)) == unknown.replace(
                "never-used", request_id)
            assert await not_found_message(b.cancel(request_id)) == unknown.replace(
                "never-used", request_id)

            async def stream(request_id: str = request_id) -> None:
                async for _ in b.stream_tokens(request_id):
                    pass

            assert await not_found_message(stream()) == unknown.replace("never-used", request_id)

        # the same client-chosen id is a separate request of tenant B, not a duplicate
        theirs = await b.submit(good(request_id="shared-id", max_tokens=8))
        assert not theirs.duplicate and theirs.request_id == "shared-id"
        assert (await b.get("shared-id")).max_tokens == 8
        assert (await a.get("shared-id")).max_tokens == 64
        assert (await a.get("shared-id")).state == pb.REQUEST_STATE_QUEUED  # not cancelled
        with pytest.raises(InvalidInput, match="tenant"):
            await b.submit(good(tenant="team-a"))
        assert (await a.cancel("shared-id")).cancelled


async def test_batch_records_must_be_signed_by_their_tenant(
    ingest: IngestApp, pki: LocalPki, tenants: TenantRegistry, kafka_bootstrap: str,
    topic_prefix: str,
) -> None:
    key_a = await tenants.add("team-a")
    key_b = await tenants.add("team-b")
    topics = TopicNames(topic_prefix)
    await ensure_topics(kafka_bootstrap, topic_specs(topics))

    def value(request_id: str, tenant: str) -> bytes:
        return json.dumps(good(request_id=request_id, tenant=tenant)).encode()

    signed = value("b1", "team-a")
    forged = value("b2", "team-a")  # claims team-a, signed with team-b's key
    async with BusProducer(kafka_bootstrap, client_id=f"t-{uuid.uuid4().hex[:6]}") as producer:
        await producer.publish_raw(topics.batch_requests, signed, b"b1",
                                   [(SIGNATURE_HEADER, sign_record(signed, signing_key(key_a))
                                     .encode())])
        await producer.publish_raw(topics.batch_requests, forged, b"b2",
                                   [(SIGNATURE_HEADER, sign_record(forged, signing_key(key_b))
                                     .encode())])
        await producer.publish_raw(topics.batch_requests, value("b3", "team-a"), b"b3")
    letters = await read_topic(kafka_bootstrap, topics.dlq, lambda r: len(r) >= 2)
    reasons = sorted(DeadLetter.model_validate_json(r.value).reason for r in letters)
    assert len(reasons) == 2 and all(SIGNATURE_HEADER in reason for reason in reasons)
    async with client_for(ingest, pki, key_a) as a, client_for(ingest, pki, key_b) as b:
        for _ in range(100):
            try:
                info = await a.get("b1")
                break
            except NotFound:
                await asyncio.sleep(0.1)
        assert info.tenant == "team-a"
        with pytest.raises(NotFound):
            await a.get("b2")
        with pytest.raises(NotFound):
            await b.get("b1")


def test_cli_tenants_add_list_revoke(redis_url: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["--redis-url", redis_url, "tenants", "add", "ops"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["tenant"] == "ops" and added["api_key"].startswith("qlm_")
    assert cli_main(["--redis-url", redis_url, "tenants", "add", "ops"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["--redis-url", redis_url, "tenants", "revoke", "ops"]) == 0
    capsys.readouterr()
    assert cli_main(["--redis-url", redis_url, "tenants", "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(t["tenant"], t["active"]) for t in listed] == [("ops", False)]


# ------------------------------------------------------------------ HTTP (OpenAI API)
def http_settings(redis_url: str, kafka_bootstrap: str, topic_prefix: str,
                  **changes: Any) -> IngestSettings:
    from qlm.localstack import free_loopback_port

    return IngestSettings(**{
        "redis_url": redis_url, "kafka_bootstrap": kafka_bootstrap, "topic_prefix": topic_prefix,
        "host": "127.0.0.1", "port": 0, "batch_consumer": False, "shutdown_grace_s": 0.5,
        "log_json": False, "auth": "required", "auth_cache_s": 0.0, "http_host": "127.0.0.1",
        "http_port": free_loopback_port(), **changes})


@pytest.fixture
async def http_ingest(redis_url: str, kafka_bootstrap: str, topic_prefix: str,
                      pki: LocalPki) -> AsyncIterator[IngestApp]:
    """Ingest as make up runs it: HTTPS with the gRPC listener's certificate, keys required."""
    app = IngestApp(http_settings(redis_url, kafka_bootstrap, topic_prefix,
                                  tls_cert_file=pki.server_cert, tls_key_file=pki.server_key),
                    models=MODELS)
    await app.start()
    yield app
    await app.stop()


def openai_client(app: IngestApp, api_key: str, ca: Path | None = None,
                  client_cert: tuple[Path, Path] | None = None, scheme: str | None = None,
                  host: str = "127.0.0.1") -> Any:
    """The official client on ``app``'s front door: https (trusting ``ca``, presenting
    ``client_cert`` for mTLS) when the front door serves TLS, else http."""
    import openai

    assert app.http is not None
    verify: ssl.SSLContext | bool = True
    if ca is not None:
        verify = ssl.create_default_context(cafile=str(ca))
        if client_cert is not None:
            verify.load_cert_chain(*client_cert)
    return openai.AsyncOpenAI(
        base_url=f"{scheme or app.http.scheme}://{host}:{app.http_port}/v1", api_key=api_key,
        max_retries=0, timeout=20, http_client=openai.DefaultAsyncHttpxClient(verify=verify))


async def test_http_tenants_see_only_their_own_completions_files_and_batches(
    http_ingest: IngestApp, tenants: TenantRegistry, pki: LocalPki
) -> None:
    import openai

    key_a, key_b = await tenants.add("team-a"), await tenants.add("team-b")
    a, b = (openai_client(http_ingest, key, pki.ca) for key in (key_a, key_b))
    nobody = openai_client(http_ingest, "qlm_not-a-key", pki.ca)
    with pytest.raises(openai.AuthenticationError) as caught:
        await nobody.models.list()
    assert caught.value.status_code == 401
    assert caught.value.body["type"] == "invalid_request_error"  # OpenAI's error shape
    assert "API key" in caught.value.body["message"]

    raw = await a.chat.completions.with_raw_response.create(
        model="m7b", max_tokens=8, messages=[{"role": "user", "content": "hi"}],
        extra_body={"background": True, "slo_class": "batch-1"})
    completion_id = raw.parse().id
    ours = await a.get(f"/chat/completions/{completion_id}", cast_to=object)
    assert ours["id"] == completion_id  # type: ignore[index]
    for who in (b, nobody):
        with pytest.raises((openai.NotFoundError, openai.AuthenticationError)):
            await who.get(f"/chat/completions/{completion_id}", cast_to=object)
    with pytest.raises(openai.NotFoundError) as unknown:
        await b.get("/chat/completions/chatcmpl-never-used", cast_to=object)
    with pytest.raises(openai.NotFoundError) as other:
        await b.get(f"/chat/completions/{completion_id}", cast_to=object)
    from services.ingest.openai.translate import request_id_of

    assert other.value.body == {**unknown.value.body, "message": unknown.value.body[
        "message"].replace(request_id_of("chatcmpl-never-used"), request_id_of(completion_id))}

    line = {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m7b", "max_tokens": 4,
                     "messages": [{"role": "user", "content": "hi"}]}}
    uploaded = await a.files.create(file=("in.jsonl", json.dumps(line).encode()),
                                    purpose="batch")
    batch = await a.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
    assert (await a.batches.retrieve(batch.id)).id == batch.id
    assert [x.id for x in (await a.batches.list()).data] == [batch.id]
    assert (await b.batches.list()).data == []
    assert (await b.files.list()).data == []
    for call in (b.batches.retrieve(batch.id), b.batches.cancel(batch.id),
                 b.files.retrieve(uploaded.id), b.files.content(uploaded.id),
                 b.files.delete(uploaded.id)):
        with pytest.raises(openai.NotFoundError):
            await call
    with pytest.raises(openai.BadRequestError):  # B cannot run a batch over A's file
        await b.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                               completion_window="24h")
    assert (await a.files.retrieve(uploaded.id)).id == uploaded.id


async def test_http_front_door_is_https_only_and_trusts_the_stack_ca(
    http_ingest: IngestApp, tenants: TenantRegistry, pki: LocalPki
) -> None:
    """The official openai client over TLS with QLM_TLS_CA as its CA works (by the IP and
    by localhost); plain http on the same port and a client without the CA fail."""
    import openai

    key = await tenants.add("team-tls")
    assert http_ingest.http is not None and http_ingest.http.scheme == "https"
    for host in ("127.0.0.1", "localhost"):
        raw = await openai_client(http_ingest, key, pki.ca, host=host
                                  ).models.with_raw_response.list()
        assert raw.status_code == 200 and raw.http_request.url.scheme == "https"
    reply = await openai_client(http_ingest, key, pki.ca).chat.completions.create(
        model="m7b", max_tokens=8, messages=[{"role": "user", "content": "hi"}],
        extra_body={"background": True, "slo_class": "batch-1"})
    assert reply.id.startswith("chatcmpl-")
    with pytest.raises(openai.APIConnectionError) as no_ca:  # the system CAs do not vouch
        await openai_client(http_ingest, key).models.list()
    assert isinstance(no_ca.value.__cause__, ssl.SSLCertVerificationError) or (
        "CERTIFICATE_VERIFY_FAILED" in repr(no_ca.value.__cause__))
    with pytest.raises(openai.APIConnectionError):  # plain HTTP is not answered
        await openai_client(http_ingest, key, scheme="http").models.list()
    with pytest.raises(openai.AuthenticationError):  # TLS is no key
        await openai_client(http_ingest, "qlm_not-a-key", pki.ca).models.list()


async def test_http_front_door_mtls_requires_a_client_certificate(
    redis_url: str, kafka_bootstrap: str, topic_prefix: str, pki: LocalPki,
    tenants: TenantRegistry
) -> None:
    import openai

    key = await tenants.add("team-mtls")
    app = IngestApp(http_settings(redis_url, kafka_bootstrap, topic_prefix,
                                  tls_cert_file=pki.server_cert, tls_key_file=pki.server_key,
                                  tls_client_ca_file=pki.ca), models=MODELS)
    await app.start()
    try:
        with pytest.raises(openai.APIConnectionError):  # no client certificate
            await openai_client(app, key, pki.ca).models.list()
        with_cert = openai_client(app, key, pki.ca, client_cert=(pki.client_cert,
                                                                  pki.client_key))
        assert (await with_cert.models.with_raw_response.list()).status_code == 200
    finally:
        await app.stop()


def test_http_tls_files_that_do_not_match_are_named(pki: LocalPki, tmp_path: Path) -> None:
    from services.common.tls import http_ssl_context

    other = ensure_local_pki(tmp_path / "other")
    settings = IngestSettings(tls_cert_file=pki.server_cert, tls_key_file=other.server_key)
    with pytest.raises(InvalidInput) as caught:
        http_ssl_context(settings)
    assert caught.value.field == "tls_key_file"
    assert http_ssl_context(IngestSettings()) is None
