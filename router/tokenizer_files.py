"""The two files of a Kimi tokenizer: ``tiktoken.model`` and ``tokenizer_config.json``.

Reading parses and validates them into plain values (ranks, a frozen ``TokenizerConfig``); the
tokenizer then builds its ``tiktoken.Encoding`` from those. We parse ``tiktoken.model`` ourselves
because ``tiktoken.load.load_tiktoken_bpe`` caches file contents by path, so a regenerated tiny
model at the same path would silently load stale ranks. Writing (used by ``make-tiny-model``)
produces Kimi-shaped files, each written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k2serve.router.kimi_vocab import (
    ADDITIONAL_SPECIAL_TOKENS,
    BOS,
    IM_END,
    NUM_RESERVED_SPECIAL_TOKENS,
    PAD,
    SPECIAL_TOKEN_LAYOUT,
    UNK,
    reserved_token_name,
)

TIKTOKEN_MODEL_FILE = "tiktoken.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MODEL_MAX_LENGTH = 262144


class TokenizerFileError(ValueError):
    """A tokenizer file is missing or malformed; names the file and, where known, the line."""

    def __init__(self, path: Path | str, reason: str, line: int | None = None) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else f"{self.path}"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class AddedToken:
    token_id: int
    content: str
    special: bool


@dataclass(frozen=True)
class TokenizerConfig:
    added_tokens: Mapping[int, AddedToken]  # only the ids the file names
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None


def read_mergeable_ranks(path: Path | str) -> dict[bytes, int]:
    """Parse ``base64(token) SPACE rank`` lines; ranks must be exactly 0..n-1, each bytes once."""
    path = Path(path)
    text = _read_text(path)
    ranks: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise TokenizerFileError(path, f"expected 'base64 rank', got {len(fields)} fields", line_no)
        encoded, rank_text = fields
        try:
            token = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise TokenizerFileError(path, f"invalid base64 token {encoded!r}: {exc}", line_no) from None
        if not token:
            raise TokenizerFileError(path, "empty token", line_no)
        if not (rank_text.isascii() and rank_text.isdigit()):
            raise TokenizerFileError(path, f"rank {rank_text!r} is not a non-negative integer", line_no)
        rank = int(rank_text)
        if rank in line_of_rank:
            raise TokenizerFileError(path, f"rank {rank} already used on line {line_of_rank[rank]}", line_no)
        if token in ranks:
            raise TokenizerFileError(path, f"token {token!r} already has rank {ranks[token]}", line_no)
        ranks[token] = rank
        line_of_rank[rank] = line_no
    if not ranks:
        raise TokenizerFileError(path, "no tokens")
    num_base = len(ranks)
    # n distinct non-negative ranks are 0..n-1 unless some rank is >= n.
    for rank, line_no in sorted(line_of_rank.items()):
        if rank >= num_base:
            missing = min(set(range(num_base)) - line_of_rank.keys())
            raise TokenizerFileError(
                path, f"rank {rank} leaves a gap: ranks must be 0..{num_base - 1} (rank {missing} missing)", line_no
            )
    return ranks


def read_tokenizer_config(path: Path | str) -> TokenizerConfig:
    """Parse ``added_tokens_decoder`` and the bos/eos/pad/unk names of a ``tokenizer_config.json``."""
    path = Path(path)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise TokenizerFileError(path, f"invalid JSON: {exc.msg}", exc.lineno) from None
    if not isinstance(data, dict):
        raise TokenizerFileError(path, "top level must be a JSON object")
    decoder = data.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        raise TokenizerFileError(path, "'added_tokens_decoder' must be an object")
    added: dict[int, AddedToken] = {}
    for key, entry in decoder.items():
        field = f"added_tokens_decoder[{key!r}]"
        if not (key.isascii() and key.isdigit()):
            raise TokenizerFileError(path, f"{field}: key must be a token id")
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or not entry["content"]:
            raise TokenizerFileError(path, f"{field}: needs a non-empty string 'content'")
        special = entry.get("special", True)
        if not isinstance(special, bool):
            raise TokenizerFileError(path, f"{field}.special must be a boolean")
        added[int(key)] = AddedToken(int(key), entry["content"], special)
    return TokenizerConfig(
        added_tokens=added,
        bos_token=_token_name(path, data, "bos_token"),
        eos_token=_token_name(path, data, "eos_token"),
        pad_token=_token_name(path, data, "pad_token"),
        unk_token=_token_name(path, data, "unk_token"),
    )


def write_tokenizer_files(out_dir: Path | str, ranks: Mapping[bytes, int]) -> None:
    """Write ``tiktoken.model`` and a Kimi-shaped ``tokenizer_config.json`` for ``ranks``."""
    out_dir = Path(out_dir)
    num_base = len(ranks)
    if sorted(ranks.values()) != list(range(num_base)):
        raise ValueError(f"ranks must be exactly 0..{num_base - 1}")
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in sorted(ranks.items(), key=_by_rank)
    ]
    _write_atomic(out_dir / TIKTOKEN_MODEL_FILE, "".join(lines))
    config = kimi_tokenizer_config(num_base)
    _write_atomic(out_dir / TOKENIZER_CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def kimi_tokenizer_config(num_base_tokens: int) -> dict[str, Any]:
    """The ``tokenizer_config.json`` object of a Kimi vocabulary with ``num_base_tokens`` BPE ranks."""
    named = {spec.offset: spec for spec in SPECIAL_TOKEN_LAYOUT}
    decoder: dict[str, dict[str, Any]] = {}
    for offset in range(NUM_RESERVED_SPECIAL_TOKENS):
        token_id = num_base_tokens + offset
        spec = named.get(offset)
        decoder[str(token_id)] = {
            "content": spec.content if spec else reserved_token_name(token_id),
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": spec.special if spec else True,
        }
    return {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD,
        "tokenizer_class": "TikTokenTokenizer",
        "unk_token": UNK,
    }


def _by_rank(item: tuple[bytes, int]) -> int:
    return item[1]


def _token_name(path: Path, data: dict[str, Any], key: str) -> str | None:
    # HF writes either "name" or an AddedToken object {"content": "name", ...}.
    value = data.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise TokenizerFileError(path, f"{key!r} must be a string or an object with 'content'")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerFileError(path, "file not found") from None
    except UnicodeDecodeError as exc:
        raise TokenizerFileError(path, f"not UTF-8 text: {exc.reason}") from None
    except OSError as exc:
        raise TokenizerFileError(path, f"cannot read: {exc.strerror}") from None


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; model folders are shared read-only
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
