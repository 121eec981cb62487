"""The chat template: OpenAI-style messages and tools in, Kimi K2 Thinking prompt text out.

Lifecycle: loaded once per process (``ChatTemplate.from_model_dir``: the model folder's
``chat_template.jinja`` if present, else the template shipped in ``k2serve.router.templates``),
then ``render`` is called per request. Rendering is pure: it validates the messages (typed errors
naming ``messages[i].field``), copies them with ``reasoning`` mapped to ``reasoning_content`` and
the tools with their keys deep-sorted (as ``tokenization_kimi.apply_chat_template`` does), and runs
the template in a jinja2 immutable sandbox configured like transformers'.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_FILE = "chat_template.jinja"
SHIPPED_TEMPLATE = "kimi_k2_thinking.jinja"
ROLES = frozenset({"system", "user", "assistant", "tool"})
IMAGE_PART_TYPES = frozenset({"image", "image_url"})


class ChatTemplateError(ValueError):
    """The template cannot be loaded or fails while rendering (incl. ``raise_exception``)."""


class ChatInputError(ValueError):
    """Invalid messages or tools; ``field`` is the path, e.g. ``messages[2].tool_call_id``."""

    def __init__(self, field: str, reason: str, index: int | None = None) -> None:
        self.field = field
        self.index = index  # message index, None for tools
        self.reason = reason
        super().__init__(f"{field}: {reason}")


def shipped_template_text() -> str:
    """The Kimi K2 Thinking template shipped with k2serve (copied into generated model folders)."""
    return resources.files("k2serve.router").joinpath("templates", SHIPPED_TEMPLATE).read_text(encoding="utf-8")


class ChatTemplate:
    """A compiled chat template; immutable and safe to share between requests."""

    def __init__(self, source: str, origin: str) -> None:
        self._origin = origin  # where the source came from, for error messages
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"{origin}:{exc.lineno}: template syntax error: {exc.message}") from None

    @classmethod
    def from_model_dir(cls, path: Path | str) -> ChatTemplate:
        """The folder's ``chat_template.jinja`` when present, else the shipped template."""
        file = Path(path) / CHAT_TEMPLATE_FILE
        if file.is_file():
            try:
                return cls(file.read_text(encoding="utf-8"), str(file))
            except (OSError, UnicodeDecodeError) as exc:
                raise ChatTemplateError(f"{file}: cannot read: {exc}") from None
        return cls.shipped()

    @classmethod
    def shipped(cls) -> ChatTemplate:
        return cls(shipped_template_text(), f"k2serve.router/templates/{SHIPPED_TEMPLATE}")

    @property
    def origin(self) -> str:
        return self._origin

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text for ``messages`` (and ``tools``); raises ``ChatInputError`` on bad input."""
        normalized = normalize_messages(messages)
        sorted_tools = normalize_tools(tools)
        try:
            return self._template.render(
                messages=normalized, tools=sorted_tools, add_generation_prompt=add_generation_prompt
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"{self._origin}: rendering failed: {exc}") from None


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validated shallow copies, with ``reasoning`` mapped onto ``reasoning_content``."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatInputError("messages", "must be a list of messages")
    if not messages:
        raise ChatInputError("messages", "must contain at least one message")
    return [_normalize_message(i, message) for i, message in enumerate(messages)]


def normalize_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[Any] | None:
    """Tools with dict keys sorted recursively (Kimi's ``deep_sort_dict``); None stays None."""
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise ChatInputError("tools", "must be a list of tool definitions")
    for j, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ChatInputError(f"tools[{j}]", "must be an object")
    return [deep_sort(tool) for tool in tools]


def deep_sort(value: Any) -> Any:
    """A copy of ``value`` whose mappings have their keys sorted, recursively."""
    if isinstance(value, Mapping):
        return {key: deep_sort(value[key]) for key in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [deep_sort(item) for item in value]
    return value


def _normalize_message(i: int, message: Any) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(message, Mapping):
        raise ChatInputError(where, "must be an object", i)
    role = message.get("role")
    if role is None:
        raise ChatInputError(f"{where}.role", "is required", i)
    if not isinstance(role, str) or role not in ROLES:  # (a list or an object is unhashable: no `in`)
        raise ChatInputError(f"{where}.role", f"must be one of {sorted(ROLES)}, got {role!r}", i)
    out = dict(message)
    _check_optional_str(out, "name", where, i)
    _check_content(out.get("content"), where, i)
    if role == "tool":
        tool_call_id = out.get("tool_call_id")
        if not isinstance(tool_call_id, str) or not tool_call_id:
            raise ChatInputError(f"{where}.tool_call_id", "is required for role 'tool' (a non-empty string)", i)
    if role == "assistant":
        _check_optional_str(out, "reasoning", where, i)
        if out.get("reasoning_content") is None and out.get("reasoning") is not None:
            out["reasoning_content"] = out["reasoning"]
        out.pop("reasoning", None)
        _check_optional_str(out, "reasoning_content", where, i)
        _check_tool_calls(out.get("tool_calls"), where, i)
    return out


def _check_optional_str(message: Mapping[str, Any], key: str, where: str, i: int) -> None:
    if message.get(key) is not None and not isinstance(message[key], str):
        raise ChatInputError(f"{where}.{key}", "must be a string", i)


def _check_content(content: Any, where: str, i: int) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, Sequence):
        raise ChatInputError(f"{where}.content", "must be a string or a list of parts", i)
    for j, part in enumerate(content):
        field = f"{where}.content[{j}]"
        if not isinstance(part, Mapping):
            raise ChatInputError(field, "must be an object", i)
        kind = part.get("type")
        if (isinstance(kind, str) and kind in IMAGE_PART_TYPES) or (kind is None and IMAGE_PART_TYPES & part.keys()):
            continue
        if kind not in (None, "text"):
            raise ChatInputError(f"{field}.type", f"unsupported part type {kind!r} (text, image, image_url)", i)
        if not isinstance(part.get("text"), str):
            raise ChatInputError(f"{field}.text", "a text part needs a string 'text'", i)


def _check_tool_calls(tool_calls: Any, where: str, i: int) -> None:
    if tool_calls is None:
        return
    if isinstance(tool_calls, (str, bytes, Mapping)) or not isinstance(tool_calls, Sequence):
        raise ChatInputError(f"{where}.tool_calls", "must be a list", i)
    for j, call in enumerate(tool_calls):
        field = f"{where}.tool_calls[{j}]"
        if not isinstance(call, Mapping):
            raise ChatInputError(field, "must be an object", i)
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise ChatInputError(f"{field}.id", "is required (a non-empty string)", i)
        if call.get("type", "function") != "function":
            raise ChatInputError(f"{field}.type", f"must be 'function', got {call.get('type')!r}", i)
        function = call.get("function")
        if not isinstance(function, Mapping):
            raise ChatInputError(f"{field}.function", "is required (an object)", i)
        if not isinstance(function.get("arguments"), (str, Mapping)):
            raise ChatInputError(f"{field}.function.arguments", "is required (a JSON string or an object)", i)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' tojson: no HTML escaping (unlike jinja's builtin), non-ASCII kept.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)
