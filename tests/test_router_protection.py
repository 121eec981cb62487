"""Unit tests of the router's protection layer: API keys, the HTTP guard, admission, the sampling
rules and the JSON body reader (reliability.md §2 rows 1-6, 8, 13-21; §3 S6, S9, S11).

No model and no network: ``HttpGuard`` is driven as a bare ASGI app around a tiny fake inner app
(plus one FastAPI app through httpx's ASGI transport), ``Admission`` on its own event loop, and
``read_json_object`` on hand-built Starlette requests.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import random
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from k2serve.router.admission import Admission, AdmissionLimits
from k2serve.router.api_error import ApiError, ErrorKind
from k2serve.router.api_keys import ApiKeys, credential
from k2serve.router.http_guard import ClientGone, HttpGuard
from k2serve.router.http_request import read_json_object, routing_for, until_done_or_gone
from k2serve.router.sampling_check import RequestLimits, SamplingFields, check_n, check_sampling, check_stop

KEY = "k-Test-123"


def run(coroutine: Awaitable[Any], timeout_s: float = 10.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coroutine, timeout_s)

    return asyncio.run(bounded())


# -- ApiKeys -------------------------------------------------------------------------------------


def test_api_keys_off_means_one_shared_tenant() -> None:
    keys = ApiKeys()
    assert not keys.enabled
    assert keys.tenant(None) == "" and keys.tenant("anything") == ""
    assert ApiKeys(["", ""]).enabled is False  # empty strings are not keys


def test_api_keys_match_exactly_and_case_sensitively() -> None:
    keys = ApiKeys([KEY, "other-key"])
    assert keys.enabled
    tenant = keys.tenant(KEY)
    assert tenant is not None and len(tenant) == 16 and int(tenant, 16) >= 0
    assert keys.tenant(KEY) == tenant  # stable
    assert keys.tenant("other-key") not in (None, tenant)  # one tenant per key
    for wrong in (None, "", KEY.lower(), KEY.upper(), KEY[:-1], KEY + "4", " " + KEY, "k"):
        assert keys.tenant(wrong) is None, wrong
    assert KEY not in tenant  # the tenant does not reveal the key


def test_api_keys_compare_every_digest_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = ApiKeys(["a-key", "b-key", "c-key"])
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented in ("a-key", "c-key", "nope"):
        calls.clear()
        keys.tenant(presented)
        assert len(calls) == 3, presented  # no early exit on the first match
        assert all(len(a) == len(b) == 32 for a, b in calls)  # digests, never the raw keys


def test_api_keys_odd_strings_never_raise() -> None:
    keys = ApiKeys([KEY, "\udc80surrogate"])
    assert keys.tenant("\ud800") is None
    assert keys.tenant("\udc80surrogate") is not None
    assert keys.tenant("ké\x00y" * 1000) is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-api-key": KEY}, KEY),
        ({"authorization": f"Bearer {KEY}"}, KEY),
        ({"authorization": f"bearer {KEY}"}, KEY),  # the scheme is case-insensitive
        ({"authorization": f"BEARER {KEY}"}, KEY),
        ({"authorization": f"Bearer   {KEY}  "}, KEY),
        ({"authorization": f"Bearer\t{KEY}"}, KEY),
        ({"authorization": f"Basic {KEY}"}, None),
        ({"authorization": "Basic a2V5OnNlY3JldA=="}, None),
        ({"authorization": f"Token {KEY}"}, None),
        ({"authorization": KEY}, None),  # a bare key is not a credential
        ({"authorization": "Bearer"}, None),
        ({"authorization": "Bearer   "}, None),
        ({"x-api-key": ""}, None),
        ({"x-api-key": "", "authorization": f"Bearer {KEY}"}, KEY),
        ({"x-api-key": "wrong", "authorization": f"Bearer {KEY}"}, "wrong"),  # x-api-key wins: a wrong one is 401
        ({}, None),
    ],
)
def test_credential_schemes(headers: dict[str, str], expected: str | None) -> None:
    assert credential(headers) == expected
    keys = ApiKeys([KEY])
    assert (keys.tenant_of_headers(headers) is not None) == (expected == KEY)


# -- HttpGuard, as a bare ASGI app -----------------------------------------------------------------


@dataclass
class FakeInner:
    """The app behind the guard: reads the body and answers 200 with what it saw."""

    calls: int = 0
    scopes: list[dict[str, Any]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    after_body: list[dict[str, Any]] = field(default_factory=list)
    stream_chunks: tuple[bytes, ...] = ()
    read_after_body: bool = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        self.scopes.append(dict(scope))
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            self.messages.append(dict(message))
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if self.read_after_body:
            self.after_body.append(dict(await receive()))
        if self.stream_chunks:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            for chunk in self.stream_chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        data = json.dumps({"len": len(body), "tenant": scope.get("state", {}).get("tenant")}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})


@dataclass
class Exchange:
    status: int
    headers: dict[str, str]
    body: bytes
    bodies: list[bytes]
    receives: int

    def json(self) -> Any:
        return json.loads(self.body)


def call_guard(
    guard: HttpGuard,
    path: str = "/v1/chat/completions",
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    chunks: tuple[bytes, ...] = (b"{}",),
    disconnect_after: int | None = None,
) -> Exchange:
    """One request through ``guard``; ``chunks`` are the body's ``http.request`` messages."""
    sent: list[dict[str, Any]] = []
    receives = 0

    async def receive() -> dict[str, Any]:
        nonlocal receives
        receives += 1
        i = receives - 1
        if disconnect_after is not None and i >= disconnect_after:
            return {"type": "http.disconnect"}
        if i < len(chunks):
            return {"type": "http.request", "body": chunks[i], "more_body": i < len(chunks) - 1}
        if i == 0:
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(0)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()],
    }
    run(guard(scope, receive, send))
    if not sent:
        return Exchange(0, {}, b"", [], receives)
    start = sent[0]
    assert start["type"] == "http.response.start"
    bodies = [m.get("body", b"") for m in sent[1:]]
    response_headers = {k.decode(): v.decode() for k, v in start.get("headers", [])}
    return Exchange(start["status"], response_headers, b"".join(bodies), bodies, receives)


