"""compressed-tensors ``pack-quantized`` INT4: group-wise symmetric quantization and int32 packing.

This is k2serve's own implementation of the rule Kimi K2 Thinking's routed experts are stored in
(reference/kimi-k2.md §2.4), checked against the compressed-tensors library in the tests.

Lifecycle of one Linear weight ``W`` [R, C] (R = out_features, C = in_features, G = C / group_size,
P = ceil(C / 8)):

- ``quantize_int4(W)``   -> ``q`` int8 [R, C] in [-8, 7], ``scale`` [R, G]  (writer side)
- ``pack_int4(q)``       -> ``weight_packed`` int32 [R, P]                  (what the checkpoint holds)
- ``unpack_int4(packed, C)`` -> ``q`` int8 [R, C]
- ``dequantize_int4(packed, scale, (R, C), dtype)`` -> ``W_hat`` [R, C] = q * scale[:, c // group_size]

Packing: offset binary ``u = q + 8`` (0..15), columns zero-padded (``u = 0``) to a multiple of 8,
``packed[r, j] = sum_k u[r, 8j + k] << 4k`` (LSB-first: column 8j in bits 0-3, 8j+7 in bits 28-31),
stored as int32 two's complement, so a top nibble >= 8 gives a negative word.

Dequantization precision: compressed-tensors multiplies ``q.to(scale.dtype) * scale``, i.e. in BF16
for a BF16 scale. ``q`` (|q| <= 8) and a BF16 scale are both exact in fp32 and their product has at
most 8 + 4 significant bits, so the fp32 product is exact and one cast to BF16 rounds it exactly like
the BF16 multiply does; for fp32 output we keep the exact product. We therefore compute in fp32 and
cast once to the target dtype (bit-identical to compressed-tensors for a BF16 target).

Every function also accepts leading batch dimensions (e.g. stacked experts [E, R, C]).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch

INT4_MIN = -8
INT4_MAX = 7
INT4_OFFSET = 8  # offset binary: stored nibble u = q + 8
VALUES_PER_WORD = 8  # int4 values per int32 word
# compressed-tensors' symmetric min-max observer: s = max|w| / ((q_max - q_min) / 2) = max|w| / 7.5
SYMMETRIC_HALF_RANGE = (INT4_MAX - INT4_MIN) / 2


class Int4FormatError(ValueError):
    """A tensor handed to the INT4 helpers has the wrong dtype, shape or value range."""


def packed_cols(num_cols: int) -> int:
    """int32 words per row for ``num_cols`` int4 values: ceil(C / 8)."""
    return math.ceil(num_cols / VALUES_PER_WORD)


def num_groups(num_cols: int, group_size: int) -> int:
    """Scale columns per row: ceil(C / group_size)."""
    return math.ceil(num_cols / group_size)


def quantize_int4(
    weight: torch.Tensor, group_size: int = 32, *, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise symmetric INT4 quantization of ``weight`` [..., R, C] along C.

    Returns ``(q, scale)``: q int8 [..., R, C] in [-8, 7] and scale [..., R, C / group_size] in
    ``scale_dtype`` (default: the weight's dtype, as compressed-tensors stores it). The scale is the
    min-max observer's ``max|w| / 7.5`` of each group, rounded to ``scale_dtype`` first; q is then
    ``clamp(round_half_even(w / scale), -8, 7)`` computed in fp32 against that stored scale, so
    ``dequantize`` reproduces the nearest grid point of the scale actually written. All-zero groups
    get the scale dtype's machine epsilon (compressed-tensors' guard against dividing by zero).
    """
    if not weight.is_floating_point():
        raise Int4FormatError(f"quantize_int4 needs a floating-point weight, got {weight.dtype}")
    if weight.dim() < 2:
        raise Int4FormatError(f"quantize_int4 needs a [..., R, C] weight, got shape {tuple(weight.shape)}")
    num_cols = weight.shape[-1]
    if group_size <= 0 or num_cols % group_size:
        raise Int4FormatError(f"in_features {num_cols} is not a multiple of group_size {group_size}")
    scale_dtype = scale_dtype or weight.dtype
    lead = weight.shape[:-1]
    groups = weight.float().reshape(*lead, num_cols // group_size, group_size)  # [..., R, G, gs]
    max_abs = groups.abs().amax(dim=-1)  # [..., R, G]
    scale = (max_abs / SYMMETRIC_HALF_RANGE).to(scale_dtype)
    scale = torch.where(scale == 0, torch.finfo(scale_dtype).eps, scale)
    q = torch.round(groups / scale.float().unsqueeze(-1)).clamp_(INT4_MIN, INT4_MAX)
    return q.to(torch.int8).reshape(weight.shape), scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] [..., R, C] into int32 words [..., R, ceil(C / 8)], LSB-first."""
    if q.dtype != torch.int8:
        raise Int4FormatError(f"pack_int4 needs int8 values, got {q.dtype}")
    if q.dim() < 2:
        raise Int4FormatError(f"pack_int4 needs a [..., R, C] tensor, got shape {tuple(q.shape)}")
    if q.numel():
        low, high = (int(v) for v in torch.aminmax(q))
        if low < INT4_MIN or high > INT4_MAX:
            raise Int4FormatError(f"int4 values must lie in [{INT4_MIN}, {INT4_MAX}], got [{low}, {high}]")
    num_cols = q.shape[-1]
    num_words = packed_cols(num_cols)
    u = (q + INT4_OFFSET).view(torch.uint8)  # [..., R, C] offset binary 0..15
    if num_words * VALUES_PER_WORD != num_cols:
        u = torch.nn.functional.pad(u, (0, num_words * VALUES_PER_WORD - num_cols))  # padding is u = 0
    # Word j = little-endian bytes (u[8j] | u[8j+1] << 4, ..., u[8j+6] | u[8j+7] << 4): the
    # arithmetic rule sum_k u[8j+k] << 4k, without ever shifting into the sign bit.
    pairs = u.reshape(*q.shape[:-1], num_words * 4, 2)  # [..., R, 4P, 2]
    word_bytes = pairs[..., 0] | (pairs[..., 1] << 4)  # [..., R, 4P] uint8
    return _bytes_to_words(word_bytes.contiguous())


def unpack_int4(packed: torch.Tensor, num_cols: int) -> torch.Tensor:
    """Inverse of ``pack_int4``: int32 [..., R, P] -> int8 [..., R, num_cols] in [-8, 7].

    Equivalent to ``q[r, 8j+k] = ((packed[r, j] >> 4k) & 0xF) - 8``, done on the words' bytes.
    """
    if packed.dtype != torch.int32:
        raise Int4FormatError(f"unpack_int4 needs int32 words, got {packed.dtype}")
    if packed.dim() < 2:
        raise Int4FormatError(f"unpack_int4 needs a [..., R, P] tensor, got shape {tuple(packed.shape)}")
    if packed.shape[-1] != packed_cols(num_cols):
        raise Int4FormatError(
            f"{num_cols} columns need {packed_cols(num_cols)} int32 words per row, got {packed.shape[-1]}"
        )
    word_bytes = _words_to_bytes(packed.contiguous())  # [..., R, 4P] uint8, little-endian order
    nibbles = torch.stack((word_bytes & 0xF, word_bytes >> 4), dim=-1)  # [..., R, 4P, 2]
    u = nibbles.reshape(*packed.shape[:-1], -1)[..., :num_cols]  # [..., R, C]
    return u.view(torch.int8) - INT4_OFFSET


def _bytes_to_words(word_bytes: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 4P] in little-endian order -> int32 [..., P] (two's complement)."""
    if sys.byteorder == "big":
        word_bytes = word_bytes.reshape(*word_bytes.shape[:-1], -1, 4).flip(-1).reshape(word_bytes.shape)
    return word_bytes.view(torch.int32)


