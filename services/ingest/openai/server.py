"""The HTTP server of the front door: uvicorn on the ingest process's own event loop.

uvicorn serves the FastAPI app next to the gRPC server, so both transports share one
:class:`services.ingest.plane.IngestPlane` (one Redis pool, one producer, one batcher). Signals
stay with the ingest process (:func:`services.common.entrypoint.stop_on_signals`): this server
installs no handlers. The socket is bound here (``SO_REUSEPORT`` with ``--processes``)
so that a taken port fails the start with a clear error. With an ``ssl`` context
(:func:`services.common.tls.http_ssl_context`) it serves HTTPS only: a plain-HTTP client
gets its connection closed during the handshake.

Graceful stop: stop accepting, let responses in flight finish for ``grace_s``, then
close what is left (open streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Iterator

import uvicorn
from fastapi import FastAPI

from qlm.log import get_logger

log = get_logger("services.ingest.openai.server")


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the ingest process owns the signals
        yield


class HttpServer:
    """One uvicorn server on ``host:port``; ``port`` is the bound one after :meth:`start`."""

    def __init__(self, app: FastAPI, host: str, port: int, *, reuse_port: bool = False,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.reuse_port = reuse_port
        self.ssl_context = ssl_context
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as error:
            sock.close()
            raise OSError(f"http_port: cannot listen on {self.host}:{self.port}: "
                          f"{error.strerror}") from None
        sock.listen(2048)
        sock.setblocking(False)
        return sock

    async def start(self) -> None:
        sock = self._bind()
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                http="httptools", ws="none", timeout_graceful_shutdown=None,
                                server_header=False, date_header=False,
                                ssl_context_factory=_given(self.ssl_context))
        self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="ingest-http")
        while not self._server.started:
            if self._task.done():
                await self._task  # raises what stopped it
                raise OSError("the HTTP server stopped at start")
            await asyncio.sleep(0.01)
        log.info("http_listening", host=self.host, port=self.port, tls=self.tls)

    @property
    def tls(self) -> bool:
        return self.ssl_context is not None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    async def stop(self, grace_s: float) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=grace_s + 0.5)
        except TimeoutError:
            self._server.force_exit = True
            with contextlib.suppress(Exception):
                await self._task


def _given(context: ssl.SSLContext | None) -> Callable[..., ssl.SSLContext] | None:
    """uvicorn's ``ssl_context_factory`` answering ``context`` (None: plain HTTP)."""
    if context is None:
        return None
    return lambda _config, _default: context
