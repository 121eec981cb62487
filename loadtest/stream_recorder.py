"""``StreamRecorder``: the clock and the reply of one streamed answer, shared by both clients.

Lifecycle: a client creates one right before it sends a request (``start`` = the send time), calls
``token_chunk`` for every message that carries generated output, ``finish`` / ``usage`` when those
arrive, and ends with ``record()`` (the stream ended normally) or ``failed(error)``; either returns
the frozen ``RequestRecord``. Nothing here does I/O.

Token chunk (the TTFT / ITL clock; vLLM ``bench serve``'s rule): a message with a non-empty
``choices`` (gRPC: a ``ChatResponse``) whose delta carries ``role``, ``content``,
``reasoning_content`` / ``reasoning`` or ``tool_calls``. The role chunk counts, as in vLLM: k2serve
sends it together with the first token (never earlier), so TTFT is the first token either way.
A finish chunk with an empty delta and the usage chunk carry no token and stop no clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from k2serve.loadtest.bench_request import BenchRequest, RequestRecord, ToolCallRecord


@dataclass
class _ToolCallParts:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class StreamRecorder:
    def __init__(self, request: BenchRequest, origin: float, start: float | None = None) -> None:
        self.request = request
        self.origin = origin  # the sweep point's clock origin (perf_counter)
        self.start = time.perf_counter() if start is None else start
        self.first: float | None = None
        self.last: float | None = None
        self.itl: list[float] = []
        self.num_text_chunks = 0
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, _ToolCallParts] = {}
        self.finish_reason = ""
        self.prompt_tokens = 0
        self.output_tokens: int | None = None
        self.cached_tokens = 0

    def token_chunk(self, now: float, content: str = "", reasoning: str = "") -> None:
        if self.first is None:
            self.first = now
        elif self.last is not None:
            self.itl.append(now - self.last)
        self.last = now
        if content or reasoning:
            self.num_text_chunks += 1
        if content:
            self.text.append(content)
        if reasoning:
            self.reasoning.append(reasoning)

    def tool_call_piece(self, index: int, id: str = "", name: str = "", arguments: str = "") -> None:
        parts = self.calls.setdefault(index, _ToolCallParts())
        parts.id = parts.id or id
        parts.name = parts.name or name
        if arguments:
            parts.arguments.append(arguments)

    def finish(self, reason: str) -> None:
        self.finish_reason = self.finish_reason or reason

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> None:
        self.prompt_tokens, self.output_tokens, self.cached_tokens = prompt_tokens, completion_tokens, cached_tokens

    def record(self) -> RequestRecord:
        """The stream ended normally: a success when at least one token chunk arrived."""
        if self.first is None or self.last is None:
            return self.failed("the stream ended without any token")
        # Without a usage chunk (a server that ignores include_usage) the output-chunk count stands in.
        output = self.output_tokens if self.output_tokens is not None else self.num_text_chunks
        return RequestRecord(
            success=True,
            prompt_tokens=self.prompt_tokens,
            output_tokens=output,
            cached_tokens=self.cached_tokens,
            ttft=self.first - self.start,
            itl=tuple(self.itl),
            latency=self.last - self.start,
            start_time=self.start - self.origin,
            session_id=self.request.session_id,
            turn=self.request.turn,
            prompt_len=self.request.prompt_len,
            max_tokens=self.request.max_tokens,
            finish_reason=self.finish_reason,
            text="".join(self.text),
            reasoning="".join(self.reasoning),
            tool_calls=tuple(ToolCallRecord(p.id, p.name, "".join(p.arguments)) for _, p in sorted(self.calls.items())),
        )

    def failed(self, error: str) -> RequestRecord:
        return RequestRecord(
            success=False,
            error=error,
            prompt_tokens=self.prompt_tokens,
            output_tokens=self.output_tokens or 0,
            latency=time.perf_counter() - self.start,
            start_time=self.start - self.origin,
            session_id=self.request.session_id,
            turn=self.request.turn,
            prompt_len=self.request.prompt_len,
            max_tokens=self.request.max_tokens,
            finish_reason=self.finish_reason,
        )