def _words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., P] -> uint8 [..., 4P] in little-endian order."""
    word_bytes = words.view(torch.uint8)
    if sys.byteorder == "big":
        word_bytes = word_bytes.reshape(*words.shape, 4).flip(-1).reshape(word_bytes.shape)
    return word_bytes


def dequantize_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    weight_shape: Sequence[int] | torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    group_size: int | None = None,
) -> torch.Tensor:
    """``W[r, c] = q[r, c] * scale[r, c // group_size]`` for packed [..., R, P], scale [..., R, G].

    ``weight_shape`` is the checkpoint's ``weight_shape`` ([R, C], tensor or sequence). The group
    size defaults to C / G. Computed in fp32 and cast once to ``dtype`` (see the module docstring).
    """
    rows, num_cols = (
        int(v) for v in (weight_shape.tolist() if isinstance(weight_shape, torch.Tensor) else weight_shape)
    )
    if packed.shape[-2] != rows:
        raise Int4FormatError(f"weight_shape says {rows} rows, packed has {packed.shape[-2]}")
    if scale.shape[:-1] != packed.shape[:-1]:
        raise Int4FormatError(f"scale {tuple(scale.shape)} does not match packed {tuple(packed.shape)} rows")
    groups = scale.shape[-1]
    if group_size is None:
        if groups == 0 or num_cols % groups:
            raise Int4FormatError(f"cannot infer group_size: {num_cols} columns, {groups} scale groups")
        group_size = num_cols // groups
    if groups != num_groups(num_cols, group_size):
        raise Int4FormatError(
            f"{num_cols} columns with group_size {group_size} need {num_groups(num_cols, group_size)} scales, got {groups}"
        )
    q = unpack_int4(packed, num_cols).float()  # [..., R, C]
    if groups * group_size != num_cols:
        q = torch.nn.functional.pad(q, (0, groups * group_size - num_cols))
    q = q.reshape(*q.shape[:-1], groups, group_size)  # [..., R, G, gs]
    w = (q * scale.float().unsqueeze(-1)).reshape(*packed.shape[:-1], groups * group_size)
    return w[..., :num_cols].to(dtype)
