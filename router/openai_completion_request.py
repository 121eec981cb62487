"""``parse_completion``: an OpenAI ``/v1/completions`` body -> one ``GenerationRequest`` per prompt.

Lifecycle: once per completions request, before anything runs. ``prompt`` is a string, a list
of token ids, a list of strings or a list of token-id lists; each prompt becomes its own
``GenerationRequest`` (run concurrently; choice ``i`` of prompt ``p`` is ``p * n + i`` in the
answer). Fields are type-checked here (400 naming the field), sampling ranges by
``check_sampling``; ``logprobs`` is the legacy integer (the top-k to return, 0 = just the sampled
token). ``max_tokens`` defaults to 16 as in OpenAI's API (less when the context has less room).
Not supported, so 400: ``suffix``, and ``echo`` with ``logprobs`` (no prompt logprobs here); more
prompts x ``n`` than the router's ``max_running`` (they could never all be admitted).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from k2serve.router.api_error import invalid
from k2serve.router.frontend import Frontend
from k2serve.router.generation_request import GenerationRequest, Routing
from k2serve.router.openai_chat_request import check_unsupported
from k2serve.router.openai_fields import WireBody, check_cache_salt, openai_sampling, openai_stop, stream_options
from k2serve.router.sampling_check import check_min_tokens, check_n

DEFAULT_MAX_TOKENS = 16
MAX_PROMPTS = 64  # prompts in one request (each runs n choices at once)


@dataclass(frozen=True)
class CompletionShape:
    stream: bool = False
    include_usage: bool = False
    continuous_usage: bool = False
    echo: bool = False
    logprobs: bool = False
    return_token_ids: bool = False


@dataclass(frozen=True)
class CompletionJob:
    response_id: str  # the id of the answer; each prompt's request id derives from it
    requests: tuple[GenerationRequest, ...]  # one per prompt, in prompt order
    prompt_texts: tuple[str, ...]  # what ``echo`` writes before each prompt's output
    shape: CompletionShape

    @property
    def n(self) -> int:
        return self.requests[0].n


def parse_completion(frontend: Frontend, raw: Mapping[str, Any], routing: Routing) -> CompletionJob:
    body = WireBody(raw)
    frontend.check_model(body.string("model"))
    check_unsupported(body)
    check_cache_salt(body)
    body.string("user")
    if body.raw("suffix"):
        raise invalid("suffix", "is not supported by this server")
    stream = body.boolean("stream")
    include_usage, continuous_usage = stream_options(body, stream)
    echo = body.boolean("echo")
    top_logprobs = body.raw("logprobs")
    if echo and top_logprobs is not None:
        raise invalid("logprobs", "cannot be combined with `echo` (prompt logprobs are not supported)")
    skip_special = body.boolean("skip_special_tokens", default=True)
    prompts = _prompts(frontend, body.raw("prompt"))
    sampling = openai_sampling(
        frontend,
        body,
        max_tokens_key="max_tokens",
        max_tokens=body.raw("max_tokens"),
        top_logprobs=top_logprobs,
        top_logprobs_key="logprobs",
    )
    n = check_n(body.raw("n"), sampling, frontend.limits)
    _check_fits(frontend, len(prompts), n)
    stop = openai_stop(frontend, body)
    include_stop = body.boolean("include_stop_str_in_output")
    response_id = frontend.new_request_id("cmpl")
    requests = []
    for p, ids in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt.{p}"
        room = frontend.check_prompt(ids, sampling.max_tokens, param=param)
        max_tokens = (
            room if sampling.max_tokens is not None else min(max(DEFAULT_MAX_TOKENS, sampling.min_tokens), room)
        )
        check_min_tokens(replace(sampling, max_tokens=max_tokens))
        requests.append(
            GenerationRequest(
                request_id=response_id if len(prompts) == 1 else f"{response_id}-{p}",
                prompt_token_ids=tuple(ids),
                sampling=replace(sampling, max_tokens=max_tokens),
                n=n,
                stop=stop,
                include_stop_str_in_output=include_stop,
                skip_special_tokens=skip_special,
                chat=None,
                routing=routing,
            )
        )
    texts = _prompt_texts(frontend, body.raw("prompt"), prompts, skip_special) if echo else ("",) * len(prompts)
    shape = CompletionShape(
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        echo=echo,
        logprobs=top_logprobs is not None,
        return_token_ids=body.boolean("return_token_ids"),
    )
    return CompletionJob(response_id, tuple(requests), texts, shape)


def _check_fits(frontend: Frontend, num_prompts: int, n: int) -> None:
    """Each prompt is admitted on its own and holds its slots until the whole answer is read, so a
    request needing more slots than the router ever runs at once would wait for itself until
    ``max_wait_s`` and then get 429: it can never run, so it is a 400 now."""
    most = frontend.admission.limits.max_running
    if num_prompts > 1 and num_prompts * n > most:
        raise invalid(
            "prompt", f"{num_prompts} prompts x n={n} need {num_prompts * n} slots; this server runs {most} at once"
        )


def _prompts(frontend: Frontend, prompt: Any) -> list[list[int]]:
    """The prompts' token ids: str | list[int] | list[str] | list[list[int]]."""
    if isinstance(prompt, str):
        return [frontend.encode(prompt)]
    if not isinstance(prompt, list) or not prompt:
        raise invalid("prompt", "must be a string, a list of token ids, or a non-empty list of either")
    if all(_is_id(item) for item in prompt):
        return [list(prompt)]
    if len(prompt) > MAX_PROMPTS:
        raise invalid("prompt", f"at most {MAX_PROMPTS} prompts per request")
    if all(isinstance(item, str) for item in prompt):
        return [frontend.encode(text) for text in prompt]
    if all(isinstance(item, list) and all(_is_id(t) for t in item) for item in prompt):
        return [list(ids) for ids in prompt]
    raise invalid("prompt", "must be a string, a list of token ids, a list of strings or a list of token-id lists")


def _prompt_texts(
    frontend: Frontend, prompt: Any, prompts: Sequence[Sequence[int]], skip_special: bool
) -> tuple[str, ...]:
    if isinstance(prompt, str):
        return (prompt,)
    if all(isinstance(item, str) for item in prompt):
        return tuple(prompt)
    return tuple(frontend.tokenizer.decode(ids, skip_special_tokens=skip_special) for ids in prompts)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