def assert_openai_error(exchange: Exchange, status: int) -> dict[str, Any]:
    assert exchange.status == status
    body = exchange.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status
    assert len(exchange.body) < 4096
    return dict(body["error"])


def assert_anthropic_error(exchange: Exchange, status: int, error_type: str) -> dict[str, Any]:
    assert exchange.status == status
    body = exchange.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert len(exchange.body) < 4096
    return dict(body["error"])


def guarded(max_body_bytes: int = 1000, **inner_options: Any) -> tuple[HttpGuard, FakeInner]:
    inner = FakeInner(**inner_options)
    return HttpGuard(inner, ApiKeys([KEY]), max_body_bytes=max_body_bytes), inner


AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": f"Bearer {KEY.lower()}"},
        {"authorization": f"Basic {KEY}"},
        {"x-api-key": "nope"},
        {"authorization": "Bearer nope"},
    ],
)
def test_guard_refuses_without_a_good_key_before_reading_the_body(headers: dict[str, str]) -> None:
    guard, inner = guarded()
    out = call_guard(guard, headers=headers)
    error = assert_openai_error(out, 401)
    assert error["type"] == "authentication_error"
    assert out.headers.get("www-authenticate") == "Bearer"
    assert inner.calls == 0 and out.receives == 0
    anthropic = call_guard(guard, "/v1/messages", headers=headers)
    assert_anthropic_error(anthropic, 401, "authentication_error")
    assert_anthropic_error(call_guard(guard, "/v1/messages/count_tokens", headers=headers), 401, "authentication_error")


@pytest.mark.parametrize("headers", [AUTH, {"x-api-key": KEY}, {"authorization": f"bEaReR {KEY}"}])
def test_guard_lets_a_good_key_through_with_its_tenant(headers: dict[str, str]) -> None:
    guard, inner = guarded()
    out = call_guard(guard, headers=headers, chunks=(b'{"a": 1}',))
    assert out.status == 200
    assert out.json() == {"len": 8, "tenant": ApiKeys([KEY]).tenant(KEY)}
    assert inner.calls == 1


def test_guard_public_paths_and_options_need_no_key() -> None:
    guard, _ = guarded()
    for path, method in (("/health", "GET"), ("/metrics", "GET"), ("/v1/chat/completions", "OPTIONS")):
        out = call_guard(guard, path, method=method, chunks=())
        assert out.status == 200, (path, method)
        assert out.json()["tenant"] == ""
    # exact match only: neighbours of a public path are protected
    for path in ("/health/", "/healthz", "/metrics/x", "/HEALTH", "/v1/health"):
        assert call_guard(guard, path, method="GET", chunks=()).status == 401, path
    # a bad key on a public path is not an error (and gives no tenant)
    assert call_guard(guard, "/health", method="GET", headers={"x-api-key": "bad"}).json()["tenant"] == ""


