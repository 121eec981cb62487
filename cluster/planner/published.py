"""``PUBLISHED``: deployments whose throughput their authors published, and the planner's prediction of each.

Lifecycle: ``k2serve plan --validate`` and tests/test_planner_published.py call ``compare(d)`` for
every entry; nothing here is fitted to these figures (the efficiencies are the defaults of
``hardware.Efficiency``). Setups and figures: ../shared/reference/anchors.md §3 and
performance.md §8 (A1-A4), from the sources named in each entry.

Each figure is per node of the role that produced it (8 GPUs), as the authors normalized it. A
figure whose setting differs from what the roofline models carries ``explained``: the reason, and
the planner reports the factor the published number implies instead of claiming a match.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2serve.cluster.planner.hardware import Efficiency, Hardware, hardware_preset
from k2serve.cluster.planner.model_spec import ModelSpec, model_preset
from k2serve.cluster.planner.roofline import RankLayout, decode_step, max_decode_batch, prefill_rate

TOLERANCE = 0.25


@dataclass(frozen=True)
class PublishedFigure:
    name: str  # e.g. "prefill input tok/s per node"
    value: float
    phase: str  # prefill | decode
    layout: RankLayout
    prompt_len: float = 2000.0
    cached_len: float = 0.0  # prefill: prompt tokens served from a cache (not computed)
    context: float = 2000.0  # decode: mean context
    batch: int | None = None  # decode: sequences per GPU when published
    itl_s: float | None = None  # decode: else the batch whose ITL matches this (published per-user speed)
    counts_cached: bool = False  # prefill: the figure counts cache-hit tokens as throughput
    explained: str | None = None  # the setting differs from the model's: why


@dataclass(frozen=True)
class PublishedDeployment:
    key: str
    title: str
    source: str
    model: ModelSpec
    hardware: Hardware
    figures: tuple[PublishedFigure, ...]


@dataclass(frozen=True)
class Comparison:
    deployment: str
    figure: str
    published: float
    predicted: float
    detail: str  # batch, binding resource
    explained: str | None

    @property
    def ratio(self) -> float:
        return self.predicted / self.published

    @property
    def within(self) -> bool:
        return abs(self.ratio - 1.0) <= TOLERANCE


def _predict(d: PublishedDeployment, f: PublishedFigure, eff: Efficiency) -> tuple[float, str]:
    gpn = d.hardware.gpus_per_node
    if f.phase == "prefill":
        est = prefill_rate(d.model, d.hardware, eff, f.layout, f.prompt_len, f.cached_len)
        per_node = est.tokens_per_s * gpn
        if f.counts_cached:
            per_node *= f.prompt_len / (f.prompt_len - f.cached_len)
        return per_node, f"EP{f.layout.ep_size}, {est.t_token * 1e6:.0f} us/token, bound by {est.binding}"
    if f.batch is not None:
        dec = decode_step(d.model, d.hardware, eff, f.layout, f.batch, f.context)
    else:
        assert f.itl_s is not None
        found = max_decode_batch(d.model, d.hardware, eff, f.layout, f.context, f.itl_s)
        if found is None:
            return 0.0, "no batch meets the ITL"
        dec = found
    detail = f"EP{f.layout.ep_size}, batch {dec.batch}/GPU, step {dec.step_s * 1000:.0f} ms, bound by {dec.binding}"
    return dec.tokens_per_s * gpn, detail


def compare(d: PublishedDeployment, eff: Efficiency | None = None) -> list[Comparison]:
    eff = eff or Efficiency()
    out = []
    for f in d.figures:
        predicted, detail = _predict(d, f, eff)
        out.append(Comparison(d.key, f.name, f.value, predicted, detail, f.explained))
    return out


_DS_PROMPT = 4384.0  # DeepSeek: mean KV length 4,989 in decode and 168B output per 608B input tokens
# give a mean prompt p with p + 0.276 p / 2 = 4,989 (the KV grows by half the output on average)
_DS_HIT = 0.563  # of input tokens served from the on-disk KV cache

PUBLISHED: tuple[PublishedDeployment, ...] = (
    PublishedDeployment(
        "deepseek-h800",
        "DeepSeek-V3/R1 online service on H800 (prefill EP32 x 4 nodes, decode EP144 x 18 nodes)",
        "deepseek-ai/open-infra-index 202502OpenSourceWeek day_6 (A1); profile data via lmsys 2025-05-05 (A2)",
        model_preset("deepseek-v3"),
        hardware_preset("h800"),
        (
            PublishedFigure(
                "decode output tok/s per node (24-h production average)",
                14_800,
                "decode",
                RankLayout(144, 32, draft_tokens=1, acceptance=0.85),  # MTP: one draft, 80-90 % accepted
                context=4989,
                itl_s=1 / 21,  # 20-22 tok/s per user
            ),
            PublishedFigure(
                "decode output tok/s per node (profile: batch 128 tokens, KV 4,096)",
                18_598,
                "decode",
                RankLayout(128, 0, draft_tokens=1, acceptance=0.85),
                context=4096,
                batch=64,  # 128 tokens per GPU = 64 sequences x (1 + 1 MTP token)
            ),
            PublishedFigure(
                "prefill input tok/s per node (profile: 16,384 tokens/GPU, 4k prompts)",
                62_713,
                "prefill",
                RankLayout(32, 32),
                prompt_len=4096,
            ),
            PublishedFigure(
                "prefill input tok/s per node incl. cache hits (24-h production average)",
                73_700,
                "prefill",
                RankLayout(32, 32),
                prompt_len=_DS_PROMPT,
                cached_len=_DS_PROMPT * _DS_HIT,
                counts_cached=True,
                explained=(
                    "a 24-hour production average, not capacity: DeepSeek's own profile of the same prefill "
                    "setup gives 62,713 computed tok/s per node (modelled above), while the service computed "
                    "32.2k per node on average (73.7k with 56.3 % cache hits); the ratio is the average load "
                    "of the prefill nodes over the day"
                ),
            ),
        ),
    ),
    PublishedDeployment(
        "sglang-96xh100",
        "SGLang, DeepSeek-V3 on 96 H100 (prefill EP32 x 4 nodes, decode EP72 x 9 nodes), 2,000-token inputs",
        "lmsys.org/blog/2025-05-05-large-scale-ep (A3)",
        model_preset("deepseek-v3"),
        hardware_preset("h100"),
        (
            PublishedFigure(
                "prefill input tok/s per node (2k prompts)", 54_543, "prefill", RankLayout(32, 32), prompt_len=2000
            ),
            PublishedFigure(
                "decode output tok/s per node (batch 256/GPU, 2k input)",
                22_282,
                "decode",
                RankLayout(72, 32),
                context=2050,
                batch=256,
            ),
        ),
    ),
    PublishedDeployment(
        "mooncake-k2-128xh200",
        "SGLang + Mooncake, Kimi K2 (FP8) on 128 H200: 4 prefill nodes (EP32), 12 decode nodes (EP96, 96 redundant)",
        "lmsys.org/blog/2025-07-20-k2-large-scale-ep; Mooncake README: 224k prefill (4 P nodes), 288k decode (12 D nodes)",
        model_preset("kimi-k2-instruct"),
        hardware_preset("h200"),
        (
            PublishedFigure(
                "prefill input tok/s per prefill node (2,000 in)", 56_000, "prefill", RankLayout(32, 0), prompt_len=2000
            ),
            PublishedFigure(
                "decode output tok/s per decode node (batch 480, 2,000 in / 100 out)",
                24_000,
                "decode",
                RankLayout(96, 96),
                context=2050,
                batch=480,
            ),
        ),
    ),
)


def published(key: str) -> PublishedDeployment:
    for d in PUBLISHED:
        if d.key == key:
            return d
    raise ValueError(f"deployment: unknown {key!r}; known: {', '.join(d.key for d in PUBLISHED)}")
