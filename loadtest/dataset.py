"""Dataset builders (``random``, ``sharegpt``, ``agentic``) with vLLM ``bench serve``'s option names.

Lifecycle: ``build_workload(options, seed)`` once per sweep point returns a frozen ``Workload``;
the same options and seed always give the same requests. The runner passes ``seed + point index``
so that points of a sweep send different prompts of the same length distribution (the server's
prefix cache does not turn later points into cache hits of earlier ones).

- ``random``: ``num_prompts`` single-turn prompts of ``random_prefix_len`` shared words plus an
  input length drawn uniformly from ``[L(1-r), L(1+r)]`` words (``--random-input-len`` L,
  ``--random-range-ratio`` r), output cap likewise from ``--random-output-len``. Words of a common
  English list are about a token each for a real tokenizer; the client does not tokenize, so the
  requested lengths are recorded (``prompt_len``) and the usage gives the served ones.
- ``sharegpt``: a ShareGPT JSON file (``[{"conversations": [{"from": "human"|"gpt", "value"}]}]``),
  the first human turn as the prompt and the gpt answer after it as the output cap (its word count
  × ``TOKENS_PER_WORD``, or ``--sharegpt-output-len``); entries shuffled with the seed; prompts or
  answers under 4 words, prompts over 1024 words or pairs over 2048 are skipped (vLLM's filter).
- ``agentic``: see ``agentic``.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k2serve.loadtest.agentic import agentic_sessions
from k2serve.loadtest.bench_request import BenchRequest
from k2serve.loadtest.conversation import Workload
from k2serve.loadtest.prompt_words import WordSource

DATASETS = ("random", "sharegpt", "agentic")
TOKENS_PER_WORD = 1.3  # English text in a BPE vocabulary of ~160k entries
MIN_WORDS, MAX_PROMPT_WORDS, MAX_TOTAL_WORDS = 4, 1024, 2048
HUMAN, GPT = ("human", "user"), ("gpt", "assistant", "chatgpt", "bard")


@dataclass(frozen=True)
class DatasetOptions:
    name: str = "random"
    num_prompts: int = 1000
    path: Path | None = None
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    random_prefix_len: int = 0
    sharegpt_output_len: int | None = None
    agentic_sessions: int = 8
    agentic_rounds: int = 4
    agentic_tool_result_len: int = 128
    agentic_system_len: int = 512
    agentic_num_tools: int = 4
    agentic_output_len: int = 128


def build_workload(options: DatasetOptions, seed: int) -> Workload:
    if options.name == "random":
        return Workload("random", requests=random_requests(options, seed))
    if options.name == "sharegpt":
        if options.path is None:
            raise ValueError("--dataset-name sharegpt needs --dataset-path (a ShareGPT JSON file)")
        return Workload("sharegpt", requests=sharegpt_requests(options.path, options, seed))
    if options.name == "agentic":
        sessions = agentic_sessions(
            num_sessions=options.agentic_sessions,
            num_rounds=options.agentic_rounds,
            tool_result_len=options.agentic_tool_result_len,
            system_len=options.agentic_system_len,
            num_tools=options.agentic_num_tools,
            output_len=options.agentic_output_len,
            seed=seed,
        )
        return Workload("agentic", sessions=sessions)
    raise ValueError(f"unknown dataset {options.name!r} (one of {', '.join(DATASETS)})")


def length_range(length: int, ratio: float) -> tuple[int, int]:
    """vLLM's ``--random-range-ratio``: lengths uniform in [floor(L(1-r)), ceil(L(1+r))], at least 1."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {ratio}")
    return max(1, math.floor(length * (1 - ratio))), max(1, math.ceil(length * (1 + ratio)))


def random_requests(options: DatasetOptions, seed: int) -> tuple[BenchRequest, ...]:
    words = WordSource(seed)
    prefix = words.words(options.random_prefix_len)
    in_low, in_high = length_range(options.random_input_len, options.random_range_ratio)
    out_low, out_high = length_range(options.random_output_len, options.random_range_ratio)
    requests: list[BenchRequest] = []
    for _ in range(options.num_prompts):
        input_len, output_len = words.randint(in_low, in_high), words.randint(out_low, out_high)
        text = f"{prefix} {words.words(input_len)}".strip()
        requests.append(
            BenchRequest(
                messages=({"role": "user", "content": text},),
                max_tokens=output_len,
                prompt_len=options.random_prefix_len + input_len,
            )
        )
    return tuple(requests)


def sharegpt_pairs(path: Path) -> list[tuple[str, str]]:
    """(first human turn, the gpt answer after it) of every entry that has both."""
    data: Any = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of {{'conversations': [...]}}")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            continue
        roles = [str(t.get("from", "")).lower() if isinstance(t, dict) else "" for t in turns]
        first = next((i for i, role in enumerate(roles) if role in HUMAN), None)
        if first is None or first + 1 >= len(turns) or roles[first + 1] not in GPT:
            continue
        pairs.append((str(turns[first].get("value", "")), str(turns[first + 1].get("value", ""))))
    return pairs


def sharegpt_requests(path: Path, options: DatasetOptions, seed: int) -> tuple[BenchRequest, ...]:
    pairs = sharegpt_pairs(path)
    random.Random(seed).shuffle(pairs)
    requests: list[BenchRequest] = []
    for prompt, answer in pairs:
        if len(requests) == options.num_prompts:
            break
        prompt_words, answer_words = len(prompt.split()), len(answer.split())
        output_len = options.sharegpt_output_len or max(1, round(answer_words * TOKENS_PER_WORD))
        too_short = prompt_words < MIN_WORDS or (options.sharegpt_output_len is None and answer_words < MIN_WORDS)
        total = prompt_words + (options.sharegpt_output_len or answer_words)
        if too_short or prompt_words > MAX_PROMPT_WORDS or total > MAX_TOTAL_WORDS:
            continue
        requests.append(
            BenchRequest(
                messages=({"role": "user", "content": prompt},), max_tokens=output_len, prompt_len=prompt_words
            )
        )
    if not requests:
        raise ValueError(f"{path}: no conversation passed the length filter")
    return tuple(requests)
