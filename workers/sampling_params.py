"""How one request wants its tokens chosen: OpenAI / vLLM sampling parameters.

Lifecycle: the router (or a test) builds a ``SamplingParams``; ``__post_init__`` checks every type
and range that does not need the model, so a bad object cannot exist. At admission the engine calls
``validate(vocab_size)``, which adds the checks against the vocabulary and resolves nothing: an
unset ``max_tokens`` stays ``None`` and the engine turns it into "up to the context limit". A request
with ``n > 1`` fans out into ``n`` children, each with ``for_child(i)``. The object is frozen and
never changes afterwards; per-step state lives in ``sampler.SamplingState``.

Names and meanings follow the OpenAI API and vLLM: ``temperature = 0`` is greedy, ``top_k`` of -1
or 0 is disabled, penalties of 0 (presence, frequency) or 1 (repetition) are neutral, ``logprobs``
is the number of top alternatives (0 = only the sampled token's logprob). Kimi K2 Thinking's
recommended defaults are temperature 1.0 and top_p 1.0, which are the defaults here.

Errors are ``SamplingParamsError`` and name the field, e.g.
``SamplingParamsError: sampling parameter 'top_p': must be in (0, 1], got 1.5``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

MAX_N = 128  # choices per request; the router may enforce a lower product limit (Moonshot: 5)
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
MAX_ABS_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty


class SamplingParamsError(ValueError):
    """A sampling parameter has the wrong type or is out of range. ``field`` names the parameter."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"sampling parameter '{field_name}': {message}")
        self.field = field_name


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy (argmax, ties -> lowest id)
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose mass reaches top_p
    top_k: int = -1  # keep the top_k most likely tokens; -1 or 0 = disabled
    min_p: float = 0.0  # drop tokens with probability below min_p x the top probability
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # HF rule on prompt + output tokens: divide positive logits, multiply negative
    seed: int | None = None  # None = a fresh random seed per request
    max_tokens: int | None = None  # None = up to the context limit (the engine resolves it)
    min_tokens: int = 0  # stop ids are masked until this many tokens are generated
    stop_token_ids: tuple[int, ...] = ()  # extra stop ids on top of the model's own
    ignore_eos: bool = False  # do not stop at the model's own stop ids (extra stop_token_ids still stop)
    logprobs: int | None = None  # None = no logprobs; k = the sampled token's plus the top k
    # Reasoning budget: the output starts inside the model's reasoning (the chat template opened
    # <think>); after max_reasoning_tokens tokens without one of reasoning_end_token_ids, the engine
    # forces the first of them (</think>) and the model goes on with its answer.
    max_reasoning_tokens: int | None = None
    reasoning_end_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Normalise before checking so the frozen object always holds canonical types.
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            object.__setattr__(self, name, _finite_float(name, getattr(self, name)))
        object.__setattr__(self, "stop_token_ids", _int_tuple("stop_token_ids", self.stop_token_ids))
        ends = _int_tuple("reasoning_end_token_ids", self.reasoning_end_token_ids)
        object.__setattr__(self, "reasoning_end_token_ids", ends)
        for name in ("n", "top_k", "min_tokens"):
            _require_int(name, getattr(self, name))
        for name in ("seed", "max_tokens", "logprobs", "max_reasoning_tokens"):
            value = getattr(self, name)
            if value is not None:
                _require_int(name, value)
        if not isinstance(self.ignore_eos, bool):
            raise SamplingParamsError("ignore_eos", f"must be a bool, got {type(self.ignore_eos).__name__}")
        self._check_ranges()

    def _check_ranges(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise SamplingParamsError("n", f"must be in [1, {MAX_N}], got {self.n}")
        if self.temperature < 0:
            raise SamplingParamsError("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise SamplingParamsError("top_k", f"must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise SamplingParamsError("min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY:
                raise SamplingParamsError(name, f"must be in [-{MAX_ABS_PENALTY}, {MAX_ABS_PENALTY}], got {value}")
        if self.repetition_penalty <= 0:
            raise SamplingParamsError("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SamplingParamsError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise SamplingParamsError("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError("min_tokens", f"{self.min_tokens} is more than max_tokens {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise SamplingParamsError("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if self.max_reasoning_tokens is not None:
            if self.max_reasoning_tokens < 0:
                raise SamplingParamsError("max_reasoning_tokens", f"must be >= 0, got {self.max_reasoning_tokens}")
            if not self.reasoning_end_token_ids:
                raise SamplingParamsError("reasoning_end_token_ids", "a reasoning budget needs the </think> id")
        negative = [t for t in (*self.stop_token_ids, *self.reasoning_end_token_ids) if t < 0]
        if negative:
            raise SamplingParamsError("stop_token_ids", f"ids {negative[:5]} are negative")

    def validate(self, vocab_size: int | None = None) -> None:
        """Every check; with ``vocab_size`` also that the stop ids are in the vocabulary."""
        self._check_ranges()
        if vocab_size is not None:
            for name in ("stop_token_ids", "reasoning_end_token_ids"):
                bad = [t for t in getattr(self, name) if not 0 <= t < vocab_size]
                if bad:
                    raise SamplingParamsError(name, f"ids {bad[:5]} are outside the vocabulary of {vocab_size}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def for_child(self, index: int) -> SamplingParams:
        """Child ``index`` of an ``n``-choice request: ``n = 1`` and seed ``seed + index``.

        Children of a seeded request are therefore reproducible and differ from each other (as in
        vLLM); note that child 1 of seed s draws like child 0 of seed s + 1. Unseeded children stay
        unseeded and each get their own fresh random seed from ``SamplingState``.
        """
        _require_int("index", index)
        if not 0 <= index < self.n:
            raise SamplingParamsError("index", f"child {index} of a request with n = {self.n}")
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, seed=seed)


def _require_int(name: str, value: object) -> None:
    # bool is a subclass of int; True as top_k is a client bug, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise SamplingParamsError(name, f"must be an int, got {type(value).__name__} {value!r}")


def _finite_float(name: str, value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise SamplingParamsError(name, f"must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise SamplingParamsError(name, f"must be finite, got {value}")
    return float(value)


def _int_tuple(name: str, value: object) -> tuple[int, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, tuple | list):
        raise SamplingParamsError(name, f"must be a sequence of ints, got {type(value).__name__}")
    for item in value:
        _require_int(name, item)
    return tuple(value)
