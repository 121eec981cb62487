"""KimiTokenizer on a vocabulary trained by our BPE trainer and written to a temporary model folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from k2serve.router.bpe_corpus import BUILTIN_CORPUS
from k2serve.router.bpe_trainer import PRETOKENIZE, train_byte_bpe, write_tokenizer_files
from k2serve.router.kimi_vocab import (
    IM_END,
    NUM_RESERVED_SPECIAL_TOKENS,
    SPECIAL_TOKEN_LAYOUT,
    TOOL_CALL_BEGIN,
    TOOL_CALLS_SECTION_BEGIN,
    reserved_token_name,
)
from k2serve.router.tokenizer import KimiTokenizer, TokenIdError, UnknownTokenError
from k2serve.router.tokenizer_files import TokenizerFileError

NUM_BASE = 512  # the tiny preset


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tokenizer_files(path, train_byte_bpe(BUILTIN_CORPUS, NUM_BASE))
    return path


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> KimiTokenizer:
    return KimiTokenizer.from_model_dir(model_dir)


# -- random text -------------------------------------------------------------------------------

_ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    " \t\n\r  \u3000\x0b\x0c",
    ".,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`",
    "世界你好人工智能模型测试中文字",
    "こんにちはカタカナ한국어",
    "Привет мир αβγδ مرحبا नमस्ते",
    "\u0301\u0308\u0303\u0327\u200d\ufe0f",  # combining marks, ZWJ, variation selector
    "😀🎉🚀👍🏽👨‍👩‍👧🇫🇷❤",
    "\x00\x01\x07\x1b\x7f\u0085\u2028\u2029\ufeff\U0010fffd",
]


def _random_text(rng: random.Random, max_len: int = 40) -> str:
    chars = []
    for _ in range(rng.randrange(max_len)):
        chars.append(rng.choice(rng.choice(_ALPHABETS)))
    return "".join(chars)


def _kimi_split(s: str, max_run: int) -> list[str]:
    """tokenization_kimi.py's _split_whitespaces_or_nonwhitespaces, verbatim in behaviour: the oracle."""
    pieces, current_len, slice_start = [], 0, 0
    current_is_space = s[0].isspace() if s else False
    for i in range(len(s)):
        is_space = s[i].isspace()
        if current_is_space ^ is_space:
            current_len, current_is_space = 1, is_space
        else:
            current_len += 1
            if current_len > max_run:
                pieces.append(s[slice_start:i])
                slice_start, current_len = i, 1
    pieces.append(s[slice_start:])
    return pieces


# -- layout and special tokens -----------------------------------------------------------------


def test_vocab_layout_matches_kimi(tokenizer: KimiTokenizer) -> None:
    assert tokenizer.num_base_tokens == NUM_BASE
    assert tokenizer.vocab_size == NUM_BASE + NUM_RESERVED_SPECIAL_TOKENS == 768
    assert tokenizer.bos_id == tokenizer.token_to_id("[BOS]") == NUM_BASE
    assert tokenizer.eos_id == tokenizer.token_to_id("<|im_end|>") == NUM_BASE + 2
    assert tokenizer.pad_id == tokenizer.token_to_id("[PAD]") == NUM_BASE + 255
    assert tokenizer.stop_token_ids == (tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("[EOS]"))
    assert len(tokenizer.special_tokens) == NUM_RESERVED_SPECIAL_TOKENS


def test_every_special_token_maps_to_its_id_by_name_and_decodes_back(tokenizer: KimiTokenizer) -> None:
    for spec in SPECIAL_TOKEN_LAYOUT:
        token_id = NUM_BASE + spec.offset
        assert tokenizer.token_to_id(spec.content) == token_id
        assert tokenizer.encode(spec.content) == [token_id]
        assert tokenizer.decode([token_id]) == spec.content
        assert tokenizer.id_to_token(token_id) == spec.content
        assert tokenizer.is_special(token_id) is spec.special
    unnamed = NUM_BASE + 5
    assert tokenizer.id_to_token(unnamed) == reserved_token_name(unnamed) == "<|reserved_token_517|>"
    assert tokenizer.is_special(unnamed)


def test_im_end_in_text_is_one_control_token_only_when_specials_are_allowed(tokenizer: KimiTokenizer) -> None:
    text = f"Hi{IM_END}there"
    allowed = tokenizer.encode(text)
    assert tokenizer.token_to_id(IM_END) in allowed
    escaped = tokenizer.encode(text, allow_special=False)
    assert all(i < NUM_BASE for i in escaped)
    assert len(tokenizer.encode(IM_END, allow_special=False)) > 1
    assert tokenizer.decode(allowed) == tokenizer.decode(escaped) == text


