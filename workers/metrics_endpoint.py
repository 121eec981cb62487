"""``MetricsEndpoint``: a process's Prometheus registry served over HTTP at ``/metrics``.

Lifecycle: ``MetricsEndpoint.start(registry, host, port)`` binds ``host`` (the configured interface,
never every interface by default; port 0 = any free port) and serves from a daemon thread;
``address`` is ``host:port``; ``stop()`` shuts the server down and closes its socket (idempotent).
Used by worker ranks and the controller; the router serves ``/metrics`` from its own REST app.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_wsgi_server


class MetricsEndpoint:
    def __init__(self, server: WSGIServer, thread: threading.Thread, host: str) -> None:
        self._server, self._thread = server, thread
        port = server.server_address[1]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @classmethod
    def start(cls, registry: CollectorRegistry, host: str, port: int = 0) -> MetricsEndpoint:
        server, thread = start_wsgi_server(port, addr=host, registry=registry)
        return cls(server, thread, host)

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout_s)
        self._server.server_close()
