"""Bad input against a real router (reliability.md §2 and §3 S6, S9, S11), on the OpenAI chat and
completions endpoints and the Anthropic ``/v1/messages`` endpoint.

Every row of the table is sent to a live router (real worker over a tiny model, real uvicorn on
loopback, API keys on) and must get its 4xx status, the surface's error shape (OpenAI
``{"error": {"message", "type", "param", "code"}}``; Anthropic ``{"type": "error", "error":
{"type", "message"}}``), a body under 4 KB with no file path or traceback, and the next normal
request on the same surface must still get 200. Then: authentication (401 cases and an
enumeration of every route of the app), admission (429 / 529 with ``Retry-After`` and no stream
byte while the only slot is busy), the body limit (413) and oversized header blocks (400/431 or a
closed connection, never a hang), and an error in the middle of a generation (row 26).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from router_fixtures import MAX_MODEL_LEN, LiveRouter, live_router
from starlette.routing import Mount, Route

from k2serve.router.admission import AdmissionLimits
from k2serve.router.api_keys import ApiKeys
from k2serve.router.http_app import build_app
from k2serve.tiny_model import make_tiny_model

KEY = "k-test"
AUTH = {"authorization": f"Bearer {KEY}"}
PUBLIC = ("/health", "/metrics")
SURFACES = ("chat", "completions", "messages")
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions", "messages": "/v1/messages"}
CLIENT_TIMEOUT_S = 30.0
LEAKS = re.compile(r"Traceback|File \"|\.py\b|/work/|/home/|/usr/|site-packages|\bline \d+", re.IGNORECASE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("bad") / "tiny", seed=11)


@pytest.fixture(scope="module")
def live(model_dir: Path) -> Iterator[LiveRouter]:
    with live_router(model_dir, api_keys=(KEY,)) as router:
        yield router


@pytest.fixture(scope="module")
def client(live: LiveRouter) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.http_url, headers=AUTH, timeout=CLIENT_TIMEOUT_S) as c:
        yield c


# -- request bodies ------------------------------------------------------------------------------

MODEL = "tiny"  # make_tiny_model(.../"tiny") serves the folder's name


def base_body(surface: str) -> dict[str, Any]:
    if surface == "completions":
        return {"model": MODEL, "prompt": "hello there", "max_tokens": 2}
    return {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 2}


@dataclass(frozen=True)
class Raw:
    """A JSON value written verbatim (NaN, 1e309, a lone-surrogate escape): json.dumps cannot."""

    text: str


DROP = object()
BAD_BYTES_MARK = "@@not-utf8@@"  # replaced by bytes that are not UTF-8 after encoding


def encode_body(surface: str, overrides: dict[str, Any], text: Any = None) -> bytes:
    """The base body with ``overrides`` (``DROP`` removes a key); ``text`` replaces the prompt text."""
    body = base_body(surface)
    raws: dict[str, str] = {}

    def sentinel(value: Any) -> Any:
        if isinstance(value, Raw):
            key = f"__raw_{len(raws)}__"
            raws[key] = value.text
            return key
        return value

    for key, value in overrides.items():
        if value is DROP:
            body.pop(key, None)
        else:
            body[key] = sentinel(value)
    if text is not None:
        if surface == "completions":
            body["prompt"] = sentinel(text)
        else:
            body["messages"] = [{"role": "user", "content": sentinel(text)}]
    data = json.dumps(body)
    for key, raw in raws.items():
        data = data.replace(json.dumps(key), raw)
    return data.encode().replace(BAD_BYTES_MARK.encode(), b"\xff\xfe\xc0")


@dataclass(frozen=True)
class Row:
    row: int
    name: str
    surfaces: tuple[str, ...]
    overrides: dict[str, Any] | None = None
    text: Any = None  # the prompt / message text
    raw: bytes | None = None  # the whole body, verbatim
    content_type: str = "application/json"
    status: int = 400
    contains: str | None = None  # a phrase the error message must have

    def body(self, surface: str) -> bytes:
        if self.raw is not None:
            return self.raw
        return encode_body(surface, self.overrides or {}, self.text)


ALL = SURFACES
OPENAI = ("chat", "completions")
CHATS = ("chat", "messages")
BIG_TEXT = "x" * 100_000
TOOL = {"type": "function", "function": {"name": "get", "parameters": {"type": "object", "properties": {}}}}
A_TOOL = {"name": "get", "input_schema": {"type": "object", "properties": {}}}
LONG_TEXT = "hello world " * 300  # far more than MAX_MODEL_LEN tokens

ROWS: list[Row] = [
    # 1: not a JSON object
    Row(1, "invalid-json", ALL, raw=b'{"model": '),
    Row(1, "array", ALL, raw=b'[{"model": "tiny"}]'),
    Row(1, "number", ALL, raw=b"42"),
    Row(1, "null", ALL, raw=b"null"),
    Row(1, "string", ALL, raw=b'"hello"'),
    Row(1, "empty-body", ALL, raw=b""),
    Row(1, "trailing-garbage", ALL, raw=b'{"model": "tiny"} x'),
    # 2: wrong content type
    Row(2, "form-urlencoded", ALL, raw=b"model=tiny&prompt=hi", content_type="application/x-www-form-urlencoded"),
    Row(2, "text-plain", ALL, content_type="text/plain"),
    # 5: invalid UTF-8, lone surrogates, NUL
    Row(5, "invalid-utf8", ALL, text=f"ab{BAD_BYTES_MARK}"),
    Row(5, "lone-surrogate", ALL, text=Raw('"a\\ud800b"')),
    Row(5, "lone-low-surrogate", ALL, text=Raw('"\\udfff"')),
    Row(5, "nul", ALL, text="a\x00b"),
    Row(5, "nul-in-key", ALL, overrides={"x\x00": 1}),
    # 6: a validation error must not echo a huge input
    Row(6, "huge-bad-max-tokens", ALL, overrides={"max_tokens": BIG_TEXT}),
    Row(6, "huge-bad-model", ALL, overrides={"model": BIG_TEXT}, status=404),
    Row(6, "many-bad-messages", CHATS, overrides={"messages": [{"role": "bogus", "content": "y" * 50}] * 3000}),
    Row(6, "many-bad-prompts", ("completions",), overrides={"prompt": [1, "a"] * 1500}),
    # 7: unknown model
    Row(7, "unknown-model", ALL, overrides={"model": "no-such-model"}, status=404),
    # 10: empty prompt / messages
    Row(10, "empty-messages", CHATS, overrides={"messages": []}),
    Row(10, "missing-messages", CHATS, overrides={"messages": DROP}),
    Row(10, "empty-prompt-text", ("completions",), overrides={"prompt": ""}),
    Row(10, "empty-prompt-list", ("completions",), overrides={"prompt": []}),
    Row(10, "missing-prompt", ("completions",), overrides={"prompt": DROP}),
    # 11: prompt token ids out of range
    Row(11, "negative-id", ("completions",), overrides={"prompt": [1, -1]}),
    Row(11, "id-past-vocab", ("completions",), overrides={"prompt": [1, 10**9]}),
    Row(11, "float-id", ("completions",), overrides={"prompt": [1, 2.5]}),
    # 12: prompt longer than the context
    Row(12, "prompt-too-long", ALL, text=LONG_TEXT, contains="maximum context length"),
    # 13: max_tokens < 1, or over the context with the prompt
    Row(13, "max-tokens-0", ALL, overrides={"max_tokens": 0}),
    Row(13, "max-tokens-negative", ALL, overrides={"max_tokens": -1}),
    Row(13, "max-tokens-over-context", ALL, overrides={"max_tokens": MAX_MODEL_LEN}, contains="maximum context"),
    Row(13, "max-completion-tokens-0", ("chat",), overrides={"max_completion_tokens": 0}),
    # 14: max_tokens huge or the wrong type
    Row(14, "max-tokens-2^31", ALL, overrides={"max_tokens": 2**31}),
    Row(14, "max-tokens-2^63", ALL, overrides={"max_tokens": 2**63}),
    Row(14, "max-tokens-2^64+", ALL, overrides={"max_tokens": 2**64 + 7}),
    Row(14, "max-tokens-1e309", ALL, overrides={"max_tokens": Raw("1e309")}),
    Row(14, "max-tokens-string", ALL, overrides={"max_tokens": "16"}),
    Row(14, "max-tokens-float", ALL, overrides={"max_tokens": 16.5}),
    Row(14, "max-tokens-bool", ALL, overrides={"max_tokens": True}),
    Row(14, "max-tokens-5000-digits", ALL, overrides={"max_tokens": Raw("9" * 5000)}),
    # 15: temperature
    Row(15, "temperature-negative", ALL, overrides={"temperature": -0.5}),
    Row(15, "temperature-over-2", ALL, overrides={"temperature": 2.5}),
    Row(15, "temperature-over-1-anthropic", ("messages",), overrides={"temperature": 1.5}),
    Row(15, "temperature-nan", ALL, overrides={"temperature": Raw("NaN")}),
    Row(15, "temperature-inf", ALL, overrides={"temperature": Raw("Infinity")}),
    Row(15, "temperature-minus-inf", ALL, overrides={"temperature": Raw("-Infinity")}),
    Row(15, "temperature-string", ALL, overrides={"temperature": "hot"}),
    Row(15, "temperature-huge-int", ALL, overrides={"temperature": Raw("1" + "0" * 400)}),
    # 16: top_p, top_k, min_p
    Row(16, "top-p-0", ALL, overrides={"top_p": 0}),
    Row(16, "top-p-over-1", ALL, overrides={"top_p": 1.5}),
    Row(16, "top-p-nan", ALL, overrides={"top_p": Raw("NaN")}),
    Row(16, "top-k-minus-2", ALL, overrides={"top_k": -2}),
    Row(16, "top-k-float", ALL, overrides={"top_k": 1.5}),
    Row(16, "top-k-string", ALL, overrides={"top_k": "5"}),
    Row(16, "min-p-negative", OPENAI, overrides={"min_p": -0.1}),
    Row(16, "min-p-over-1", OPENAI, overrides={"min_p": 1.5}),
    # 17: penalties
    Row(17, "presence-over-2", OPENAI, overrides={"presence_penalty": 2.5}),
    Row(17, "presence-under-minus-2", OPENAI, overrides={"presence_penalty": -2.5}),
    Row(17, "frequency-over-2", OPENAI, overrides={"frequency_penalty": 3}),
    Row(17, "repetition-0", OPENAI, overrides={"repetition_penalty": 0}),
    Row(17, "repetition-negative", OPENAI, overrides={"repetition_penalty": -1}),
    Row(17, "repetition-inf", OPENAI, overrides={"repetition_penalty": Raw("Infinity")}),
    # 18: n
    Row(18, "n-0", OPENAI, overrides={"n": 0}),
    Row(18, "n-over-cap", OPENAI, overrides={"n": 9}),
    Row(18, "n-huge", OPENAI, overrides={"n": 2**40}),
    Row(18, "n-greedy", OPENAI, overrides={"n": 2, "temperature": 0}),
    Row(18, "n-string", OPENAI, overrides={"n": "2"}),
    # 19: logprobs
    Row(19, "top-logprobs-over-cap", ("chat",), overrides={"logprobs": True, "top_logprobs": 21}),
    Row(19, "top-logprobs-negative", ("chat",), overrides={"logprobs": True, "top_logprobs": -1}),
    Row(19, "top-logprobs-without-logprobs", ("chat",), overrides={"top_logprobs": 3}),
    Row(19, "logprobs-not-bool", ("chat",), overrides={"logprobs": 5}),
    Row(19, "legacy-logprobs-negative", ("completions",), overrides={"logprobs": -1}),
    Row(19, "legacy-logprobs-over-cap", ("completions",), overrides={"logprobs": 21}),
    # 20: stop strings
    Row(20, "stop-empty", OPENAI, overrides={"stop": ""}),
    Row(20, "stop-empty-item", OPENAI, overrides={"stop": ["ok", ""]}),
    Row(20, "stop-too-many", OPENAI, overrides={"stop": [f"s{i}" for i in range(17)]}),
    Row(20, "stop-too-long", OPENAI, overrides={"stop": ["x" * 257]}),
    Row(20, "stop-not-string", OPENAI, overrides={"stop": [1]}),
    Row(20, "stop-object", OPENAI, overrides={"stop": {"a": 1}}),
    Row(20, "stop-sequences-empty-item", ("messages",), overrides={"stop_sequences": [""]}),
    Row(20, "stop-sequences-too-many", ("messages",), overrides={"stop_sequences": [f"s{i}" for i in range(17)]}),
    Row(20, "stop-sequences-too-long", ("messages",), overrides={"stop_sequences": ["x" * 257]}),
    Row(20, "stop-sequences-string", ("messages",), overrides={"stop_sequences": "END"}),
    # 21: stop_token_ids
    Row(21, "stop-token-ids-string", OPENAI, overrides={"stop_token_ids": ["a"]}),
    Row(21, "stop-token-ids-negative", OPENAI, overrides={"stop_token_ids": [-1]}),
    Row(21, "stop-token-ids-past-vocab", OPENAI, overrides={"stop_token_ids": [10**9]}),
    Row(21, "stop-token-ids-not-list", OPENAI, overrides={"stop_token_ids": 5}),
    # 22: logit_bias (not supported here: any non-empty bias is a 400)
    Row(22, "logit-bias-non-int-key", OPENAI, overrides={"logit_bias": {"abc": 1}}),
    Row(22, "logit-bias-past-vocab", OPENAI, overrides={"logit_bias": {"999999999": 5}}),
    Row(22, "logit-bias-non-numeric", OPENAI, overrides={"logit_bias": {"1": "x"}}),
    Row(22, "logit-bias-many-bad", OPENAI, overrides={"logit_bias": {"a": 1, "b": 200, "-1": 1}}),
    Row(22, "logit-bias-not-object", OPENAI, overrides={"logit_bias": [1, 2]}),
    # 23: cache_salt
    Row(23, "cache-salt-empty", OPENAI, overrides={"cache_salt": ""}),
    Row(23, "cache-salt-not-string", OPENAI, overrides={"cache_salt": 5}),
    # 24: structured output we do not support
    Row(24, "response-format-json-schema", OPENAI, overrides={"response_format": {"type": "json_schema"}}),
    # 25: malformed tools
    Row(25, "tools-parameters-not-object", ("chat",), overrides={"tools": [{**TOOL, "function": {"name": "get", "parameters": "x"}}]}),
    Row(25, "tools-duplicate-names", ("chat",), overrides={"tools": [TOOL, TOOL]}),
    Row(25, "tool-choice-absent-tool", ("chat",), overrides={"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
    Row(25, "tool-type-not-function", ("chat",), overrides={"tools": [{**TOOL, "type": "retrieval"}]}),
    Row(25, "tools-empty", ("chat",), overrides={"tools": []}),
    Row(25, "tools-missing-name", ("chat",), overrides={"tools": [{"type": "function", "function": {}}]}),
    Row(25, "tool-choice-required-without-tools", ("chat",), overrides={"tool_choice": "required"}),
    Row(25, "tool-choice-unknown-mode", ("chat",), overrides={"tools": [TOOL], "tool_choice": "always"}),
    Row(25, "assistant-tool-call-type", ("chat",), overrides={"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "retrieval", "function": {"name": "get", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ]}),
    Row(25, "input-schema-not-object", ("messages",), overrides={"tools": [{**A_TOOL, "input_schema": "x"}]}),
    Row(25, "anthropic-duplicate-names", ("messages",), overrides={"tools": [A_TOOL, A_TOOL]}),
    Row(25, "anthropic-tool-choice-absent", ("messages",), overrides={"tools": [A_TOOL], "tool_choice": {"type": "tool", "name": "nope"}}),
    Row(25, "anthropic-tool-choice-bogus", ("messages",), overrides={"tools": [A_TOOL], "tool_choice": {"type": "bogus"}}),
    Row(25, "anthropic-server-tool", ("messages",), overrides={"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
    # Anthropic's own required fields and rules
    Row(13, "anthropic-max-tokens-missing", ("messages",), overrides={"max_tokens": DROP}),
    Row(15, "anthropic-thinking-budget-too-small", ("messages",), overrides={"max_tokens": 200, "thinking": {"type": "enabled", "budget_tokens": 10}}),
]  # fmt: skip


def _cases() -> list[Any]:
    cases = []
    for row in ROWS:
        for surface in row.surfaces:
            cases.append(pytest.param(row, surface, id=f"{row.row}-{row.name}-{surface}"))
    return cases


def assert_error(response: httpx.Response, surface: str, status: int, error_type: str | None = None) -> str:
    """The surface's error shape, bounded and clean; returns the message."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert len(response.content) < 4096, len(response.content)
    assert not LEAKS.search(response.text), response.text[:500]
    assert response.headers.get("content-type", "").startswith("application/json")
    body = response.json()
    if surface == "messages":
        assert body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"}, body
        expected = error_type or {400: "invalid_request_error", 404: "not_found_error"}.get(status)
        if expected:
            assert body["error"]["type"] == expected, body
        message = body["error"]["message"]
    else:
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert body["error"]["code"] == status, body
        if error_type:
            assert body["error"]["type"] == error_type, body
        message = body["error"]["message"]
    assert isinstance(message, str) and message
    return str(message)


