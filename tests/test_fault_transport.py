"""Router-level fault tests, transport (reliability.md §4.1 injectors 4 and 5) against a live router.

A TCP proxy between the router and one of two colocated ranks (tests/tcp_proxy.py; checked first on
an echo server): 200 ms a chunk of delay still gives the oracle's tokens; a reset mid-stream ends each
stream ok (migrated) or with a clean SSE error event, and the router serves again within a bound; a
blackhole ends requests by the dispatcher's deadline, never a hang. Misbehaving clients
(tests/misbehaving_clients.py): a slow reader, hang-ups at random bytes of a stream, and slowloris
header senders: others are served meanwhile, no 5xx, every block freed, slow headers cut off.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import pytest
from misbehaving_clients import disconnect_at_byte, post_bytes, slow_read, slowloris
from request_ledger import Ledger, Result, report
from router_faults import (
    BIG_CACHE,
    COMPLETIONS,
    QUIET_S,
    REQUEST_S,
    Oracle,
    completion,
    follow,
    http_5xx,
    leaked_blocks,
    prompts,
    run_ledgered,
    served_job,
    stream_completion,
    worker_finished,
)
from router_fixtures import LiveRouter, live_router
from tcp_proxy import TcpProxy

from k2serve.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("faults") / "tiny", seed=11)


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> Oracle:
    return Oracle(model_dir)


# -- the harness itself: the proxy --------------------------------------------------------------------


@contextlib.contextmanager
def echo_server() -> Iterator[tuple[str, int]]:
    """A threaded TCP echo server on loopback (the proxy's upstream in its own test)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.2)
            while not stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                with contextlib.suppress(OSError):
                    conn.sendall(data)

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[:2]
    finally:
        stop.set()
        listener.close()
        thread.join(5)


def echo(sock: socket.socket, data: bytes, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    sock.sendall(data)
    got = b""
    with contextlib.suppress(TimeoutError):
        while len(got) < len(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    return got


def assert_silent(sock: socket.socket, seconds: float) -> None:
    """No byte, no FIN and no RST arrives within ``seconds``."""
    sock.settimeout(seconds)
    with pytest.raises(TimeoutError):
        sock.recv(16)


def test_tcp_proxy_passes_delays_blackholes_and_resets() -> None:
    with echo_server() as upstream, TcpProxy.start(upstream) as proxy:
        host, port = proxy.address.split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            assert echo(sock, b"hello", 5) == b"hello"
            proxy.delay(150)
            t0 = time.monotonic()
            assert echo(sock, b"slow", 5) == b"slow"
            assert time.monotonic() - t0 >= 0.29  # held 150 ms each way
            proxy.blackhole()
            sock.sendall(b"held")
            assert_silent(sock, 0.5)  # nothing forwarded, and no FIN or RST either
            with socket.create_connection((host, int(port)), timeout=5) as held:
                held.sendall(b"new")
                assert_silent(held, 0.3)  # accepted and held
                proxy.pass_through()
                held.settimeout(5)
                assert held.recv(16) == b"new"  # the held one resumes
            sock.settimeout(5)
            assert sock.recv(16) == b"held"  # the held bytes flow again, once
            proxy.reset()
            with pytest.raises(ConnectionResetError):
                sock.settimeout(5)
                sock.sendall(b"x")
                sock.recv(16)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):  # on connect, send or receive
            with socket.create_connection((host, int(port)), timeout=5) as refused:
                refused.settimeout(5)
                refused.sendall(b"x")
                if not refused.recv(16):
                    raise AssertionError("a FIN, not an RST")
        assert proxy.resets >= 2 and proxy.accepted == 3
        proxy.pass_through()
        with socket.create_connection((host, int(port)), timeout=5) as again:
            assert echo(again, b"back", 5) == b"back"
    assert proxy.open == 0


# -- a TCP proxy between the router and one worker: delay, reset, blackhole ---------------------------------

PROXY_DELAY_MS = 200
PROXY_DEADLINE_S = 4.0  # the dispatcher's per-request deadline on the blackhole router


def proxied_router(model_dir: Path, **options: Any) -> contextlib.AbstractContextManager[LiveRouter]:
    """Two colocated ranks, the router reaching rank 0 through a proxy; round robin, so consecutive
    requests alternate between the proxied rank and the direct one."""
    return live_router(model_dir, roles=("mixed", "mixed"), proxied=(0,), policy="round_robin", **options)


def test_proxy_delay_between_router_and_worker_still_gives_the_oracle_tokens(model_dir: Path, oracle: Oracle) -> None:
    ledger = Ledger()
    with proxied_router(model_dir) as live:
        proxy = live.proxies[0]
        proxy.delay(PROXY_DELAY_MS)
        seconds = []
        for i, prompt in enumerate(prompts(4, seed=31)):
            t0 = time.monotonic()
            outcome = stream_completion(live.http_url, completion(prompt, 8)).outcome(oracle(prompt, 8))
            seconds.append(time.monotonic() - t0)
            ledger.record(Result(f"delayed-{i}", outcome, seconds=seconds[-1]))
        assert proxy.bytes_down > 0 and worker_finished(live, 0, "length") == 2  # half went through the proxy
        live.wait_quiet(QUIET_S)
        assert http_5xx(live) == 0
    report("test_fault_transport::proxy_delay", ledger.figure(1) + f"; slowest {max(seconds):.2f} s")
    ledger.assert_none()
    assert ledger.kinds() == {"ok": 4}
    assert max(seconds) >= 2 * PROXY_DELAY_MS / 1000  # the delay really applied (one chunk each way at least)


def run_streams_through_a_fault(
    live: LiveRouter,
    oracle: Oracle,
    ledger: Ledger,
    fault: Callable[[], None],
    *,
    count: int,
    max_tokens: int,
    deadline_s: float,
) -> None:
    """``count`` long greedy streams (alternating ranks); once each has some tokens, ``fault()``; every
    stream must end by ``deadline_s`` as ok (== the oracle) or with a clean error."""
    bodies = [(p, completion(p, max_tokens)) for p in prompts(count, seed=41)]
    events = [threading.Event() for _ in bodies]
    pool = ThreadPoolExecutor(max_workers=count)
    try:
        futures = [
            pool.submit(follow, live.http_url, body, ev, 3) for (_, body), ev in zip(bodies, events, strict=True)
        ]
        for ev in events:
            assert ev.wait(REQUEST_S), "a stream never started"
        fault()
        t0 = time.monotonic()
        for i, ((prompt, _), future) in enumerate(zip(bodies, futures, strict=True)):
            try:
                streamed = future.result(timeout=max(0.0, deadline_s - (time.monotonic() - t0)))
                outcome = streamed.outcome(oracle(prompt, max_tokens))
            except FutureTimeout:
                outcome = "hung"
            except Exception as exc:
                outcome = f"raised: {type(exc).__name__}: {str(exc)[:160]}"
            ledger.record(Result(f"stream-{i}", outcome, seconds=time.monotonic() - t0))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def test_proxy_reset_mid_stream_ends_each_stream_ok_or_with_a_clean_error(model_dir: Path, oracle: Oracle) -> None:
    ledger = Ledger()
    with proxied_router(model_dir) as live:
        proxy = live.proxies[0]
        in_flight: list[int] = []

        def reset() -> None:
            in_flight.append(live.loads()[0].running)  # the proxied rank's streams at the moment of the fault
            proxy.reset()

        run_streams_through_a_fault(live, oracle, ledger, reset, count=4, max_tokens=100, deadline_s=30.0)
        assert in_flight[0] >= 1 and proxy.resets >= 1  # the reset cut live streams
        proxy.pass_through()
        quiet_s = live.wait_quiet(QUIET_S)  # the proxied rank saw its calls die and aborted them
        errors = [r for r in ledger.results.values() if r.kind == "error"]
        assert all("stream error event" in r.outcome for r in errors), errors  # after a 200: an SSE error event
        # recovery: within a bound every request is served again (the channel reconnects with backoff)
        deadline = time.monotonic() + 15.0
        while True:
            batch = prompts(2, seed=int(time.monotonic() * 1000) % 10_000)
            outcomes = [stream_completion(live.http_url, completion(p, 8)).outcome(oracle(p, 8)) for p in batch]
            if outcomes == ["ok", "ok"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        ledger.record(Result("recovered", outcomes[0] if outcomes == ["ok", "ok"] else f"error: {outcomes}"))
        assert http_5xx(live) == 0
    report(
        "test_fault_transport::proxy_reset_mid_stream",
        ledger.figure(1, recovery_s=[quiet_s])
        + f"; {in_flight[0]} streams on the reset rank, {len(errors)} ended with an error event, the rest migrated",
    )
    ledger.assert_none()
    assert 1 <= len(errors) <= 2 or ledger.kinds().get("ok", 0) == 5  # the proxied rank's streams failed or migrated
    assert ledger.results["recovered"].kind == "ok"


def test_proxy_blackhole_ends_requests_by_their_deadline(model_dir: Path, oracle: Oracle) -> None:
    ledger = Ledger()
    with proxied_router(model_dir, request_timeout_s=PROXY_DEADLINE_S) as live:
        proxy = live.proxies[0]
        # 100 tokens take ~0.5 s idle, well inside the deadline; the stream on the proxied rank stops dead
        run_streams_through_a_fault(
            live, oracle, ledger, proxy.blackhole, count=2, max_tokens=100, deadline_s=PROXY_DEADLINE_S + 5.0
        )
        # new requests while the proxied rank is blackholed: each ends by its deadline too
        t0 = time.monotonic()
        for i, prompt in enumerate(prompts(2, seed=43)):
            streamed = stream_completion(live.http_url, completion(prompt, 8), timeout_s=PROXY_DEADLINE_S + 5.0)
            ledger.record(Result(f"during-{i}", streamed.outcome(oracle(prompt, 8)), seconds=time.monotonic() - t0))
        assert time.monotonic() - t0 < 2 * (PROXY_DEADLINE_S + 2.0)
        proxy.pass_through()
        quiet_s = live.wait_quiet(PROXY_DEADLINE_S + QUIET_S)  # the worker's own deadline ended its calls
    report("test_fault_transport::proxy_blackhole", ledger.figure(1, recovery_s=[quiet_s]))
    ledger.assert_none()
    assert ledger.kinds().get("ok", 0) >= 2 and ledger.kinds().get("error", 0) >= 2  # one of each pair was blackholed
    assert all(r.seconds < PROXY_DEADLINE_S + 3.0 for r in ledger.results.values())


# -- misbehaving clients: a slow reader, hang-ups at random bytes, slowloris --------------------------------

HEADER_TIMEOUT_S = 2.0  # the plain router's REST header deadline (RouterOptions.header_timeout_s)


@pytest.fixture(scope="module")
def plain(model_dir: Path) -> Iterator[LiveRouter]:
    options = {"header_timeout_s": HEADER_TIMEOUT_S}
    with live_router(model_dir, router_options=options, **BIG_CACHE) as live:
        yield live


def served_meanwhile(live: LiveRouter, oracle: Oracle, count: int, seed: int) -> dict[str, Callable[[], str]]:
    """``count`` short greedy requests that must be served (== the oracle) while the misbehaviour goes on."""
    return {f"meanwhile-{i}": served_job(live.http_url, oracle, p, 16) for i, p in enumerate(prompts(count, seed=seed))}


def test_a_slow_reader_neither_stalls_others_nor_leaks(plain: LiveRouter, oracle: Oracle) -> None:
    live, ledger = plain, Ledger()
    live.wait_quiet(QUIET_S)
    request = post_bytes(live.http_url, COMPLETIONS, completion(prompts(1, seed=51)[0], 200))

    def slow() -> str:
        got = slow_read(request, live.http_url, recv_bytes=256, pause_s=0.02, rcvbuf=4096, timeout_s=REQUEST_S)
        whole = got.status == 200 and got.complete and b"data: [DONE]" in got.received
        return "ok" if whole else f"wrong: status {got.status}, complete {got.complete}"

    run_ledgered(ledger, {"slow-reader": slow, **served_meanwhile(live, oracle, 6, seed=52)})
    quiet_s = live.wait_quiet(QUIET_S)
    report(
        "test_fault_transport::slow_reader",
        ledger.figure(1, leaked_blocks=leaked_blocks(live))
        + f"; slow read {ledger.results['slow-reader'].seconds:.1f} s",
    )
    ledger.assert_none()
    assert ledger.kinds() == {"ok": 7} and quiet_s < QUIET_S and http_5xx(live) == 0


def test_hang_ups_at_random_bytes_of_a_stream_free_everything(plain: LiveRouter, oracle: Oracle) -> None:
    live, ledger = plain, Ledger()
    live.wait_quiet(QUIET_S)
    request = post_bytes(live.http_url, COMPLETIONS, completion(prompts(1, seed=61)[0], 120))
    whole = disconnect_at_byte(request, live.http_url, cut=10**9)  # the whole answer: where the cuts may fall
    assert whole.status == 200 and not whole.reached and b"data: [DONE]" in whole.received
    rng = random.Random(61)
    cuts = sorted(rng.sample(range(1, len(whole.received)), 10))

    def cutter(cut: int, abrupt: bool) -> Callable[[], str]:
        def run() -> str:
            got = disconnect_at_byte(request, live.http_url, cut, abrupt=abrupt)
            return (
                f"cancelled: hung up at byte {cut}" if got.reached else f"wrong: ended at {len(got.received)} < {cut}"
            )

        return run

    jobs = {f"cut-{cut}": cutter(cut, abrupt=i % 2 == 1) for i, cut in enumerate(cuts)}
    run_ledgered(ledger, {**jobs, **served_meanwhile(live, oracle, 4, seed=62)})
    quiet_s = live.wait_quiet(QUIET_S)
    report(
        "test_fault_transport::hang_up_at_random_bytes",
        ledger.figure(len(cuts), leaked_blocks=leaked_blocks(live), recovery_s=[quiet_s])
        + f"; cuts at bytes {cuts} of {len(whole.received)}",
    )
    ledger.assert_none()
    assert ledger.kinds() == {"cancelled": len(cuts), "ok": 4} and http_5xx(live) == 0


def test_slowloris_connections_are_closed_by_the_server_and_others_are_served(
    plain: LiveRouter, oracle: Oracle
) -> None:
    """Five clients send request heads one byte every 100 ms: the server closes each connection within
    its header deadline (plus headroom for a loaded box) while normal requests are served."""
    live, ledger = plain, Ledger()
    bound_s = HEADER_TIMEOUT_S + 3.0

    def loris() -> str:
        got = slowloris(live.http_url, interval_s=0.1, timeout_s=bound_s + 3.0)
        if got.closed_after_s is None:
            return f"wrong: still open after {bound_s + 3.0:g} s ({got.bytes_sent} bytes sent)"
        return (
            "error: closed by the server"
            if got.closed_after_s <= bound_s
            else f"wrong: closed late, {got.closed_after_s:.1f} s"
        )

    run_ledgered(ledger, {**{f"loris-{i}": loris for i in range(5)}, **served_meanwhile(live, oracle, 3, seed=71)})
    report("test_fault_transport::slowloris", ledger.figure(5))
    ledger.assert_none()
    assert ledger.kinds() == {"error": 5, "ok": 3}
