"""The sampler: logits of the rows that need a token -> one token each (plus logprobs on request).

Lifecycle: the engine builds one ``SamplingState`` per running sequence at admission
(``SamplingState.create``) and keeps it with the request until the request finishes; it survives
preemption unchanged. Each step the engine calls ``Sampler.sample(logits, states)`` once, then
appends every sampled token to its state's ``output_token_ids`` (the penalties and ``min_tokens``
read it) and itself checks stop ids and ``max_tokens``: the sampler only masks stop ids while fewer
than ``min_tokens`` tokens exist. The ``Sampler`` itself holds no per-request state.

Per row, in order: stop ids -> ``-inf`` while ``len(output) < min_tokens``; repetition, presence
and frequency penalties; greedy rows (``temperature == 0``) take the argmax (ties -> lowest id),
bit-exact ``argmax(logits)`` when no penalty or mask applies; the others divide by the temperature,
apply top-k, softmax, top-p and min-p, and draw with their own ``torch.Generator``: one vector of
exponential noise ``E`` per row and ``argmax(probs / E)`` (the exponential race, an exact sample
from ``probs``). A request's tokens therefore depend only on its seed and its own history, never on
its batch mates or its row. A greedy row draws nothing.

Logprobs are those of the RAW model distribution, ``log_softmax(logits)`` before masking,
penalties and temperature (vLLM's default ``raw_logprobs``): what the model believed, not what the
filters let through. ``rank`` is vLLM's: the number of tokens with a logprob >= the sampled one's
(1 = the most likely; ties count against the token).

Shape legend: ``N`` rows of the call (one per state), ``V`` vocabulary size, ``R`` a subset of rows.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from k2serve.workers.logits_processors import (
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    mask_token_ids,
    token_counts,
)
from k2serve.workers.sampling_params import SamplingParams

MIN_TEMPERATURE = 1e-5  # smaller temperatures are clamped so logits / T stays finite
_SEED_SPACE = 2**64  # torch.Generator.manual_seed takes [0, 2**64)


class SamplingState:
    """What sampling needs to remember about one sequence between steps."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: tuple[int, ...],
        stop_ids_for_min_tokens: tuple[int, ...],
        seed: int,
    ) -> None:
        self.params = params
        self.prompt_token_ids = prompt_token_ids
        self.stop_ids_for_min_tokens = stop_ids_for_min_tokens
        self.seed = seed  # the effective seed: params.seed, or a fresh random one
        self.output_token_ids: list[int] = []  # append-only; the engine appends each sampled token
        self._generator: torch.Generator | None = None
        self._output_mirror = torch.empty(0, dtype=torch.int64)  # CPU copy of output ids, grown in place
        self._num_mirrored = 0
        self._prompt_ids: torch.Tensor | None = None
        self._reasoning_scanned = 0  # output tokens already checked for a reasoning end
        self._reasoning_ended = False

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        stop_ids_for_min_tokens: Sequence[int] = (),
    ) -> SamplingState:
        """A fresh state; unseeded requests get a random seed so that they differ from each other."""
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        return cls(params, tuple(prompt_token_ids), tuple(stop_ids_for_min_tokens), seed)

    @property
    def masks_stop_ids(self) -> bool:
        """Whether the stop ids are still masked (fewer than ``min_tokens`` generated)."""
        return bool(self.stop_ids_for_min_tokens) and len(self.output_token_ids) < self.params.min_tokens

    @property
    def forces_reasoning_end(self) -> bool:
        """Whether the next token must be ``</think>``: the reasoning budget is spent and the model has
        not ended its reasoning itself (the budget counts every output token before the end)."""
        budget = self.params.max_reasoning_tokens
        if budget is None or self._reasoning_ended:
            return False
        ends = self.params.reasoning_end_token_ids
        outputs = self.output_token_ids
        while self._reasoning_scanned < len(outputs):
            if outputs[self._reasoning_scanned] in ends:
                self._reasoning_ended = True
                return False
            self._reasoning_scanned += 1
        return len(outputs) >= budget

    def generator(self, device: torch.device) -> torch.Generator:
        """This sequence's own generator on ``device``, seeded on first use."""
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed % _SEED_SPACE)
        elif self._generator.device != device:
            raise ValueError(f"generator: this sequence samples on {self._generator.device}, not {device}")
        return self._generator

    def generator_state(self) -> bytes:
        """The generator's state after the draws so far (b"" if it never drew): a PD handoff carries it
        so the decode rank continues the seeded stream the prefill rank started."""
        if self._generator is None:
            return b""
        return bytes(self._generator.get_state().numpy().tobytes())

    def restore_generator(self, state: bytes, device: torch.device) -> None:
        """Continue from ``generator_state()`` of another rank (b"" = start from the seed)."""
        if not state:
            return
        generator = torch.Generator(device=device)
        generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        self._generator = generator

    def output_ids_tensor(self) -> torch.Tensor:
        """The output ids as a CPU int64 tensor ``[num_output_tokens]``; copies only the new ones."""
        n = len(self.output_token_ids)
        if n < self._num_mirrored:  # the list was replaced or truncated: start over
            self._num_mirrored = 0
        if n > self._output_mirror.numel():
            grown = torch.empty(max(2 * self._output_mirror.numel(), n, 64), dtype=torch.int64)
            grown[: self._num_mirrored] = self._output_mirror[: self._num_mirrored]
            self._output_mirror = grown
        if n > self._num_mirrored:
            new = self.output_token_ids[self._num_mirrored : n]
            self._output_mirror[self._num_mirrored : n] = torch.tensor(new, dtype=torch.int64)
            self._num_mirrored = n
        return self._output_mirror[:n]

    def prompt_ids_tensor(self) -> torch.Tensor:
        """The prompt ids as a CPU int64 tensor ``[num_prompt_tokens]`` (built once)."""
        if self._prompt_ids is None:
            self._prompt_ids = torch.tensor(self.prompt_token_ids, dtype=torch.int64)
        return self._prompt_ids


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs of one sampled token under the raw model distribution."""

    token_id: int
    logprob: float
    rank: int  # tokens with logprob >= this one's; 1 = the most likely
    top_token_ids: tuple[int, ...]  # the params.logprobs most likely ids, most likely first
    top_logprobs: tuple[float, ...]


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]  # [N]
    logprobs: list[TokenLogprobs | None] | None  # [N] when any row asked (None for the others), else None


class Sampler:
    """Stateless batched sampling over ``SamplingState`` rows."""

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
        # logits [N, V]
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits: expected [{len(states)}, V], got {list(logits.shape)}")
        if not states:
            return SamplerOutput([], None)
        logits = logits.float()
        wants_logprobs = any(s.params.logprobs is not None for s in states)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None  # [N, V]
        logits = self._mask_and_penalise(logits, states)
        drawn = [i for i, s in enumerate(states) if not s.params.is_greedy]
        if not drawn:
            tokens = logits.argmax(dim=-1)  # [N]; torch.argmax returns the first (lowest) maximal id
        elif len(drawn) == len(states):
            tokens = self._draw(logits, states)
        else:
            tokens = logits.argmax(dim=-1)
            index = _index(drawn, logits.device)
            tokens[index] = self._draw(logits[index], [states[i] for i in drawn])
        token_ids = tokens.tolist()
        logprobs = None if raw_logprobs is None else _logprobs(raw_logprobs, tokens, token_ids, states)
        return SamplerOutput(token_ids, logprobs)

    def _mask_and_penalise(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """``logits`` after min_tokens stop masking and penalties; untouched rows stay bit-exact."""
        device, vocab = logits.device, logits.shape[-1]
        masked = [(i, t) for i, s in enumerate(states) if s.masks_stop_ids for t in s.stop_ids_for_min_tokens]
        if masked:
            pairs = torch.tensor(masked, dtype=torch.int64, device=device)  # [T, 2]
            logits = mask_token_ids(logits, pairs[:, 0], pairs[:, 1])
        forced = [(i, s.params.reasoning_end_token_ids[0]) for i, s in enumerate(states) if s.forces_reasoning_end]
        if forced:  # only </think> stays possible: every sampling mode then picks it
            rows_t = torch.tensor([i for i, _ in forced], dtype=torch.int64, device=device)
            ids_t = torch.tensor([t for _, t in forced], dtype=torch.int64, device=device)
            kept = logits[rows_t, ids_t]
            logits = logits.clone()
            logits[rows_t] = float("-inf")
            logits[rows_t, ids_t] = torch.where(torch.isfinite(kept), kept, torch.zeros_like(kept))
        rows = [i for i, s in enumerate(states) if s.params.has_penalties]
        if not rows:
            return logits
        penalised = [states[i] for i in rows]
        counts = token_counts([s.output_ids_tensor() for s in penalised], vocab, device)  # [R, V]
        prompt_mask = None
        if any(s.params.repetition_penalty != 1.0 for s in penalised):
            prompt_mask = token_counts([s.prompt_ids_tensor() for s in penalised], vocab, device) > 0  # [R, V]
        values = torch.tensor(
            [[s.params.repetition_penalty, s.params.presence_penalty, s.params.frequency_penalty] for s in penalised],
            dtype=torch.float32,
            device=device,
        )  # [R, 3]
        index = _index(rows, device)
        out = logits.clone()
        out[index] = apply_penalties(logits[index], counts, prompt_mask, values[:, 0], values[:, 1], values[:, 2])
        return out

    def _draw(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """One token per row from the filtered distribution, each with its own generator."""
        # logits [R, V]
        device = logits.device
        params = [s.params for s in states]
        values = torch.tensor(
            [[max(p.temperature, MIN_TEMPERATURE), p.top_p, p.min_p, p.top_k] for p in params],
            dtype=torch.float32,
            device=device,
        )  # [R, 4]
        logits = logits / values[:, 0:1]
        vocab = logits.shape[-1]
        top_k = [p.top_k for p in params if 0 < p.top_k < vocab]
        if top_k:
            logits = apply_top_k(logits, values[:, 3].to(torch.int64), k_max=max(top_k))
        probs = torch.softmax(logits, dim=-1)  # [R, V]
        top_p_rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
        if top_p_rows:
            index = _index(top_p_rows, device)
            probs[index] = apply_top_p(probs[index], values[index, 1])
        if any(p.min_p > 0.0 for p in params):
            probs = apply_min_p(probs, values[:, 2])
        noise = torch.empty_like(probs)  # [R, V]
        for row, state in enumerate(states):
            noise[row].exponential_(generator=state.generator(device))
        # E may round to 0; a tiny floor keeps zero-probability tokens at 0 instead of NaN
        return (probs / noise.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(dim=-1)  # [R]


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _logprobs(
    raw_logprobs: torch.Tensor, tokens: torch.Tensor, token_ids: list[int], states: Sequence[SamplingState]
) -> list[TokenLogprobs | None]:
    """Per row that asked: the sampled token's raw logprob, its rank and the top alternatives."""
    # raw_logprobs [N, V]; tokens [N]
    rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    index = _index(rows, raw_logprobs.device)
    lp = raw_logprobs[index]  # [R, V]
    sampled = lp.gather(-1, tokens[index][:, None])  # [R, 1]
    ranks = (lp >= sampled).sum(dim=-1)  # [R]
    k_max = max(states[i].params.logprobs or 0 for i in rows)
    top = lp.topk(k_max, dim=-1) if k_max else None  # [R, k_max], most likely first
    sampled_list, rank_list = sampled[:, 0].tolist(), ranks.tolist()
    top_ids = top.indices.tolist() if top is not None else [[] for _ in rows]
    top_lps = top.values.tolist() if top is not None else [[] for _ in rows]
    out: list[TokenLogprobs | None] = [None] * len(states)
    for r, i in enumerate(rows):
        k = states[i].params.logprobs or 0
        out[i] = TokenLogprobs(
            token_ids[i], sampled_list[r], rank_list[r], tuple(top_ids[r][:k]), tuple(top_lps[r][:k])
        )
    return out