def test_skip_special_tokens_drops_specials_but_keeps_tool_markers(tokenizer: KimiTokenizer) -> None:
    text = (
        f"<|im_assistant|>assistant<|im_middle|><think>r</think>{TOOL_CALLS_SECTION_BEGIN}{TOOL_CALL_BEGIN}x<|im_end|>"
    )
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == f"assistantr{TOOL_CALLS_SECTION_BEGIN}{TOOL_CALL_BEGIN}x"
    assert not tokenizer.is_special(tokenizer.token_to_id(TOOL_CALL_BEGIN))


def test_single_token_lookups(tokenizer: KimiTokenizer) -> None:
    assert tokenizer.token_to_id("a") == ord("a")
    assert tokenizer.token_to_id(b"\xe4") == 0xE4
    assert tokenizer.id_to_bytes(0xE4) == b"\xe4"
    with pytest.raises(UnknownTokenError):
        tokenizer.token_to_id("<|no_such_token|>")
    with pytest.raises(KeyError):  # UnknownTokenError is a KeyError, like a dict lookup
        tokenizer.token_to_id("zzzzzzzzzz")
    for bad in (-1, tokenizer.vocab_size):
        with pytest.raises(TokenIdError):
            tokenizer.decode([1, bad])
        with pytest.raises(TokenIdError):
            tokenizer.id_to_token(bad)


# -- encoding ----------------------------------------------------------------------------------


def test_pat_str_splits_like_kimi() -> None:
    assert PRETOKENIZE.findall("Hello 世界 it's 12345") == ["Hello", " ", "世界", " it's", " ", "123", "45"]


def test_tiktoken_splits_like_the_trainer_pretokenizer(tokenizer: KimiTokenizer) -> None:
    # Same split <=> encoding the whole text equals encoding each regex-V1 piece on its own.
    rng = random.Random(7)
    texts = [BUILTIN_CORPUS, *(_random_text(rng, 80) for _ in range(300))]
    for text in texts:
        pieces = PRETOKENIZE.findall(text)
        by_piece = [i for piece in pieces for i in tokenizer.encode(piece, allow_special=False)]
        assert tokenizer.encode(text, allow_special=False) == by_piece, text


def test_round_trip_of_random_unicode(tokenizer: KimiTokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(2000):
        text = _random_text(rng)
        ids = tokenizer.encode(text, allow_special=False)
        assert all(0 <= i < NUM_BASE for i in ids)
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_lone_surrogates_do_not_crash(tokenizer: KimiTokenizer) -> None:
    for text in ["\ud800", "a\udfffb", "😀\ud83dx", "\udc00" * 5]:
        decoded = tokenizer.decode(tokenizer.encode(text))
        assert "\ufffd" in decoded
        assert decoded.replace("\ufffd", "") == "".join(c for c in text if not 0xD800 <= ord(c) <= 0xDFFF)


def test_long_runs_are_cut_like_tokenization_kimi(tokenizer: KimiTokenizer) -> None:
    texts = [
        " " * 60_000,
        "a" * 30_000 + "\n" * 26_000 + "b",
        "x y " * 10 + "z" * 75_001 + " \t" * 20_000,
        ("word " * 5_000) + "\u3000" * 25_001,
    ]
    for text in texts:
        expected = [i for piece in _kimi_split(text, 25_000) for i in tokenizer.encode(piece)]
        ids = tokenizer.encode(text)
        assert ids == expected
        assert tokenizer.decode(ids) == text


def test_texts_longer_than_one_chunk_round_trip(tokenizer: KimiTokenizer) -> None:
    text = ("Kimi 你好 12345 <|im_end|>\n" * 17_000)[:450_000]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    first, second = text[:400_000], text[400_000:]
    assert ids == tokenizer.encode(first) + tokenizer.encode(second)


# -- incremental detokenization -----------------------------------------------------------------


def test_incremental_detokenizer_token_by_token_equals_full_decode(tokenizer: KimiTokenizer) -> None:
    rng = random.Random(99)
    texts = ["日本語と中文😀👨‍👩‍👧 ok", "<|im_end|>é\u0301🇫🇷", *(_random_text(rng, 60) for _ in range(300))]
    for text in texts:
        ids = tokenizer.encode(text)
        stream = tokenizer.incremental_detokenizer()
        chunks = [stream.push(i) for i in ids]
        assert not stream.has_pending_bytes
        chunks.append(stream.flush())
        assert "".join(chunks) == tokenizer.decode(ids) == text
        assert all("\ufffd" not in chunk for chunk in chunks)


def test_incremental_detokenizer_holds_back_partial_characters(tokenizer: KimiTokenizer) -> None:
    ids = [tokenizer.token_to_id(bytes([b])) for b in "世".encode()]
    stream = tokenizer.incremental_detokenizer()
    assert stream.push(ids[0]) == ""
    assert stream.push(ids[1]) == ""
    assert stream.has_pending_bytes
    assert stream.push(ids[2]) == "世"
    assert stream.push(ids[0]) == ""
    assert stream.flush() == "\ufffd"  # a truncated character at the very end is replaced
    assert stream.push([ord("o"), ord("k")]) == "ok"  # flush started a fresh stream


def test_incremental_detokenizer_matches_decode_on_arbitrary_ids(tokenizer: KimiTokenizer) -> None:
    rng = random.Random(5)
    for skip in (False, True):
        for _ in range(300):
            ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 30))]
            stream = tokenizer.incremental_detokenizer(skip_special_tokens=skip)
            out, pos = [], 0
            while pos < len(ids):
                step = rng.randrange(1, 4)
                out.append(stream.push(ids[pos : pos + step]))
                pos += step
            out.append(stream.flush())
            assert "".join(out) == tokenizer.decode(ids, skip_special_tokens=skip)


