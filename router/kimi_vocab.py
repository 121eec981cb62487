"""Kimi K2's vocabulary layout: the pre-tokenisation regex and the reserved special-token table.

Pure constants, shared by the tokenizer (which reads a model folder) and the BPE trainer (which
writes one). A Kimi vocabulary is ``num_base_tokens`` byte-level BPE ranks followed by exactly
``NUM_RESERVED_SPECIAL_TOKENS`` special ids ``[num_base, num_base + 256)``; each special id is named
by ``tokenizer_config.json`` or else ``<|reserved_token_{id}|>``. Ids are never hard-coded: code
looks them up by name, and the offsets below exist only to *write* Kimi-shaped test vocabularies.
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_RESERVED_SPECIAL_TOKENS = 256

# tokenization_kimi.py's pat_str. `&&` is a class intersection: tiktoken's fancy-regex and the
# `regex` module with V1 flags support it; Python's `re` does not.
PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

# Names used by the tokenizer and the parsers (looked up in the loaded vocabulary, never by number).
BOS = "[BOS]"
EOS = "[EOS]"
IM_END = "<|im_end|>"
IM_USER = "<|im_user|>"
IM_ASSISTANT = "<|im_assistant|>"
IM_SYSTEM = "<|im_system|>"
IM_MIDDLE = "<|im_middle|>"
TOOL_CALLS_SECTION_BEGIN = "<|tool_calls_section_begin|>"
TOOL_CALLS_SECTION_END = "<|tool_calls_section_end|>"
TOOL_CALL_BEGIN = "<|tool_call_begin|>"
TOOL_CALL_ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
TOOL_CALL_END = "<|tool_call_end|>"
THINK_BEGIN = "<think>"
THINK_END = "</think>"
MEDIA_START = "<|media_start|>"
MEDIA_CONTENT = "<|media_content|>"
MEDIA_END = "<|media_end|>"
MEDIA_PAD = "<|media_pad|>"
UNK = "[UNK]"
PAD = "[PAD]"


@dataclass(frozen=True)
class SpecialTokenSpec:
    offset: int  # id - num_base_tokens
    content: str
    special: bool  # the HF `special` flag: True means dropped by skip_special_tokens


# Offsets of K2-Instruct/K2-Thinking (reference §4). The media offsets 18..21 follow Kimi-VL
# (media_placeholder_token_id 163605 = base + 21); for K2-Thinking they are unconfirmed, as are
# the think offsets 22/23 and their flags.
SPECIAL_TOKEN_LAYOUT: tuple[SpecialTokenSpec, ...] = (
    SpecialTokenSpec(0, BOS, True),
    SpecialTokenSpec(1, EOS, True),
    SpecialTokenSpec(2, IM_END, True),
    SpecialTokenSpec(3, IM_USER, True),
    SpecialTokenSpec(4, IM_ASSISTANT, True),
    SpecialTokenSpec(6, "<|start_header_id|>", True),
    SpecialTokenSpec(7, "<|end_header_id|>", True),
    SpecialTokenSpec(9, "[EOT]", True),
    SpecialTokenSpec(10, IM_SYSTEM, True),
    SpecialTokenSpec(11, TOOL_CALLS_SECTION_BEGIN, False),
    SpecialTokenSpec(12, TOOL_CALLS_SECTION_END, False),
    SpecialTokenSpec(13, TOOL_CALL_BEGIN, False),
    SpecialTokenSpec(14, TOOL_CALL_ARGUMENT_BEGIN, False),
    SpecialTokenSpec(15, TOOL_CALL_END, False),
    SpecialTokenSpec(17, IM_MIDDLE, True),
    SpecialTokenSpec(18, MEDIA_START, True),
    SpecialTokenSpec(19, MEDIA_CONTENT, True),
    SpecialTokenSpec(20, MEDIA_END, True),
    SpecialTokenSpec(21, MEDIA_PAD, True),
    SpecialTokenSpec(22, THINK_BEGIN, True),
    SpecialTokenSpec(23, THINK_END, True),
    SpecialTokenSpec(254, UNK, True),
    SpecialTokenSpec(255, PAD, True),
)

# tokenization_kimi.py's default `additional_special_tokens`.
ADDITIONAL_SPECIAL_TOKENS: tuple[str, ...] = (
    IM_END,
    IM_USER,
    IM_ASSISTANT,
    "<|start_header_id|>",
    "<|end_header_id|>",
    "[EOT]",
    IM_SYSTEM,
    IM_MIDDLE,
)


def reserved_token_name(token_id: int) -> str:
    """The name of a special id that ``tokenizer_config.json`` leaves unnamed (absolute id)."""
    return f"<|reserved_token_{token_id}|>"
