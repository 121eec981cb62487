"""The all-to-all dispatcher against the local one: N ranks as threads of this process, each with its
own gloo process group on loopback (a real group and real collectives, just no process spawn).

Every rank holds its slice of one set of random experts; the sum over ranks' outputs for the
tokens of rank r must equal what one rank holding every expert computes for them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from k2serve.workers.all_to_all_dispatcher import AllToAllDispatcher
from k2serve.workers.config import ModelConfig
from k2serve.workers.dispatcher import LocalDispatcher
from k2serve.workers.expert_placement import ExpertPlacement
from k2serve.workers.model.experts import LocalExperts
from k2serve.workers.parallel import GroupError, ParallelContext, host_store

LAYER = 1  # the tiny preset's first MoE layer


def _run_ranks(size: int, body: Callable[[ParallelContext], Any], timeout_s: float = 5.0) -> list[Any]:
    """Run ``body(ctx)`` on ``size`` threads, one group member each; returns results or raised exceptions."""
    store = host_store("127.0.0.1", timeout_s=timeout_s)
    results: list[Any] = [None] * size

    def member(rank: int) -> None:
        ctx = ParallelContext.create(f"127.0.0.1:{store.port}", rank, size, timeout_s=timeout_s)
        try:
            results[rank] = body(ctx)
        except Exception as exc:
            results[rank] = exc
        finally:
            ctx.close()

    threads = [threading.Thread(target=member, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=4 * timeout_s + 10)
    assert not any(t.is_alive() for t in threads), "a rank thread hung"
    return results


def _experts(config: ModelConfig, expert_ids: tuple[int, ...], full: LocalExperts) -> LocalExperts:
    experts = LocalExperts(config, expert_ids, device="cpu", dtype=torch.float32, layer_id=LAYER)
    with torch.no_grad():
        experts.gate_up_proj.copy_(full.gate_up_proj[list(expert_ids)])
        experts.down_proj.copy_(full.down_proj[list(expert_ids)])
    return experts


def _inputs(
    config: ModelConfig, num_tokens: int, seed: int, only: tuple[int, ...] | None = None
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, config.hidden_size, generator=g)
    k, e = config.num_experts_per_tok, config.n_routed_experts
    pool = torch.tensor(only if only is not None else range(e))
    rows = [pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(num_tokens)]
    ids = torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.int64)  # [T, K] distinct per row
    weights = torch.rand(num_tokens, k, generator=g)
    return hidden, ids.to(torch.int64), weights


@pytest.fixture(scope="module")
def full_experts(tiny: ModelConfig) -> LocalExperts:
    experts = LocalExperts(tiny, range(tiny.n_routed_experts), device="cpu", dtype=torch.float32, layer_id=LAYER)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g) * 0.1)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) * 0.1)
    return experts


def _check_group(
    tiny: ModelConfig,
    full: LocalExperts,
    placement: ExpertPlacement,
    tokens_per_rank: list[int],
    only: tuple[int, ...] | None = None,
) -> list[AllToAllDispatcher]:
    size = placement.num_ranks
    inputs = [_inputs(tiny, n, seed=10 + r, only=only) for r, n in enumerate(tokens_per_rank)]
    reference = [LocalDispatcher().dispatch(h, i, w, full) for h, i, w in inputs]

    def body(ctx: ParallelContext) -> tuple[torch.Tensor, AllToAllDispatcher]:
        dispatcher = AllToAllDispatcher(ctx, placement)
        experts = _experts(tiny, placement.rank_experts(LAYER, ctx.rank), full)
        return dispatcher.dispatch(*inputs[ctx.rank], experts), dispatcher

    results = _run_ranks(size, body)
    for rank, result in enumerate(results):
        assert not isinstance(result, Exception), result
        out, _ = result
        assert out.shape == reference[rank].shape
        torch.testing.assert_close(out, reference[rank], rtol=1e-5, atol=1e-5)
    return [d for _, d in results]


@pytest.mark.parametrize(
    ("size", "tokens"),
    [(2, [5, 9]), (2, [0, 7]), (4, [4, 0, 11, 2]), (4, [1, 0, 0, 13]), (4, [0, 0, 0, 0])],
)
def test_matches_local_dispatch_with_uneven_and_empty_ranks(
    tiny: ModelConfig, full_experts: LocalExperts, size: int, tokens: list[int]
) -> None:
    placement = ExpertPlacement.initial(tiny.n_routed_experts, size, tiny.moe_layer_ids)
    _check_group(tiny, full_experts, placement, tokens)


def test_all_tokens_to_one_rank(tiny: ModelConfig, full_experts: LocalExperts) -> None:
    placement = ExpertPlacement.initial(tiny.n_routed_experts, 4, tiny.moe_layer_ids)
    owned = placement.rank_experts(LAYER, 2)  # every token picks experts of rank 2 only
    dispatchers = _check_group(tiny, full_experts, placement, [6, 3, 0, 5], only=owned)
    assert dispatchers[2].stats.tokens_sent == 0  # rank 2's own tokens never leave it
    assert all(dispatchers[r].stats.tokens_sent == n for r, n in ((0, 6), (1, 3), (3, 5)))


def test_replicated_placement_gives_the_same_result(tiny: ModelConfig, full_experts: LocalExperts) -> None:
    placement = ExpertPlacement.initial(tiny.n_routed_experts, 2, tiny.moe_layer_ids, num_redundant=2)
    assert placement.replica_table(LAYER)[1].max() == 2  # some experts really have two replicas
    _check_group(tiny, full_experts, placement, [17, 6])


def test_bytes_follow_the_formula(tiny: ModelConfig, full_experts: LocalExperts) -> None:
    """tokens × hidden × 4 bytes, once per token per *remote* destination rank (deduplicated)."""
    size, tokens = 4, [9, 4, 0, 12]
    placement = ExpertPlacement.initial(tiny.n_routed_experts, size, tiny.moe_layer_ids)
    dispatchers = _check_group(tiny, full_experts, placement, tokens)
    per_rank = tiny.n_routed_experts // size
    for rank, n in enumerate(tokens):
        _, ids, _ = _inputs(tiny, n, seed=10 + rank)
        remote_rows = sum(len({int(e) // per_rank for e in row} - {rank}) for row in ids)
        stats = dispatchers[rank].stats
        assert stats.dispatch_bytes == remote_rows * tiny.hidden_size * 4
        assert stats.combine_bytes == stats.dispatch_bytes
        assert stats.metadata_bytes == remote_rows * 2 * tiny.num_experts_per_tok * 4
        assert int(stats.total_load.sum()) == n * tiny.num_experts_per_tok


def test_a_departed_peer_is_an_error_on_every_other_rank_not_a_hang(
    tiny: ModelConfig, full_experts: LocalExperts
) -> None:
    placement = ExpertPlacement.initial(tiny.n_routed_experts, 4, tiny.moe_layer_ids)

    def body(ctx: ParallelContext) -> float:
        dispatcher = AllToAllDispatcher(ctx, placement)
        experts = _experts(tiny, placement.rank_experts(LAYER, ctx.rank), full_experts)
        dispatcher.dispatch(*_inputs(tiny, 3, seed=ctx.rank), experts)  # one good round
        if ctx.rank == 1:
            ctx.abandon("test: rank 1 leaves")  # drops its connections, like a dead process
            return 0.0
        started = time.monotonic()
        with pytest.raises(GroupError, match="peer rank is dead or stuck"):
            dispatcher.dispatch(*_inputs(tiny, 3, seed=ctx.rank), experts)
        with pytest.raises(GroupError, match="broken"):  # and stays broken
            dispatcher.dispatch(*_inputs(tiny, 3, seed=ctx.rank), experts)
        return time.monotonic() - started

    results = _run_ranks(4, body, timeout_s=3.0)
    for rank in (0, 2, 3):
        assert isinstance(results[rank], float), results[rank]
        assert results[rank] < 3.0 + 2.0  # at the latest the collective timeout, never a hang
