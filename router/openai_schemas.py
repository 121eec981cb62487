"""JSON Schemas of the OpenAI surface's bodies, for the OpenAPI document (``/openapi.json``).

Lifecycle: constants, read once when ``openai_routes`` declares its routes. The routes read raw
JSON (``read_json_object`` + ``WireBody``: a wrong type is a 400 naming the field), so FastAPI
cannot derive these; they are written by hand to describe what the parsers accept and what the
answers look like, so that clients can generate code and a fuzzer (schemathesis,
tests/test_fuzz.py) can generate requests and check answers. The parsers stay the authority: a
body that fits these schemas may still be refused (an unknown model is 404, a prompt longer than
the context is 400), and unknown fields are ignored. Errors always have ``ERROR``'s shape.
``json_body`` specializes two placeholders to the served model: ``MODEL`` (its name) and
``TOKEN_ID`` (below its vocabulary size).
"""

from __future__ import annotations

from typing import Any

from k2serve.router.sampling_check import MAX_SEED, RequestLimits

Schema = dict[str, Any]
_LIMITS = RequestLimits()  # the defaults; a router may be configured tighter (then: 400)
INT32_MAX = 2**31 - 1


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def integer(minimum: int, maximum: int = INT32_MAX) -> Schema:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def number(minimum: float, maximum: float, *, exclusive_minimum: bool = False) -> Schema:
    low = {"exclusiveMinimum": minimum} if exclusive_minimum else {"minimum": minimum}
    return {"type": "number", **low, "maximum": maximum}


BOOLEAN: Schema = {"type": "boolean"}
STRING: Schema = {"type": "string"}
MODEL: Schema = {"type": "string", "description": "the served model's name"}  # placeholder, see json_body
TOKEN_ID: Schema = integer(0)  # placeholder: json_body sets the maximum to the vocabulary's last id
TOKEN_IDS: Schema = {"type": "array", "items": TOKEN_ID}

ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": STRING,
                "type": STRING,
                "param": nullable(STRING),
                "code": {"anyOf": [{"type": "integer"}, STRING, {"type": "null"}]},
            },
        }
    },
}

STOP: Schema = {
    "anyOf": [
        {"type": "string", "minLength": 1, "maxLength": _LIMITS.max_stop_chars},
        {
            "type": "array",
            "maxItems": _LIMITS.max_stop,
            "items": {"type": "string", "minLength": 1, "maxLength": _LIMITS.max_stop_chars},
        },
    ]
}

# The sampling fields chat and completions share (``openai_sampling``, ``check_sampling``).
SAMPLING: Schema = {
    "temperature": number(0.0, 2.0),
    "top_p": number(0.0, 1.0, exclusive_minimum=True),
    "top_k": integer(-1),
    "min_p": number(0.0, 1.0),
    "presence_penalty": number(-2.0, 2.0),
    "frequency_penalty": number(-2.0, 2.0),
    "repetition_penalty": number(0.0, 2.0**31, exclusive_minimum=True),
    "seed": integer(-MAX_SEED - 1, MAX_SEED),
    "max_tokens": integer(1),
    "min_tokens": integer(0),
    "n": {**integer(1, _LIMITS.max_n), "description": "more than 1 needs temperature > 0"},
    "stop": STOP,
    "stop_token_ids": {**TOKEN_IDS, "maxItems": _LIMITS.max_stop_token_ids},
    "ignore_eos": BOOLEAN,
    "stream": BOOLEAN,
    "stream_options": {
        "type": "object",
        "description": "only with stream: true",
        "properties": {"include_usage": BOOLEAN, "continuous_usage_stats": BOOLEAN},
    },
    "include_stop_str_in_output": BOOLEAN,
    "return_token_ids": BOOLEAN,
    "user": {"type": "string", "description": "also the routing session key (multi-turn affinity)"},
    "cache_salt": {"type": "string", "minLength": 1, "description": "ignored: the server salts by API key"},
    "logit_bias": {"type": "object", "maxProperties": 0, "description": "not supported (non-empty: 400)"},
    "response_format": {"type": "object", "properties": {"type": {"enum": ["text"]}}},
}

