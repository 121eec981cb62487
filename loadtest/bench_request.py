"""``BenchRequest`` (what the benchmark sends) and ``RequestRecord`` (what it measured).

Lifecycle: a dataset builds ``BenchRequest``s (a single-turn dataset all at once; the agentic
dataset one round at a time, from the replies of the previous rounds); a client turns each one
into exactly one ``RequestRecord``, success or failure, never an exception. Both are frozen and
hold plain JSON-shaped data (OpenAI message and tool dicts), so either client can send them.

Times in a record are seconds (``time.perf_counter`` differences); ``start_time`` is measured from
the origin of the sweep point, so records of one point share one clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, Any]
Tool = dict[str, Any]


@dataclass(frozen=True)
class BenchRequest:
    """One chat request. ``prompt_len`` is the requested prompt size in words (the client does not
    tokenize; the served prompt token count comes back in the usage); ``max_tokens`` the output cap."""

    messages: tuple[Message, ...]
    max_tokens: int
    session_id: str | None = None
    turn: int = 0
    prompt_len: int = 0
    tools: tuple[Tool, ...] = ()


@dataclass(frozen=True)
class ToolCallRecord:
    """A tool call the model wrote, reassembled from its streamed pieces."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class RequestRecord:
    """The measurement of one request, with vLLM ``bench serve``'s definitions (seconds):
    ``ttft`` send -> first token chunk; ``itl`` gaps between consecutive token chunks; ``latency``
    send -> last token chunk; ``output_tokens`` / ``prompt_tokens`` / ``cached_tokens`` from the
    final usage. A failed request keeps ``latency`` = send -> failure, for the concurrency count."""

    success: bool
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    ttft: float = 0.0
    itl: tuple[float, ...] = ()
    latency: float = 0.0
    start_time: float = 0.0
    session_id: str | None = None
    turn: int = 0
    prompt_len: int = 0
    max_tokens: int = 0
    finish_reason: str = ""
    text: str = field(default="", repr=False)
    reasoning: str = field(default="", repr=False)
    tool_calls: tuple[ToolCallRecord, ...] = ()

    @property
    def tpot(self) -> float | None:
        """(latency - ttft) / (output_tokens - 1); None for fewer than two output tokens."""
        if self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        """The measured fields (not the generated text) for the result files."""
        return {
            "success": self.success,
            "error": self.error,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "ttft": self.ttft,
            "itl": list(self.itl),
            "latency": self.latency,
            "start_time": self.start_time,
            "session_id": self.session_id,
            "turn": self.turn,
            "prompt_len": self.prompt_len,
            "max_tokens": self.max_tokens,
            "finish_reason": self.finish_reason,
        }