def test_guard_auth_off_lets_everything_through() -> None:
    inner = FakeInner()
    guard = HttpGuard(inner, ApiKeys(), max_body_bytes=100)
    assert call_guard(guard).status == 200
    assert inner.scopes[0]["state"]["tenant"] == ""


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/v1/chat/completions", {f"x-h{i}": "v" for i in range(200)}),
        ("/v1/chat/completions", {"cookie": "c=" + "b" * 40_000}),
        ("/v1/messages", {"cookie": "c=" + "b" * 40_000}),
        ("/health", {"x-big": "b" * 40_000}),  # public paths too
    ],
)
def test_guard_too_many_or_too_large_headers_is_431(path: str, headers: dict[str, str]) -> None:
    guard, inner = guarded()
    out = call_guard(guard, path, headers={**AUTH, **headers})
    assert out.status == 431 and out.headers.get("connection") == "close"
    assert len(out.body) < 4096 and inner.calls == 0 and out.receives == 0
    body = out.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    elif path.startswith("/v1"):
        assert body["error"]["code"] == 431
    ok = call_guard(guard, headers={**AUTH, **{f"x-h{i}": "v" * 100 for i in range(100)}})
    assert ok.status == 200  # 100 headers of 100 bytes are fine


def test_guard_content_length_over_the_limit_is_413_without_reading() -> None:
    guard, inner = guarded(max_body_bytes=100)
    out = call_guard(guard, headers={**AUTH, "content-length": "101"}, chunks=(b"x" * 101,))
    error = assert_openai_error(out, 413)
    assert "100 bytes" in error["message"]
    assert out.headers.get("connection") == "close"
    assert inner.calls == 0 and out.receives == 0
    huge = call_guard(guard, headers={**AUTH, "content-length": "9" * 40})
    assert_openai_error(huge, 413)
    anthropic = call_guard(guard, "/v1/messages", headers={**AUTH, "content-length": "5000"})
    assert_anthropic_error(anthropic, 413, "request_too_large")
    assert inner.calls == 0


@pytest.mark.parametrize("length", ["12a", "-1", "²", "1e3", "0x10", "1 2"])
def test_guard_malformed_content_length_is_400(length: str) -> None:
    guard, inner = guarded()
    out = call_guard(guard, headers={**AUTH, "content-length": length})
    assert_openai_error(out, 400)
    assert inner.calls == 0


def test_guard_chunked_body_growing_past_the_limit_is_413() -> None:
    guard, inner = guarded(max_body_bytes=100)
    chunks = tuple(b"x" * 30 for _ in range(50))
    out = call_guard(guard, chunks=chunks, headers=AUTH)
    assert_openai_error(out, 413)
    assert out.headers.get("connection") == "close"
    assert inner.calls == 0
    assert out.receives == 4  # stopped reading as soon as the body passed the limit (4 x 30 > 100)
    anthropic = call_guard(guard, "/v1/messages", chunks=chunks, headers=AUTH)
    assert_anthropic_error(anthropic, 413, "request_too_large")


def test_guard_body_at_the_limit_reaches_the_app_whole() -> None:
    guard, inner = guarded(max_body_bytes=100, read_after_body=True)
    out = call_guard(guard, chunks=(b"a" * 40, b"", b"b" * 60), headers=AUTH)
    assert out.status == 200 and out.json()["len"] == 100
    assert len(inner.messages) == 1 and inner.messages[0]["body"] == b"a" * 40 + b"b" * 60
    assert inner.messages[0]["more_body"] is False
    assert inner.after_body == [{"type": "http.disconnect"}]  # later receives are the server's own
    # with an honest Content-Length at the limit too
    out = call_guard(guard, chunks=(b"c" * 100,), headers={**AUTH, "content-length": "100"})
    assert out.status == 200 and out.json()["len"] == 100


def test_guard_client_leaving_mid_body_never_reaches_the_app() -> None:
    guard, inner = guarded()
    out = call_guard(guard, chunks=(b"x" * 10, b"y" * 10, b"z"), headers=AUTH, disconnect_after=1)
    assert out.status == 0 and inner.calls == 0


def test_guard_streams_the_response_untouched() -> None:
    chunks = (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n")
    guard, _ = guarded(stream_chunks=chunks)
    out = call_guard(guard, headers=AUTH)
    assert out.status == 200
    assert out.bodies == [*chunks, b""]


def test_guard_passes_other_scopes_through() -> None:
    guard, inner = guarded()

    async def go() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "lifespan.startup"}

        async def send(message: dict[str, Any]) -> None:
            pass

        await guard({"type": "lifespan"}, receive, send)

    run(go())
    assert inner.calls == 1 and inner.scopes[0]["type"] == "lifespan"


def _fastapi_behind_guard(max_body_bytes: int) -> HttpGuard:
    """A FastAPI app whose catch-all handler turns any escaped exception into a 500 (as http_app)."""
    app = FastAPI()

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": {"message": "internal"}}, status_code=500)

    @app.post("/v1/chat/completions")
    async def echo(request: Request) -> dict[str, Any]:
        return {"len": len(await read_json_object(request))}

    return HttpGuard(app, ApiKeys([KEY]), max_body_bytes=max_body_bytes)


