"""The byte-level BPE trainer and the Kimi-shaped tokenizer files it writes."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import tiktoken

from k2serve.router.bpe_corpus import BUILTIN_CORPUS
from k2serve.router.bpe_trainer import CorpusTooSmallError, train_byte_bpe, write_tokenizer_files
from k2serve.router.kimi_vocab import PAT_STR, SPECIAL_TOKEN_LAYOUT


def _encoding(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    return tiktoken.Encoding("t", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})


@pytest.mark.parametrize("num_base_tokens", [512, 2048])  # the tiny and small presets
def test_trained_ranks_are_a_valid_tiktoken_bpe(num_base_tokens: int) -> None:
    ranks = train_byte_bpe(BUILTIN_CORPUS, num_base_tokens)
    assert sorted(ranks.values()) == list(range(num_base_tokens))
    assert all(ranks[bytes([b])] == b for b in range(256))
    encoding = _encoding(ranks)
    # Every learnt token is reachable by tiktoken's own merge rule: its bytes encode to itself.
    for token, rank in ranks.items():
        assert encoding._encode_single_piece(token) == [rank], token


def test_training_is_deterministic() -> None:
    first = train_byte_bpe(BUILTIN_CORPUS, 1024)
    second = train_byte_bpe(BUILTIN_CORPUS, 1024)
    assert list(first.items()) == list(second.items())
    # A smaller vocabulary is a prefix of a larger one: merges are learnt in one fixed order.
    smaller = train_byte_bpe(BUILTIN_CORPUS, 700)
    assert all(first[token] == rank for token, rank in smaller.items())


def test_merges_prefer_frequent_pairs() -> None:
    ranks = train_byte_bpe("ab ab ab ab cd cd xy", 258)
    by_rank = sorted(ranks, key=ranks.__getitem__)
    assert by_rank[256:] == [b"ab", b" ab"]


def test_too_small_corpus_or_vocabulary_is_rejected() -> None:
    with pytest.raises(CorpusTooSmallError, match="corpus yields only"):
        train_byte_bpe("tiny corpus", 400)
    with pytest.raises(ValueError, match=">= 256"):
        train_byte_bpe(BUILTIN_CORPUS, 255)


def test_written_files_are_kimi_shaped(tmp_path: Path) -> None:
    ranks = train_byte_bpe(BUILTIN_CORPUS, 512)
    write_tokenizer_files(tmp_path, ranks)
    lines = (tmp_path / "tiktoken.model").read_text().splitlines()
    assert len(lines) == 512
    assert lines[0] == f"{base64.b64encode(bytes([0])).decode()} 0"
    assert all(
        base64.b64decode(line.split()[0]) == token
        for line, token in zip(lines, sorted(ranks, key=ranks.get), strict=True)
    )

    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    assert sorted(map(int, decoder)) == list(range(512, 768))
    for spec in SPECIAL_TOKEN_LAYOUT:
        assert decoder[str(512 + spec.offset)]["content"] == spec.content
        assert decoder[str(512 + spec.offset)]["special"] is spec.special
    assert decoder["512"] == {
        "content": "[BOS]",
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    assert decoder["525"]["content"] == "<|tool_call_begin|>" and decoder["525"]["special"] is False
    assert decoder["517"]["content"] == "<|reserved_token_517|>"
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        "[BOS]",
        "<|im_end|>",
        "[PAD]",
        "[UNK]",
    )
    assert config["model_max_length"] == 262144
    assert config["tokenizer_class"] == "TikTokenTokenizer"
    assert config["auto_map"]["AutoTokenizer"][0] == "tokenization_kimi.TikTokenTokenizer"
    assert "<|im_middle|>" in config["additional_special_tokens"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_write_rejects_non_contiguous_ranks(tmp_path: Path) -> None:
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"ab"] = 300
    with pytest.raises(ValueError, match="ranks must be exactly"):
        write_tokenizer_files(tmp_path, ranks)
