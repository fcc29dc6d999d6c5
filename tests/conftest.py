"""Shared fixtures: a real ``redis-server`` and a real Apache Kafka broker on free loopback ports.

Each server starts once per test session, and only when a test asks for it
(Kafka takes seconds). When a server cannot start, the asking test fails under
``CI=true`` and is skipped elsewhere, with the reason.

- ``redis_server``: the session's :class:`~qlm.localstack.RedisServer` (AOF on), with ACL
  users as ``make up`` runs it (``redis_server.url`` is the admin's, with its password;
  ``redis_server.url_for("qlm-worker")`` a service's).
  ``redis_server.restart()`` stops it (SIGTERM; ``kill=True`` for SIGKILL) and
  starts it again on the same port and data directory, to show what the AOF kept.
- ``redis_url``: the server's URL, with every database flushed before the test.
- ``redis_cluster``: a :class:`~qlm.localstack.LocalRedisCluster` of three masters
  (``redis-server --cluster-enabled yes``, slots spread by ``redis-cli --cluster create``);
  ``redis_cluster_url``: its ``redis+cluster://`` URL, every master flushed before the test.
- ``kafka_server``: the session's :class:`~qlm.localstack.KafkaServer` (KRaft, one node,
  topics are not auto-created).
- ``kafka_bootstrap``: its ``bootstrap_servers`` string.
- ``kafka_cluster``: a :class:`~qlm.localstack.KafkaCluster` of three KRaft nodes (each
  broker and controller), started for the tests that ask for it; a test may SIGKILL a
  node (``kafka_cluster.kill(node)``), so every test gets a fresh cluster.
- ``unique_topic``: ``unique_topic("events")`` returns a topic name no other test uses.
- ``topic_prefix``: a prefix unique to the test, for :class:`qlm.bus.topics.TopicNames`.
- ``kafka_topics``: the six qlm topics under ``topic_prefix``, created.
- ``tiny_checkpoint``: a directory with a tiny real checkpoint (random Llama weights as
  safetensors, a BPE tokenizer trained on docs/*.md, a chat template), written once per
  session by :func:`qlm.engine.checkpoint.write_checkpoint`.

Servers started here get SIGTERM if the test process dies, so none outlives a run.

A test that hangs fails after pytest-timeout's ``timeout`` (pyproject.toml) instead of
holding up the run: the stacks of every thread and of every pending asyncio task are
printed first (:func:`pytest_timeout_set_timer`), so the log shows what it waited on.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import pytest
import redis

from qlm.bus.topics import TopicNames, ensure_topics, topic_specs
from qlm.core.errors import Unavailable
from qlm.localstack import KafkaCluster, KafkaServer, LocalRedisCluster, RedisServer
from qlm.localstack.redis import RedisUsers


def in_ci() -> bool:
    """Whether the tests run under CI (``CI=true``): missing servers are then failures."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


@pytest.hookimpl(wrapper=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> Generator[None, Any, Any]:
    """Around pytest-timeout's SIGALRM handler: print the pending asyncio tasks' stacks
    before it prints the threads' and fails the test. A hung async test sits in the
    event loop's select(), where thread stacks alone say nothing of what it awaits."""
    result = yield
    inner = signal.getsignal(signal.SIGALRM) if settings.method == "signal" else None
    if callable(inner):
        def dump_tasks_then_fail(signum: int, frame: FrameType | None) -> None:
            __tracebackhide__ = True
            _print_pending_tasks(item)
            inner(signum, frame)

        signal.signal(signal.SIGALRM, dump_tasks_then_fail)
    return result


def _print_pending_tasks(item: pytest.Item) -> None:
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # no loop running: a synchronous test
        return
    out = io.StringIO()
    for task in tasks:
        task.print_stack(file=out)
    terminal = item.config.get_terminal_writer()
    terminal.sep("+", title=f"Timeout: {len(tasks)} pending asyncio tasks")
    terminal.write(out.getvalue())


def server_unavailable(reason: str) -> NoReturn:
    """Fail under CI, skip elsewhere."""
    if in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    try:
        data_dir = tmp_path_factory.mktemp("redis")
        server = RedisServer.start_on_free_port(
            data_dir, die_with_parent=True,
            users=RedisUsers.load_or_create(data_dir / "users.json"),
        )
    except Unavailable as error:
        server_unavailable(f"redis-server did not start: {error}")
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    if not redis_server.is_running():  # an earlier test stopped it and failed before restarting
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRedisCluster]:
    try:
        cluster = LocalRedisCluster.start_on_free_ports(
            tmp_path_factory.mktemp("redis-cluster"), num_masters=3, die_with_parent=True
        )
    except Unavailable as error:
        server_unavailable(f"the Redis Cluster did not start: {error}")
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: LocalRedisCluster) -> str:
    for node in redis_cluster.nodes:
        client = redis.Redis(host=node.host, port=node.port)
        try:
            client.flushall()
        finally:
            client.close()
    return redis_cluster.url


@pytest.fixture(scope="session")
def kafka_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaServer]:
    try:
        server = KafkaServer.start_on_free_ports(
            tmp_path_factory.mktemp("kafka"), die_with_parent=True, quick_start=True
        )
    except Unavailable as error:
        server_unavailable(f"Kafka did not start: {error}")
    yield server
    server.stop()


@pytest.fixture
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    try:
        cluster = KafkaCluster.start_on_free_ports(
            tmp_path_factory.mktemp("kafka-cluster"), num_nodes=3, die_with_parent=True,
            quick_start=True,
        )
    except Unavailable as error:
        server_unavailable(f"the three-node Kafka cluster did not start: {error}")
    yield cluster
    cluster.stop(kill=True)


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_server: KafkaServer) -> str:
    return kafka_server.bootstrap_servers


def _test_slug(request: pytest.FixtureRequest) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:80]


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest) -> Callable[[str], str]:
    slug = _test_slug(request)

    def make(base: str = "topic") -> str:
        return f"{base}.{slug}.{uuid.uuid4().hex[:8]}"

    return make


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    return f"{_test_slug(request)}.{uuid.uuid4().hex[:8]}."


@pytest.fixture
async def kafka_topics(kafka_bootstrap: str, topic_prefix: str) -> TopicNames:
    names = TopicNames(topic_prefix)
    await ensure_topics(kafka_bootstrap, topic_specs(names))
    return names


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qlm.engine.checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("checkpoints") / "tiny-llama")
