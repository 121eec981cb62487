"""``ModelSpec``: the byte and FLOP accounting of one DeepSeek-V3-architecture model (Kimi K2 and kin).

Lifecycle: built once, from a preset (``MODEL_PRESETS``: Kimi K2 Thinking with INT4 experts, Kimi K2
Instruct and DeepSeek-V3 in FP8) or from a checkpoint's ``ModelConfig`` (``from_model_config``), and
then only read by the roofline. Every figure is derived from the config's dimensions and the
weight formats; nothing is a stored total. The arithmetic follows ../shared/reference/performance.md
§1-§2 (K2 Thinking: 1,026.4 B parameters, 594.2 GB, 24.77 MB per routed expert, 21.10 GB read per
decode step, 70,272 B of KV per token), which the tests check.

Weight formats are bytes per parameter: bf16 = 2; INT4 group 32 with a bf16 scale = 0.5 + 2/32;
FP8 with one fp32 scale per 128 x 128 block = 1 + 4/16384.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2serve.workers.config import ModelConfig

BF16 = 2.0
INT4_G32 = 0.5 + 2.0 / 32  # 4.5 bits: packed nibbles + one bf16 scale per 32 weights
FP8_BLOCK128 = 1.0 + 4.0 / (128 * 128)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    num_experts: int
    top_k: int
    num_shared_experts: int
    moe_intermediate_size: int
    dense_intermediate_size: int
    first_k_dense: int
    vocab_size: int
    expert_bytes_per_param: float = INT4_G32  # routed experts
    dense_bytes_per_param: float = BF16  # attention, dense MLP, shared experts
    kv_bytes_per_value: float = BF16  # the latent cache (bf16; 1 for raw fp8)
    weights_fp8: bool = False  # the linear layers run as FP8 GEMMs (FP8 checkpoints)
    max_context: int = 262_144  # max_position_embeddings: the longest request the model serves

    # ---- parameters ---------------------------------------------------------------------------------

    @property
    def moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    @property
    def attention_params(self) -> int:
        """One layer's MLA weights and norms (101.14 M for K2)."""
        h, heads = self.hidden_size, self.num_heads
        q = h * self.q_lora_rank + self.q_lora_rank * heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)  # fmt: skip
        o = heads * self.v_head_dim * h
        norms = self.q_lora_rank + self.kv_lora_rank + 2 * h
        return q + kv + o + norms

    @property
    def expert_params(self) -> int:
        """One routed expert: gate, up and down projections (44.04 M for K2)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.dense_intermediate_size

    @property
    def shared_params(self) -> int:
        """Shared experts of one MoE layer."""
        return self.num_shared_experts * self.expert_params

    @property
    def gate_params(self) -> int:
        return self.num_experts * self.hidden_size

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size  # the embedding; the lm_head has as many

    @property
    def total_params(self) -> int:
        dense = self.num_layers * self.attention_params + self.first_k_dense * self.dense_mlp_params
        moe = self.moe_layers * (self.shared_params + self.gate_params + self.num_experts * self.expert_params)
        return dense + moe + 2 * self.embedding_params

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies (31.69 B for K2): lm_head, not the embedding lookup."""
        dense = self.num_layers * self.attention_params + self.first_k_dense * self.dense_mlp_params
        moe = self.moe_layers * (self.shared_params + self.gate_params + self.top_k * self.expert_params)
        return dense + moe + self.embedding_params

    # ---- bytes --------------------------------------------------------------------------------------

    @property
    def expert_bytes(self) -> float:
        """One routed expert in its stored format (24.77 MB for K2 INT4)."""
        return self.expert_params * self.expert_bytes_per_param

    @property
    def replicated_read_bytes(self) -> float:
        """What every data-parallel attention rank reads per decode step besides its experts (21.10 GB
        for K2 Thinking): attention, dense MLP, shared experts, gates (bf16) and the lm_head (bf16)."""
        dense = (
            self.num_layers * self.attention_params
            + self.first_k_dense * self.dense_mlp_params
            + self.moe_layers * self.shared_params
        )
        return dense * self.dense_bytes_per_param + (self.moe_layers * self.gate_params + self.embedding_params) * BF16

    @property
    def replicated_bytes(self) -> float:
        """What every rank holds besides its experts (23.44 GB for K2 Thinking): the read set + the embedding."""
        return self.replicated_read_bytes + self.embedding_params * BF16

    @property
    def routed_bytes(self) -> float:
        return self.moe_layers * self.num_experts * self.expert_bytes

    @property
    def checkpoint_bytes(self) -> float:
        return self.replicated_bytes + self.routed_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        """The MLA latent + RoPE key of every layer (70,272 B for K2 in bf16)."""
        return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * self.kv_bytes_per_value

    # ---- FLOPs --------------------------------------------------------------------------------------

    @property
    def linear_flops_per_token(self) -> float:
        """Decode: 2 x active parameters (63.4 GFLOP for K2)."""
        return 2.0 * self.active_params

    @property
    def prefill_linear_flops_per_token(self) -> float:
        """Prefill: the lm_head runs for the last token only (61.03 GFLOP for K2)."""
        return 2.0 * (self.active_params - self.embedding_params)

    @property
    def decode_attention_flops_per_context_token(self) -> float:
        """Absorbed MLA, one query token against one cached token, all layers (8.50 MFLOP for K2)."""
        latent = self.kv_lora_rank + self.qk_rope_head_dim
        return 2.0 * self.num_heads * (latent + self.kv_lora_rank) * self.num_layers

    def prefill_attention_flops_per_token(self, prompt_len: float, cached_len: float = 0.0) -> float:
        """MLA in its expanded form, causal: a computed token attends to the cached prefix and, on
        average, half of the computed part (1.2493 MFLOP x L for K2 without a cache hit)."""
        context = cached_len + (prompt_len - cached_len) / 2.0
        width = self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim
        return 2.0 * self.num_heads * width * context * self.num_layers

    # ---- all-to-all ---------------------------------------------------------------------------------

    def dispatch_bytes_per_pair(self, fp8: bool) -> float:
        """One token to one expert: fp8 values + one fp32 scale per 128 (7,392 B), or bf16 (14,336 B)."""
        return self.hidden_size * (1.0 + 4.0 / 128) if fp8 else self.hidden_size * BF16

    @property
    def combine_bytes_per_pair(self) -> float:
        return self.hidden_size * BF16


