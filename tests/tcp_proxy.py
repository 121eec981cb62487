"""``TcpProxy``: a small loopback TCP proxy for fault tests (reliability.md §4.1 injector 4).

It sits between a client (the router's gRPC channel, say) and one upstream address and misbehaves
on demand; no toxiproxy, no third-party code.

Lifecycle: ``proxy = TcpProxy.start(upstream)`` binds ``127.0.0.1:0`` (``proxy.address`` is what the
client dials) and serves on its OWN thread with its own event loop, so a test drives it from
synchronous code and its timing does not depend on how busy the caller's loop is. The mode is
switched at run time, from any thread; each switch has taken effect when the call returns:
- ``pass_through()``: forward both ways (the default);
- ``delay(ms)``: forward, each chunk held ``ms`` before it is written, in both directions;
- ``reset()``: every open connection is aborted with a TCP RST on both sides (``SO_LINGER`` 0, then
  close), and every new connection is accepted and reset at once (the client sees ECONNRESET),
  until the mode changes;
- ``blackhole()``: nothing is forwarded: open connections stop being read (both ways: what the
  peers send stays in the kernel buffers), new ones are accepted and held without an upstream
  connection. A half-open peer: no FIN, no RST, no byte. Switching back to ``pass_through`` (or
  ``delay``) resumes the held connections and connects the held new ones.
``close()`` (idempotent) closes the listener and every connection and stops the thread; the proxy
is also a context manager. Buffers are bounded: each direction moves one chunk of at most
``CHUNK_BYTES`` at a time and waits for the writer to drain before reading the next, so a slow side
back-pressures the other instead of growing memory. Counters (``accepted``, ``open``,
``bytes_up`` / ``bytes_down``, ``resets``) let a test check that traffic really went through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from dataclasses import dataclass
from types import TracebackType

CHUNK_BYTES = 64 * 1024
START_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ProxyMode:
    """``kind`` is one of pass, delay, reset, blackhole; ``delay_ms`` applies to ``delay``."""

    kind: str = "pass"
    delay_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("pass", "delay", "reset", "blackhole"):
            raise ValueError(f"unknown proxy mode {self.kind!r}")
        if not 0 <= self.delay_ms < 600_000:
            raise ValueError(f"delay_ms out of range: {self.delay_ms}")

    @property
    def forwards(self) -> bool:
        return self.kind in ("pass", "delay")


class _Connection:
    """One accepted client and (once forwarding) its upstream connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.client = (reader, writer)
        self.upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.task: asyncio.Task[None] | None = None

    def writers(self) -> list[asyncio.StreamWriter]:
        return [self.client[1], *([self.upstream[1]] if self.upstream else [])]


class TcpProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.accepted = 0
        self.bytes_up = 0  # client -> upstream
        self.bytes_down = 0  # upstream -> client
        self.resets = 0  # connections ended with an RST by the proxy
        self._mode = ProxyMode()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._mode_changed: asyncio.Event | None = None
        self._closed = False
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    def start(cls, upstream: tuple[str, int] | str) -> TcpProxy:
        """A running proxy in front of ``upstream`` (``(host, port)`` or ``"host:port"``)."""
        if isinstance(upstream, str):
            host, _, port = upstream.rpartition(":")
            upstream = (host, int(port))
        proxy = cls(upstream)
        proxy._thread.start()
        try:
            proxy._call(proxy._listen(), START_TIMEOUT_S)
        except BaseException:
            proxy.close()
            raise
        return proxy

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def mode(self) -> ProxyMode:
        return self._mode

    @property
    def open(self) -> int:
        return len(self._connections)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self._call(self._shutdown(), CALL_TIMEOUT_S)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=CALL_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # -- modes (any thread) --------------------------------------------------------------------------

    def pass_through(self) -> None:
        self.set_mode(ProxyMode("pass"))

    def delay(self, ms: float) -> None:
        self.set_mode(ProxyMode("delay", float(ms)))

    def reset(self) -> None:
        self.set_mode(ProxyMode("reset"))

    def blackhole(self) -> None:
        self.set_mode(ProxyMode("blackhole"))

    def set_mode(self, mode: ProxyMode) -> None:
        if self._closed:
            raise RuntimeError("the proxy is closed")
        self._call(self._apply(mode), CALL_TIMEOUT_S)

    # -- the proxy's own loop ----------------------------------------------------------------------

    def _call(self, coroutine: object, timeout_s: float) -> None:
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout_s)  # type: ignore[arg-type]

    async def _listen(self) -> None:
        self._mode_changed = asyncio.Event()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=CHUNK_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _apply(self, mode: ProxyMode) -> None:
        self._mode = mode
        assert self._mode_changed is not None
        self._mode_changed.set()  # wakes held pipes and held new connections; they re-read the mode
        self._mode_changed = asyncio.Event()
        if mode.kind == "reset":
            for connection in list(self._connections):
                self._reset(connection)
            await asyncio.sleep(0)  # let the pipes see their closed transports

    async def _until_forwarding(self) -> bool:
        """Wait while the mode holds traffic; False when the connection must be reset instead."""
        while not self._mode.forwards:
            if self._mode.kind == "reset" or self._closed:
                return False
            assert self._mode_changed is not None
            await self._mode_changed.wait()
        return True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        connection = _Connection(reader, writer)
        connection.task = asyncio.current_task()
        self._connections.add(connection)
        try:
            if not await self._until_forwarding():
                self._reset(connection)
                return
            try:
                connection.upstream = await asyncio.wait_for(
                    asyncio.open_connection(*self.upstream, limit=CHUNK_BYTES), CALL_TIMEOUT_S
                )
            except (OSError, TimeoutError):
                self._reset(connection)  # the upstream is gone: the client sees what a dead peer gives
                return
            up_reader, up_writer = connection.upstream
            await asyncio.gather(self._pipe(reader, up_writer, up=True), self._pipe(up_reader, writer, up=False))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(connection)
            for w in connection.writers():
                if not w.is_closing():
                    w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool) -> None:
        """One direction: one chunk at a time (bounded), held or delayed as the mode says."""
        try:
            while True:
                if not await self._until_forwarding():
                    return
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()  # a half-close is forwarded as such
                    return
                if not await self._until_forwarding():
                    return
                if self._mode.kind == "delay" and self._mode.delay_ms > 0:
                    await asyncio.sleep(self._mode.delay_ms / 1000)
                writer.write(data)
                await writer.drain()
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
        except (OSError, RuntimeError):
            return  # the other side was reset or closed

    def _reset(self, connection: _Connection) -> None:
        """RST both sides: linger 0 then close (an abort sends RST instead of FIN)."""
        self.resets += 1
        for w in connection.writers():
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._mode_changed is not None:
            self._mode_changed.set()
        for connection in list(self._connections):
            for w in connection.writers():
                w.transport.abort()
        tasks = [c.task for c in self._connections if c.task is not None and c.task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._connections.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
