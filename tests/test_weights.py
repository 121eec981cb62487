"""Random checkpoint writer -> loader: layout, naming contract, expert subsets, packed mode, errors."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from k2serve.tiny_presets import preset_config
from k2serve.workers.checkpoint_layout import expected_tensors
from k2serve.workers.checkpoint_writer import write_random_checkpoint
from k2serve.workers.config import ModelConfig
from k2serve.workers.int4 import dequantize_int4
from k2serve.workers.weights import CheckpointError, load_weights

INDEX = "model.safetensors.index.json"
SHARD_BYTES = 64 * 1024  # forces the tiny model (~0.5 MB) into several shards


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return preset_config("tiny")


@pytest.fixture(scope="module")
def ckpt(config: ModelConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    write_random_checkpoint(config, folder, seed=0, max_shard_bytes=SHARD_BYTES)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return folder


@pytest.fixture
def fresh_ckpt(config: ModelConfig, tmp_path: Path) -> Path:
    """A private copy to corrupt."""
    write_random_checkpoint(config, tmp_path, seed=0, max_shard_bytes=SHARD_BYTES)
    return tmp_path


def _stored(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard, read straight from the files."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / INDEX).read_text())["weight_map"]


def _replace_tensor(folder: Path, name: str, tensor: torch.Tensor | None) -> None:
    """Rewrite the shard holding ``name`` with ``tensor`` in its place (None: drop it)."""
    shard = folder / _weight_map(folder)[name]
    tensors = load_file(shard)
    if tensor is None:
        del tensors[name]
    else:
        tensors[name] = tensor
    save_file(tensors, shard, metadata={"format": "pt"})


# ---- writer: layout ----------------------------------------------------------------------------


def test_written_index_covers_every_tensor_with_the_right_total_size(ckpt: Path) -> None:
    index = json.loads((ckpt / INDEX).read_text())
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert len(shards) > 1
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    in_files: dict[str, str] = {}
    for shard in shards:
        with safe_open(str(ckpt / shard), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            in_files.update(dict.fromkeys(handle.keys(), shard))
    assert index["weight_map"] == in_files
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in _stored(ckpt).values())


def test_writer_produces_exactly_the_tensors_the_config_implies(ckpt: Path, config: ModelConfig) -> None:
    stored = _stored(ckpt)
    specs = expected_tensors(config)
    assert set(stored) == {s.name for s in specs}
    for spec in specs:
        assert tuple(stored[spec.name].shape) == spec.shape, spec.name
        assert stored[spec.name].dtype == spec.dtype, spec.name


def test_writer_uses_the_real_storage_dtypes(ckpt: Path) -> None:
    stored = _stored(ckpt)
    expert = "model.layers.1.mlp.experts.3.down_proj"
    assert stored[f"{expert}.weight_packed"].dtype == torch.int32
    assert stored[f"{expert}.weight_packed"].shape == (64, 4)  # [H, I/8]
    assert stored[f"{expert}.weight_scale"].dtype == torch.bfloat16
    assert stored[f"{expert}.weight_scale"].shape == (64, 1)  # [H, I/32]
    assert stored[f"{expert}.weight_shape"].dtype == torch.int64
    assert stored[f"{expert}.weight_shape"].tolist() == [64, 32]
    assert f"{expert}.weight" not in stored
    assert stored["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.bfloat16
    assert stored["model.layers.1.mlp.shared_experts.up_proj.weight"].dtype == torch.bfloat16
    assert stored["model.layers.0.mlp.gate_proj.weight"].dtype == torch.bfloat16
    bias = stored["model.layers.2.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32
    assert bool((bias.abs() >= 0.05).all()) and bool((bias.abs() <= 0.1).all())
    assert bool((bias > 0).any()) and bool((bias < 0).any())


def test_same_seed_same_tensors_different_seed_different(config: ModelConfig, ckpt: Path, tmp_path: Path) -> None:
    write_random_checkpoint(config, tmp_path / "again", seed=0, max_shard_bytes=SHARD_BYTES)
    write_random_checkpoint(config, tmp_path / "resharded", seed=0)  # default sharding
    write_random_checkpoint(config, tmp_path / "other", seed=1, max_shard_bytes=SHARD_BYTES)
    reference = _stored(ckpt)
    for folder in ("again", "resharded"):
        again = _stored(tmp_path / folder)
        assert set(again) == set(reference)
        assert all(torch.equal(again[k], reference[k]) for k in reference)
    assert (tmp_path / "again" / INDEX).read_bytes() == (ckpt / INDEX).read_bytes()
    other = _stored(tmp_path / "other")
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.experts.0.gate_proj.weight_packed"):
        assert not torch.equal(other[name], reference[name])


def test_writer_refuses_a_folder_with_a_checkpoint(config: ModelConfig, ckpt: Path) -> None:
    with pytest.raises(FileExistsError):
        write_random_checkpoint(config, ckpt, seed=0)


# ---- loader: naming contract -------------------------------------------------------------------


def test_round_trip_names_shapes_and_values(ckpt: Path, config: ModelConfig) -> None:
    weights = load_weights(ckpt, config)
    stored = _stored(ckpt)
    moe_layers = config.moe_layer_ids
    stacked = {f"model.layers.{L}.mlp.experts.{p}" for L in moe_layers for p in ("gate_up_proj", "down_proj")}
    plain = {n for n in stored if ".mlp.experts." not in n}
    assert set(weights) == plain | stacked
    for name in plain:
        assert torch.equal(weights[name], stored[name].float()), name
    num_experts, inter, hidden = config.n_routed_experts, config.moe_intermediate_size, config.hidden_size
    for layer in moe_layers:
        gate_up = weights[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = weights[f"model.layers.{layer}.mlp.experts.down_proj"]
        assert gate_up.shape == (num_experts, 2 * inter, hidden) and down.shape == (num_experts, hidden, inter)
        assert gate_up.dtype == down.dtype == torch.float32
        for e in range(num_experts):
            parts = (("gate_proj", gate_up[e, :inter]), ("up_proj", gate_up[e, inter:]), ("down_proj", down[e]))
            for proj, got in parts:
                m = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                want = dequantize_int4(
                    stored[f"{m}.weight_packed"],
                    stored[f"{m}.weight_scale"],
                    stored[f"{m}.weight_shape"],
                    torch.float32,
                )
                assert torch.equal(got, want), m


def test_bf16_load_keeps_stored_values_and_bias_stays_fp32(ckpt: Path, config: ModelConfig) -> None:
    weights = load_weights(ckpt, config, dtype=torch.bfloat16)
    stored = _stored(ckpt)
    assert torch.equal(
        weights["model.layers.0.self_attn.kv_b_proj.weight"], stored["model.layers.0.self_attn.kv_b_proj.weight"]
    )
    assert torch.equal(weights["lm_head.weight"], stored["lm_head.weight"])
    assert weights["model.layers.1.mlp.experts.down_proj"].dtype == torch.bfloat16
    bias = weights["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32
    assert torch.equal(bias, stored["model.layers.1.mlp.gate.e_score_correction_bias"])


def test_expert_subset_loads_only_those_experts_in_that_order(
    ckpt: Path, config: ModelConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from k2serve.workers.checkpoint_reader import CheckpointReader

    read: list[str] = []
    original = CheckpointReader.read

    def spy(self: CheckpointReader, name: str, expected_shape: tuple[int, ...]) -> torch.Tensor:
        read.append(name)
        return original(self, name, expected_shape)

    full = load_weights(ckpt, config)
    monkeypatch.setattr(CheckpointReader, "read", spy)
    subset = load_weights(ckpt, config, expert_ids=[5, 2])
    experts_read = {int(n.split(".")[5]) for n in read if ".mlp.experts." in n}
    assert experts_read == {5, 2}
    for layer in config.moe_layer_ids:
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            assert torch.equal(subset[name], full[name][[5, 2]])


def test_keep_packed_returns_int32_words_and_scales(ckpt: Path, config: ModelConfig) -> None:
    dense = load_weights(ckpt, config, expert_ids=[1, 6, 1])
    packed = load_weights(ckpt, config, expert_ids=[1, 6, 1], keep_packed=True, dtype=torch.float32)
    inter, hidden = config.moe_intermediate_size, config.hidden_size
    p = "model.layers.2.mlp.experts"
    assert f"{p}.gate_up_proj" not in packed
    expected = {
        f"{p}.gate_up_proj_packed": ((3, 2 * inter, hidden // 8), torch.int32),
        f"{p}.gate_up_proj_scale": ((3, 2 * inter, hidden // 32), torch.float32),
        f"{p}.down_proj_packed": ((3, hidden, inter // 8), torch.int32),
        f"{p}.down_proj_scale": ((3, hidden, inter // 32), torch.float32),
    }
    for name, (shape, dtype) in expected.items():
        assert (tuple(packed[name].shape), packed[name].dtype) == (shape, dtype), name
    gate_up = dequantize_int4(
        packed[f"{p}.gate_up_proj_packed"], packed[f"{p}.gate_up_proj_scale"], (2 * inter, hidden), torch.float32
    )
    down = dequantize_int4(
        packed[f"{p}.down_proj_packed"], packed[f"{p}.down_proj_scale"], (hidden, inter), torch.float32
    )
    assert torch.equal(gate_up, dense[f"{p}.gate_up_proj"])
    assert torch.equal(down, dense[f"{p}.down_proj"])


def test_unquantized_checkpoint_holds_plain_expert_weights(config: ModelConfig, tmp_path: Path) -> None:
    plain = dataclasses.replace(config, quantization=None)
    write_random_checkpoint(plain, tmp_path, seed=3)
    stored = _stored(tmp_path)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in stored
    assert not any(n.endswith("weight_packed") for n in stored)
    weights = load_weights(tmp_path, plain, keep_packed=True)  # nothing packed to keep: dense stacks
    gate_up = weights["model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(
        gate_up[0, : plain.moe_intermediate_size], stored["model.layers.1.mlp.experts.0.gate_proj.weight"].float()
    )
    assert torch.equal(
        gate_up[0, plain.moe_intermediate_size :], stored["model.layers.1.mlp.experts.0.up_proj.weight"].float()
    )


def test_no_q_lora_rank_uses_q_proj(config: ModelConfig, tmp_path: Path) -> None:
    no_lora = dataclasses.replace(config, q_lora_rank=None)
    write_random_checkpoint(no_lora, tmp_path, seed=0)
    weights = load_weights(tmp_path, no_lora)
    q_out = config.num_attention_heads * config.qk_head_dim
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (q_out, config.hidden_size)
    assert not any("q_a_proj" in n or "q_b_proj" in n or "q_a_layernorm" in n for n in weights)


def test_single_unindexed_safetensors_file(ckpt: Path, config: ModelConfig, tmp_path: Path) -> None:
    save_file(_stored(ckpt), tmp_path / "model.safetensors", metadata={"format": "pt"})
    single = load_weights(tmp_path, config)
    sharded = load_weights(ckpt, config)
    assert set(single) == set(sharded) and all(torch.equal(single[k], sharded[k]) for k in sharded)


def test_tolerated_variants_and_ignored_extras(
    fresh_ckpt: Path, config: ModelConfig, caplog: pytest.LogCaptureFixture
) -> None:
    shape_name = "model.layers.1.mlp.experts.0.up_proj.weight_shape"
    bias_name = "model.layers.2.mlp.gate.e_score_correction_bias"
    stored = _stored(fresh_ckpt)
    _replace_tensor(fresh_ckpt, shape_name, stored[shape_name].to(torch.int32))
    _replace_tensor(fresh_ckpt, bias_name, stored[bias_name].to(torch.bfloat16))
    mtp = "model.layers.3.mlp.gate.weight"  # an MTP layer the config does not use
    shard = fresh_ckpt / _weight_map(fresh_ckpt)["lm_head.weight"]
    tensors = load_file(shard)
    tensors[mtp] = torch.zeros(8, 64, dtype=torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((fresh_ckpt / INDEX).read_text())
    index["weight_map"][mtp] = shard.name
    (fresh_ckpt / INDEX).write_text(json.dumps(index))
    with caplog.at_level(logging.INFO, logger="k2serve.workers.weights"):
        weights = load_weights(fresh_ckpt, config, progress=True)
    assert mtp not in weights
    assert any(mtp in r.getMessage() for r in caplog.records)
    assert weights[bias_name].dtype == torch.float32


# ---- loader: errors ----------------------------------------------------------------------------


def _load_error(folder: Path, config: ModelConfig) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        load_weights(folder, config)
    return info.value


def test_missing_tensor_in_shard(fresh_ckpt: Path, config: ModelConfig) -> None:
    name = "model.layers.2.mlp.experts.7.down_proj.weight_scale"
    _replace_tensor(fresh_ckpt, name, None)
    err = _load_error(fresh_ckpt, config)
    assert err.tensor == name and name in str(err)
    assert err.expected == (64, 1) and "[64, 1]" in str(err)
    assert _weight_map(fresh_ckpt)[name] in str(err)


def test_missing_tensor_in_index(fresh_ckpt: Path, config: ModelConfig) -> None:
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    index = json.loads((fresh_ckpt / INDEX).read_text())
    del index["weight_map"][name]
    (fresh_ckpt / INDEX).write_text(json.dumps(index))
    err = _load_error(fresh_ckpt, config)
    assert err.tensor == name and INDEX in str(err) and "[128, 32]" in str(err)


def test_wrong_shape(fresh_ckpt: Path, config: ModelConfig) -> None:
    name = "model.layers.0.self_attn.o_proj.weight"
    _replace_tensor(fresh_ckpt, name, torch.zeros(64, 48, dtype=torch.bfloat16))
    err = _load_error(fresh_ckpt, config)
    assert (err.tensor, err.expected, err.found) == (name, (64, 64), (64, 48))


def test_packed_weight_must_be_int32(fresh_ckpt: Path, config: ModelConfig) -> None:
    name = "model.layers.1.mlp.experts.2.gate_proj.weight_packed"
    _replace_tensor(fresh_ckpt, name, _stored(fresh_ckpt)[name].to(torch.int64))
    err = _load_error(fresh_ckpt, config)
    assert err.tensor == name and err.found == torch.int64 and "int32" in str(err)


def test_weight_shape_must_agree_with_config(fresh_ckpt: Path, config: ModelConfig) -> None:
    name = "model.layers.2.mlp.experts.4.gate_proj.weight_shape"
    _replace_tensor(fresh_ckpt, name, torch.tensor([32, 60]))
    err = _load_error(fresh_ckpt, config)
    assert (err.tensor, err.expected, err.found) == (name, (32, 64), (32, 60))


def test_index_pointing_at_missing_shard(fresh_ckpt: Path, config: ModelConfig) -> None:
    shard = _weight_map(fresh_ckpt)["lm_head.weight"]
    (fresh_ckpt / shard).unlink()
    err = _load_error(fresh_ckpt, config)
    assert err.tensor is not None and _weight_map(fresh_ckpt)[err.tensor] == shard
    assert shard in str(err)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".pkl", ".ckpt"])
def test_pickle_files_are_refused(fresh_ckpt: Path, config: ModelConfig, suffix: str) -> None:
    (fresh_ckpt / f"pytorch_model{suffix}").write_bytes(b"\x80\x04.")
    err = _load_error(fresh_ckpt, config)
    assert f"pytorch_model{suffix}" in str(err) and "safetensors only" in str(err)


def test_folder_without_safetensors(tmp_path: Path, config: ModelConfig) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    err = _load_error(tmp_path, config)
    assert "no safetensors" in str(err)


# ---- layout of the real model (reference/kimi-k2.md §2) ----------------------------------------


def test_layout_of_kimi_k2_thinking_matches_the_reference_tables() -> None:
    from k2serve.workers.quantization_config import kimi_k2_quantization

    kimi = ModelConfig(
        vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=64, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8,
        quantization=kimi_k2_quantization(32),
    )  # fmt: skip
    specs = {s.name: s for s in expected_tensors(kimi, expert_ids=[0, 383])}
    shapes = {name: (spec.shape, spec.dtype) for name, spec in specs.items()}
    bf16, i32, i64 = torch.bfloat16, torch.int32, torch.int64
    assert shapes["model.embed_tokens.weight"] == ((163840, 7168), bf16)
    assert shapes["lm_head.weight"] == ((163840, 7168), bf16)
    assert shapes["model.layers.60.self_attn.q_b_proj.weight"] == ((12288, 1536), bf16)
    assert shapes["model.layers.60.self_attn.kv_a_proj_with_mqa.weight"] == ((576, 7168), bf16)
    assert shapes["model.layers.7.self_attn.kv_b_proj.weight"] == ((16384, 512), bf16)
    assert shapes["model.layers.7.self_attn.o_proj.weight"] == ((7168, 8192), bf16)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == ((7168, 18432), bf16)
    assert shapes["model.layers.1.mlp.gate.weight"] == ((384, 7168), bf16)
    assert shapes["model.layers.1.mlp.gate.e_score_correction_bias"] == ((384,), torch.float32)
    assert shapes["model.layers.1.mlp.shared_experts.gate_proj.weight"] == ((2048, 7168), bf16)
    expert = "model.layers.60.mlp.experts.383"
    assert shapes[f"{expert}.up_proj.weight_packed"] == ((2048, 896), i32)
    assert shapes[f"{expert}.up_proj.weight_scale"] == ((2048, 224), bf16)
    assert shapes[f"{expert}.up_proj.weight_shape"] == ((2,), i64)
    assert shapes[f"{expert}.down_proj.weight_packed"] == ((7168, 256), i32)
    assert shapes[f"{expert}.down_proj.weight_scale"] == ((7168, 64), bf16)
    assert specs[f"{expert}.down_proj.weight_shape"].logical_shape == (7168, 2048)
    assert not any(".layers.0.mlp.experts" in n or ".layers.61." in n for n in specs)
    assert sum(".layers.5.mlp.experts." in n for n in specs) == 2 * 3 * 3  # 3456 with all 384 experts
