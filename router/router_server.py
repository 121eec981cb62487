"""``RouterServer``: the router's two listeners (REST under uvicorn, gRPC) around one ``Frontend``.

Lifecycle: ``await RouterServer.start(frontend, options)`` binds both ports on ``options.host``
(port 0 = any free port; the bound ones are ``http_port`` / ``grpc_port``; TLS on both when
``options.tls`` names a certificate, mutual TLS when it also names a CA) and returns once both
accept connections. The entry point owns the signals: on SIGINT/SIGTERM it calls
``request_stop()``, which starts the drain at once (``GET /health`` and gRPC health answer 503 /
NOT_SERVING, every new request 503 / UNAVAILABLE, while the listeners stay open so clients are told
so); ``await server.wait()`` returns then (or when the HTTP server ended on its own);
``await server.stop(grace_s)`` lets the requests in flight finish for up to ``grace_s`` (a second
``request_stop()`` ends the grace early), aborts the rest (their streams end with finish reason
``abort``), then closes both listeners and returns a ``DrainReport``.

uvicorn bounds neither the time a client takes to send its request headers (its keep-alive timer
is armed only after a response, and the first byte cancels it) nor the number of connections; the
REST listener adds ``header_timeout_s`` (``HeaderTimeoutH11``) and ``limit_concurrency``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import h11
import uvicorn
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from uvicorn.protocols.http.h11_impl import H11Protocol

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
ABORT_SETTLE_S = 2.0  # after the grace: aborted streams write their last event and give back their slots
CLOSE_GRACE_S = 2  # uvicorn then cancels the handlers of connections still open
GRPC_CLOSE_GRACE_S = 0.5


class TlsError(ValueError):
    """A TLS setting is incomplete, a file is missing or does not load; ``field`` names the setting."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the router's listeners: its certificate chain and key, and (mutual TLS) the CA
    that must have signed every client's certificate."""

    cert: Path
    key: Path
    ca: Path | None = None

    @property
    def mutual(self) -> bool:
        return self.ca is not None

    @classmethod
    def of(
        cls,
        cert: str | Path | None,
        key: str | Path | None,
        ca: str | Path | None = None,
        *,
        names: tuple[str, str, str] = ("tls_cert", "tls_key", "tls_ca"),
    ) -> TlsFiles | None:
        """None when no TLS is configured; else checked files (both or neither of cert and key, every
        file readable, the key matching the certificate), or ``TlsError`` naming the setting."""
        cert_name, key_name, ca_name = names
        if cert is None and key is None:
            if ca is not None:
                raise TlsError(ca_name, f"needs {cert_name} and {key_name} (the server's own certificate)")
            return None
        if cert is None or key is None:
            given, missing = (cert_name, key_name) if cert is not None else (key_name, cert_name)
            raise TlsError(missing, f"is required with {given} (give both or neither)")
        files = cls(Path(cert).expanduser(), Path(key).expanduser(), Path(ca).expanduser() if ca is not None else None)
        for name, path in ((cert_name, files.cert), (key_name, files.key), (ca_name, files.ca)):
            if path is not None and not path.is_file():
                raise TlsError(name, f"no such file: {path}")
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(files.cert, files.key)
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(
                key_name, f"{files.cert} and {files.key} do not load as a PEM certificate and its key: {exc}"
            ) from None
        if files.ca is not None:
            try:
                ssl.create_default_context(cafile=str(files.ca))
            except (ssl.SSLError, OSError) as exc:
                raise TlsError(ca_name, f"{files.ca} does not load as PEM CA certificates: {exc}") from None
        return files

    def grpc_credentials(self) -> grpc.ServerCredentials:
        ca = self.ca.read_bytes() if self.ca is not None else None
        pair = (self.key.read_bytes(), self.cert.read_bytes())
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


@dataclass(frozen=True)
class RouterOptions:
    host: str = "127.0.0.1"
    port: int = 8000  # REST; 0 = any free port
    grpc_port: int = 50051  # 0 = any free port; -1 = no gRPC listener
    api_keys: tuple[str, ...] = ()
    public_paths: tuple[str, ...] = DEFAULT_PUBLIC_PATHS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    tls: TlsFiles | None = None  # None: plaintext on both listeners
    header_timeout_s: float = 10.0  # REST: from connect (or the previous response) to a request's last header
    keep_alive_s: int = 5  # REST: an idle keep-alive connection is closed after this
    max_connections: int | None = 2048  # REST: open connections (or handlers) above this get 503