def assert_still_serving(client: httpx.Client, surface: str) -> None:
    response = client.post(PATHS[surface], json=base_body(surface))
    assert response.status_code == 200, response.text[:500]


@pytest.mark.parametrize(("row", "surface"), _cases())
def test_bad_input_row(client: httpx.Client, row: Row, surface: str) -> None:
    response = client.post(PATHS[surface], content=row.body(surface), headers={"content-type": row.content_type})
    message = assert_error(response, surface, row.status)
    if row.contains:
        assert row.contains in message
    assert_still_serving(client, surface)


def test_context_boundary_is_exact(client: httpx.Client) -> None:  # row 12
    fits = client.post(
        PATHS["completions"], json={"model": MODEL, "prompt": [1] * (MAX_MODEL_LEN - 1), "max_tokens": 1}
    )
    assert fits.status_code == 200, fits.text[:300]
    full = client.post(PATHS["completions"], json={"model": MODEL, "prompt": [1] * MAX_MODEL_LEN, "max_tokens": 1})
    message = assert_error(full, "completions", 400)
    assert "maximum context length is" in message and str(MAX_MODEL_LEN) in message
    over = client.post(
        PATHS["completions"], json={"model": MODEL, "prompt": [1] * (MAX_MODEL_LEN - 1), "max_tokens": 2}
    )
    message = assert_error(over, "completions", 400)
    assert str(MAX_MODEL_LEN) in message and str(MAX_MODEL_LEN - 1) in message


