"""``RouterServer``: the router's two listeners (REST under uvicorn, gRPC) around one ``Frontend``.

Lifecycle: ``await RouterServer.start(frontend, options)`` binds both ports on ``options.host``
(port 0 = any free port; the bound ones are ``http_port`` / ``grpc_port``) and returns once both
accept connections; ``await server.wait()`` returns when the HTTP server stops (uvicorn turns
SIGINT/SIGTERM into a graceful stop when it runs in the main thread); ``await server.stop(grace_s)``
stops admitting (readiness 503, new requests 503), lets in-flight requests finish for up to
``grace_s``, then closes both listeners. The gRPC server also answers ``grpc.health.v1`` (SERVING
while admitting, NOT_SERVING once draining) and reflection.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from k2serve.proto import serving_pb2
from k2serve.router.api_keys import ApiKeys
from k2serve.router.frontend import Frontend
from k2serve.router.grpc_counter import GrpcCounter
from k2serve.router.grpc_server import add_serving, auth_interceptor
from k2serve.router.http_app import build_app
from k2serve.router.http_guard import DEFAULT_MAX_BODY_BYTES, DEFAULT_PUBLIC_PATHS

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 2**20),
    ("grpc.max_receive_message_length", 64 * 2**20),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
]
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class RouterOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # REST; 0 = any free port
    grpc_port: int = 50051  # 0 = any free port; -1 = no gRPC listener
    api_keys: tuple[str, ...] = ()
    public_paths: tuple[str, ...] = DEFAULT_PUBLIC_PATHS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


class RouterServer:
    def __init__(self, frontend: Frontend, options: RouterOptions) -> None:
        self.frontend, self.options = frontend, options
        self.keys = ApiKeys(options.api_keys)
        self.health = health.aio.HealthServicer()
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._grpc: grpc.aio.Server | None = None
        self.http_port = 0
        self.grpc_port = 0

    @classmethod
    async def start(cls, frontend: Frontend, options: RouterOptions = RouterOptions()) -> RouterServer:
        server = cls(frontend, options)
        try:
            await server._start_grpc()
            await server._start_http()
        except BaseException:
            await server.stop(grace_s=0)
            raise
        return server

    @property
    def http_url(self) -> str:
        return f"http://{self.options.host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.options.host}:{self.grpc_port}"

    async def _start_http(self) -> None:
        o = self.options
        app = build_app(
            self.frontend,
            self.keys,
            public_paths=o.public_paths,
            max_body_bytes=o.max_body_bytes,
        )
        config = uvicorn.Config(
            app,
            host=o.host,
            port=o.port,
            log_level="warning",
            lifespan="off",
            http="h11",  # its header-size limit applies (httptools, when installed, has none)
            h11_max_incomplete_event_size=64 * 1024,  # bounds a request's header block
            timeout_graceful_shutdown=None,
        )
        self._http = uvicorn.Server(config)
        self._http_task = asyncio.create_task(self._http.serve(), name="router-http")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # raises the bind error
                raise RuntimeError(f"the HTTP server on {o.host}:{o.port} stopped during start-up")
            if loop.time() > deadline:
                raise TimeoutError(f"the HTTP server on {o.host}:{o.port} did not start in {START_TIMEOUT_S:g} s")
            await asyncio.sleep(0.02)
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1]

    async def _start_grpc(self) -> None:
        o = self.options
        if o.grpc_port < 0:
            return
        server = grpc.aio.server(
            options=GRPC_OPTIONS,
            interceptors=[GrpcCounter(self.frontend.metrics.grpc_requests), auth_interceptor(self.keys)],
        )
        add_serving(server, self.frontend, self.keys)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (
            serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        self.grpc_port = server.add_insecure_port(f"{o.host}:{o.grpc_port}")
        if self.grpc_port == 0:
            raise OSError(f"cannot bind the gRPC port {o.host}:{o.grpc_port}")
        await server.start()
        self._grpc = server
        await self._set_serving(True)

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name):
            await self.health.set(service, status)

    async def wait(self) -> None:
        """Until the HTTP server stops (a signal in the main thread, or ``stop``)."""
        if self._http_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._http_task

    async def stop(self, grace_s: float = 5.0) -> None:
        """Drain: refuse new requests at once, give running ones ``grace_s``, then close the listeners."""
        self.frontend.admission.draining = True
        if self._grpc is not None:
            await self._set_serving(False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.frontend.admission.running and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._http is not None:
            self._http.should_exit = True
            self._http.force_exit = True
        if self._http_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._http_task, timeout=5.0)
        if self._grpc is not None:
            await self._grpc.stop(grace=0.5)
            self._grpc = None