@dataclass(frozen=True)
class DrainReport:
    seconds: float  # from the drain's start to both listeners closed
    aborted: int  # requests still running when the grace ran out (ended with finish reason abort)


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers: a connection that has not
    sent a complete request head ``header_timeout_s`` after it opened (or after the previous
    response) is closed, so slow or silent clients (slowloris) cannot hold connections forever."""

    header_timeout_s = 10.0  # set per server by a subclass (``_start_http``)
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request head is complete
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the next request on this keep-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own SIGINT/SIGTERM handlers: the entry point owns the signals and drains
    through ``RouterServer`` (uvicorn's would close the listener at once, so readiness probes and new
    requests would see refused connections instead of 503s, and it would wait for streams unbounded)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class RouterServer:
    def __init__(self, frontend: Frontend, options: RouterOptions) -> None:
        self.frontend, self.options = frontend, options
        self.keys = ApiKeys(options.api_keys)
        self.health = health.aio.HealthServicer()
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._grpc: grpc.aio.Server | None = None
        self._stop_requested = asyncio.Event()
        self._hurry = asyncio.Event()  # a second stop request: the grace ends now
        self._background: set[asyncio.Task[None]] = set()
        self._drain_started = 0.0
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
        scheme = "https" if self.options.tls is not None else "http"
        return f"{scheme}://{self.options.host}:{self.http_port}"

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
        protocol = type("RouterH11", (HeaderTimeoutH11,), {"header_timeout_s": o.header_timeout_s})
        tls = o.tls
        config = uvicorn.Config(
            app,
            host=o.host,
            port=o.port,
            log_level="warning",
            lifespan="off",
            http=protocol,  # h11: its header-size limit applies (httptools, when installed, has none)
            h11_max_incomplete_event_size=64 * 1024,  # bounds a request's header block
            timeout_keep_alive=o.keep_alive_s,
            limit_concurrency=o.max_connections,
            timeout_graceful_shutdown=CLOSE_GRACE_S,  # only reached after the drain (``stop``)
            ssl_certfile=str(tls.cert) if tls is not None else None,
            ssl_keyfile=str(tls.key) if tls is not None else None,
            ssl_ca_certs=str(tls.ca) if tls is not None and tls.ca is not None else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls is not None and tls.mutual else ssl.CERT_NONE,
        )
        self._http = _Uvicorn(config)
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
        address = f"{o.host}:{o.grpc_port}"
        if o.tls is not None:
            self.grpc_port = server.add_secure_port(address, o.tls.grpc_credentials())
        else:
            self.grpc_port = server.add_insecure_port(address)
        if self.grpc_port == 0:
            raise OSError(f"cannot bind the gRPC port {address}")
        await server.start()
        self._grpc = server
        await self._set_serving(True)

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name):
            await self.health.set(service, status)

    # ---- drain and stop ---------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._stop_requested.is_set()

    def request_stop(self) -> None:
        """Start draining now (on the server's loop; a signal handler hands it over with
        ``loop.call_soon_threadsafe``): readiness and new requests 503 from here on. A second call
        ends the grace of a ``stop`` in progress (the requests still running are aborted)."""
        if self._stop_requested.is_set():
            self._hurry.set()
            return
        self._drain_started = time.monotonic()
        self._stop_requested.set()
        self.frontend.admission.draining = True
        if self._grpc is not None:
            task = asyncio.get_running_loop().create_task(self._set_serving(False), name="router-not-serving")
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def wait(self) -> None:
        """Until a stop is requested, or the HTTP server ends on its own."""
        stop = asyncio.ensure_future(self._stop_requested.wait())
        waiting: set[asyncio.Future[Any]] = {stop}
        if self._http_task is not None:
            waiting.add(self._http_task)
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()

    async def stop(self, grace_s: float = 5.0) -> DrainReport:
        """Drain (refuse new requests at once, give running ones ``grace_s``), abort what is left,
        close the listeners. Bounded by ``grace_s`` + about ``ABORT_SETTLE_S + CLOSE_GRACE_S + 1`` s."""
        if not self._stop_requested.is_set():
            self.request_stop()
        if self._grpc is not None:
            await self._set_serving(False)
        deadline = self._drain_started + max(0.0, grace_s)
        while self.frontend.admission.running and not self._hurry.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await self._hurry.wait()
        aborted = await self._abort_running()
        if self._http is not None:
            self._http.should_exit = True
        if self._http_task is not None:
            # wait() neither raises the task's outcome nor swallows a cancel of the caller
            await asyncio.wait({self._http_task}, timeout=CLOSE_GRACE_S + 1.0)
            if not self._http_task.done():  # uvicorn's own bound did not hold: stop waiting for it
                self._http.force_exit = True  # type: ignore[union-attr]
                self._http_task.cancel()
                await asyncio.gather(self._http_task, return_exceptions=True)
        if self._grpc is not None:
            await self._grpc.stop(grace=GRPC_CLOSE_GRACE_S)
            self._grpc = None
        for task in list(self._background):
            task.cancel()
        return DrainReport(time.monotonic() - self._drain_started, aborted)

    async def _abort_running(self) -> int:
        """Abort every request still running (its stream ends with finish reason ``abort``) and wait,
        bounded, until all have given back their admission slots. Requests still waiting for their
        first token join the running set later, so this repeats until nothing runs."""
        aborted: set[str] = set()
        deadline = time.monotonic() + ABORT_SETTLE_S
        while self.frontend.admission.running and time.monotonic() < deadline:
            for request_id in self.frontend.running_ids():
                if request_id not in aborted:
                    aborted.add(request_id)
                    await self.frontend.abort(request_id)
            await asyncio.sleep(0.02)
        return len(aborted)