def test_streaming_requests_are_validated_before_any_stream_byte(client: httpx.Client) -> None:
    for surface in SURFACES:
        body = encode_body(surface, {"stream": True, "temperature": -1})
        response = client.post(PATHS[surface], content=body)
        assert_error(response, surface, 400)
        assert not response.text.startswith(("data:", "event:"))


def test_client_leaving_a_non_streaming_request_frees_its_slot_quietly(
    live: LiveRouter, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    server_log = logging.getLogger("uvicorn.error")  # uvicorn's loggers do not propagate to the root
    server_log.addHandler(caplog.handler)
    try:
        _leave_early(live, client)
    finally:
        server_log.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]


def _leave_early(live: LiveRouter, client: httpx.Client) -> None:
    admission = live.frontend.admission
    _wait_until(lambda: admission.running == 0)
    body = encode_body("completions", {"max_tokens": 200, "ignore_eos": True})
    with httpx.Client(base_url=live.http_url, headers=AUTH, timeout=httpx.Timeout(5.0, read=0.5)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post(PATHS["completions"], content=body)  # gives up (closes) after 0.5 s
    _wait_until(lambda: admission.running == 0)  # the server noticed, cancelled the work, freed the slot
    time.sleep(0.3)
    assert_still_serving(client, "completions")


# -- authentication (row 8, S6) --------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"authorization": "Bearer wrong-key"}, id="wrong-bearer"),
        pytest.param({"x-api-key": "wrong-key"}, id="wrong-x-api-key"),
        pytest.param({"authorization": f"Basic {KEY}"}, id="basic-scheme"),
        pytest.param({"authorization": "Basic ay10ZXN0Og=="}, id="basic-base64"),
        pytest.param({"authorization": f"Bearer {KEY.upper()}"}, id="wrong-case"),
        pytest.param({"x-api-key": KEY.upper()}, id="wrong-case-x-api-key"),
        pytest.param({"authorization": KEY}, id="no-scheme"),
        pytest.param({"authorization": f"Bearer {KEY}x"}, id="suffix"),
    ],
)
@pytest.mark.parametrize("surface", SURFACES)
def test_bad_credentials_are_401(live: LiveRouter, headers: dict[str, str], surface: str) -> None:
    with httpx.Client(base_url=live.http_url, timeout=CLIENT_TIMEOUT_S) as anonymous:
        response = anonymous.post(PATHS[surface], json=base_body(surface), headers=headers)
    assert_error(response, surface, 401, "authentication_error")


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"authorization": f"Bearer {KEY}"}, id="bearer"),
        pytest.param({"authorization": f"bearer {KEY}"}, id="bearer-lower-scheme"),
        pytest.param({"authorization": f"BEARER {KEY}"}, id="bearer-upper-scheme"),
        pytest.param({"x-api-key": KEY}, id="x-api-key"),
    ],
)
@pytest.mark.parametrize("surface", SURFACES)
def test_good_credentials_are_accepted(live: LiveRouter, headers: dict[str, str], surface: str) -> None:
    with httpx.Client(base_url=live.http_url, timeout=CLIENT_TIMEOUT_S) as c:
        response = c.post(PATHS[surface], json=base_body(surface), headers=headers)
    assert response.status_code == 200, response.text[:300]