_FUNCTION: Schema = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "description": STRING,
        "parameters": {"type": "object", "description": "JSON Schema of the arguments"},
    },
}
TOOL: Schema = {
    "type": "object",
    "required": ["function"],
    "properties": {"type": {"enum": ["function"]}, "function": _FUNCTION},
}
TOOL_CHOICE: Schema = {
    "anyOf": [
        {"enum": ["none", "auto", "required"]},
        {
            "type": "object",
            "required": ["type", "function"],
            "properties": {
                "type": {"enum": ["function"]},
                "function": {"type": "object", "required": ["name"], "properties": {"name": STRING}},
            },
        },
    ]
}
_TEXT_PART: Schema = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"enum": ["text"]}, "text": STRING},
}
_TOOL_CALL: Schema = {
    "type": "object",
    "required": ["id", "function"],
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "type": {"enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {"name": STRING, "arguments": {"anyOf": [STRING, {"type": "object"}]}},
        },
    },
}
_CONTENT: Schema = {"anyOf": [STRING, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]}
MESSAGE: Schema = {
    "anyOf": [
        {
            "type": "object",
            "required": ["role"],
            "properties": {"role": {"enum": ["system", "user"]}, "content": _CONTENT, "name": STRING},
        },
        {
            "type": "object",
            "required": ["role"],
            "properties": {
                "role": {"enum": ["assistant"]},
                "content": _CONTENT,
                "name": STRING,
                "reasoning_content": nullable(STRING),
                "tool_calls": {"type": "array", "items": _TOOL_CALL},
            },
        },
        {
            "type": "object",
            "required": ["role", "tool_call_id"],
            "properties": {
                "role": {"enum": ["tool"]},
                "content": _CONTENT,
                "tool_call_id": {"type": "string", "minLength": 1},
            },
        },
    ]
}
CONVERSATION: Schema = {
    "model": MODEL,
    "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
    "tools": {"type": "array", "minItems": 1, "items": TOOL},
    "tool_choice": TOOL_CHOICE,
}

CHAT_REQUEST: Schema = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        **SAMPLING,
        **CONVERSATION,
        "max_completion_tokens": integer(1),
        "logprobs": BOOLEAN,
        "top_logprobs": {**integer(0, _LIMITS.max_top_logprobs), "description": "needs logprobs: true"},
        "parallel_tool_calls": BOOLEAN,
        "max_reasoning_tokens": integer(0),
        "thinking_token_budget": integer(0),
        "thinking": {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["enabled", "disabled"]}}},
        "chat_template_kwargs": {"type": "object", "properties": {"thinking": BOOLEAN, "enable_thinking": BOOLEAN}},
    },
}

_PROMPT: Schema = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {**TOKEN_IDS, "minItems": 1},
        {"type": "array", "minItems": 2, "maxItems": 64, "items": {"type": "string", "minLength": 1}},
        {"type": "array", "minItems": 2, "maxItems": 64, "items": {**TOKEN_IDS, "minItems": 1}},
    ]
}
COMPLETION_REQUEST: Schema = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        **SAMPLING,
        "model": MODEL,
        "prompt": _PROMPT,
        "echo": BOOLEAN,
        "logprobs": {**integer(0, _LIMITS.max_top_logprobs), "description": "not with echo"},
        "skip_special_tokens": BOOLEAN,
        "suffix": {"type": "string", "maxLength": 0, "description": "not supported (non-empty: 400)"},
    },
}

TOKENIZE_REQUEST: Schema = {
    "type": "object",
    "description": "either prompt, or messages (rendered by the chat template)",
    "anyOf": [{"required": ["prompt"]}, {"required": ["messages"]}],
    "properties": {
        "model": MODEL,
        "prompt": STRING,
        "messages": CONVERSATION["messages"],
        "tools": CONVERSATION["tools"],
        "add_generation_prompt": BOOLEAN,
        "return_token_strs": BOOLEAN,
    },
}
DETOKENIZE_REQUEST: Schema = {
    "type": "object",
    "required": ["tokens"],
    "properties": {"model": MODEL, "tokens": TOKEN_IDS},
}

