"""``RequestLimits`` and ``check_sampling``: one rule set for the sampling fields of every API.

Lifecycle: pure functions over already-parsed values. Each surface maps its own field names onto
``SamplingFields`` (``param`` names the wire field in errors) and calls ``check_sampling``, which
raises ``ApiError`` 400 naming the first bad field (the bad-input table of reliability.md §2.3)
or returns the engine's ``Sampling``. ``check_stop`` and ``check_n`` cover the request-level
fields, ``check_min_tokens`` the ``max_tokens`` a request ends up with. Non-finite floats
(Python's json accepts NaN and Infinity) are rejected everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from k2serve.router.api_error import invalid
from k2serve.router.generation_request import Sampling

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class RequestLimits:
    max_n: int = 8  # choices per request (each is a worker request and an admission unit)
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 256
    max_top_logprobs: int = 20
    max_stop_token_ids: int = 64


@dataclass(frozen=True)
class SamplingFields:
    """Parsed wire values; None = not given. ``names`` maps a field to its wire name for errors."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    top_logprobs: int | None = None
    max_reasoning_tokens: int | None = None


def check_sampling(
    f: SamplingFields, limits: RequestLimits, names: dict[str, str] | None = None, vocab_size: int | None = None
) -> Sampling:
    def name(field: str) -> str:
        return (names or {}).get(field, field)

    def number(field: str, value: float | None, low: float, high: float, *, low_open: bool = False) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid(name(field), "must be a finite number")
        if isinstance(value, float) and not math.isfinite(value):  # (an int is finite; isfinite(10**400) raises)
            raise invalid(name(field), "must be a finite number")
        if value < low or value > high or (low_open and value == low):
            bracket = "(" if low_open else "["
            raise invalid(name(field), f"must be in {bracket}{low:g}, {high:g}], got {_show(value)}")

    def integer(field: str, value: int | None, low: int, high: int = 2**31 - 1) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(name(field), "must be an integer")
        if not low <= value <= high:
            raise invalid(name(field), f"must be in [{low}, {high}], got {_show(value)}")

    number("temperature", f.temperature, 0.0, 2.0)
    number("top_p", f.top_p, 0.0, 1.0, low_open=True)
    integer("top_k", f.top_k, -1)
    number("min_p", f.min_p, 0.0, 1.0)
    number("presence_penalty", f.presence_penalty, -2.0, 2.0)
    number("frequency_penalty", f.frequency_penalty, -2.0, 2.0)
    number("repetition_penalty", f.repetition_penalty, 0.0, 2.0**31, low_open=True)
    integer("seed", f.seed, -MAX_SEED - 1, MAX_SEED)
    integer("max_tokens", f.max_tokens, 1)
    integer("min_tokens", f.min_tokens, 0)
    if f.min_tokens is not None and f.max_tokens is not None and f.min_tokens > f.max_tokens:
        raise invalid(name("min_tokens"), f"must not exceed max_tokens ({f.max_tokens})")
    integer("top_logprobs", f.top_logprobs, 0, limits.max_top_logprobs)
    integer("max_reasoning_tokens", f.max_reasoning_tokens, 0)
    if f.ignore_eos is not None and not isinstance(f.ignore_eos, bool):
        raise invalid(name("ignore_eos"), "must be a boolean")
    if f.stop_token_ids is not None and (
        isinstance(f.stop_token_ids, str | bytes) or not isinstance(f.stop_token_ids, Sequence)
    ):
        raise invalid(name("stop_token_ids"), "must be a list of token ids")
    stop_ids = tuple(f.stop_token_ids or ())
    if len(stop_ids) > limits.max_stop_token_ids:
        raise invalid(name("stop_token_ids"), f"at most {limits.max_stop_token_ids} ids")
    for token_id in stop_ids:
        integer("stop_token_ids", token_id, 0, (vocab_size or 2**31) - 1)
    return Sampling(
        temperature=1.0 if f.temperature is None else float(f.temperature),
        top_p=1.0 if f.top_p is None else float(f.top_p),
        top_k=-1 if f.top_k in (None, 0) else int(f.top_k),  # 0 and -1 both mean off
        min_p=float(f.min_p or 0.0),
        presence_penalty=float(f.presence_penalty or 0.0),
        frequency_penalty=float(f.frequency_penalty or 0.0),
        repetition_penalty=1.0 if f.repetition_penalty is None else float(f.repetition_penalty),
        seed=None if f.seed is None else f.seed % 2**64,
        max_tokens=f.max_tokens,
        min_tokens=f.min_tokens or 0,
        stop_token_ids=stop_ids,
        ignore_eos=bool(f.ignore_eos),
        top_logprobs=f.top_logprobs,
        max_reasoning_tokens=f.max_reasoning_tokens,
    )


def check_stop(stop: str | Sequence[str] | None, limits: RequestLimits, param: str = "stop") -> tuple[str, ...]:
    if stop is None:
        return ()
    if not isinstance(stop, str | Sequence) or isinstance(stop, bytes):
        raise invalid(param, "must be a string or a list of strings")
    items = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(items) > limits.max_stop:
        raise invalid(param, f"at most {limits.max_stop} stop strings")
    for item in items:
        if not isinstance(item, str):
            raise invalid(param, "stop strings must be strings")
        if not item:
            raise invalid(param, "stop strings must not be empty")
        if len(item) > limits.max_stop_chars:
            raise invalid(param, f"a stop string may have at most {limits.max_stop_chars} characters")
    return items


def check_min_tokens(sampling: Sampling, param: str = "min_tokens") -> None:
    """``min_tokens`` against the ``max_tokens`` a request ends up with: the context's room when the
    client gave none (``check_sampling`` only compares it with a given ``max_tokens``)."""
    if sampling.max_tokens is not None and sampling.min_tokens > sampling.max_tokens:
        raise invalid(
            param,
            f"must not exceed max_tokens ({sampling.max_tokens}, the room left in the context when not given)",
        )


def check_n(n: int | None, sampling: Sampling, limits: RequestLimits, param: str = "n") -> int:
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limits.max_n:
        raise invalid(param, f"must be an integer in [1, {limits.max_n}]")
    if n > 1 and sampling.temperature == 0.0:
        raise invalid(param, "n must be 1 when using greedy sampling (temperature 0)")
    return n


def _show(value: float) -> str:
    """A bad value for an error message, bounded (a 4,000-digit integer is not echoed back)."""
    text = (
        str(value)
        if not isinstance(value, int) or abs(value) < 10**30
        else f"an integer of {len(str(abs(value)))} digits"
    )
    return text[:40]
