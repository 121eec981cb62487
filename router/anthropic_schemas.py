"""JSON Schemas of the Anthropic surface's bodies (``/v1/messages``, ``/v1/messages/count_tokens``).

Lifecycle: constants, read once when ``anthropic_routes`` declares its routes; see
``openai_schemas`` for why they are written by hand and why the parsers
(``anthropic_request``, ``anthropic_messages``) stay the authority. Errors have ``ERROR``'s shape
(Anthropic's ``{"type": "error", "error": {"type", "message"}}``).
"""

from __future__ import annotations

from k2serve.router.openai_schemas import BOOLEAN, MODEL, STOP, STRING, Schema, integer, nullable, number

ERROR: Schema = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"enum": ["error"]},
        "error": {"type": "object", "required": ["type", "message"], "properties": {"type": STRING, "message": STRING}},
        "request_id": STRING,
    },
}

_TEXT: Schema = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"enum": ["text"]}, "text": STRING},
}
_TOOL_USE: Schema = {
    "type": "object",
    "required": ["type", "id", "name"],
    "properties": {
        "type": {"enum": ["tool_use"]},
        "id": {"type": "string", "minLength": 1},
        "name": {"type": "string", "minLength": 1},
        "input": {"type": "object"},
    },
}
_TOOL_RESULT: Schema = {
    "type": "object",
    "required": ["type", "tool_use_id"],
    "properties": {
        "type": {"enum": ["tool_result"]},
        "tool_use_id": {"type": "string", "minLength": 1},
        "content": {"anyOf": [STRING, {"type": "array", "items": _TEXT}, {"type": "null"}]},
    },
}
_THINKING: Schema = {
    "type": "object",
    "required": ["type", "thinking"],
    "properties": {"type": {"enum": ["thinking"]}, "thinking": STRING, "signature": STRING},
}
MESSAGE: Schema = {
    "anyOf": [
        {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "role": {"enum": ["user"]},
                "content": {"anyOf": [STRING, {"type": "array", "items": {"anyOf": [_TEXT, _TOOL_RESULT]}}]},
            },
        },
        {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "role": {"enum": ["assistant"]},
                "content": {"anyOf": [STRING, {"type": "array", "items": {"anyOf": [_TEXT, _TOOL_USE, _THINKING]}}]},
            },
        },
    ]
}
TOOL: Schema = {
    "type": "object",
    "required": ["name", "input_schema"],
    "properties": {
        "type": {"enum": ["custom"]},
        "name": {"type": "string", "minLength": 1},
        "description": STRING,
        "input_schema": {"type": "object"},
    },
}
TOOL_CHOICE: Schema = {
    "type": "object",
    "required": ["type"],
    "description": "`tool` needs `name`; `any` and `tool` need tools",
    "properties": {
        "type": {"enum": ["auto", "any", "tool", "none"]},
        "name": STRING,
        "disable_parallel_tool_use": BOOLEAN,
    },
}
CONVERSATION: Schema = {
    "model": MODEL,
    "system": {"anyOf": [STRING, {"type": "array", "items": _TEXT}]},
    "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
    "tools": {"type": "array", "items": TOOL},
    "tool_choice": TOOL_CHOICE,
}
COUNT_REQUEST: Schema = {"type": "object", "required": ["model", "messages"], "properties": CONVERSATION}
MESSAGES_REQUEST: Schema = {
    "type": "object",
    "required": ["model", "messages", "max_tokens"],
    "properties": {
        **CONVERSATION,
        "max_tokens": integer(1),
        "temperature": number(0.0, 1.0),
        "top_p": number(0.0, 1.0, exclusive_minimum=True),
        "top_k": integer(-1),
        "stop_sequences": STOP["anyOf"][1],
        "stream": BOOLEAN,
        "metadata": {"type": "object", "properties": {"user_id": nullable(STRING)}},
        "thinking": {
            "description": "enabled needs 1024 <= budget_tokens < max_tokens",
            "anyOf": [
                {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["disabled", "adaptive"]}}},
                {
                    "type": "object",
                    "required": ["type", "budget_tokens"],
                    "properties": {"type": {"enum": ["enabled"]}, "budget_tokens": integer(1024)},
                },
            ],
        },
    },
}

MESSAGE_ANSWER: Schema = {
    "type": "object",
    "required": ["id", "type", "role", "model", "content", "stop_reason", "usage"],
    "properties": {
        "id": STRING,
        "type": {"enum": ["message"]},
        "role": {"enum": ["assistant"]},
        "model": STRING,
        "content": {"type": "array", "items": {"anyOf": [_TEXT, _TOOL_USE, _THINKING]}},
        "stop_reason": nullable({"enum": ["end_turn", "max_tokens", "stop_sequence", "tool_use"]}),
        "stop_sequence": nullable(STRING),
        "usage": {
            "type": "object",
            "required": ["input_tokens", "output_tokens"],
            "properties": {
                "input_tokens": integer(0),
                "output_tokens": integer(0),
                "cache_creation_input_tokens": integer(0),
                "cache_read_input_tokens": integer(0),
            },
        },
    },
}
STREAM_EVENT: Schema = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {
            "enum": [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
                "ping",
                "error",
            ]
        },
        "data": {"type": "string", "minLength": 1},
    },
}
COUNT_ANSWER: Schema = {"type": "object", "required": ["input_tokens"], "properties": {"input_tokens": integer(0)}}