# -- files -------------------------------------------------------------------------------------


def _copy_model(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("tiktoken.model", "tokenizer_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _replace_line(path: Path, line_no: int, new: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[line_no - 1] = new
    path.write_text("".join(lines))


@pytest.mark.parametrize(
    ("line_no", "new_line", "reason"),
    [
        (10, "not-base64!! 9\n", "invalid base64"),
        (10, "YQ==\n", "expected 'base64 rank'"),
        (300, "AAAA 5000\n", "rank 5000 leaves a gap"),
        (12, "zz== 3\n", "rank 3 already used on line 4"),
        (200, "YQ== 199\n", "already has rank 97"),
        (12, "YQ== -11\n", "not a non-negative integer"),
    ],
)
def test_corrupted_tiktoken_model_names_file_and_line(
    model_dir: Path, tmp_path: Path, line_no: int, new_line: str, reason: str
) -> None:
    folder = _copy_model(model_dir, tmp_path / "m")
    _replace_line(folder / "tiktoken.model", line_no, new_line)
    with pytest.raises(TokenizerFileError) as excinfo:
        KimiTokenizer.from_model_dir(folder)
    assert excinfo.value.path == folder / "tiktoken.model"
    assert excinfo.value.line == line_no
    assert f"tiktoken.model:{line_no}:" in str(excinfo.value)
    assert reason in str(excinfo.value)


def test_missing_or_invalid_files_name_the_file(model_dir: Path, tmp_path: Path) -> None:
    folder = _copy_model(model_dir, tmp_path / "m")
    (folder / "tokenizer_config.json").write_text('{"added_tokens_decoder": {')
    with pytest.raises(TokenizerFileError, match=r"tokenizer_config\.json:1: invalid JSON"):
        KimiTokenizer.from_model_dir(folder)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["9999"] = {"content": "<|x|>", "special": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerFileError, match=r"id 9999 is outside the reserved range \[512, 768\)"):
        KimiTokenizer.from_model_dir(folder)
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(TokenizerFileError, match=r"tokenizer_config\.json: file not found"):
        KimiTokenizer.from_model_dir(folder)
    with pytest.raises(TokenizerFileError, match="model folder not found"):
        KimiTokenizer.from_model_dir(tmp_path / "nowhere")


def test_regenerated_files_at_the_same_path_are_not_served_stale(model_dir: Path, tmp_path: Path) -> None:
    folder = _copy_model(model_dir, tmp_path / "m")
    before = KimiTokenizer.from_model_dir(folder).encode("hello world")
    write_tokenizer_files(folder, train_byte_bpe(BUILTIN_CORPUS[:3000], 300))
    after = KimiTokenizer.from_model_dir(folder)
    assert after.num_base_tokens == 300
    assert after.encode("hello world") != before
    assert after.decode(after.encode("hello world")) == "hello world"
