"""``MessagesRequest``: the validated top-level fields of an Anthropic ``/v1/messages`` body.

Lifecycle: pure; ``parse_messages_request(body, limits)`` once per request (``count_tokens`` uses
``parse_count_request``: the same conversation rules, no sampling). Every bad field is an
``ApiError`` 400 naming it; unknown fields are ignored (Anthropic adds fields often: ``metadata``
keys, ``output_config``, ``container``, ``service_tier``...). Rules beyond ``check_sampling``:
- ``max_tokens`` is required (an integer >= 1); ``temperature`` is in [0, 1] (Anthropic's range);
- ``thinking``: ``{"type": "enabled", "budget_tokens": N}`` with 1024 <= N < ``max_tokens``
  (Anthropic's rule) -> ``Sampling.max_reasoning_tokens`` = N (the engine then forces
  ``</think>``); ``{"type": "disabled"}`` -> no reasoning (the turn is prefilled with an empty
  one); ``{"type": "adaptive"}`` and no ``thinking`` -> the model's own reasoning, no budget;
- ``metadata.user_id`` -> the routing session key (multi-turn affinity);
- ``stop_sequences`` -> stop strings matched on the answer text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from k2serve.router.anthropic_messages import Conversation, convert_conversation
from k2serve.router.api_error import invalid
from k2serve.router.generation_request import Sampling
from k2serve.router.sampling_check import RequestLimits, SamplingFields, check_sampling, check_stop

MIN_THINKING_BUDGET = 1024
THINKING_TYPES = ("enabled", "disabled", "adaptive")
SAMPLING_NAMES = MappingProxyType({"max_reasoning_tokens": "thinking.budget_tokens"})


@dataclass(frozen=True)
class MessagesRequest:
    model: str
    conversation: Conversation
    sampling: Sampling
    stop: tuple[str, ...] = ()
    thinking: bool = True  # False: {"type": "disabled"}
    stream: bool = False
    user_id: str | None = None  # metadata.user_id


def parse_messages_request(body: Mapping[str, Any], limits: RequestLimits) -> MessagesRequest:
    model = _model(body)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise invalid("max_tokens", "is required (an integer >= 1)")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise invalid("max_tokens", f"must be an integer >= 1, got {max_tokens!r}")
    temperature = body.get("temperature")
    if temperature is not None and _is_number(temperature) and not 0.0 <= temperature <= 1.0:
        raise invalid("temperature", f"must be in [0, 1], got {temperature}")
    thinking, budget = _thinking(body.get("thinking"), max_tokens)
    sampling = check_sampling(
        SamplingFields(
            temperature=temperature,
            top_p=body.get("top_p"),
            top_k=body.get("top_k"),
            max_tokens=max_tokens,
            max_reasoning_tokens=budget,
        ),
        limits,
        names=dict(SAMPLING_NAMES),
    )
    stop = body.get("stop_sequences")
    if stop is not None and not isinstance(stop, list):
        raise invalid("stop_sequences", "must be a list of strings")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise invalid("stream", "must be a boolean")
    return MessagesRequest(
        model=model,
        conversation=convert_conversation(body),
        sampling=sampling,
        stop=check_stop(stop, limits, param="stop_sequences"),
        thinking=thinking,
        stream=bool(stream),
        user_id=_user_id(body.get("metadata")),
    )


def parse_count_request(body: Mapping[str, Any]) -> tuple[str, Conversation]:
    """``/v1/messages/count_tokens``: (model, conversation); sampling fields are not looked at."""
    return _model(body), convert_conversation(body)


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "is required (a non-empty string)")
    return model


def _thinking(thinking: Any, max_tokens: int) -> tuple[bool, int | None]:
    """-> (reasoning on, budget or None)."""
    if thinking is None:
        return True, None
    if not isinstance(thinking, Mapping):
        raise invalid("thinking", 'must be an object such as {"type": "enabled", "budget_tokens": 2048}')
    kind = thinking.get("type")
    if kind not in THINKING_TYPES:
        raise invalid("thinking.type", f"must be one of {list(THINKING_TYPES)}, got {kind!r}")
    if kind == "disabled":
        return False, None
    if kind == "adaptive":
        return True, None
    budget = thinking.get("budget_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise invalid("thinking.budget_tokens", "is required with `enabled` (an integer)")
    if budget < MIN_THINKING_BUDGET:
        raise invalid("thinking.budget_tokens", f"must be >= {MIN_THINKING_BUDGET}, got {budget}")
    if budget >= max_tokens:
        raise invalid("thinking.budget_tokens", f"must be less than max_tokens ({max_tokens}), got {budget}")
    return True, budget


def _user_id(metadata: Any) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise invalid("metadata", "must be an object")
    user_id = metadata.get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        raise invalid("metadata.user_id", "must be a string")
    return user_id or None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
