"""``GenerationRequest``: one validated request as the frontend runs it, whatever API it came from.

Lifecycle: an API adapter (OpenAI chat or completions, Anthropic messages, gRPC Generate or Chat)
validates its wire request and builds one ``GenerationRequest`` (prompt ids rendered and
tokenized, every limit checked); ``Frontend.start`` runs it. Frozen: nothing downstream edits it.

``chat`` is None for token-level requests (completions, gRPC Generate): the output is plain text.
With ``chat`` set the output goes through the Kimi reasoning and tool-call parsers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ToolChoiceMode = str  # "none" | "auto" | "required" | "function" (then ``ChatOutput.function_name``)


@dataclass(frozen=True)
class Sampling:
    """The engine's sampling knobs (defaults = the engine's); validated by the adapter."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = None  # None = up to the context limit
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int | None = None  # None = no logprobs; k >= 0 = the sampled token's plus the top k
    max_reasoning_tokens: int | None = None  # chat only: thinking budget, then </think> is forced


@dataclass(frozen=True)
class ChatOutput:
    """How a chat request's output is parsed (per request, never per model)."""

    start_in_reasoning: bool = False  # the prompt opened <think> (``prompt_opens_reasoning``)
    first_tool_index: int = 0  # tool calls already in the conversation (ids count on from here)
    tool_choice: ToolChoiceMode = "none"
    function_name: str | None = None  # tool_choice "function": the one allowed function
    forced_prefix_ids: tuple[int, ...] = ()  # ids appended to the prompt that the parser sees as output


@dataclass(frozen=True)
class Routing:
    """What the router may use to pick workers; never sent to a client."""

    session_key: str | None = None  # multi-turn affinity (a session header or the ``user`` field)
    cache_salt: str | None = None  # per-tenant prefix-cache isolation, set from the API key


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str  # the server's id (unique); the client's own id is only echoed
    prompt_token_ids: tuple[int, ...]
    sampling: Sampling = Sampling()
    n: int = 1
    stop: tuple[str, ...] = ()  # stop strings, matched on the output text (chat: on the content)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # token-level text only (chat text never shows special tokens)
    chat: ChatOutput | None = None
    routing: Routing = field(default_factory=Routing)
    deadline_s: float | None = None  # seconds from now the client waits at most (gRPC deadline)
