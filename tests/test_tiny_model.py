"""``k2serve make-tiny-model`` and ``k2serve generate`` end to end, on a folder in the real layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_fixtures import build_hf_model

from k2serve.cli import main
from k2serve.router.chat_template import ChatTemplate
from k2serve.router.tokenizer import KimiTokenizer
from k2serve.tiny_model import make_tiny_model
from k2serve.workers.config import ModelConfig
from k2serve.workers.greedy import greedy_generate
from k2serve.workers.model_loader import load_model
from k2serve.workers.weights import load_weights

EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tiktoken.model",
    "tokenizer_config.json",
    "chat_template.jinja",
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", preset="tiny", seed=0)


def test_folder_has_the_real_layout(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    assert names >= EXPECTED_FILES
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    assert len(shards) > 1 and all(n.startswith("model-") and "-of-" in n for n in shards)
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert "model.layers.1.mlp.experts.0.gate_proj.weight_packed" in index["weight_map"]
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" not in index["weight_map"]
    raw = json.loads((tiny_dir / "config.json").read_text())
    assert raw["quantization_config"]["format"] == "pack-quantized"
    assert raw["quantization_config"]["ignore"][1:] == [
        "re:.*self_attn.*",
        "re:.*shared_experts.*",
        r"re:.*mlp\.(gate|up|gate_up|down)_proj.*",
    ]
    assert raw["rms_norm_eps"] == 1e-6 and raw["qk_rope_head_dim"] == 64


def test_config_tokenizer_and_generation_config_agree(tiny_dir: Path) -> None:
    config = ModelConfig.from_model_dir(tiny_dir)
    tokenizer = KimiTokenizer.from_model_dir(tiny_dir)
    assert tokenizer.vocab_size == config.vocab_size
    assert config.bos_token_id == tokenizer.token_to_id("[BOS]")
    assert config.eos_token_id == (tokenizer.token_to_id("<|im_end|>"),)
    assert config.pad_token_id == tokenizer.token_to_id("[PAD]")
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.token_to_id("<|im_end|>")


def test_same_seed_gives_the_same_model_and_another_seed_does_not(tmp_path: Path, tiny_dir: Path) -> None:
    config = ModelConfig.from_model_dir(tiny_dir)
    base = load_weights(tiny_dir, config, progress=False)
    same = load_weights(make_tiny_model(tmp_path / "same", seed=0), config, progress=False)
    other = load_weights(make_tiny_model(tmp_path / "other", seed=1), config, progress=False)
    assert all(torch.equal(base[k], same[k]) for k in base)
    assert not torch.equal(base["lm_head.weight"], other["lm_head.weight"])


def test_refuses_a_non_empty_folder_without_force(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        make_tiny_model(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_loaded_folder_matches_transformers_greedy(tiny_dir: Path) -> None:
    """The model loaded from the INT4 folder and HF's DeepseekV3 on the same (dequantized) weights."""
    pytest.importorskip("transformers")
    model = load_model(tiny_dir, max_positions=128)
    hf = build_hf_model(model.config, load_weights(tiny_dir, model.config, progress=False))
    tokenizer = KimiTokenizer.from_model_dir(tiny_dir)
    prompt = tokenizer.encode(ChatTemplate.from_model_dir(tiny_dir).render([{"role": "user", "content": "2+2?"}]))
    ours = greedy_generate(model, prompt, max_tokens=32)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
    assert ours == out[0, len(prompt) :].tolist()


def test_generate_command_prints_the_oracle_tokens(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", str(tiny_dir), "--prompt", "Hello", "--max-tokens", "8", "--show-ids"])
    model = load_model(tiny_dir, max_positions=128)
    tokenizer = KimiTokenizer.from_model_dir(tiny_dir)
    prompt = tokenizer.encode(ChatTemplate.from_model_dir(tiny_dir).render([{"role": "user", "content": "Hello"}]))
    expected = greedy_generate(model, prompt, max_tokens=8, stop_token_ids=tokenizer.stop_token_ids)
    assert code == 0
    out = capsys.readouterr().out
    assert f"token ids: {expected}" in out
    assert tokenizer.decode(expected) in out


def test_generate_command_reports_a_pickle_file_as_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_tiny_model(tmp_path / "m")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    code = main(["generate", str(folder), "--prompt", "Hi", "--max-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "pytorch_model.bin" in err and "safetensors" in err
    assert "Traceback" not in err