def test_guard_chunked_413_through_fastapi_is_not_a_500() -> None:
    """Regression: the guard used to raise inside the app's ``receive``; FastAPI's catch-all made it 500."""
    guard = _fastapi_behind_guard(max_body_bytes=1000)

    async def go() -> list[httpx.Response]:
        async def big() -> Any:
            for _ in range(20):
                yield b" " * 100

        async def small() -> Any:
            yield b'{"a": '
            yield b"1}"

        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://router", headers=AUTH) as client:
            return [
                await client.post("/v1/chat/completions", content=big()),
                await client.post("/v1/chat/completions", content=small()),
            ]

    too_big, fine = run(go())
    assert too_big.status_code == 413, too_big.text
    assert too_big.json()["error"]["code"] == 413
    assert fine.status_code == 200 and fine.json() == {"len": 1}


def test_guard_ends_quietly_when_the_client_left_a_non_streaming_request() -> None:
    """``until_done_or_gone`` cancels the work and raises ``ClientGone``; the guard swallows it (no
    "Exception in ASGI application" from the server), and a real cancellation still propagates."""
    app = FastAPI()
    work_cancelled = asyncio.Event()

    @app.post("/v1/completions")
    async def slow(request: Request) -> dict[str, Any]:
        await read_json_object(request)

        async def work() -> dict[str, Any]:
            try:
                await asyncio.sleep(3600)
            finally:
                work_cancelled.set()
            return {}

        return await until_done_or_gone(request, work())

    guard = HttpGuard(app, ApiKeys([KEY]))
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b""}
    scope["headers"] = [(b"authorization", f"Bearer {KEY}".encode())]
    sent: list[Any] = []

    async def go() -> None:
        messages = [{"type": "http.request", "body": b"{}", "more_body": False}]
        gone_at = asyncio.get_running_loop().time() + 0.3  # the client leaves 0.3 s in

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            while asyncio.get_running_loop().time() < gone_at:
                await asyncio.sleep(0.01)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await guard(dict(scope), receive, send)  # returns: no exception reaches the server
        assert work_cancelled.is_set() and sent == []

        async def forever() -> dict[str, Any]:
            await asyncio.sleep(3600)
            return {}

        task = asyncio.create_task(guard(dict(scope), forever, send))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(go())


# -- Admission -------------------------------------------------------------------------------------


def test_admission_limits_are_validated() -> None:
    for bad in ({"max_running": 0}, {"max_waiting": -1}, {"max_wait_s": -1.0}, {"max_wait_s": math.nan}):
        with pytest.raises(ValueError):
            AdmissionLimits(**bad)


def test_admission_runs_up_to_the_limit_then_refuses_with_retry_after() -> None:
    async def go() -> None:
        admission = Admission(AdmissionLimits(max_running=2, max_waiting=0, retry_after_s=3))
        async with admission.slot(), admission.slot():
            assert admission.running == 2
            with pytest.raises(ApiError) as refused:
                async with admission.slot():
                    pytest.fail("admitted past the limit")
            assert refused.value.kind is ErrorKind.OVERLOADED
            assert refused.value.headers() == {"retry-after": "3"}
            assert admission.rejected == 1
        assert admission.running == 0
        async with admission.slot(2):  # a request with n=2 costs 2 units
            assert admission.running == 2
        async with admission.slot(50):  # more than the whole limit: clamped, runs alone
            assert admission.running == 2
        assert admission.running == 0 and admission.waiting == 0

    run(go())


def test_overload_statuses_per_surface() -> None:
    assert ErrorKind.OVERLOADED.http_status == 429 and ErrorKind.OVERLOADED.anthropic_status == 529
    assert ErrorKind.UNAVAILABLE.http_status == 503 and ErrorKind.UNAVAILABLE.anthropic_status == 529
    assert ErrorKind.OVERLOADED.anthropic_type == ErrorKind.UNAVAILABLE.anthropic_type == "overloaded_error"


async def _hold(admission: Admission, order: list[str], name: str, release: asyncio.Event, cost: int = 1) -> None:
    async with admission.slot(cost):
        order.append(name)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_admission_is_first_in_first_out() -> None:
    async def go() -> None:
        admission = Admission(AdmissionLimits(max_running=1, max_waiting=10))
        order: list[str] = []
        events = {name: asyncio.Event() for name in "abcde"}
        tasks = []
        for name in "abcde":
            tasks.append(asyncio.create_task(_hold(admission, order, name, events[name])))
            await _settle()
        assert order == ["a"] and admission.waiting == 4
        for name in "abcde":
            events[name].set()
            await _settle()
        await asyncio.gather(*tasks)
        assert order == list("abcde")
        assert admission.running == 0 and admission.waiting == 0

    run(go())


