"""``Conversation``: an Anthropic conversation (system, messages, tools, tool choice) in OpenAI's shape.

Lifecycle: pure; ``convert_conversation(body)`` once per ``/v1/messages`` or ``count_tokens``
request, after the body was read. It type-checks every block and raises ``ApiError`` 400 naming
the field (``messages.2.content.0.type``); the result feeds ``chat_generation`` / ``render_chat``,
which own the chat template. The mapping is vLLM's and SGLang's:
- ``system`` (a string or text blocks) -> a leading system message. Claude Code's
  ``x-anthropic-billing-header`` text block changes on every request and would defeat prefix
  caching, so it is dropped (as vLLM does);
- text blocks -> OpenAI text parts (a single one -> a string): the chat template joins them;
- user ``tool_result`` blocks -> ``{"role": "tool", "tool_call_id", "content"}`` messages, placed
  before the rest of the user's turn (the results answer the previous assistant turn);
- assistant ``tool_use`` -> ``tool_calls`` (``arguments = json.dumps(input)``, non-ASCII kept as
  the model writes it; the client's id verbatim), ``thinking`` -> ``reasoning_content`` (signatures accepted and ignored),
  ``redacted_thinking`` -> dropped;
- ``image`` and ``document`` blocks -> 400: the model reads text only;
- tools -> ``{"type": "function", "function": {"name", "description", "parameters": input_schema}}``;
  ``tools: []`` counts as no tools;
- ``tool_choice`` ``auto`` -> ``"auto"`` (nothing without tools), ``any`` -> ``"required"``,
  ``tool`` -> the named function, ``none`` -> ``"none"``; ``disable_parallel_tool_use`` is kept
  for the response side (only the first call is returned).
A final assistant message is rendered as a finished turn (no prefill continuation).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from k2serve.router.api_error import ApiError, invalid

ROLES = ("user", "assistant")
BILLING_HEADER_PREFIX = "x-anthropic-billing-header"
UNSUPPORTED_MEDIA = ("image", "document")
TOOL_CHOICE_TYPES = ("auto", "any", "tool", "none")

Message = dict[str, Any]


@dataclass(frozen=True)
class Conversation:
    messages: list[Message]  # OpenAI-shaped: system / user / assistant / tool
    tools: list[Message] | None  # OpenAI function tools; None = no tools
    tool_choice: str | Message | None  # OpenAI style; None = the default (auto with tools)
    disable_parallel_tool_use: bool = False


def convert_conversation(body: Mapping[str, Any]) -> Conversation:
    tools = _tools(body.get("tools"))
    choice, single_call = _tool_choice(body.get("tool_choice"), tools)
    messages = _system(body.get("system"))
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid("messages", "is required (a non-empty list of messages)")
    for i, message in enumerate(raw):
        messages.extend(_message(i, message))
    return Conversation(messages, tools, choice, single_call)


# -- system and messages -------------------------------------------------------------------------


def _system(system: Any) -> list[Message]:
    if system is None:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}] if system else []
    if not isinstance(system, list):
        raise invalid("system", "must be a string or a list of text blocks")
    parts = []
    for j, block in enumerate(system):
        text = _text_block(block, f"system.{j}", "system")
        if not text.startswith(BILLING_HEADER_PREFIX):
            parts.append(text)
    return [{"role": "system", "content": _joined(parts)}] if parts else []


def _message(i: int, message: Any) -> list[Message]:
    where = f"messages.{i}"
    if not isinstance(message, Mapping):
        raise invalid(where, "must be an object with `role` and `content`")
    role = message.get("role")
    if role not in ROLES:
        raise invalid(f"{where}.role", f"must be one of {list(ROLES)}, got {role!r}")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise invalid(f"{where}.content", "must be a string or a list of content blocks")
    if role == "user":
        return _user_turn(where, content)
    return [_assistant_turn(where, content)]


def _user_turn(where: str, blocks: list[Any]) -> list[Message]:
    results: list[Message] = []
    parts: list[str] = []
    for j, block in enumerate(blocks):
        field = f"{where}.content.{j}"
        kind = _block_type(block, field)
        if kind == "text":
            parts.append(_string(block, "text", field))
        elif kind == "tool_result":
            results.append(_tool_result(block, field))
        else:
            raise _unsupported(field, kind, "user")
    if parts or not results:
        return [*results, {"role": "user", "content": _joined(parts)}]
    return results


def _assistant_turn(where: str, blocks: list[Any]) -> Message:
    reasoning: list[str] = []
    parts: list[str] = []
    calls: list[Message] = []
    for j, block in enumerate(blocks):
        field = f"{where}.content.{j}"
        kind = _block_type(block, field)
        if kind == "text":
            parts.append(_string(block, "text", field))
        elif kind == "thinking":
            reasoning.append(_string(block, "thinking", field))
        elif kind == "tool_use":
            calls.append(_tool_use(block, field))
        elif kind != "redacted_thinking":
            raise _unsupported(field, kind, "assistant")
    out: Message = {"role": "assistant", "content": _joined(parts)}
    if reasoning:
        out["reasoning_content"] = "".join(reasoning)
    if calls:
        out["tool_calls"] = calls
    return out


def _tool_use(block: Mapping[str, Any], field: str) -> Message:
    call_id, name = _string(block, "id", field, non_empty=True), _string(block, "name", field, non_empty=True)
    arguments = block.get("input", {})
    if not isinstance(arguments, Mapping):
        raise invalid(f"{field}.input", "must be an object")
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(dict(arguments), ensure_ascii=False)},
    }


def _tool_result(block: Mapping[str, Any], field: str) -> Message:
    call_id = _string(block, "tool_use_id", field, non_empty=True)
    content = block.get("content")
    if content is None or isinstance(content, str):
        text: str | list[Message] = content or ""
    elif isinstance(content, list):
        text = _joined([_text_block(part, f"{field}.content.{k}", "tool_result") for k, part in enumerate(content)])
    else:
        raise invalid(f"{field}.content", "must be a string or a list of text blocks")
    return {"role": "tool", "tool_call_id": call_id, "content": text}


# -- tools ---------------------------------------------------------------------------------------


def _tools(tools: Any) -> list[Message] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise invalid("tools", "must be a list of tools")
    out = [_tool(j, tool) for j, tool in enumerate(tools)]
    names = [tool["function"]["name"] for tool in out]
    if len(set(names)) != len(names):
        raise invalid("tools", "tool names must be unique")
    return out or None


def _tool(j: int, tool: Any) -> Message:
    field = f"tools.{j}"
    if not isinstance(tool, Mapping):
        raise invalid(field, "must be an object")
    if tool.get("type") not in (None, "custom"):
        raise invalid(f"{field}.type", f"only client tools are supported, got {tool.get('type')!r}")
    name = _string(tool, "name", field, non_empty=True)
    schema = tool.get("input_schema")
    if not isinstance(schema, Mapping):
        raise invalid(f"{field}.input_schema", "is required (a JSON Schema object)")
    function: Message = {"name": name, "parameters": dict(schema)}
    description = tool.get("description")
    if description is not None:
        function["description"] = _string(tool, "description", field)
    return {"type": "function", "function": function}


def _tool_choice(choice: Any, tools: list[Message] | None) -> tuple[str | Message | None, bool]:
    """-> (OpenAI tool choice, disable_parallel_tool_use)."""
    if choice is None:
        return None, False
    if not isinstance(choice, Mapping):
        raise invalid("tool_choice", 'must be an object such as {"type": "auto"}')
    kind = choice.get("type")
    if kind not in TOOL_CHOICE_TYPES:
        raise invalid("tool_choice.type", f"must be one of {list(TOOL_CHOICE_TYPES)}, got {kind!r}")
    single = choice.get("disable_parallel_tool_use", False)
    if not isinstance(single, bool):
        raise invalid("tool_choice.disable_parallel_tool_use", "must be a boolean")
    if kind == "none":
        return "none", single
    if kind == "auto":
        return ("auto" if tools else None), single
    if not tools:
        raise invalid("tool_choice", f"`{kind}` needs `tools`")
    if kind == "any":
        return "required", single
    name = _string(choice, "name", "tool_choice", non_empty=True)
    if name not in {tool["function"]["name"] for tool in tools}:
        raise invalid("tool_choice.name", f"names the tool `{name}`, which is not in `tools`")
    return {"type": "function", "function": {"name": name}}, single


# -- blocks --------------------------------------------------------------------------------------


def _block_type(block: Any, field: str) -> str:
    if not isinstance(block, Mapping):
        raise invalid(field, "must be a content block (an object with `type`)")
    kind = block.get("type")
    if not isinstance(kind, str):
        raise invalid(f"{field}.type", "is required (a string)")
    return kind


def _text_block(block: Any, field: str, where: str) -> str:
    kind = _block_type(block, field)
    if kind != "text":
        raise _unsupported(field, kind, where)
    return _string(block, "text", field)


def _string(block: Mapping[str, Any], key: str, field: str, *, non_empty: bool = False) -> str:
    value = block.get(key)
    if not isinstance(value, str) or (non_empty and not value):
        raise invalid(f"{field}.{key}", "is required (a non-empty string)" if non_empty else "must be a string")
    return value


def _joined(parts: list[str]) -> str | list[Message]:
    """One text part -> a string; several -> OpenAI text parts (the template joins them)."""
    if len(parts) == 1:
        return parts[0]
    return [{"type": "text", "text": text} for text in parts] if parts else ""


def _unsupported(field: str, kind: str, where: str) -> ApiError:
    if kind in UNSUPPORTED_MEDIA:
        return invalid(f"{field}.type", f"`{kind}` blocks are not supported: this model reads text only")
    return invalid(f"{field}.type", f"`{kind}` blocks are not supported in {where} content")
