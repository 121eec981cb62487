"""``k2serve make-tiny-model``: a random model of the Kimi K2 architecture in the real layout.

Lifecycle: build the preset's ``ModelConfig`` -> train a byte-level BPE on the built-in corpus ->
write everything into a temporary sibling folder -> rename it into place, so a reader never sees
a half-written model. The folder holds exactly what a Kimi K2 Thinking download holds that a
server reads: ``config.json`` (with the real ``quantization_config``), sharded safetensors with
``model.safetensors.index.json`` (routed experts INT4 pack-quantized, the rest bf16),
``generation_config.json``, ``tiktoken.model``, ``tokenizer_config.json`` and
``chat_template.jinja``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from k2serve.router.bpe_trainer import BUILTIN_CORPUS, train_byte_bpe, write_tokenizer_files
from k2serve.router.chat_template import shipped_template_text
from k2serve.tiny_presets import PRESETS, preset_config
from k2serve.workers.checkpoint_writer import write_random_checkpoint
from k2serve.workers.config import ModelConfig


def make_tiny_model(out: str | Path, *, preset: str = "tiny", seed: int = 0, force: bool = False) -> Path:
    """Write the model folder ``out`` and return its path. Refuses a non-empty folder unless ``force``."""
    target = Path(out).resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise FileExistsError(f"{target} is not empty; pass --force to overwrite it")
    config = preset_config(preset)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_model(staging, config, preset=preset, seed=seed)
        staging.chmod(0o755)  # mkdtemp creates 0700; a model folder is meant to be shared
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _write_model(folder: Path, config: ModelConfig, *, preset: str, seed: int) -> None:
    ranks = train_byte_bpe(BUILTIN_CORPUS, PRESETS[preset].num_base_tokens)
    write_tokenizer_files(folder, ranks)
    write_random_checkpoint(config, folder, seed=seed)
    _write_json(folder / "config.json", config.to_dict())
    eos = config.eos_token_id[0] if len(config.eos_token_id) == 1 else list(config.eos_token_id)
    _write_json(folder / "generation_config.json", {"max_length": config.max_position_embeddings, "eos_token_id": eos})
    (folder / "chat_template.jinja").write_text(shipped_template_text(), encoding="utf-8")


def _write_json(path: Path, payload: dict[str, object]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