def test_admission_newcomer_never_overtakes_a_waiter() -> None:
    async def go() -> None:
        admission = Admission(AdmissionLimits(max_running=4, max_waiting=10))
        order: list[str] = []
        small_release, big_release, late_release = asyncio.Event(), asyncio.Event(), asyncio.Event()
        first = [asyncio.create_task(_hold(admission, order, f"s{i}", small_release)) for i in range(3)]
        await _settle()
        big = asyncio.create_task(_hold(admission, order, "big", big_release, cost=2))
        await _settle()
        late = asyncio.create_task(_hold(admission, order, "late", late_release))  # would fit (3 + 1 <= 4)
        await _settle()
        assert order == ["s0", "s1", "s2"] and admission.waiting == 2  # but waits behind "big"
        small_release.set()
        await asyncio.gather(*first)
        await _settle()
        assert order[3:] == ["big", "late"]
        big_release.set()
        late_release.set()
        await asyncio.gather(big, late)
        assert admission.running == 0

    run(go())


def test_admission_head_leaving_unblocks_the_waiters_behind_it() -> None:
    """A blocked head that times out must not keep smaller waiters queued until the next release."""

    async def go() -> None:
        admission = Admission(AdmissionLimits(max_running=4, max_waiting=10, max_wait_s=5.0))
        order: list[str] = []
        release = asyncio.Event()
        holders = [asyncio.create_task(_hold(admission, order, f"s{i}", release)) for i in range(3)]
        await _settle()

        async def big() -> None:
            async with admission.slot(2, deadline_s=0.2):
                pytest.fail("the big request cannot fit")

        big_task = asyncio.create_task(big())
        await _settle()
        late = asyncio.create_task(_hold(admission, order, "late", release))
        await _settle()
        assert "late" not in order
        with pytest.raises(ApiError) as timed_out:
            await big_task
        assert timed_out.value.kind is ErrorKind.OVERLOADED
        await _settle()
        assert order[-1] == "late" and admission.running == 4 and admission.waiting == 0
        release.set()
        await asyncio.gather(*holders, late)
        assert admission.running == 0

    run(go())


def test_admission_wait_times_out_with_429_and_honours_the_deadline() -> None:
    async def go() -> None:
        admission = Admission(AdmissionLimits(max_running=1, max_waiting=5, max_wait_s=0.3))
        async with admission.slot():
            loop = asyncio.get_running_loop()
            for deadline, expect_s in ((None, 0.3), (0.05, 0.05), (0.0, 0.0), (-1.0, 0.0)):
                t0 = loop.time()
                with pytest.raises(ApiError) as refused:
                    async with admission.slot(deadline_s=deadline):
                        pytest.fail("admitted while full")
                took = loop.time() - t0
                assert refused.value.kind is ErrorKind.OVERLOADED
                assert refused.value.retry_after_s == 1
                assert expect_s - 0.01 <= took < expect_s + 1.0, (deadline, took)  # generous: shared CPUs
                assert admission.waiting == 0
        assert admission.running == 0 and admission.rejected == 4

    run(go())


def test_admission_cancelled_waiter_never_leaks_a_slot() -> None:
    async def go() -> None:
        admission = Admission(AdmissionLimits(max_running=1, max_waiting=5))
        release = asyncio.Event()
        order: list[str] = []
        holder = asyncio.create_task(_hold(admission, order, "holder", release))
        await _settle()
        waiter = asyncio.create_task(_hold(admission, order, "waiter", asyncio.Event()))
        await _settle()
        assert admission.waiting == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert admission.waiting == 0 and admission.running == 1
        release.set()
        await holder
        assert admission.running == 0
        async with admission.slot():  # capacity is whole again
            assert admission.running == 1

    run(go())


def test_admission_cancel_in_the_instant_of_the_grant_gives_the_slot_back() -> None:
    async def go() -> None:
        admission = Admission(AdmissionLimits(max_running=1, max_waiting=5))
        entered = False

        async def waiter() -> None:
            nonlocal entered
            async with admission.slot():
                entered = True

        cm = admission.slot()
        await cm.__aenter__()
        task = asyncio.create_task(waiter())
        await _settle()
        assert admission.waiting == 1
        await cm.__aexit__(None, None, None)  # grants the waiter synchronously...
        assert admission.running == 1
        task.cancel()  # ...which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not entered
        assert admission.running == 0 and admission.waiting == 0

    run(go())


