"""``parse_chat``: an OpenAI ``/v1/chat/completions`` body -> ``GenerationRequest`` and ``ChatShape``.

Lifecycle: once per chat request, before anything runs. Every field is type-checked here (400
naming it); the sampling ranges are ``check_sampling``'s, the conversation and tool-choice rules
``chat_generation``'s. ``ChatShape`` keeps what only changes how the answer is written (streaming,
usage, logprobs, token ids, parallel tool calls). Unknown fields are ignored; known fields we
cannot honour (``logit_bias``, a ``response_format`` other than text, ``n`` > 1 with greedy) are
400s rather than silently dropped. Ids are ours: a client ``request_id`` is never used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from k2serve.router.api_error import invalid
from k2serve.router.chat_request import chat_generation
from k2serve.router.frontend import Frontend
from k2serve.router.generation_request import GenerationRequest, Routing
from k2serve.router.openai_fields import WireBody, check_cache_salt, openai_sampling, openai_stop, stream_options
from k2serve.router.sampling_check import check_min_tokens, check_n


@dataclass(frozen=True)
class ChatShape:
    """How the answer is written; nothing here changes what is generated."""

    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False  # usage so far on every chunk (vLLM's continuous_usage_stats)
    logprobs: bool = False
    return_token_ids: bool = False
    parallel_tool_calls: bool = True  # False: only the first call is returned


def parse_chat(frontend: Frontend, raw: Mapping[str, Any], routing: Routing) -> tuple[GenerationRequest, ChatShape]:
    body = WireBody(raw)
    frontend.check_model(body.string("model"))
    check_unsupported(body)
    check_cache_salt(body)
    body.string("user")
    stream = body.boolean("stream")
    include_usage, continuous_usage = stream_options(body, stream)
    logprobs, top_logprobs = _logprobs(body)
    max_key = "max_completion_tokens" if body.has("max_completion_tokens") else "max_tokens"
    budget_key = "max_reasoning_tokens" if body.has("max_reasoning_tokens") else "thinking_token_budget"
    sampling = openai_sampling(
        frontend,
        body,
        max_tokens_key=max_key,
        max_tokens=body.raw(max_key),
        top_logprobs=top_logprobs,
        top_logprobs_key="top_logprobs",
        max_reasoning_tokens=body.raw(budget_key),
        max_reasoning_key=budget_key,
    )
    n = check_n(body.raw("n"), sampling, frontend.limits)
    request = chat_generation(
        frontend,
        request_id=frontend.new_request_id("chatcmpl"),
        messages=body.raw("messages"),
        tools=body.array("tools"),
        tool_choice=body.raw("tool_choice"),
        sampling=sampling,
        thinking=_thinking(body),
        n=n,
        stop=openai_stop(frontend, body),
        include_stop_str_in_output=body.boolean("include_stop_str_in_output"),
        routing=routing,
    )
    check_min_tokens(request.sampling)
    shape = ChatShape(
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        logprobs=logprobs,
        return_token_ids=body.boolean("return_token_ids"),
        parallel_tool_calls=body.boolean("parallel_tool_calls", default=True),
    )
    return request, shape


STRUCTURED_OUTPUT_FIELDS = (
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "structured_outputs",
)


def check_unsupported(body: WireBody) -> None:
    """Known OpenAI fields whose meaning we cannot honour: a 400 beats a silently different answer."""
    bias = body.mapping("logit_bias")
    if bias:
        raise invalid("logit_bias", "is not supported by this server")
    response_format = body.mapping("response_format")
    if response_format is not None and response_format.get("type", "text") != "text":
        raise invalid("response_format", "only {'type': 'text'} is supported by this server")
    for name in STRUCTURED_OUTPUT_FIELDS:  # vLLM's extensions: constrained decoding is not built here
        if body.raw(name) is not None:
            raise invalid(name, "structured output (constrained decoding) is not supported by this server")


def _logprobs(body: WireBody) -> tuple[bool, int | None]:
    """-> (logprobs asked for, the sampling's top_logprobs: None = none, else k)."""
    logprobs = body.boolean("logprobs")
    top = body.raw("top_logprobs")
    if not logprobs:
        if top not in (None, 0):
            raise invalid("top_logprobs", "requires `logprobs` to be true")
        return False, None
    return True, 0 if top is None else top


def _thinking(body: WireBody) -> bool:
    """``chat_template_kwargs.thinking`` (vLLM) or ``thinking: {"type": ...}`` (Moonshot); on by default."""
    kwargs = body.mapping("chat_template_kwargs") or {}
    thinking = True
    flag = WireBody(kwargs, "chat_template_kwargs.")
    for key in ("thinking", "enable_thinking"):
        if flag.has(key):
            thinking = flag.boolean(key)
    switch = body.mapping("thinking")
    if switch is not None:
        kind = switch.get("type")
        if kind not in ("enabled", "disabled"):
            raise invalid("thinking.type", 'must be "enabled" or "disabled"')
        thinking = kind == "enabled"
    return thinking
