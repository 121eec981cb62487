"""ExpertPlacement: initial tables, validation, replica tables, load folding, EPLB rebalance, JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from k2serve.workers.expert_placement import (
    ExpertPlacement,
    PlacementError,
    _pack,
    _rebalance_layer,
    _repair,
    imbalance,
    rebalance,
)


def _ranks(row: tuple[int, ...], slots_per_rank: int) -> list[tuple[int, ...]]:
    return [row[i : i + slots_per_rank] for i in range(0, len(row), slots_per_rank)]


def _replica_counts(row: tuple[int, ...], num_logical: int) -> list[int]:
    return [row.count(expert) for expert in range(num_logical)]


def _assert_valid(placement: ExpertPlacement) -> None:
    """The placement rules, checked from the raw table (independent of __post_init__)."""
    e, n, s = placement.num_logical, placement.num_ranks, placement.slots_per_rank
    assert len(placement.physical_to_logical) == len(placement.layers)
    for row in placement.physical_to_logical:
        assert len(row) == n * s
        for local in _ranks(row, s):
            assert len(set(local)) == s, f"duplicate on a rank: {local}"
        counts = _replica_counts(row, e)
        assert all(1 <= count <= n for count in counts), counts


def _even_split_rank_load(placement: ExpertPlacement, logical_load: torch.Tensor) -> list[list[float]]:
    """Per-rank load when each logical expert's load is split evenly over its replicas, from the table alone."""
    out = []
    for row, loads in zip(placement.physical_to_logical, logical_load.tolist(), strict=True):
        counts = _replica_counts(row, placement.num_logical)
        out.append([sum(loads[e] / counts[e] for e in local) for local in _ranks(row, placement.slots_per_rank)])
    return out


def _max_over_mean(values: list[float]) -> float:
    return max(values) / (sum(values) / len(values))


# --- PlacementError ---------------------------------------------------------------------------------


def test_placement_error_names_the_field() -> None:
    error = PlacementError("num_ranks", "must be >= 1")
    assert isinstance(error, ValueError)
    assert error.field == "num_ranks"
    assert str(error) == "num_ranks: must be >= 1"


# --- initial ------------------------------------------------------------------------------------------


def test_initial_single_rank_holds_every_expert() -> None:
    placement = ExpertPlacement.initial(8, 1, (1, 2))
    assert placement.slots_per_rank == 8 and placement.num_physical == 8
    assert placement.physical_to_logical == ((0, 1, 2, 3, 4, 5, 6, 7),) * 2
    assert placement.rank_experts(2, 0) == (0, 1, 2, 3, 4, 5, 6, 7)


def test_initial_two_ranks_without_redundancy() -> None:
    placement = ExpertPlacement.initial(8, 2, [1, 2])
    assert placement.layers == (1, 2)
    assert placement.slots_per_rank == 4
    assert placement.rank_experts(1, 0) == (0, 1, 2, 3)
    assert placement.rank_experts(1, 1) == (4, 5, 6, 7)


def test_initial_two_ranks_with_redundancy_takes_the_next_block_head() -> None:
    placement = ExpertPlacement.initial(8, 2, (3,), num_redundant=2)
    assert placement.slots_per_rank == 5
    # rank 0: its block 0..3 + expert 4 (head of rank 1's block); rank 1: 4..7 + expert 0 (wraps to rank 0).
    assert placement.physical_to_logical == ((0, 1, 2, 3, 4, 4, 5, 6, 7, 0),)


def test_initial_four_ranks_exact_tables() -> None:
    plain = ExpertPlacement.initial(8, 4, (1, 2))
    assert plain.physical_to_logical == ((0, 1, 2, 3, 4, 5, 6, 7),) * 2
    redundant = ExpertPlacement.initial(8, 4, (1, 2), num_redundant=4)
    assert redundant.slots_per_rank == 3
    assert redundant.physical_to_logical == ((0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 0),) * 2
    full = ExpertPlacement.initial(8, 4, (1,), num_redundant=8)  # k = E/N: the whole next block
    assert _ranks(full.physical_to_logical[0], 4) == [(0, 1, 2, 3), (2, 3, 4, 5), (4, 5, 6, 7), (6, 7, 0, 1)]