def test_admission_releases_on_error_inside_the_slot() -> None:
    async def go() -> None:
        admission = Admission(AdmissionLimits(max_running=1, max_waiting=0))
        with pytest.raises(RuntimeError):
            async with admission.slot():
                raise RuntimeError("boom")
        assert admission.running == 0
        async with admission.slot():
            pass

    run(go())


def test_admission_draining_refuses_new_and_waiting_requests_with_503() -> None:
    async def go() -> None:
        admission = Admission(AdmissionLimits(max_running=1, max_waiting=5))
        release = asyncio.Event()
        order: list[str] = []
        holder = asyncio.create_task(_hold(admission, order, "running", release))
        await _settle()
        waiters = [asyncio.create_task(_hold(admission, order, f"w{i}", asyncio.Event())) for i in range(2)]
        await _settle()
        assert admission.waiting == 2
        admission.draining = True
        assert admission.draining is True
        for task in waiters:
            with pytest.raises(ApiError) as refused:
                await task
            assert refused.value.kind is ErrorKind.UNAVAILABLE and refused.value.retry_after_s == 1
        with pytest.raises(ApiError) as new:
            async with admission.slot():
                pytest.fail("admitted while draining")
        assert new.value.kind is ErrorKind.UNAVAILABLE
        assert admission.rejected == 0  # draining is not overload
        assert not holder.done()  # the running request finishes
        release.set()
        await holder
        assert order == ["running"] and admission.running == 0 and admission.waiting == 0
        admission.draining = False
        async with admission.slot():
            pass

    run(go())


def test_admission_random_churn_keeps_the_books_straight() -> None:
    """Many requests with random costs, hold times, deadlines and cancellations: never more than the
    limit at once, and nothing is left running or waiting afterwards."""

    async def go() -> None:
        rng = random.Random(5)
        limits = AdmissionLimits(max_running=4, max_waiting=8, max_wait_s=0.05)
        admission = Admission(limits)
        peak = 0
        outcomes: dict[str, int] = {"ok": 0, "overloaded": 0, "cancelled": 0}

        async def one(cost: int, hold_s: float, deadline: float | None) -> None:
            nonlocal peak
            try:
                async with admission.slot(cost, deadline_s=deadline):
                    peak = max(peak, admission.running)
                    assert admission.running <= limits.max_running
                    await asyncio.sleep(hold_s)
                outcomes["ok"] += 1
            except ApiError as exc:
                assert exc.kind is ErrorKind.OVERLOADED
                outcomes["overloaded"] += 1
            except asyncio.CancelledError:
                outcomes["cancelled"] += 1

        tasks = []
        for _ in range(300):
            deadline = rng.choice([None, 0.0, 0.01, 0.03])
            tasks.append(asyncio.create_task(one(rng.randint(1, 3), rng.random() * 0.01, deadline)))
            if rng.random() < 0.25:
                rng.choice(tasks).cancel()
            await asyncio.sleep(rng.random() * 0.002)
        await asyncio.gather(*tasks, return_exceptions=True)
        assert admission.running == 0 and admission.waiting == 0
        assert peak <= limits.max_running
        assert outcomes["ok"] > 0 and outcomes["overloaded"] > 0

    run(go(), timeout_s=30)


# -- sampling_check (reliability.md §2.3 rows 13-21) ------------------------------------------------