# -- answers ---------------------------------------------------------------------------------------

USAGE: Schema = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": integer(0),
        "completion_tokens": integer(0),
        "total_tokens": integer(0),
        "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": integer(0)}},
        "completion_tokens_details": {"type": "object", "properties": {"reasoning_tokens": integer(0)}},
    },
}
_FINISH: Schema = nullable({"enum": ["stop", "length", "tool_calls", "abort", "error"]})
_ANSWER: Schema = {
    "id": STRING,
    "created": {"type": "integer"},
    "model": STRING,
    "usage": USAGE,
}
CHAT_COMPLETION: Schema = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        **_ANSWER,
        "object": {"enum": ["chat.completion"]},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "message", "finish_reason"],
                "properties": {
                    "index": integer(0),
                    "message": {
                        "type": "object",
                        "required": ["role"],
                        "properties": {
                            "role": {"enum": ["assistant"]},
                            "content": nullable(STRING),
                            "reasoning_content": nullable(STRING),
                            "tool_calls": {"type": "array", "items": _TOOL_CALL},
                        },
                    },
                    "finish_reason": _FINISH,
                    "logprobs": nullable({"type": "object"}),
                },
            },
        },
    },
}
COMPLETION: Schema = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        **_ANSWER,
        "object": {"enum": ["text_completion"]},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "text", "finish_reason"],
                "properties": {
                    "index": integer(0),
                    "text": STRING,
                    "finish_reason": _FINISH,
                    "logprobs": nullable({"type": "object"}),
                    "token_ids": TOKEN_IDS,
                    "prompt_token_ids": TOKEN_IDS,
                },
            },
        },
    },
}
MODEL_LIST: Schema = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"enum": ["list"]},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["id", "object", "max_model_len"],
                "properties": {"id": STRING, "object": {"enum": ["model"]}, "max_model_len": integer(1)},
            },
        },
    },
}
TOKENIZE_ANSWER: Schema = {
    "type": "object",
    "required": ["count", "max_model_len", "tokens"],
    "properties": {
        "count": integer(0),
        "max_model_len": integer(1),
        "tokens": TOKEN_IDS,
        "token_strs": nullable({"type": "array", "items": STRING}),
    },
}
DETOKENIZE_ANSWER: Schema = {"type": "object", "required": ["prompt"], "properties": {"prompt": STRING}}
# One server-sent event (OpenAPI 3.1: a text/event-stream schema describes each event): a chunk's
# JSON in ``data``, the last event's ``data`` being ``[DONE]``.
SSE_EVENT: Schema = {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "minLength": 1}, "event": {"enum": ["message"]}},
}


def json_body(schema: Schema, model: str, vocab_size: int) -> dict[str, Any]:
    """``openapi_extra`` of a route whose JSON body is ``schema``, for the served ``model``."""
    served = {"model": {"type": "string", "enum": [model]}, "token_id": integer(0, vocab_size - 1)}
    content = {"application/json": {"schema": _specialized(schema, served)}}
    return {"requestBody": {"required": True, "content": content}}


def _specialized(node: Any, served: Schema) -> Any:
    """A copy of ``node`` with the ``MODEL`` and ``TOKEN_ID`` placeholders (by identity) replaced."""
    if node is MODEL:
        return served["model"]
    if node is TOKEN_ID:
        return served["token_id"]
    if isinstance(node, dict):
        return {key: _specialized(value, served) for key, value in node.items()}
    if isinstance(node, list):
        return [_specialized(value, served) for value in node]
    return node


def responses(ok: Schema, error: Schema = ERROR, *, stream_event: Schema | None = None) -> dict[int | str, Any]:
    """``responses`` of a route: ``ok`` on 200 (or server-sent events of ``stream_event``), ``error``
    on every 4xx/5xx."""
    content: dict[str, Any] = {"application/json": {"schema": ok}}
    if stream_event is not None:
        content["text/event-stream"] = {"schema": stream_event}
    failure = {"description": "an error", "content": {"application/json": {"schema": error}}}
    return {200: {"description": "the answer", "content": content}, "4XX": failure, "5XX": failure}
