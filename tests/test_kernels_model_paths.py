"""The tiny model gives the same greedy tokens whichever kernel path runs: dequantized expert stacks
(``expert_format="dense"``), packed INT4 through the torch reference of ``fused_moe_w4a16`` (what
``impl="auto"`` picks on CPU), and packed INT4 plus the attention kernels (``kv_cache_write``,
``mla_decode``) through Triton (under the interpreter on CPU, see conftest.py, or on the GPU)."""

from __future__ import annotations

import tempfile

import pytest
import torch
from model_fixtures import batched_greedy

from k2serve.kernels.dispatch import is_interpreted
from k2serve.kernels.moe_w4a16 import _moe_w4a16_gemm_kernel
from k2serve.workers.checkpoint_writer import write_random_checkpoint
from k2serve.workers.config import ModelConfig
from k2serve.workers.model.attention import MLAAttention
from k2serve.workers.model.experts import LocalExperts
from k2serve.workers.model.forward_batch import make_forward_batch
from k2serve.workers.model.kv_cache import allocate_kv_cache
from k2serve.workers.model.model import KimiK2ForCausalLM
from k2serve.workers.weights import load_weights


@pytest.fixture(scope="module")
def weights(tiny: ModelConfig) -> dict[str, dict[str, torch.Tensor]]:
    """The same random checkpoint loaded both ways."""
    with tempfile.TemporaryDirectory(prefix="k2-kernels-") as folder:
        write_random_checkpoint(tiny, folder, seed=0)
        return {
            fmt: load_weights(folder, tiny, dtype=torch.float32, keep_packed=fmt == "int4", progress=False)
            for fmt in ("dense", "int4")
        }


def _model(config: ModelConfig, state: dict[str, torch.Tensor], fmt: str, impl: str = "auto") -> KimiK2ForCausalLM:
    model = KimiK2ForCausalLM(config, dtype=torch.float32, device="cpu", max_positions=512, expert_format=fmt)  # type: ignore[arg-type]
    model.load_state_dict(state, strict=True)
    for module in model.modules():
        if isinstance(module, LocalExperts | MLAAttention):
            module.kernel_impl = impl  # type: ignore[assignment]
    return model.eval()


def _prompts(config: ModelConfig) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in (5, 1, 9)]


def test_int4_state_dict_names_are_the_packed_loader_names(tiny: ModelConfig, weights: dict) -> None:
    model = _model(tiny, weights["int4"], "int4")
    assert set(model.state_dict()) == set(weights["int4"])
    assert any(name.endswith("experts.gate_up_proj_packed") for name in weights["int4"])


def test_int4_reference_path_gives_the_dense_logits(tiny: ModelConfig, weights: dict) -> None:
    prompts = _prompts(tiny)
    logits = []
    for fmt in ("dense", "int4"):
        batch = make_forward_batch(prompts, block_size=4)
        cache = allocate_kv_cache(tiny, 16, 4, torch.float32, "cpu")
        logits.append(_model(tiny, weights[fmt], fmt)(batch, cache))
    assert torch.equal(logits[0], logits[1])  # same dequantized values, same op order


def test_greedy_tokens_are_the_same_on_every_expert_path(tiny: ModelConfig, weights: dict) -> None:
    if not is_interpreted(_moe_w4a16_gemm_kernel) and not torch.cuda.is_available():
        pytest.fail("the Triton path needs the interpreter or a GPU (tests/conftest.py)")
    prompts = _prompts(tiny)
    dense = batched_greedy(_model(tiny, weights["dense"], "dense"), prompts, 6)
    packed = batched_greedy(_model(tiny, weights["int4"], "int4"), prompts, 6)
    if is_interpreted(_moe_w4a16_gemm_kernel):
        triton_model = _model(tiny, weights["int4"], "int4", impl="triton")
    else:
        triton_model = _model(tiny, weights["int4"], "int4").cuda()
    assert dense == packed == batched_greedy(triton_model, prompts, 6)


def test_int4_format_needs_a_quantized_checkpoint(tiny: ModelConfig) -> None:
    import dataclasses

    unquantized = dataclasses.replace(tiny, quantization=None)
    with pytest.raises(ValueError, match="quantization_config"):
        KimiK2ForCausalLM(unquantized, dtype=torch.float32, device="cpu", max_positions=64, expert_format="int4")


def test_triton_attention_kernels_give_the_torch_decode_logits(tiny: ModelConfig, weights: dict) -> None:
    """The torch attention on CPU against the Triton attention kernels (interpreted on CPU, or on the GPU)."""
    prompts = _prompts(tiny)
    logits = []
    for impl in ("auto", "triton"):
        device = "cuda" if impl == "triton" and not is_interpreted(_moe_w4a16_gemm_kernel) else "cpu"
        model = _model(tiny, weights["dense"], "dense", impl=impl).to(device)
        cache = allocate_kv_cache(tiny, 16, 4, torch.float32, device)
        tables = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
        model(make_forward_batch(prompts, block_size=4, block_tables=tables, device=device), cache)
        step = make_forward_batch(
            [[7], [8], [9]], block_size=4, context_lens=[len(p) for p in prompts], block_tables=tables, device=device
        )
        logits.append(model(step, cache).cpu())
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-4
