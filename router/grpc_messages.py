"""The public gRPC API's request messages (``k2serve.v1``) -> the router's own types.

Lifecycle: pure functions, called by the ``Serving`` servicer once per call before anything runs;
each raises ``ApiError`` (INVALID_ARGUMENT naming the wire field, e.g. ``sampling.top_p`` or
``tools[1].parameters_json``) or returns plain Python: ``Sampling`` and the request-level fields
(``RequestSampling``), OpenAI-shaped message / tool / tool-choice dicts for ``chat_generation``,
and the client's request id. Protobuf stops here and in ``grpc_responses``: nothing past the
servicer sees a message.

proto3 zero values are not the semantic defaults: an unset ``optional`` field becomes None (the
REST default); the plain scalars (``min_p``, penalties, ``min_tokens``) default to zero, which is
also their REST default. Strings never carry NUL characters (as on the REST side, they break the
tokenizer and the template); protobuf already guarantees valid UTF-8.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from k2serve.proto import serving_pb2
from k2serve.router.api_error import invalid
from k2serve.router.generation_request import Sampling
from k2serve.router.sampling_check import RequestLimits, SamplingFields, check_n, check_sampling, check_stop

SAMPLING_NAMES = {f.name: f"sampling.{f.name}" for f in fields(SamplingFields)}
MAX_CLIENT_ID_CHARS = 256


@dataclass(frozen=True)
class RequestSampling:
    """The checked sampling of one request: engine knobs, stop strings, number of choices."""

    sampling: Sampling
    stop: tuple[str, ...]
    n: int


def request_sampling(p: serving_pb2.SamplingParams, limits: RequestLimits, vocab_size: int) -> RequestSampling:
    def optional(name: str) -> Any:
        return getattr(p, name) if p.HasField(name) else None

    f = SamplingFields(
        temperature=optional("temperature"),
        top_p=optional("top_p"),
        top_k=optional("top_k"),
        min_p=p.min_p,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=optional("repetition_penalty"),
        seed=optional("seed"),
        max_tokens=optional("max_tokens"),
        min_tokens=p.min_tokens,
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        top_logprobs=optional("top_logprobs"),
        max_reasoning_tokens=optional("max_reasoning_tokens"),
    )
    sampling = check_sampling(f, limits, SAMPLING_NAMES, vocab_size=vocab_size)
    stop = check_stop(list(p.stop) or None, limits, param="sampling.stop")
    for s in stop:
        text(s, "sampling.stop")
    n = check_n(optional("n"), sampling, limits, param="sampling.n")
    return RequestSampling(sampling, stop, n)


def text(value: str, field: str) -> str:
    if "\x00" in value:
        raise invalid(field, "must not contain NUL characters")
    return value


def client_request_id(value: str, field: str = "request_id") -> str:
    """The client's own id, echoed as ``x-request-id`` metadata: printable ASCII only."""
    if len(value) > MAX_CLIENT_ID_CHARS:
        raise invalid(field, f"at most {MAX_CLIENT_ID_CHARS} characters")
    if not all(" " <= c <= "~" for c in value):
        raise invalid(field, "must be printable ASCII (it is echoed as the `x-request-id` metadata)")
    return value


# -- chat ----------------------------------------------------------------------------------------


def chat_messages(messages: Any, field: str = "messages") -> list[dict[str, Any]]:
    """``ChatMessage``s as OpenAI-shaped dicts (empty fields left out)."""
    return [_message(m, f"{field}[{i}]") for i, m in enumerate(messages)]


def chat_tools(tools: Any, field: str = "tools") -> list[dict[str, Any]] | None:
    """``ToolFunction``s as OpenAI tools; none given = None (``tools`` left out)."""
    return [_tool(t, f"{field}[{i}]") for i, t in enumerate(tools)] or None


def tool_choice(request: serving_pb2.ChatRequest) -> str | dict[str, Any] | None:
    """Unset = None (auto with tools, none without); a mode string; or a named function."""
    if not request.HasField("tool_choice"):
        return None
    which = request.tool_choice.WhichOneof("choice")
    if which == "mode":
        return str(request.tool_choice.mode)
    if which == "function_name":
        return {"type": "function", "function": {"name": request.tool_choice.function_name}}
    return None


def thinking(request: serving_pb2.ChatRequest) -> bool:
    return bool(request.thinking) if request.HasField("thinking") else True


def _message(m: serving_pb2.ChatMessage, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role}
    for key in ("content", "reasoning_content", "tool_call_id", "name"):
        value = getattr(m, key)
        if value:
            out[key] = text(value, f"{where}.{key}")
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": text(call.id, f"{where}.tool_calls[{j}].id"),
                "type": "function",
                "function": {
                    "name": text(call.name, f"{where}.tool_calls[{j}].name"),
                    "arguments": text(call.arguments_json, f"{where}.tool_calls[{j}].arguments_json") or "{}",
                },
            }
            for j, call in enumerate(m.tool_calls)
        ]
    return out


def _tool(t: serving_pb2.ToolFunction, where: str) -> dict[str, Any]:
    function: dict[str, Any] = {"name": text(t.name, f"{where}.name")}
    if t.description:
        function["description"] = text(t.description, f"{where}.description")
    if t.parameters_json:
        try:
            parameters = json.loads(t.parameters_json, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise invalid(f"{where}.parameters_json", "is not valid JSON") from None
        if not isinstance(parameters, dict):
            raise invalid(f"{where}.parameters_json", "must be a JSON Schema object")
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
