"""The ingest gRPC server: QueueManager + grpc.health.v1 + reflection, and its lifecycle.

With an ``authenticator`` every QueueManager call needs an API key
(:mod:`services.common.auth`); TLS comes from the ``tls_*`` settings
(:mod:`services.common.tls`).

Health: the overall status ("") and ``qlm.v1.QueueManager`` are SERVING while every
probe (Redis answers, Kafka answers) succeeds, NOT_SERVING otherwise; they are checked
every ``health_interval_s``.

Graceful shutdown (:meth:`IngestServer.stop`, run on SIGTERM/SIGINT): health turns
NOT_SERVING (load balancers stop sending), the server stops taking new calls and lets
calls in flight finish for ``grace_s`` (``server.stop(grace)``), then the caller closes
the store and the producer (drain).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from qlm.aio import cancel_and_wait
from qlm.api.v1 import qlm_pb2, qlm_pb2_grpc
from qlm.log import get_logger
from services.common.auth import Authenticator, AuthInterceptor
from services.common.errors import add_with_error_mapping
from services.common.settings import CommonSettings
from services.common.tls import add_listener
from services.ingest.plane import IngestPlane
from services.ingest.servicer import QueueManagerServicer

log = get_logger("services.ingest.server")

SERVICE_NAME = qlm_pb2.DESCRIPTOR.services_by_name["QueueManager"].full_name
Probe = Callable[[], Awaitable[bool]]


class IngestServer:
    """One gRPC server on ``address``; ``port`` is the bound port once started."""

    def __init__(
        self,
        plane: IngestPlane,
        address: str,
        probes: Sequence[Probe],
        *,
        max_message_bytes: int = 8 * 1024 * 1024,
        health_interval_s: float = 2.0,
        reuse_port: bool = False,
        settings: CommonSettings | None = None,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.plane = plane
        self.probes = tuple(probes)
        self.health_interval_s = health_interval_s
        self.health = health_aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[AuthInterceptor(authenticator)] if authenticator else None,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", int(reuse_port)),
            ],
        )
        add_with_error_mapping(qlm_pb2_grpc.add_QueueManagerServicer_to_server,
                               QueueManagerServicer(plane), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self.server,
        )
        self.port = add_listener(self.server, address, settings)
        self._health_task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        await self.server.start()
        await self.refresh_health()
        self._health_task = asyncio.create_task(self._watch_health(), name="ingest-health")
        log.info("ingest_listening", port=self.port)

    async def refresh_health(self) -> bool:
        """Probe the dependencies once and publish the result; returns whether all answer."""
        results = await asyncio.gather(*(_safe(p) for p in self.probes))
        healthy = all(results) and not self._stopping
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if healthy
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
        return healthy

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.refresh_health()

    async def stop(self, grace_s: float) -> None:
        """Health NOT_SERVING → stop taking calls → let calls in flight finish (grace)."""
        self._stopping = True
        if self._health_task is not None:
            await cancel_and_wait([self._health_task])
        await self.health.enter_graceful_shutdown()
        log.info("ingest_stopping", grace_s=grace_s)
        await self.server.stop(grace_s)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def _safe(probe: Probe) -> bool:
    try:
        return bool(await asyncio.wait_for(probe(), timeout=2.0))
    except Exception:
        return False