@pytest.mark.parametrize(("num_ranks", "num_redundant"), [(1, 0), (2, 0), (2, 2), (2, 8), (4, 0), (4, 4), (4, 8)])
def test_initial_is_valid_and_counts_replicas(num_ranks: int, num_redundant: int) -> None:
    placement = ExpertPlacement.initial(8, num_ranks, (1, 2, 5), num_redundant)
    _assert_valid(placement)
    assert placement.num_physical == 8 + num_redundant
    for row in placement.physical_to_logical:
        assert sum(count - 1 for count in _replica_counts(row, 8)) == num_redundant
    assert placement.physical_to_logical[0] == placement.physical_to_logical[2]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"num_logical": 8, "num_ranks": 3}, "num_logical"),
        ({"num_logical": 8, "num_ranks": 1, "num_redundant": 2}, "num_redundant"),
        ({"num_logical": 8, "num_ranks": 4, "num_redundant": 2}, "num_redundant"),
        ({"num_logical": 8, "num_ranks": 4, "num_redundant": 12}, "num_redundant"),
        ({"num_logical": 8, "num_ranks": 4, "num_redundant": -4}, "num_redundant"),
        ({"num_logical": 8, "num_ranks": 0}, "num_ranks"),
        ({"num_logical": 0, "num_ranks": 1}, "num_logical"),
        ({"num_logical": 8.0, "num_ranks": 2}, "num_logical"),
    ],
)
def test_initial_rejects_bad_arguments(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(PlacementError) as info:
        ExpertPlacement.initial(layers=(1,), **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_initial_rejects_unordered_layers() -> None:
    with pytest.raises(PlacementError) as info:
        ExpertPlacement.initial(8, 2, (2, 1))
    assert info.value.field == "layers"
    with pytest.raises(PlacementError) as info:
        ExpertPlacement.initial(8, 2, (1, 1))
    assert info.value.field == "layers"


# --- constructor validation ----------------------------------------------------------------------------


def _make(
    row: tuple[int, ...], *, e: int = 4, n: int = 2, s: int = 3, layers: tuple[int, ...] = (1,)
) -> ExpertPlacement:
    return ExpertPlacement(e, n, s, layers, tuple(row for _ in layers))


def test_constructor_accepts_replicas_on_different_ranks() -> None:
    placement = _make((0, 1, 2, 0, 2, 3))
    assert placement.rank_experts(1, 1) == (0, 2, 3)


@pytest.mark.parametrize(
    ("row", "field", "needle"),
    [
        ((0, 0, 1, 2, 3, 1), "physical_to_logical", "rank 0 holds more than one replica of expert(s) [0]"),
        ((0, 1, 2, 0, 1, 2), "physical_to_logical", "no replica of expert(s) [3]"),
        ((0, 1, 2, 3, 4, 1), "physical_to_logical", "expert 4, outside [0, 4)"),
        ((0, 1, 2, 3, -1, 1), "physical_to_logical", ">= 0"),
        ((0, 1, 2, 3, 0), "physical_to_logical", "expected N*S = 6"),
    ],
)
def test_constructor_rejects_bad_tables(row: tuple[int, ...], field: str, needle: str) -> None:
    with pytest.raises(PlacementError) as info:
        _make(row)
    assert info.value.field == field
    assert needle in str(info.value)


def test_constructor_rejects_bad_geometry() -> None:
    _assert_valid(_make((0, 1, 2, 3, 0, 1, 2, 3), e=4, n=2, s=4))  # S == E: every rank holds every expert
    with pytest.raises(PlacementError) as info:
        _make((0, 1, 2, 3, 4, 0, 1, 2, 3, 4), e=4, n=2, s=5)
    assert info.value.field == "slots_per_rank"  # S > E: a rank cannot hold S distinct experts
    with pytest.raises(PlacementError) as info:
        _make((0, 1, 2), e=4, n=3, s=1)
    assert info.value.field == "slots_per_rank"  # N*S < E
    with pytest.raises(PlacementError) as info:
        ExpertPlacement(4, 2, 2, (1, 2), ((0, 1, 2, 3),))
    assert info.value.field == "physical_to_logical"
    with pytest.raises(PlacementError) as info:
        ExpertPlacement(4, 0, 2, (1,), ((0, 1, 2, 3),))
    assert info.value.field == "num_ranks"


def test_placement_is_frozen() -> None:
    placement = ExpertPlacement.initial(4, 2, (1,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        placement.num_ranks = 4  # type: ignore[misc]


def test_layer_and_rank_lookups() -> None:
    placement = ExpertPlacement(4, 2, 2, (3, 7), ((0, 1, 2, 3), (3, 2, 1, 0)))
    assert placement.layer_index(3) == 0 and placement.layer_index(7) == 1
    assert placement.rank_experts(7, 0) == (3, 2)
    assert placement.rank_experts(7, 1) == (1, 0)
    with pytest.raises(PlacementError) as info:
        placement.layer_index(4)
    assert info.value.field == "layer"
    with pytest.raises(PlacementError) as info:
        placement.rank_experts(3, 2)
    assert info.value.field == "rank"


# --- replica_table ------------------------------------------------------------------------------------


def test_replica_table_of_redundant_initial() -> None:
    placement = ExpertPlacement.initial(8, 4, (1, 2), num_redundant=4)
    slots, counts = placement.replica_table(2)
    assert slots.dtype == torch.int64 and counts.dtype == torch.int64
    # table (0,1,2 | 2,3,4 | 4,5,6 | 6,7,0): expert 0 sits in slots 0 and 11, expert 2 in 2 and 3, ...
    assert slots.tolist() == [[0, 11], [1, -1], [2, 3], [4, -1], [5, 6], [7, -1], [8, 9], [10, -1]]
    assert counts.tolist() == [2, 1, 2, 1, 2, 1, 2, 1]


def test_replica_table_without_redundancy_and_per_layer() -> None:
    placement = ExpertPlacement(3, 3, 2, (1, 2), ((0, 1, 1, 2, 2, 0), (0, 1, 2, 0, 1, 2)))
    slots, counts = placement.replica_table(1)
    assert slots.tolist() == [[0, 5], [1, 2], [3, 4]]
    assert counts.tolist() == [2, 2, 2]
    slots, counts = placement.replica_table(2)
    assert slots.tolist() == [[0, 3], [1, 4], [2, 5]]
    single = ExpertPlacement.initial(4, 2, (1,))
    slots, counts = single.replica_table(1)
    assert slots.tolist() == [[0], [1], [2], [3]] and counts.tolist() == [1, 1, 1, 1]


# --- logical_load / rank_load / imbalance ---------------------------------------------------------------


def test_logical_and_rank_load_fold_slots() -> None:
    placement = ExpertPlacement.initial(8, 4, (1, 2), num_redundant=4)  # (0,1,2 | 2,3,4 | 4,5,6 | 6,7,0)
    physical = torch.arange(24, dtype=torch.int64).reshape(2, 12)
    logical = placement.logical_load(physical)
    assert logical.dtype == torch.int64 and logical.shape == (2, 8)
    assert logical[0].tolist() == [0 + 11, 1, 2 + 3, 4, 5 + 6, 7, 8 + 9, 10]
    assert logical[1].tolist() == [12 + 23, 13, 14 + 15, 16, 17 + 18, 19, 20 + 21, 22]
    ranks = placement.rank_load(physical)
    assert ranks.tolist() == [[3, 12, 21, 30], [39, 48, 57, 66]]
    assert torch.equal(logical.sum(dim=1), physical.sum(dim=1))
    assert torch.equal(ranks.sum(dim=1), physical.sum(dim=1))


def test_load_folding_sums_on_random_float_loads() -> None:
    generator = torch.Generator().manual_seed(7)
    placement = rebalance(torch.rand(3, 10, generator=generator), 4, 4, (1, 2, 3))
    physical = torch.rand(3, 16, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(placement.logical_load(physical).sum(dim=1), physical.sum(dim=1))
    torch.testing.assert_close(placement.rank_load(physical).sum(dim=1), physical.sum(dim=1))


def test_load_folding_rejects_wrong_shapes() -> None:
    placement = ExpertPlacement.initial(8, 2, (1, 2))
    for method in (placement.logical_load, placement.rank_load):
        with pytest.raises(PlacementError) as info:
            method(torch.zeros(1, 8))
        assert info.value.field == "physical_load"


def test_imbalance_is_max_over_mean() -> None:
    rank_load = torch.tensor([[10, 10, 10, 10], [40, 0, 0, 0], [0, 0, 0, 0], [3, 1, 1, 1]])
    assert imbalance(rank_load).tolist() == [1.0, 4.0, 1.0, 2.0]
    assert imbalance(rank_load).dtype == torch.float64
    assert imbalance(rank_load.float()).dtype == torch.float32
    with pytest.raises(PlacementError) as info:
        imbalance(torch.ones(4))
    assert info.value.field == "rank_load"


# --- rebalance ----------------------------------------------------------------------------------------


def test_rebalance_replicates_the_hot_expert_and_lowers_imbalance() -> None:
    load = torch.tensor([[1000.0] + [10.0] * 7])  # one layer, E=8
    initial = ExpertPlacement.initial(8, 4, (1,), num_redundant=4)  # S=3, replicas of 0, 2, 4, 6
    balanced = rebalance(load, 4, 3, (1,))
    _assert_valid(balanced)
    # Spares: expert 0 goes 1000 -> 500 -> 333 -> 250 and stops at N=4; the last spare goes to expert 1 (tie, lowest id).
    _, counts = balanced.replica_table(1)
    assert counts.tolist() == [4, 2, 1, 1, 1, 1, 1, 1]
    # Pack: 250 x4 on ranks 0..3; 10s for experts 2..7 on ranks 0,1,2,3,0,1; expert 1's two 5s on ranks 2, 3.
    assert _ranks(balanced.physical_to_logical[0], 3) == [(0, 2, 6), (0, 3, 7), (0, 1, 4), (0, 1, 5)]

    before = _even_split_rank_load(initial, load)[0]
    after = _even_split_rank_load(balanced, load)[0]
    assert before == [515.0, 20.0, 20.0, 515.0]
    assert after == [270.0, 270.0, 265.0, 265.0]
    assert _max_over_mean(before) == pytest.approx(515 / 267.5)
    assert _max_over_mean(after) == pytest.approx(270 / 267.5)

    # rank_load/imbalance agree with the independent helper when slots see an even split of the load.
    for placement, expected in ((initial, before), (balanced, after)):
        _, replicas = placement.replica_table(1)
        per_replica = load[0] / replicas.to(load.dtype)
        physical = per_replica[torch.tensor(placement.physical_to_logical[0])][None, :]
        ranks = placement.rank_load(physical)
        torch.testing.assert_close(ranks[0], torch.tensor(expected))
    imbalance_before = imbalance(torch.tensor([before])).item()
    imbalance_after = imbalance(torch.tensor([after])).item()
    assert imbalance_after < imbalance_before
    assert imbalance_after == pytest.approx(270 / 267.5)


def test_rebalance_replica_counts_follow_load_per_replica() -> None:
    # E=4, N=3, S=2: two spares. 90 -> 45 (spare 1); then 60 beats 45 (spare 2).
    placement = rebalance(torch.tensor([[90, 60, 1, 0]]), 3, 2, (1,))
    assert placement.replica_table(1)[1].tolist() == [2, 2, 1, 1]
    # All-zero load: ties go to the lowest id, capped at N replicas.
    zeros = rebalance(torch.zeros(1, 4), 2, 3, (1,))
    assert zeros.replica_table(1)[1].tolist() == [2, 2, 1, 1]
    _assert_valid(zeros)


def test_rebalance_handles_each_layer_on_its_own() -> None:
    load = torch.tensor([[1000.0] + [10.0] * 7, [10.0] * 7 + [1000.0]])
    both = rebalance(load, 4, 3, (1, 2))
    first = rebalance(load[:1], 4, 3, (1,))
    second = rebalance(load[1:], 4, 3, (2,))
    assert both.physical_to_logical == first.physical_to_logical + second.physical_to_logical
    assert both.replica_table(2)[1].tolist() == [2, 1, 1, 1, 1, 1, 1, 4]


def test_rebalance_without_spare_slots_is_one_replica_each() -> None:
    placement = rebalance(torch.tensor([[5, 1, 9, 3, 7, 2]]), 3, 2, (4,))
    assert placement.replica_table(4)[1].tolist() == [1] * 6
    # Heaviest first onto the least-loaded rank: 9->r0, 7->r1, 5->r2, 3->r2, 2->r1, 1->r0.
    assert _ranks(placement.physical_to_logical[0], 2) == [(1, 2), (4, 5), (0, 3)]


def _reference_counts(loads: list[float], num_ranks: int, spare: int) -> list[int]:
    """Step 1 of rebalance written naively: scan for the best load per replica each time."""
    counts = [1] * len(loads)
    for _ in range(spare):
        best = max((e for e in range(len(loads)) if counts[e] < num_ranks), key=lambda e: (loads[e] / counts[e], -e))
        counts[best] += 1
    return counts


def test_rebalance_invariants_on_random_loads() -> None:
    generator = torch.Generator().manual_seed(1234)
    for case in range(300):
        e = int(torch.randint(1, 13, (1,), generator=generator))
        n = int(torch.randint(1, 6, (1,), generator=generator))
        low = max(1, -(-e // n))
        s = int(torch.randint(low, e + 1, (1,), generator=generator))
        num_layers = int(torch.randint(1, 4, (1,), generator=generator))
        kind = case % 4
        if kind == 0:
            load = torch.randint(0, 1000, (num_layers, e), generator=generator).double()
        elif kind == 1:
            load = torch.rand(num_layers, e, generator=generator, dtype=torch.float64) ** 6 * 1e4
        elif kind == 2:
            load = torch.randint(0, 3, (num_layers, e), generator=generator).double()  # many ties and zeros
        else:
            load = torch.zeros(num_layers, e, dtype=torch.float64)
            load[:, 0] = 1e6
        layers = tuple(range(1, num_layers + 1))
        placement = rebalance(load, n, s, layers)
        _assert_valid(placement)
        assert placement.num_logical == e and placement.num_ranks == n and placement.slots_per_rank == s
        for layer, row in zip(layers, placement.physical_to_logical, strict=True):
            for rank in range(n):
                local = placement.rank_experts(layer, rank)
                assert list(local) == sorted(local)
            expected = _reference_counts(load[layer - 1].tolist(), n, n * s - e)
            assert _replica_counts(row, e) == expected, (e, n, s, load)
        assert rebalance(load.clone(), n, s, layers) == placement  # deterministic
        assert rebalance(load.float(), n, s, layers) == rebalance(load.float().double(), n, s, layers)


def test_rebalance_repairs_when_every_open_rank_holds_the_expert() -> None:
    # E=8, N=3, S=6: replicas [3, 2, 3, 3, 2, 2, 2, 1]. After the 7/3, 1 and 2/3 replicas, rank 0 sums to
    # 5.500000000000001 (float rounding) against 5.5 on ranks 1 and 2, so both replicas of expert 5 go to
    # ranks 1 and 2, which fills them; expert 6's first replica takes rank 0 and its second finds only
    # rank 0 open. Repair: every move (x in {1, 4, 5} from rank 1 or 2 to rank 0) gives the same peak
    # 6.0, so the lowest (a=0, b=1, x=1) wins: expert 1 moves to rank 0 and expert 6 takes rank 1's slot.
    loads = [7.0, 1.0, 2.0, 3.0, 1.0, 1.0, 1.0, 1.0]
    row, repairs = _rebalance_layer(loads, 3, 6)
    assert repairs == 1
    assert _ranks(row, 6) == [(0, 1, 2, 3, 6, 7), (0, 2, 3, 4, 5, 6), (0, 1, 2, 3, 4, 5)]
    placement = rebalance(torch.tensor([loads]), 3, 6, (1,))
    assert placement.physical_to_logical == (row,)
    _assert_valid(placement)


def test_pack_keeps_going_after_a_repair() -> None:
    # Counts given directly (not from step 1) so the repair comes before the last replica. N=2, S=4:
    # 10 -> r0; the four 1s fill r1; expert 3's first 0.4 -> r0, its second finds only r0 open (holds 3).
    # Repair moves expert 1 (every x ties at peak 11.4; lowest id) to r0 and puts 3 on r1, which is full
    # again, so the last replica (expert 4, 0.2) must go to r0.
    loads = [10.0, 1.0, 1.0, 0.8, 0.2, 1.0, 1.0]
    members, repairs = _pack(loads, [1, 1, 1, 2, 1, 1, 1], 2, 4)
    assert repairs == 1
    assert [sorted(m) for m in members] == [[0, 1, 3, 4], [2, 3, 5, 6]]


def test_repair_picks_the_swap_with_the_lowest_peak() -> None:
    # N=3, S=3, placing expert 9: rank 0 (load 1) is the only open rank and already holds 9.
    weight = [0.0, 4.0, 1.0, 2.0, 3.0, 3.0, 3.0, 0.0, 0.0, 1.0]
    members = [[9], [1, 2, 3], [4, 5, 6]]
    held = [set(m) for m in members]
    rank_loads = [1.0, 7.0, 9.0]
    # Moving x from b to rank 0: peak = max(1 + w_x, load_b - w_x + 1): x=1 -> 5, x=2 -> 7, x=3 -> 6, x=4..6 -> 7.
    target = _repair(9, members, held, rank_loads, weight, 3)
    assert target == 1
    assert members == [[9, 1], [2, 3], [4, 5, 6]]
    assert held == [{9, 1}, {2, 3}, {4, 5, 6}]
    assert rank_loads == [5.0, 3.0, 9.0]


def test_rebalance_rejects_bad_arguments() -> None:
    good = torch.ones(2, 8)
    cases: list[tuple[torch.Tensor, int, int, tuple[int, ...], str]] = [
        (torch.ones(8), 4, 2, (1,), "logical_load"),
        (good, 4, 2, (1,), "logical_load"),
        (good * -1, 4, 2, (1, 2), "logical_load"),
        (good * float("nan"), 4, 2, (1, 2), "logical_load"),
        (good, 4, 9, (1, 2), "slots_per_rank"),
        (good, 3, 2, (1, 2), "slots_per_rank"),
        (good, 0, 2, (1, 2), "num_ranks"),
        (good, 4, 2, (2, 1), "layers"),
    ]
    for load, n, s, layers, field in cases:
        with pytest.raises(PlacementError) as info:
            rebalance(load, n, s, layers)
        assert info.value.field == field, (n, s, layers, str(info.value))


# --- JSON -----------------------------------------------------------------------------------------------


def test_json_round_trip() -> None:
    generator = torch.Generator().manual_seed(3)
    placements = [
        ExpertPlacement.initial(8, 4, (1, 2), num_redundant=4),
        ExpertPlacement.initial(8, 1, ()),
        rebalance(torch.rand(3, 12, generator=generator), 4, 4, (3, 5, 9)),
    ]
    for placement in placements:
        text = placement.to_json()
        back = ExpertPlacement.from_json(text)
        assert back == placement
        assert back.to_json() == text
        assert isinstance(back.layers, tuple) and all(isinstance(row, tuple) for row in back.physical_to_logical)
    data = json.loads(placements[0].to_json())
    assert data["version"] == 1 and data["layers"] == [1, 2] and data["slots_per_rank"] == 3


def _json_with(**changes: object) -> str:
    data = json.loads(ExpertPlacement.initial(4, 2, (1,), num_redundant=2).to_json())
    data.update(changes)
    return json.dumps(data)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("{not json", "text"),
        ("[1, 2]", "text"),
        (json.dumps({"version": 1}), "num_logical"),
        (_json_with(extra=1), "extra"),
        (_json_with(version=2), "version"),
        (_json_with(num_ranks=True), "num_ranks"),
        (_json_with(num_logical=4.0), "num_logical"),
        (_json_with(layers="1"), "layers"),
        (_json_with(physical_to_logical=[[0, 0, 2, 1, 2, 3]]), "physical_to_logical"),
        (_json_with(physical_to_logical=[[0, 1, 2, 2, 3, 0.5]]), "physical_to_logical"),
        (_json_with(physical_to_logical=[0, 1, 2, 2, 3, 0]), "physical_to_logical"),
        (_json_with(physical_to_logical=[]), "physical_to_logical"),
    ],
)
def test_from_json_rejects_bad_input(text: str, field: str) -> None:
    with pytest.raises(PlacementError) as info:
        ExpertPlacement.from_json(text)
    assert info.value.field == field
