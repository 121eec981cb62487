"""``chat_generation``: an OpenAI-shaped conversation (messages, tools, tool choice) -> ``GenerationRequest``.

Lifecycle: called once per chat request by every chat surface (OpenAI chat, Anthropic messages
after converting its blocks, gRPC Chat) with already type-checked fields; it checks what they have
in common, renders the chat template, tokenizes, and decides how the output is parsed.

Tool choice (OpenAI's rules): omitted -> ``auto`` with tools, ``none`` without; ``tools: []``, a
choice other than ``none`` without tools, or a named function not in ``tools`` -> 400.
- ``none``: the tools are left out of the prompt and any call the model still writes is dropped;
- ``auto``: the model decides; parsed calls end the choice with ``tool_calls``;
- ``required`` / a named function: enforced by prefilling the assistant turn with an empty
  reasoning block and an open tool-call section (``<think></think><|tool_calls_section_begin|>
  <|tool_call_begin|>`` and, when named, ``functions.NAME:IDX<|tool_call_argument_begin|>``):
  the model can only write a call. The prefilled ids reach the parser as output (so the call is
  reported) but are not counted or returned as generated tokens. These choices skip the
  reasoning phase (vLLM enforces them with structured decoding instead).
``thinking=False`` prefills ``<think></think>`` likewise: the answer comes without reasoning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from k2serve.router.api_error import invalid
from k2serve.router.frontend import Frontend
from k2serve.router.generation_request import ChatOutput, GenerationRequest, Routing, Sampling
from k2serve.router.kimi_output import count_history_tool_calls, prompt_opens_reasoning, tool_call_id
from k2serve.router.kimi_vocab import (
    THINK_BEGIN,
    THINK_END,
    TOOL_CALL_ARGUMENT_BEGIN,
    TOOL_CALL_BEGIN,
    TOOL_CALLS_SECTION_BEGIN,
)

TOOL_CHOICE_MODES = ("none", "auto", "required")


def resolve_tool_choice(tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any) -> tuple[str, str | None]:
    """-> (mode, function name): mode is none | auto | required | function."""
    if tools is not None and len(tools) == 0:
        raise invalid("tools", "`tools` must not be an empty array (leave it out instead)")
    names = [_tool_name(i, tool) for i, tool in enumerate(tools or ())]
    if len(set(names)) != len(names):
        raise invalid("tools", "function names must be unique")
    if tool_choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICE_MODES:
            raise invalid("tool_choice", f"must be one of {list(TOOL_CHOICE_MODES)} or a named function")
        if tool_choice != "none" and not tools:
            raise invalid("tool_choice", f"`{tool_choice}` needs `tools`")
        return tool_choice, None
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str) or not name:
            raise invalid("tool_choice", 'a named choice is {"type": "function", "function": {"name": ...}}')
        if name not in names:
            raise invalid("tool_choice", f"names the function `{name}`, which is not in `tools`")
        return "function", name
    raise invalid("tool_choice", "must be a string or an object")


def chat_generation(
    frontend: Frontend,
    *,
    request_id: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
    tool_choice: Any,
    sampling: Sampling,
    thinking: bool = True,
    n: int = 1,
    stop: Sequence[str] = (),
    include_stop_str_in_output: bool = False,
    routing: Routing | None = None,
    deadline_s: float | None = None,
) -> GenerationRequest:
    mode, name = resolve_tool_choice(tools, tool_choice)
    prompt = frontend.render_chat(messages, tools if mode != "none" else None)
    first_tool_index = count_history_tool_calls(messages)
    forced = _forced_prefix(frontend, mode, name, first_tool_index, thinking)
    max_tokens = frontend.check_prompt([*prompt, *forced], sampling.max_tokens, param="messages")
    chat = ChatOutput(
        start_in_reasoning=prompt_opens_reasoning(frontend.tokenizer, prompt),
        first_tool_index=first_tool_index,
        tool_choice=mode,
        function_name=name,
        forced_prefix_ids=tuple(forced),
    )
    return GenerationRequest(
        request_id=request_id,
        prompt_token_ids=tuple(prompt),
        sampling=replace(sampling, max_tokens=max_tokens),
        n=n,
        stop=tuple(stop),
        include_stop_str_in_output=include_stop_str_in_output,
        chat=chat,
        routing=routing or Routing(),
        deadline_s=deadline_s,
    )


def _forced_prefix(frontend: Frontend, mode: str, name: str | None, first_index: int, thinking: bool) -> list[int]:
    special = frontend.tokenizer.special_tokens
    if mode not in ("required", "function"):
        return [] if thinking else [special[THINK_BEGIN], special[THINK_END]]
    ids = [special[THINK_BEGIN], special[THINK_END], special[TOOL_CALLS_SECTION_BEGIN], special[TOOL_CALL_BEGIN]]
    if mode == "function" and name is not None:
        ids += frontend.tokenizer.encode(tool_call_id(name, first_index), allow_special=False)
        ids.append(special[TOOL_CALL_ARGUMENT_BEGIN])
    return ids


def _tool_name(i: int, tool: Mapping[str, Any]) -> str:
    if not isinstance(tool, Mapping):
        raise invalid(f"tools[{i}]", "must be an object")
    if tool.get("type", "function") != "function":
        raise invalid(f"tools[{i}].type", "only `function` tools are supported")
    function = tool.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not name:
        raise invalid(f"tools[{i}].function.name", "is required (a non-empty string)")
    parameters = function.get("parameters") if isinstance(function, Mapping) else None
    if parameters is not None and not isinstance(parameters, Mapping):
        raise invalid(f"tools[{i}].function.parameters", "must be a JSON Schema object")
    return name