LIMITS = RequestLimits()
NAMES = {"max_tokens": "max_completion_tokens", "top_logprobs": "top_logprobs"}
BIG = 10**400


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        # 13, 14: max_tokens
        ({"max_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": -5}, "max_completion_tokens"),
        ({"max_tokens": 2**31}, "max_completion_tokens"),
        ({"max_tokens": 2**63}, "max_completion_tokens"),
        ({"max_tokens": BIG}, "max_completion_tokens"),
        ({"max_tokens": math.inf}, "max_completion_tokens"),
        ({"max_tokens": 1e309}, "max_completion_tokens"),
        ({"max_tokens": "10"}, "max_completion_tokens"),
        ({"max_tokens": 10.0}, "max_completion_tokens"),
        ({"max_tokens": True}, "max_completion_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        # 15: temperature
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.01}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": -math.inf}, "temperature"),
        ({"temperature": BIG}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": False}, "temperature"),
        # 16: top_p, top_k, min_p
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": 1.0001}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": "5"}, "top_k"),
        ({"top_k": 2**31}, "top_k"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.01}, "min_p"),
        ({"min_p": math.inf}, "min_p"),
        # 17: penalties
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"presence_penalty": 2.01}, "presence_penalty"),
        ({"presence_penalty": math.nan}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"repetition_penalty": math.nan}, "repetition_penalty"),
        # seed
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 1.5}, "seed"),
        # 19: top_logprobs
        ({"top_logprobs": -1}, "top_logprobs"),
        ({"top_logprobs": LIMITS.max_top_logprobs + 1}, "top_logprobs"),
        ({"top_logprobs": "3"}, "top_logprobs"),
        # 21: stop_token_ids
        ({"stop_token_ids": ["1"]}, "stop_token_ids"),
        ({"stop_token_ids": [1.5]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [1000]}, "stop_token_ids"),  # vocab_size 1000
        ({"stop_token_ids": [True]}, "stop_token_ids"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"stop_token_ids": "12"}, "stop_token_ids"),
        ({"stop_token_ids": list(range(LIMITS.max_stop_token_ids + 1))}, "stop_token_ids"),
        # the others
        ({"max_reasoning_tokens": -1}, "max_reasoning_tokens"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_check_sampling_rejects(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as bad:
        check_sampling(SamplingFields(**fields), LIMITS, NAMES, vocab_size=1000)
    assert bad.value.kind is ErrorKind.INVALID
    assert bad.value.param == param
    assert bad.value.message.startswith(f"{param}: ")
    assert len(bad.value.message) < 200  # a huge value is never echoed back


def test_check_sampling_accepts_the_edges_and_maps_defaults() -> None:
    default = check_sampling(SamplingFields(), LIMITS)
    assert (default.temperature, default.top_p, default.top_k, default.repetition_penalty) == (1.0, 1.0, -1, 1.0)
    assert default.max_tokens is None and default.seed is None and default.stop_token_ids == ()
    edges = SamplingFields(
        temperature=0,
        top_p=1,
        top_k=0,
        min_p=1.0,
        presence_penalty=-2,
        frequency_penalty=2.0,
        repetition_penalty=1e-6,
        seed=-1,
        max_tokens=1,
        min_tokens=1,
        stop_token_ids=(0, 999),
        ignore_eos=True,
        top_logprobs=LIMITS.max_top_logprobs,
        max_reasoning_tokens=0,
    )
    s = check_sampling(edges, LIMITS, vocab_size=1000)
    assert s.temperature == 0.0 and isinstance(s.temperature, float)
    assert s.top_k == -1  # 0 means off, like -1
    assert s.seed == 2**64 - 1  # a negative seed wraps into the worker's uint64
    assert s.stop_token_ids == (0, 999) and s.ignore_eos is True
    assert check_sampling(SamplingFields(top_k=-1, max_tokens=2**31 - 1), LIMITS).max_tokens == 2**31 - 1


@pytest.mark.parametrize(
    "stop",
    [
        "",
        [""],
        ["ok", ""],
        ["s"] * (LIMITS.max_stop + 1),
        ["x" * (LIMITS.max_stop_chars + 1)],
        [1],
        [None],
        5,
        {"a": 1},
        True,
    ],
)
def test_check_stop_rejects(stop: Any) -> None:  # row 20
    with pytest.raises(ApiError) as bad:
        check_stop(stop, LIMITS, param="stop_sequences")
    assert bad.value.kind is ErrorKind.INVALID and bad.value.param == "stop_sequences"


def test_check_stop_accepts() -> None:
    assert check_stop(None, LIMITS) == ()
    assert check_stop("END", LIMITS) == ("END",)
    assert check_stop(["a", "b" * LIMITS.max_stop_chars], LIMITS) == ("a", "b" * LIMITS.max_stop_chars)
    assert check_stop(["s"] * LIMITS.max_stop, LIMITS) == ("s",) * LIMITS.max_stop


@pytest.mark.parametrize("n", [0, -1, LIMITS.max_n + 1, 2**63, 1.0, "2", True])
def test_check_n_rejects(n: Any) -> None:  # row 18
    sampling = check_sampling(SamplingFields(temperature=1.0), LIMITS)
    with pytest.raises(ApiError) as bad:
        check_n(n, sampling, LIMITS)
    assert bad.value.kind is ErrorKind.INVALID and bad.value.param == "n"


def test_check_n_greedy_must_be_one() -> None:
    greedy = check_sampling(SamplingFields(temperature=0.0), LIMITS)
    with pytest.raises(ApiError, match="greedy"):
        check_n(2, greedy, LIMITS)
    assert check_n(1, greedy, LIMITS) == 1
    assert check_n(None, greedy, LIMITS) == 1
    assert check_n(LIMITS.max_n, check_sampling(SamplingFields(), LIMITS), LIMITS) == LIMITS.max_n


# -- read_json_object (rows 1, 2, 5, 6; NaN / Infinity) ---------------------------------------------


def make_request(body: bytes, content_type: str | None = "application/json", **headers: str) -> Request:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    if content_type is not None:
        raw.append((b"content-type", content_type.encode()))
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": raw, "state": {}}
    return Request(scope, receive)


def read(body: bytes, content_type: str | None = "application/json") -> dict[str, Any]:
    result: dict[str, Any] = run(read_json_object(make_request(body, content_type)))
    return result


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"a": 1,}',
        b"{'a': 1}",
        b"[]",
        b'[{"model": "m"}]',
        b"42",
        b"null",
        b"true",
        b'"a string"',
        b'{"a": 1} trailing',
        b'{"temperature": NaN}',
        b'{"temperature": Infinity}',
        b'{"temperature": -Infinity}',
        b'{"max_tokens": 1e309}',
        b'{"max_tokens": -1e400}',
        b'{"max_tokens": ' + b"9" * 5000 + b"}",
        b"\xef\xbb\xbf{}",  # a UTF-8 byte-order mark
        b'{"messages": "\xff\xfe"}',  # invalid UTF-8
        b'{"messages": "\xed\xa0\x80"}',  # an encoded surrogate: invalid UTF-8
        b'{"messages": "\\ud800"}',  # a lone surrogate, escaped (json accepts it)
        b'{"messages": [{"content": "ok \\udfff"}]}',
        b'{"\\ud800": 1}',  # in a key
        b'{"messages": "a\\u0000b"}',  # NUL
        b'{"messages": [{"role": "user", "content": [{"text": "x\\u0000"}]}]}',
        b'{"a\\u0000": 1}',
        b"[" * 100_000 + b"]" * 100_000,  # deep enough to exhaust the recursion limit
        b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}",  # deeper than the 64 levels allowed
    ],
)
def test_read_json_object_rejects(body: bytes) -> None:
    with pytest.raises(ApiError) as bad:
        read(body)
    assert bad.value.kind is ErrorKind.INVALID
    assert len(bad.value.message) < 300
    assert "/" not in bad.value.message.replace("application/json", "")  # no file paths
    assert "Traceback" not in bad.value.message


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x", "a/b"]
)
def test_read_json_object_rejects_wrong_content_type(content_type: str) -> None:  # row 2
    with pytest.raises(ApiError) as bad:
        read(b'{"a": 1}', content_type)
    assert bad.value.kind is ErrorKind.INVALID and "Content-Type" in bad.value.message


