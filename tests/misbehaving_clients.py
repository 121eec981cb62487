"""Misbehaving HTTP clients for fault tests (reliability.md §4.1 injector 5), on raw sockets.

Each function opens its own connection to ``http_url`` (``http://host:port``), misbehaves in one
way, closes it and returns what happened; each is synchronous, single-threaded and bounded by its
own ``timeout_s`` (a test runs several at once from a thread pool):
- ``disconnect_at_byte``: POSTs a request and, once ``cut`` bytes of the response (status line and
  headers included) have arrived, drops the connection: a FIN, or an RST with ``abrupt``;
- ``slow_read``: POSTs a request and reads the answer ``recv_bytes`` at a time with a pause
  between reads, from a socket with a small receive buffer, so the server's writes back up;
- ``slowloris``: sends a request head one byte every ``interval_s`` and reports when (if) the
  server closed the connection;
- ``HangUp``: sends a request and hangs up when the test says (``hang_up()``): before any byte of
  the answer (queued, in prefill), or after ``read_events(n)`` saw ``n`` SSE ``data:`` events.
``post_bytes`` builds the raw request. Nothing here retries or follows redirects.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Cut:
    """What ``disconnect_at_byte`` saw before it hung up."""

    received: bytes
    status: int | None  # from the status line, once it arrived
    reached: bool  # the cut point was reached (else the server ended first or the timeout passed)


@dataclass(frozen=True)
class SlowRead:
    received: bytes
    status: int | None
    complete: bool  # the server ended the response (a chunked terminator or its close)
    seconds: float


@dataclass(frozen=True)
class Slowloris:
    closed_after_s: float | None  # when the server closed the connection; None = still open at the bound
    bytes_sent: int
    answer: bytes  # anything the server wrote (a 408 / 400), usually nothing


def _address(http_url: str) -> tuple[str, int]:
    parts = urlsplit(http_url)
    assert parts.hostname is not None and parts.port is not None, http_url
    return parts.hostname, parts.port


def post_bytes(http_url: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 POST of ``body`` as JSON (one request, ``connection: close``)."""
    host, port = _address(http_url)
    data = json.dumps(body).encode()
    lines = [
        f"POST {path} HTTP/1.1",
        f"host: {host}:{port}",
        "content-type: application/json",
        f"content-length: {len(data)}",
        "connection: close",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


def _status(data: bytes) -> int | None:
    if not data.startswith(b"HTTP/1.1 ") or len(data) < 12:
        return None
    with contextlib.suppress(ValueError):
        return int(data[9:12])
    return None


def _hang_up(sock: socket.socket, abrupt: bool) -> None:
    if abrupt:  # RST: linger 0 then close
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _ended(data: bytes) -> bool:
    """A chunked response's terminating chunk arrived."""
    return data.endswith(b"\r\n0\r\n\r\n")


def disconnect_at_byte(
    request: bytes, http_url: str, cut: int, *, abrupt: bool = False, timeout_s: float = 30.0
) -> Cut:
    sock = socket.create_connection(_address(http_url), timeout=timeout_s)
    received = b""
    reached = False
    deadline = time.monotonic() + timeout_s
    try:
        sock.sendall(request)
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(min(65536, cut - len(received)))
            except (TimeoutError, ConnectionError):
                break
            if not chunk:
                break
            received += chunk
            if len(received) >= cut:
                reached = True
                break
    finally:
        _hang_up(sock, abrupt)
    return Cut(received, _status(received), reached)


def slow_read(
    request: bytes,
    http_url: str,
    *,
    recv_bytes: int = 64,
    pause_s: float = 0.05,
    rcvbuf: int = 4096,
    timeout_s: float = 60.0,
) -> SlowRead:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: the window stays small
    t0 = time.monotonic()
    received = b""
    complete = False
    try:
        sock.settimeout(timeout_s)
        sock.connect(_address(http_url))
        sock.sendall(request)
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(recv_bytes)
            except (TimeoutError, ConnectionError):
                break
            if not chunk:
                complete = True  # connection: close -> the server closes after the last byte
                break
            received += chunk
            if _ended(received):
                complete = True
                break
            time.sleep(pause_s)
    finally:
        _hang_up(sock, abrupt=False)
    return SlowRead(received, _status(received), complete, time.monotonic() - t0)


class HangUp:
    """One request whose client hangs up at a point the test chooses; a context manager (hangs up on exit)."""

    def __init__(self, http_url: str, request: bytes, *, timeout_s: float = 30.0) -> None:
        self.sock = socket.create_connection(_address(http_url), timeout=timeout_s)
        self.received = b""
        self.closed = False  # by the server
        self._hung_up = False
        self.sock.sendall(request)

    @property
    def status(self) -> int | None:
        return _status(self.received)

    @property
    def events(self) -> int:
        return self.received.count(b"data:")

    def read_events(self, count: int, timeout_s: float = 30.0) -> int:
        """Read until ``count`` SSE events arrived (or the server closed, or ``timeout_s``); returns how many."""
        deadline = time.monotonic() + timeout_s
        while self.events < count and not self.closed and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionError:
                self.closed = True
                break
            if not chunk:
                self.closed = True
            self.received += chunk
        return self.events

    def hang_up(self, *, abrupt: bool = False) -> None:
        if not self._hung_up:
            self._hung_up = True
            _hang_up(self.sock, abrupt)

    def __enter__(self) -> HangUp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.hang_up()


def slowloris(http_url: str, *, interval_s: float = 0.1, timeout_s: float = 30.0) -> Slowloris:
    """An endless request head, one byte per ``interval_s``, until the server closes or ``timeout_s``."""
    host, port = _address(http_url)
    head = f"POST /v1/completions HTTP/1.1\r\nhost: {host}:{port}\r\n".encode()
    filler = b"x-slow: " + b"a" * 1_000_000  # never finished: the head has no end
    sock = socket.create_connection((host, port), timeout=timeout_s)
    t0 = time.monotonic()
    sent = 0
    answer = b""
    try:
        sock.setblocking(False)
        for byte in (head + filler)[: int(timeout_s / interval_s) + 1]:
            if time.monotonic() - t0 > timeout_s:
                break
            try:
                data = sock.recv(4096)
                if not data:
                    return Slowloris(time.monotonic() - t0, sent, answer)
                answer += data
            except BlockingIOError:
                pass
            except ConnectionError:
                return Slowloris(time.monotonic() - t0, sent, answer)
            try:
                sock.send(bytes((byte,)))
                sent += 1
            except BlockingIOError:
                pass
            except (ConnectionError, BrokenPipeError):
                return Slowloris(time.monotonic() - t0, sent, answer)
            time.sleep(interval_s)
        return Slowloris(None, sent, answer)
    finally:
        _hang_up(sock, abrupt=True)
