"""OpenAI ``usage`` objects, the final one and the running one of ``continuous_usage_stats``.

Lifecycle: ``usage_body`` once per response from the ``RequestUsage`` of ``RequestFinished``;
``RunningUsage`` per streaming response, fed every delta's token ids, for the usage that
``stream_options.continuous_usage_stats`` puts on every chunk (what is known so far: the
prompt-cache and reasoning counts only arrive with the final usage chunk).
"""

from __future__ import annotations

from typing import Any

from k2serve.router.generation_event import RequestUsage


def usage_body(usage: RequestUsage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class RunningUsage:
    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def add(self, num_tokens: int) -> None:
        self.completion_tokens += num_tokens

    def body(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
