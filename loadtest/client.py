"""``OpenAIChatClient``: streaming ``POST /v1/chat/completions`` over one ``httpx.AsyncClient``.

Lifecycle: one per sweep (``async with OpenAIChatClient(...)``); ``send(request, origin)`` per
request returns a ``RequestRecord`` and never raises: a non-200 status, an SSE ``{"error": ...}``
event, a stream without ``[DONE]``, a broken connection or the per-request timeout (the whole
request, ``asyncio.timeout``; connect / read / pool waits have their own httpx bounds) all become
a failed record. The body is vLLM's ``openai-chat`` one: ``stream``, ``stream_options.include_usage``,
``max_completion_tokens``; a multi-turn session adds the ``x-session-id`` header (the router's
session affinity). See ``stream_recorder`` for the TTFT / ITL clock.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from k2serve.loadtest.bench_request import BenchRequest, RequestRecord
from k2serve.loadtest.stream_recorder import StreamRecorder

SESSION_HEADER = "x-session-id"
CHAT_PATH = "/v1/chat/completions"
CONNECT_TIMEOUT_S = 10.0
ERROR_BODY_CHARS = 300
TOKEN_KEYS = ("role", "content", "reasoning_content", "reasoning", "tool_calls")


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def chat_body(request: BenchRequest, model: str, *, temperature: float | None, ignore_eos: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": list(request.messages),
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": request.max_tokens,
    }
    if request.tools:
        body["tools"] = list(request.tools)
    if temperature is not None:
        body["temperature"] = temperature
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def apply_chunk(recorder: StreamRecorder, chunk: dict[str, Any], now: float) -> str | None:
    """Feed one parsed SSE chunk to the recorder; -> an error text for an error event, else None."""
    if "error" in chunk:
        error = chunk["error"]
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    choices = chunk.get("choices") or []
    if choices:
        choice = choices[0]
        delta = choice.get("delta") or {}
        if any(key in delta for key in TOKEN_KEYS):
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            recorder.token_chunk(now, content=delta.get("content") or "", reasoning=reasoning)
            for call in delta.get("tool_calls") or []:
                function = call.get("function") or {}
                recorder.tool_call_piece(
                    call.get("index", 0),
                    call.get("id") or "",
                    function.get("name") or "",
                    function.get("arguments") or "",
                )
        if choice.get("finish_reason"):
            recorder.finish(choice["finish_reason"])
    usage = chunk.get("usage")
    if isinstance(usage, dict) and not choices:
        details = usage.get("prompt_tokens_details") or {}
        recorder.usage(
            usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), details.get("cached_tokens", 0)
        )
    return None


class OpenAIChatClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        request_timeout_s: float = 600.0,
        temperature: float | None = None,
        ignore_eos: bool = False,
        path: str = CHAT_PATH,
        transport: httpx.AsyncBaseTransport | None = None,  # a test's mock; None: real connections
    ) -> None:
        self.model = model
        self.path = path
        self.request_timeout_s = request_timeout_s
        self.temperature = temperature
        self.ignore_eos = ignore_eos
        timeout = httpx.Timeout(request_timeout_s, connect=min(CONNECT_TIMEOUT_S, request_timeout_s))
        # No connection cap: the arrival process and --max-concurrency decide what is in flight.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=auth_headers(api_key), timeout=timeout, limits=limits, transport=transport
        )

    async def __aenter__(self) -> OpenAIChatClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, request: BenchRequest, origin: float) -> RequestRecord:
        recorder = StreamRecorder(request, origin)
        try:
            async with asyncio.timeout(self.request_timeout_s):
                return await self._stream(request, recorder)
        except TimeoutError:
            return recorder.failed(f"timed out after {self.request_timeout_s:g} s")
        except httpx.HTTPError as exc:
            return recorder.failed(f"{type(exc).__name__}: {exc}")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return recorder.failed(f"bad response: {type(exc).__name__}: {exc}")

    async def _stream(self, request: BenchRequest, recorder: StreamRecorder) -> RequestRecord:
        body = chat_body(request, self.model, temperature=self.temperature, ignore_eos=self.ignore_eos)
        headers = {SESSION_HEADER: request.session_id} if request.session_id else {}
        recorder.start = time.perf_counter()
        async with self._http.stream("POST", self.path, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")[:ERROR_BODY_CHARS]
                return recorder.failed(f"HTTP {response.status_code}: {text}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, keep-alive comments, other SSE fields
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    return recorder.record()
                error = apply_chunk(recorder, json.loads(data), time.perf_counter())
                if error is not None:
                    return recorder.failed(error)
        return recorder.failed("the stream ended without [DONE]")


async def discover_model(base_url: str, api_key: str | None, timeout_s: float = 30.0) -> str:
    """The first model id of ``GET /v1/models``; ValueError when the server cannot say."""
    try:
        async with httpx.AsyncClient(base_url=base_url, headers=auth_headers(api_key), timeout=timeout_s) as http:
            response = await http.get("/v1/models")
            response.raise_for_status()
            models = [entry["id"] for entry in response.json().get("data", [])]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read the served model from {base_url}/v1/models ({exc}); pass --model") from exc
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return str(models[0])