@pytest.mark.parametrize(
    "content_type", [None, "", "application/json", "Application/JSON; charset=utf-8", "application/vnd.api+json"]
)
def test_read_json_object_accepts(content_type: str | None) -> None:
    body = '{"messages": [{"role": "user", "content": "héllo 🙂 \\ud83d\\ude42"}], "t": 0.5, "n": 1e308}'
    got = read(body.encode(), content_type)
    assert got["messages"][0]["content"] == "héllo 🙂 🙂" and got["n"] == 1e308


def test_read_json_object_error_never_echoes_a_huge_input() -> None:  # row 6
    with pytest.raises(ApiError) as bad:
        read(b'{"a": "' + b"x" * 100_000 + b'" oops}')
    assert len(bad.value.message) < 300 and "xxxxxxxxxx" not in bad.value.message


def test_routing_for_uses_the_guard_tenant_and_session() -> None:
    request = make_request(b"{}", **{"x-session-id": "sess-1"})
    request.scope["state"]["tenant"] = "abcd"
    routing = routing_for(request, user="u-1")
    assert routing.cache_salt == "abcd" and routing.session_key == "sess-1"
    plain = make_request(b"{}")
    assert routing_for(plain, user="u-1").session_key == "u-1"
    assert routing_for(plain, user=5).session_key is None
    assert routing_for(plain).cache_salt is None  # no tenant (auth off): no salt


def test_until_done_or_gone_returns_and_cancels() -> None:
    async def go() -> None:
        gone = {"now": False}

        async def receive() -> dict[str, Any]:
            if gone["now"]:
                return {"type": "http.disconnect"}
            await asyncio.sleep(3600)
            return {}

        request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)

        async def quick() -> int:
            return 7

        assert await until_done_or_gone(request, quick()) == 7
        cancelled = asyncio.Event()

        async def slow() -> int:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return 0

        gone["now"] = True
        with pytest.raises(ClientGone):
            await until_done_or_gone(request, slow())
        assert cancelled.is_set()
        assert issubclass(ClientGone, asyncio.CancelledError)

    run(go())


def test_error_bodies_are_the_surface_shapes() -> None:
    error = ApiError(ErrorKind.INVALID, "x" * 5000, param="messages")
    assert len(error.message) <= 1000
    assert error.openai_body()["error"]["param"] == "messages"
    assert error.anthropic_body("req_1") == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": error.message},
        "request_id": "req_1",
    }
