"""``moe_align``: the Triton kernels equal the torch reference exactly, and the reference is right.

Runs under the Triton interpreter on CPU (see conftest.py) or on the GPU. Every scratch and output
buffer starts poisoned, so an unwritten row shows up as a mismatch.
"""

from __future__ import annotations

import pytest
import torch
from kernel_fixtures import kernel_device

from k2serve.kernels.moe_align import _moe_scatter_kernel, max_padded_rows, moe_align, moe_align_reference

DEVICE = kernel_device(_moe_scatter_kernel)
FIELDS = ("sorted_ids", "block_expert_ids", "num_padded", "expert_counts", "expert_offsets")


def _random_ids(num_tokens: int, top_k: int, num_experts: int, seed: int, skip: float = 0.2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_experts, (num_tokens, top_k), generator=gen)
    ids[torch.rand(num_tokens, top_k, generator=gen) < skip] = -1
    return ids.to(DEVICE)


def _assert_same(ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    ours = moe_align(ids, num_experts, block_m, impl="triton")
    ref = moe_align_reference(ids, num_experts, block_m)
    for field in FIELDS:
        assert torch.equal(getattr(ours, field).cpu(), getattr(ref, field).cpu()), field
    assert ours.num_assignments == ref.num_assignments == ids.numel()


@pytest.mark.parametrize(
    ("num_tokens", "top_k", "num_experts", "block_m", "seed"),
    [
        (5, 2, 4, 4, 0),  # decode-sized
        (1, 1, 1, 16, 1),  # one token, one expert
        (300, 8, 48, 16, 2),  # several chunks of 128 assignments, EP8-like expert count
        (64, 2, 3, 16, 3),  # several M blocks per expert
        (7, 3, 33, 8, 4),  # many empty experts, expert count not a power of two
    ],
)
def test_triton_alignment_equals_reference(
    poison_allocations: None, num_tokens: int, top_k: int, num_experts: int, block_m: int, seed: int
) -> None:
    _assert_same(_random_ids(num_tokens, top_k, num_experts, seed), num_experts, block_m)


def test_an_expert_with_no_tokens_gets_no_rows(poison_allocations: None) -> None:
    ids = torch.tensor([[0, 2], [2, -1], [0, 0]], device=DEVICE)  # expert 1 and 3 empty
    _assert_same(ids, 4, 4)
    align = moe_align(ids, 4, 4, impl="triton")
    assert align.expert_counts.tolist() == [3, 0, 2, 0]
    assert align.expert_offsets.tolist() == [0, 4, 4, 8, 8]
    sentinel = ids.numel()
    assert align.sorted_ids[:8].tolist() == [0, 4, 5, sentinel, 1, 2, sentinel, sentinel]
    assert align.block_expert_ids.tolist()[:2] == [0, 2]
    assert all(e == -1 for e in align.block_expert_ids.tolist()[2:])


def test_no_local_assignment_and_no_tokens(poison_allocations: None) -> None:
    _assert_same(torch.full((6, 2), -1, device=DEVICE), 3, 4)
    _assert_same(torch.tensor([[9, -5]], device=DEVICE), 3, 4)  # ids outside [0, E) are skipped too
    empty = torch.empty(0, 8, dtype=torch.int64, device=DEVICE)
    _assert_same(empty, 5, 16)
    assert moe_align(empty, 5, 16, impl="triton").sorted_ids.numel() == 0


def test_int32_ids_are_accepted() -> None:
    ids = _random_ids(9, 2, 5, seed=5).int()
    _assert_same(ids, 5, 4)


def test_reference_layout_invariants() -> None:
    ids = _random_ids(200, 8, 12, seed=6).cpu()
    block_m = 8
    align = moe_align_reference(ids, 12, block_m)
    flat = ids.flatten()
    sorted_ids, offsets = align.sorted_ids.long(), align.expert_offsets.long()
    assert sorted_ids.numel() == max_padded_rows(ids.numel(), 12, block_m)
    assert offsets[-1] <= sorted_ids.numel()
    for expert in range(12):
        segment = sorted_ids[offsets[expert] : offsets[expert + 1]]
        real = segment[segment < ids.numel()]
        expected = torch.nonzero(flat == expert).flatten()
        assert torch.equal(real, expected)  # every assignment once, in flat order
        assert (segment.numel() - real.numel()) < block_m and segment.numel() % block_m == 0
        blocks = align.block_expert_ids[offsets[expert] // block_m : offsets[expert + 1] // block_m]
        assert (blocks == expert).all()
    assert (sorted_ids[offsets[-1] :] == ids.numel()).all()


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="power of two"):
        moe_align(torch.zeros(2, 2, dtype=torch.int64), 4, 12)
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        moe_align(torch.zeros(4, dtype=torch.int64), 4, 16)
    with pytest.raises(ValueError, match="impl"):
        moe_align(torch.zeros(2, 2, dtype=torch.int64), 4, 16, impl="cuda")  # type: ignore[arg-type]
