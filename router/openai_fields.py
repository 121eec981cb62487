"""``WireBody`` and ``openai_sampling``: typed reads of an OpenAI request body, and its sampling fields.

Lifecycle: per request, a route wraps the parsed JSON object (``read_json_object``) in a
``WireBody`` and reads each field it knows with the accessor of its type; a wrong type is a 400
naming the field (never a 422 or a 500), and ``null`` reads as absent. Unknown fields are left
alone (OpenAI SDKs send new fields first). ``openai_sampling`` reads the sampling fields common to
chat and completions and hands them to ``check_sampling`` (ranges and the engine's ``Sampling``),
with the wire names for its errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from k2serve.router.api_error import invalid
from k2serve.router.frontend import Frontend
from k2serve.router.generation_request import Sampling
from k2serve.router.sampling_check import SamplingFields, check_sampling, check_stop

# Read as given and range-checked by ``check_sampling`` (which also rejects wrong types).
_NUMBERS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
_INTEGERS = ("top_k", "seed", "min_tokens")


class WireBody:
    """Typed, read-only access to one request's JSON object."""

    def __init__(self, body: Mapping[str, Any], prefix: str = "") -> None:
        self._body, self._prefix = body, prefix  # prefix: where a nested object sits, for errors

    def name(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def raw(self, key: str) -> Any:
        return self._body.get(key)

    def has(self, key: str) -> bool:
        return self._body.get(key) is not None

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self._body.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise invalid(self.name(key), "must be a boolean")
        return value

    def string(self, key: str) -> str | None:
        value = self._body.get(key)
        if value is not None and not isinstance(value, str):
            raise invalid(self.name(key), "must be a string")
        return value

    def integer(self, key: str) -> int | None:
        value = self._body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise invalid(self.name(key), "must be an integer")
        return value

    def mapping(self, key: str) -> Mapping[str, Any] | None:
        value = self._body.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise invalid(self.name(key), "must be an object")
        return value

    def array(self, key: str) -> list[Any] | None:
        value = self._body.get(key)
        if value is not None and not isinstance(value, list):
            raise invalid(self.name(key), "must be an array")
        return value

    def token_ids(self, key: str) -> list[int] | None:
        values = self.array(key)
        if values is not None and any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise invalid(self.name(key), "must be an array of integer token ids")
        return values


def check_cache_salt(body: WireBody) -> None:
    """A client salt is accepted but ignored: the server salts by tenant (reliability.md S8)."""
    salt = body.string("cache_salt")
    if salt is not None and not salt:
        raise invalid("cache_salt", "must be a non-empty string")


def openai_sampling(
    frontend: Frontend,
    body: WireBody,
    *,
    max_tokens_key: str,
    max_tokens: int | None,
    top_logprobs: int | None,
    top_logprobs_key: str,
    max_reasoning_tokens: int | None = None,
    max_reasoning_key: str = "max_reasoning_tokens",
) -> Sampling:
    """The sampling fields both APIs share; ``max_tokens`` and logprobs are read by the caller."""
    values: dict[str, Any] = {key: body.raw(key) for key in _NUMBERS + _INTEGERS}
    return check_sampling(
        SamplingFields(
            **values,
            max_tokens=max_tokens,
            stop_token_ids=body.token_ids("stop_token_ids"),
            ignore_eos=body.boolean("ignore_eos"),
            top_logprobs=top_logprobs,
            max_reasoning_tokens=max_reasoning_tokens,
        ),
        frontend.limits,
        names={
            "max_tokens": max_tokens_key,
            "top_logprobs": top_logprobs_key,
            "max_reasoning_tokens": max_reasoning_key,
        },
        vocab_size=frontend.tokenizer.vocab_size,
    )


def openai_stop(frontend: Frontend, body: WireBody) -> tuple[str, ...]:
    stop = body.raw("stop")
    if stop is not None and not isinstance(stop, str | list):
        raise invalid("stop", "must be a string or an array of strings")
    return check_stop(stop, frontend.limits)


def stream_options(body: WireBody, stream: bool) -> tuple[bool, bool]:
    """-> (include_usage, continuous_usage_stats); 400 when given without ``stream``."""
    options = body.mapping("stream_options")
    if options is None:
        return False, False
    if not stream:
        raise invalid("stream_options", "Stream options can only be defined when `stream=True`.")
    flags = WireBody(options, "stream_options.")
    return flags.boolean("include_usage"), flags.boolean("continuous_usage_stats")
