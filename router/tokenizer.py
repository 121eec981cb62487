"""Kimi K2's tokenizer: tiktoken byte-level BPE plus 256 reserved special tokens.

Lifecycle: built once per process from a model folder (``KimiTokenizer.from_model_dir``), then
shared read-only by every request: ``encode`` prompts, ``decode`` or an ``IncrementalDetokenizer``
per streamed response. Layout (reference §4): ranks ``[0, num_base)`` come from
``tiktoken.model``; ids ``[num_base, num_base + 256)`` are special tokens named by
``tokenizer_config.json`` (or ``<|reserved_token_{id}|>``). Ids are looked up by name, never
hard-coded. Encoding mirrors ``tokenization_kimi.py``: text goes to tiktoken in <=400,000-char
chunks, each cut into runs of whitespace or non-whitespace of <=25,000 chars (tiktoken #195).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import tiktoken

from k2serve.router.detokenizer import IncrementalDetokenizer
from k2serve.router.kimi_vocab import (
    BOS,
    EOS,
    IM_END,
    NUM_RESERVED_SPECIAL_TOKENS,
    PAD,
    PAT_STR,
    reserved_token_name,
)
from k2serve.router.tokenizer_files import (
    TIKTOKEN_MODEL_FILE,
    TOKENIZER_CONFIG_FILE,
    TokenizerConfig,
    TokenizerFileError,
    read_mergeable_ranks,
    read_tokenizer_config,
)

MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# Runs longer than MAX_RUN_CHARS; `\s` in `re` is exactly `str.isspace()`, the test Kimi uses.
_LONG_RUN = re.compile(rf"\s{{{MAX_RUN_CHARS + 1},}}|\S{{{MAX_RUN_CHARS + 1},}}")


class UnknownTokenError(KeyError):
    """A token string (or bytes) that is not in the vocabulary."""

    def __init__(self, token: str | bytes) -> None:
        self.token = token
        super().__init__(f"token {token!r} is not in the vocabulary")


class TokenIdError(ValueError):
    """A token id outside ``[0, vocab_size)``."""

    def __init__(self, token_id: int, vocab_size: int) -> None:
        self.token_id = token_id
        super().__init__(f"token id {token_id} is outside the vocabulary [0, {vocab_size})")


class KimiTokenizer:
    """Encodes text to Kimi token ids and back; immutable after construction."""

    def __init__(
        self,
        encoding: tiktoken.Encoding,
        num_base_tokens: int,
        special_tokens: Mapping[str, int],
        skipped_ids: frozenset[int],
        bos_token: str,
        eos_token: str,
        pad_token: str,
    ) -> None:
        self._encoding = encoding
        self._num_base_tokens = num_base_tokens
        self._special_tokens = MappingProxyType(dict(special_tokens))
        self._skipped_ids = skipped_ids  # special=true in tokenizer_config: dropped by skip_special_tokens
        self._bos_id = special_tokens[bos_token]
        self._eos_id = special_tokens[eos_token]
        self._pad_id = special_tokens[pad_token]
        self._stop_token_ids = (special_tokens[IM_END], special_tokens[EOS])

    @classmethod
    def from_model_dir(cls, path: Path | str) -> KimiTokenizer:
        """Load ``tiktoken.model`` and ``tokenizer_config.json`` from a model folder."""
        path = Path(path)
        if not path.is_dir():
            raise TokenizerFileError(path, "model folder not found")
        ranks = read_mergeable_ranks(path / TIKTOKEN_MODEL_FILE)
        config = read_tokenizer_config(path / TOKENIZER_CONFIG_FILE)
        return cls.from_parts(ranks, config, config_path=path / TOKENIZER_CONFIG_FILE)

    @classmethod
    def from_parts(
        cls, ranks: dict[bytes, int], config: TokenizerConfig, *, config_path: Path | str = TOKENIZER_CONFIG_FILE
    ) -> KimiTokenizer:
        """Build from parsed files; ``config_path`` only names the file in errors."""
        num_base = len(ranks)
        special_tokens, skipped = _special_tokens(num_base, config, Path(config_path))
        bos, eos, pad = config.bos_token or BOS, config.eos_token or IM_END, config.pad_token or PAD
        required = (
            ("bos_token", bos),
            ("eos_token", eos),
            ("pad_token", pad),
            ("stop token", IM_END),
            ("stop token", EOS),
        )
        for field, name in required:
            if name not in special_tokens:
                raise TokenizerFileError(config_path, f"{field} {name!r} is not a special token")
        encoding = tiktoken.Encoding(
            "kimi_k2",
            pat_str=PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=special_tokens,
            explicit_n_vocab=num_base + NUM_RESERVED_SPECIAL_TOKENS,
        )
        return cls(encoding, num_base, special_tokens, skipped, bos, eos, pad)

    # -- sizes and well-known ids ---------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._num_base_tokens + NUM_RESERVED_SPECIAL_TOKENS

    @property
    def num_base_tokens(self) -> int:
        return self._num_base_tokens

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Generation stops on any of these: ``<|im_end|>`` and ``[EOS]``."""
        return self._stop_token_ids

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """All 256 reserved tokens, name -> id (read-only)."""
        return self._special_tokens

    # -- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``; with ``allow_special=False`` special-token strings are plain text."""
        ids: list[int] = []
        for piece in _pieces(text):
            if allow_special:
                ids.extend(self._encoding.encode(piece, allowed_special="all", disallowed_special=()))
            else:
                ids.extend(self._encoding.encode_ordinary(piece))
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 becomes U+FFFD. Tool-call markers survive skipping."""
        return self.decode_bytes(ids, skip_special_tokens=skip_special_tokens).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> bytes:
        """Concatenated bytes of ``ids`` (special tokens as their names unless skipped)."""
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise TokenIdError(bad, self.vocab_size)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._skipped_ids]
        return self._encoding.decode_bytes(ids)

    def incremental_detokenizer(self, *, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        """A fresh per-request stream decoder over this vocabulary."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # -- single tokens --------------------------------------------------------------------------

    def token_to_id(self, token: str | bytes) -> int:
        """Id of a special-token name, or of an ordinary token given as its text or bytes."""
        if isinstance(token, str) and token in self._special_tokens:
            return self._special_tokens[token]
        data = token.encode("utf-8", errors="surrogatepass") if isinstance(token, str) else token
        try:
            return self._encoding.encode_single_token(data)
        except KeyError:
            raise UnknownTokenError(token) from None

    def id_to_token(self, token_id: int) -> str:
        """Name of a special id, or an ordinary token's text (U+FFFD where it is partial UTF-8)."""
        return self.id_to_bytes(token_id).decode("utf-8", errors="replace")

    def id_to_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise TokenIdError(token_id, self.vocab_size)
        return self._encoding.decode_single_token_bytes(token_id)

    def is_special(self, token_id: int) -> bool:
        """The ``special`` flag of ``tokenizer_config.json``: True if ``skip_special_tokens`` drops it."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenIdError(token_id, self.vocab_size)
        return token_id in self._skipped_ids


def _special_tokens(num_base: int, config: TokenizerConfig, path: Path) -> tuple[dict[str, int], frozenset[int]]:
    """Name -> id for all reserved ids, and the ids flagged special (unnamed ones count as special)."""
    reserved = range(num_base, num_base + NUM_RESERVED_SPECIAL_TOKENS)
    for token_id in config.added_tokens:
        if token_id not in reserved:
            raise TokenizerFileError(
                path,
                f"added_tokens_decoder id {token_id} is outside the reserved range "
                f"[{num_base}, {reserved.stop}) implied by {TIKTOKEN_MODEL_FILE}",
            )
    names: dict[str, int] = {}
    skipped: set[int] = set()
    for token_id in reserved:
        added = config.added_tokens.get(token_id)
        name = added.content if added else reserved_token_name(token_id)
        if name in names:
            raise TokenizerFileError(path, f"special token {name!r} names both id {names[name]} and id {token_id}")
        names[name] = token_id
        if added is None or added.special:
            skipped.add(token_id)
    return names, frozenset(skipped)


def _pieces(text: str) -> Iterator[str]:
    """Kimi's chunking: <=400,000-char chunks, long same-kind runs cut every 25,000 chars."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start : start + MAX_ENCODE_CHARS]
        cut = 0
        for run in _LONG_RUN.finditer(chunk):
            for pos in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[cut:pos]
                cut = pos
        yield chunk[cut:]