def _walk(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(path, method) of ``routes``, through included routers and mounts; an unknown kind fails."""
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI's lazily included APIRouter
            yield from _walk(route.original_router.routes, prefix + route.include_context.prefix)
        elif isinstance(route, Mount):
            yield from _walk(route.routes, prefix + route.path)
        elif isinstance(route, Route):
            path = re.sub(r"\{[^}]+\}", "x", prefix + route.path)
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    yield path, method
        else:
            pytest.fail(f"a route of an unknown kind ({type(route).__name__}): extend the auth-coverage walk")


def _route_table(live: LiveRouter) -> list[tuple[str, str]]:
    """Every route of the app the router serves (``build_app`` over the same frontend: deterministic)."""
    app: Any = build_app(live.frontend, ApiKeys((KEY,))).app.app  # HttpCounter -> HttpGuard -> FastAPI
    table = sorted(set(_walk(app.routes)))
    walked = {path for path, _ in table}
    for path in app.openapi()["paths"]:  # the schema's view agrees with the walk
        assert path in walked, (path, sorted(walked))
    return table


def test_every_route_needs_a_key_except_the_allowlist(live: LiveRouter) -> None:  # S6
    table = _route_table(live)
    paths = {path for path, _ in table}
    for expected in (*PATHS.values(), "/v1/models", "/v1/messages/count_tokens", "/tokenize", "/detokenize"):
        assert expected in paths, (expected, sorted(paths))
    assert {"/openapi.json", "/docs"} <= paths  # FastAPI's own pages are routes too
    checked = []
    with httpx.Client(base_url=live.http_url, timeout=CLIENT_TIMEOUT_S) as anonymous:
        for path, method in table:
            response = anonymous.request(method, path, json={} if method in ("POST", "PUT", "PATCH") else None)
            if path in PUBLIC:
                assert response.status_code == 200, (method, path, response.status_code)
                continue
            assert response.status_code == 401, (method, path, response.status_code, response.text[:200])
            assert_error(response, "messages" if path.startswith("/v1/messages") else "chat", 401)
            checked.append((path, method))
        # deny by default: paths that no route serves are 401 too, not 404
        for path in ("/admin", "/v1/nope", "/v2/embed", "/invocations", "/health/", "/metrics/x", "//v1/models"):
            assert anonymous.get(path).status_code == 401, path
    assert len(checked) >= 8
    with httpx.Client(base_url=live.http_url, timeout=CLIENT_TIMEOUT_S, headers=AUTH) as keyed:
        assert keyed.get("/v1/models").status_code == 200


# -- transport: headers (row 4) --------------------------------------------------------------------


def _raw_exchange(live: LiveRouter, request: bytes, timeout_s: float = 10.0) -> bytes:
    """Send ``request`` on a fresh connection; what came back before the server closed (or the timeout)."""
    host, port = live.http_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        received = b""
        try:
            sock.sendall(request)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
                if b"\r\n\r\n" in received and _complete(received):
                    break
        except (ConnectionResetError, BrokenPipeError):
            pass
        except TimeoutError:
            pytest.fail(f"the router neither answered nor closed within {timeout_s} s (got {received[:200]!r})")
        return received


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"content-length:\s*(\d+)", head, re.IGNORECASE)
    return match is not None and len(body) >= int(match.group(1))


def _request_head(live: LiveRouter, extra: bytes) -> bytes:
    body = encode_body("chat", {})
    host = live.http_url.removeprefix("http://").encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: " + host + b"\r\n"
        b"authorization: Bearer " + KEY.encode() + b"\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body
    )


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(b"x-huge: " + b"a" * 200_000 + b"\r\n", id="one-huge-header"),
        pytest.param(b"".join(b"x-h%d: v\r\n" % i for i in range(20_000)), id="many-headers"),
        pytest.param(b"cookie: " + b"c=" + b"b" * 70_000 + b"\r\n", id="huge-cookie"),
        pytest.param(b"cookie: " + b"c=" + b"b" * 40_000 + b"\r\n", id="big-cookie"),
        pytest.param(b"".join(b"x-h%d: v\r\n" % i for i in range(200)), id="200-headers"),
    ],
)
def test_oversized_header_block_is_refused_not_hung(live: LiveRouter, client: httpx.Client, extra: bytes) -> None:
    answer = _raw_exchange(live, _request_head(live, extra))
    if answer:  # an answer, if any, is a 4xx (431, or h11's 400), never a 200 or a 5xx
        status = int(answer.split(b" ", 2)[1])
        assert status in (400, 413, 431), answer[:300]
    assert_still_serving(client, "chat")


def test_sane_raw_request_works(live: LiveRouter) -> None:
    answer = _raw_exchange(live, _request_head(live, b""))
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


# -- a tight router: one slot, no queue, a 4 KB body limit -------------------------------------------

TIGHT_BODY_LIMIT = 4096


@pytest.fixture(scope="module")
def tight(model_dir: Path) -> Iterator[LiveRouter]:
    limits = AdmissionLimits(max_running=1, max_waiting=0, retry_after_s=2)
    with live_router(model_dir, api_keys=(KEY,), admission=limits, max_body_bytes=TIGHT_BODY_LIMIT) as router:
        yield router


@pytest.fixture(scope="module")
def tight_client(tight: LiveRouter) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tight.http_url, headers=AUTH, timeout=CLIENT_TIMEOUT_S) as c:
        yield c


def _padded(surface: str, size: int) -> bytes:
    body = encode_body(surface, {"metadata_pad": "p" * size})
    assert len(body) > size
    return body


@pytest.mark.parametrize("surface", SURFACES)
def test_body_over_the_limit_is_413(tight_client: httpx.Client, surface: str) -> None:  # row 3
    error_type = "request_too_large" if surface == "messages" else None
    fits = _padded(surface, TIGHT_BODY_LIMIT - 200)
    assert len(fits) <= TIGHT_BODY_LIMIT
    assert tight_client.post(PATHS[surface], content=fits).status_code == 200
    response = tight_client.post(PATHS[surface], content=_padded(surface, TIGHT_BODY_LIMIT))
    assert_error(response, surface, 413, error_type)
    body = _padded(surface, 3 * TIGHT_BODY_LIMIT)

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit must hold on the stream
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    response = tight_client.post(PATHS[surface], content=chunked())
    assert_error(response, surface, 413, error_type)
    assert_still_serving(tight_client, surface)


def _wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the router")
        time.sleep(0.02)


def test_admission_full_is_429_or_529_before_any_stream_byte(tight: LiveRouter, tight_client: httpx.Client) -> None:
    """S9: while the only slot runs a long stream, every other request is refused at once."""
    admission = tight.frontend.admission
    _wait_until(lambda: admission.running == 0)
    long_body = encode_body("chat", {"stream": True, "max_tokens": 200, "ignore_eos": True, "temperature": 1.0})
    with tight_client.stream("POST", PATHS["chat"], content=long_body) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # kept: a dropped iterator closes the connection (= client gone)
        assert next(lines).startswith("data:")
        assert admission.running == 1
        t0 = time.monotonic()
        for surface in SURFACES:
            for stream in (True, False):
                response = tight_client.post(PATHS[surface], content=encode_body(surface, {"stream": stream}))
                assert admission.running == 1  # the long stream still holds the slot
                status, kind = (529, "overloaded_error") if surface == "messages" else (429, "rate_limit_error")
                assert_error(response, surface, status, kind)
                assert response.headers.get("retry-after") == "2"
                assert not response.text.lstrip().startswith(("data:", "event:"))
        assert time.monotonic() - t0 < 5.0  # refused at once, not after a wait
    # leaving the stream early gives the slot back
    _wait_until(lambda: admission.running == 0)
    for surface in SURFACES:
        assert_still_serving(tight_client, surface)


# -- row 26: an error in the middle of a generation ---------------------------------------------------


def test_worker_dying_mid_stream_ends_the_stream_with_an_error(model_dir: Path) -> None:
    """Row 26: the only worker stops while a stream runs: an error event and the terminal marker,
    never a silent hang; a non-streaming request in flight gets a 5xx error body."""
    with live_router(model_dir, api_keys=(KEY,)) as router:
        with httpx.Client(base_url=router.http_url, headers=AUTH, timeout=CLIENT_TIMEOUT_S) as c:
            long_chat = {"stream": True, "max_tokens": 200, "ignore_eos": True, "temperature": 1.0}
            outcome: dict[str, Any] = {}

            def non_streaming() -> None:
                body = encode_body("completions", {"max_tokens": 200, "ignore_eos": True})
                outcome["response"] = c.post(PATHS["completions"], content=body)

            with c.stream("POST", PATHS["chat"], content=encode_body("chat", long_chat)) as chat:
                with c.stream("POST", PATHS["messages"], content=encode_body("messages", long_chat)) as messages:
                    assert chat.status_code == messages.status_code == 200
                    chat_lines, message_lines = chat.iter_lines(), messages.iter_lines()
                    assert next(chat_lines).startswith("data:")
                    next(message_lines)
                    worker = threading.Thread(target=non_streaming)
                    worker.start()
                    _wait_until(lambda: router.frontend.admission.running >= 3)
                    router.run(router.workers[0].stop(grace_s=0.0))
                    rest = [line for line in chat_lines if line]
                    assert rest[-1] == "data: [DONE]", rest[-3:]
                    payloads = [json.loads(line[5:]) for line in rest[:-1] if line.startswith("data:")]
                    errors = [p["error"] for p in payloads if "error" in p]
                    assert errors and errors[-1]["code"] in (500, 503), rest[-3:]  # an error event, then [DONE]
                    events = [line for line in message_lines if line.startswith("event:")]
                    assert events and events[-1] == "event: error", events[-5:]
            worker.join(CLIENT_TIMEOUT_S)
            assert not worker.is_alive()
            response = outcome["response"]
            assert response.status_code in (500, 503), response.text[:300]
            assert_error(response, "completions", response.status_code)