def _spec(name: str, config: dict[str, int], **formats: float | bool) -> ModelSpec:
    return ModelSpec(name=name, **config, **formats)  # type: ignore[arg-type]


_K2 = {
    "num_layers": 61,
    "hidden_size": 7168,
    "num_heads": 64,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "num_experts": 384,
    "top_k": 8,
    "num_shared_experts": 1,
    "moe_intermediate_size": 2048,
    "dense_intermediate_size": 18432,
    "first_k_dense": 1,
    "vocab_size": 163840,
}
_DEEPSEEK_V3 = {
    **_K2,
    "num_heads": 128,
    "num_experts": 256,
    "first_k_dense": 3,
    "vocab_size": 129280,
    "max_context": 163_840,
}

# config.json of each (public copies; performance.md "Method"): K2 differs from DeepSeek-V3 in heads
# (64 vs 128), experts (384 vs 256), dense layers (1 vs 3) and vocabulary.
MODEL_PRESETS: dict[str, ModelSpec] = {
    "kimi-k2-thinking": _spec("kimi-k2-thinking", _K2),  # INT4 W4A16 routed experts, bf16 elsewhere
    "kimi-k2-instruct": _spec(
        "kimi-k2-instruct",
        _K2,
        expert_bytes_per_param=FP8_BLOCK128,
        dense_bytes_per_param=FP8_BLOCK128,
        weights_fp8=True,
    ),
    "deepseek-v3": _spec(
        "deepseek-v3",
        _DEEPSEEK_V3,
        expert_bytes_per_param=FP8_BLOCK128,
        dense_bytes_per_param=FP8_BLOCK128,
        weights_fp8=True,
    ),
}


def model_preset(name: str) -> ModelSpec:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(f"model: unknown preset {name!r}; presets: {', '.join(MODEL_PRESETS)}") from None


def from_model_config(config: ModelConfig, name: str = "checkpoint") -> ModelSpec:
    """The spec of a checkpoint folder's config.json: INT4 experts when its quantization config says
    pack-quantized, else bf16 (FP8 checkpoints: pass a preset)."""
    quantized = config.quantization is not None
    return ModelSpec(
        name=name,
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        q_lora_rank=config.q_lora_rank or config.hidden_size,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        num_experts=config.n_routed_experts,
        top_k=config.num_experts_per_tok,
        num_shared_experts=config.n_shared_experts,
        moe_intermediate_size=config.moe_intermediate_size,
        dense_intermediate_size=config.intermediate_size,
        first_k_dense=config.first_k_dense_replace,
        vocab_size=config.vocab_size,
        expert_bytes_per_param=INT4_G32 if quantized else BF16,
        max_context=config.max_position_embeddings,
    )
