"""``ExpertPlacement``: which logical routed expert each physical expert slot holds, per MoE layer.

Kimi K2 / DeepSeek-V3 MoE layers have E routed experts; expert parallelism splits them over N ranks
with S slots each. A placement maps every one of the P = N*S physical slots to a logical expert,
per MoE layer, and when P > E the spare slots hold redundant replicas of hot experts (DeepSeek's
EPLB). Physical slot ``s`` lives on rank ``s // S`` at local index ``s % S``. Rules, checked on
construction: within one layer a rank never holds two replicas of the same logical expert (its S
slots are distinct logical ids), and every logical expert has at least one replica in every layer;
hence ``1 <= replicas <= N`` and ``S <= E <= P``.

Lifecycle:
1. start-up: ``ExpertPlacement.initial(E, N, layers, num_redundant)`` gives rank ``r`` the
   contiguous block of ``E/N`` experts, then ``num_redundant/N`` replicas of the first experts of
   rank ``(r + 1) % N``'s block; the same table in every layer.
2. serving: ranks count the tokens routed to each physical slot over a window, ``[L, P]``;
   ``logical_load`` folds the counts onto logical experts ``[L, E]``, ``rank_load`` onto ranks
   ``[L, N]``, and ``imbalance`` reports max/mean rank load per layer.
3. rebalance: ``rebalance(logical_load, N, S, layers)`` recomputes replica counts and their packing
   onto ranks from the window's ``[L, E]`` counts. It is deterministic (pure Python over float64
   on the CPU), so every rank may compute it from the same all-reduced counts; or one process
   computes it and ``to_json`` / ``from_json`` hand it to the rank processes. Moving the expert
   weights to match a new placement is the caller's job.

Legend: L = MoE layers (``len(layers)``; ``layers`` holds their model layer ids, ascending),
E = logical experts, N = ranks, S = slots per rank, P = N*S physical slots,
R_max = the most replicas any expert has in a layer.
"""

from __future__ import annotations

import heapq
import itertools
import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

_JSON_VERSION = 1
_JSON_FIELDS = ("version", "num_logical", "num_ranks", "slots_per_rank", "layers", "physical_to_logical")


class PlacementError(ValueError):
    """An argument is invalid. ``field`` names the argument (or the JSON field); ``str(e)`` is ``"field: message"``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _as_int(field: str, value: object, minimum: int) -> int:
    """``value`` as a plain int >= ``minimum`` (ints, numpy ints; never bool or float)."""
    if isinstance(value, bool):
        raise PlacementError(field, "must be an int, got bool")
    try:
        result = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise PlacementError(field, f"must be an int, got {type(value).__name__}") from None
    if result < minimum:
        raise PlacementError(field, f"must be >= {minimum}, got {result}")
    return result


def _as_sequence(field: str, value: object) -> Sequence[Any]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise PlacementError(field, f"must be a sequence, got {type(value).__name__}")
    return value


def _as_layers(value: object) -> tuple[int, ...]:
    """Model layer ids: non-negative ints, strictly ascending (so distinct)."""
    layers = tuple(_as_int("layers", item, 0) for item in _as_sequence("layers", value))
    for before, after in itertools.pairwise(layers):
        if after <= before:
            raise PlacementError("layers", f"must be strictly ascending model layer ids, got {list(layers)}")
    return layers


@dataclass(frozen=True)
class ExpertPlacement:
    """Physical slot -> logical expert, per MoE layer. Immutable; validated on construction.

    ``physical_to_logical[i][s]`` is the logical expert in physical slot ``s`` of MoE layer
    ``layers[i]``; methods taking ``layer`` take the model layer id, not the index ``i``.
    """

    num_logical: int  # E
    num_ranks: int  # N
    slots_per_rank: int  # S (N*S >= E, S <= E)
    layers: tuple[int, ...]  # [L] model layer ids of the MoE layers, ascending
    physical_to_logical: tuple[tuple[int, ...], ...]  # [L][P]

    def __post_init__(self) -> None:
        num_logical = _as_int("num_logical", self.num_logical, 1)
        num_ranks = _as_int("num_ranks", self.num_ranks, 1)
        slots = _as_int("slots_per_rank", self.slots_per_rank, 1)
        _check_geometry(num_logical, num_ranks, slots)
        layers = _as_layers(self.layers)
        rows = _as_sequence("physical_to_logical", self.physical_to_logical)
        if len(rows) != len(layers):
            raise PlacementError("physical_to_logical", f"has {len(rows)} rows but there are {len(layers)} layers")
        num_physical = num_ranks * slots
        table = []
        for index, (layer, raw_row) in enumerate(zip(layers, rows, strict=True)):
            row = _as_sequence("physical_to_logical", raw_row)
            where = f"layer {layer} (row {index})"
            if len(row) != num_physical:
                raise PlacementError(
                    "physical_to_logical", f"{where} has {len(row)} slots, expected N*S = {num_physical}"
                )
            ids = tuple(_as_int("physical_to_logical", item, 0) for item in row)
            for slot, expert in enumerate(ids):
                if expert >= num_logical:
                    raise PlacementError(
                        "physical_to_logical", f"{where} slot {slot} holds expert {expert}, outside [0, {num_logical})"
                    )
            for rank in range(num_ranks):
                local = ids[rank * slots : (rank + 1) * slots]
                if len(set(local)) != slots:
                    twice = sorted({expert for expert in local if local.count(expert) > 1})
                    raise PlacementError(
                        "physical_to_logical", f"{where} rank {rank} holds more than one replica of expert(s) {twice}"
                    )
            missing = sorted(set(range(num_logical)) - set(ids))
            if missing:
                raise PlacementError("physical_to_logical", f"{where} has no replica of expert(s) {missing}")
            table.append(ids)
        object.__setattr__(self, "num_logical", num_logical)
        object.__setattr__(self, "num_ranks", num_ranks)
        object.__setattr__(self, "slots_per_rank", slots)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "physical_to_logical", tuple(table))

    @classmethod
    def initial(
        cls, num_logical: int, num_ranks: int, layers: Sequence[int], num_redundant: int = 0
    ) -> ExpertPlacement:
        """The start-up placement, the same in every layer.

        Rank ``r`` holds the contiguous block ``[r*E/N, (r+1)*E/N)`` in its first slots, then
        ``k = num_redundant/N`` replicas of the first ``k`` experts of rank ``(r+1) % N``'s block
        (so no rank holds a duplicate); S = E/N + k. Needs ``E % N == 0``, ``num_redundant % N == 0``,
        ``k <= E/N`` and ``num_redundant == 0`` when N == 1.
        """
        experts = _as_int("num_logical", num_logical, 1)
        ranks = _as_int("num_ranks", num_ranks, 1)
        redundant = _as_int("num_redundant", num_redundant, 0)
        if experts % ranks:
            raise PlacementError("num_logical", f"{experts} experts do not split evenly over {ranks} ranks")
        if ranks == 1 and redundant:
            raise PlacementError(
                "num_redundant", f"must be 0 with a single rank (it would hold duplicates), got {redundant}"
            )
        if redundant % ranks:
            raise PlacementError("num_redundant", f"{redundant} redundant slots do not split evenly over {ranks} ranks")
        block = experts // ranks
        extra = redundant // ranks
        if extra > block:
            raise PlacementError(
                "num_redundant",
                f"{extra} redundant slots per rank exceed the {block} experts of the next rank's block "
                "(a rank would hold a duplicate)",
            )
        row: list[int] = []
        for rank in range(ranks):
            row.extend(range(rank * block, (rank + 1) * block))
            neighbour = (rank + 1) % ranks
            row.extend(range(neighbour * block, neighbour * block + extra))
        layer_ids = _as_layers(layers)
        return cls(experts, ranks, block + extra, layer_ids, tuple(tuple(row) for _ in layer_ids))

    @property
    def num_physical(self) -> int:
        """P = N*S."""
        return self.num_ranks * self.slots_per_rank

    def layer_index(self, layer: int) -> int:
        """Position of model layer id ``layer`` in ``layers`` (the row of ``physical_to_logical``)."""
        if not isinstance(layer, bool) and isinstance(layer, int) and layer in self.layers:
            return self.layers.index(layer)
        raise PlacementError("layer", f"{layer!r} is not a MoE layer of this placement (layers {list(self.layers)})")

    def rank_experts(self, layer: int, rank: int) -> tuple[int, ...]:
        """Logical ids held by ``rank`` in model layer ``layer``, in local slot order."""
        row = self.physical_to_logical[self.layer_index(layer)]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.num_ranks:
            raise PlacementError("rank", f"must be an int in [0, {self.num_ranks}), got {rank!r}")
        return row[rank * self.slots_per_rank : (rank + 1) * self.slots_per_rank]

    def replica_table(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots ``[E, R_max]`` int64: physical slots of each logical expert, ascending, padded with -1;
        counts ``[E]`` int64: replicas per expert). CPU tensors; model layer id ``layer``."""
        row = self.physical_to_logical[self.layer_index(layer)]
        slots_of: list[list[int]] = [[] for _ in range(self.num_logical)]
        for slot, expert in enumerate(row):
            slots_of[expert].append(slot)
        width = max(len(slots) for slots in slots_of)
        padded = [slots + [-1] * (width - len(slots)) for slots in slots_of]
        counts = [len(slots) for slots in slots_of]
        return torch.tensor(padded, dtype=torch.int64), torch.tensor(counts, dtype=torch.int64)

    def logical_load(self, physical_load: torch.Tensor) -> torch.Tensor:
        """``[L, P]`` per-slot load -> ``[L, E]`` per-expert load (sum over replicas); same dtype and device."""
        self._check_physical_load(physical_load)
        index = torch.tensor(self.physical_to_logical, dtype=torch.int64, device=physical_load.device)
        index = index.reshape(len(self.layers), self.num_physical)
        out = torch.zeros((len(self.layers), self.num_logical), dtype=physical_load.dtype, device=physical_load.device)
        return out.scatter_add_(1, index, physical_load)

    def rank_load(self, physical_load: torch.Tensor) -> torch.Tensor:
        """``[L, P]`` per-slot load -> ``[L, N]`` per-rank load (sum over each rank's S slots)."""
        self._check_physical_load(physical_load)
        return physical_load.reshape(len(self.layers), self.num_ranks, self.slots_per_rank).sum(dim=2)

    def _check_physical_load(self, physical_load: torch.Tensor) -> None:
        if not isinstance(physical_load, torch.Tensor):
            raise PlacementError("physical_load", f"must be a torch.Tensor, got {type(physical_load).__name__}")
        expected = (len(self.layers), self.num_physical)
        if tuple(physical_load.shape) != expected:
            raise PlacementError(
                "physical_load", f"expected shape [L, P] = {list(expected)}, got {list(physical_load.shape)}"
            )

    def to_json(self) -> str:
        """Compact JSON object; ``from_json`` reads it back to an equal placement."""
        return json.dumps(
            {
                "version": _JSON_VERSION,
                "num_logical": self.num_logical,
                "num_ranks": self.num_ranks,
                "slots_per_rank": self.slots_per_rank,
                "layers": list(self.layers),
                "physical_to_logical": [list(row) for row in self.physical_to_logical],
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> ExpertPlacement:
        """Inverse of ``to_json``. Malformed JSON -> ``PlacementError("text", ...)``; a missing, unknown
        or invalid field -> ``PlacementError`` naming that field."""
        if not isinstance(text, str | bytes | bytearray):
            raise PlacementError("text", f"must be a JSON string, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise PlacementError("text", f"not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise PlacementError("text", f"expected a JSON object, got {type(data).__name__}")
        for key in _JSON_FIELDS:
            if key not in data:
                raise PlacementError(key, "missing from the JSON object")
        for key in data:
            if key not in _JSON_FIELDS:
                raise PlacementError(str(key), "unknown field in the JSON object")
        if isinstance(data["version"], bool) or data["version"] != _JSON_VERSION:
            raise PlacementError("version", f"expected {_JSON_VERSION}, got {data['version']!r}")
        rows = data["physical_to_logical"]
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            raise PlacementError("physical_to_logical", "expected a list of lists of ints")
        layers = data["layers"]
        if not isinstance(layers, list):
            raise PlacementError("layers", "expected a list of ints")
        return cls(
            num_logical=data["num_logical"],
            num_ranks=data["num_ranks"],
            slots_per_rank=data["slots_per_rank"],
            layers=tuple(layers),
            physical_to_logical=tuple(tuple(row) for row in rows),
        )


def _check_geometry(num_logical: int, num_ranks: int, slots_per_rank: int) -> None:
    if slots_per_rank > num_logical:
        raise PlacementError(
            "slots_per_rank",
            f"{slots_per_rank} slots per rank exceed the {num_logical} experts (a rank's experts are distinct)",
        )
    if num_ranks * slots_per_rank < num_logical:
        raise PlacementError(
            "slots_per_rank",
            f"num_ranks * slots_per_rank = {num_ranks * slots_per_rank} < {num_logical} experts",
        )


def rebalance(
    logical_load: torch.Tensor, num_ranks: int, slots_per_rank: int, layers: Sequence[int]
) -> ExpertPlacement:
    """A placement for ``logical_load`` ``[L, E]`` (token counts over a window, any finite non-negative numbers).

    Per layer (DeepSeek EPLB):
    1. replicas: every expert starts with 1; each of the P - E spare slots gives one more replica to
       the expert with the highest load per replica (ties -> lower expert id), never past N replicas.
    2. pack: each replica carries load/replicas; replicas go heaviest first (ties -> lower expert
       id) to the least-loaded rank (ties -> lower rank) that has a free slot and does not hold that
       expert yet. When every rank with a free slot already holds it, one swap repairs it: a
       replica ``x`` moves from a full rank ``b`` without the expert to a rank ``a`` with a free slot
       that lacks ``x`` (such a pair always exists), and the expert takes ``b``'s freed slot; of all
       such moves the one with the smallest ``max(load_a, load_b)`` afterwards (ties -> lowest
       ``(a, b, x)``). At most one swap per replica, so the loop is bounded by P.
    Within a rank, slots are ordered by logical id ascending.

    Deterministic: the same input gives the same output on every process (float64 on the CPU).
    """
    if not isinstance(logical_load, torch.Tensor):
        raise PlacementError("logical_load", f"must be a torch.Tensor, got {type(logical_load).__name__}")
    layer_ids = _as_layers(layers)
    if logical_load.dim() != 2:
        raise PlacementError("logical_load", f"must be 2-D [L, E], got shape {list(logical_load.shape)}")
    if logical_load.shape[0] != len(layer_ids):
        raise PlacementError("logical_load", f"has {logical_load.shape[0]} rows but there are {len(layer_ids)} layers")
    num_logical = logical_load.shape[1]
    if num_logical < 1:
        raise PlacementError("logical_load", "has no experts (E == 0)")
    ranks = _as_int("num_ranks", num_ranks, 1)
    slots = _as_int("slots_per_rank", slots_per_rank, 1)
    _check_geometry(num_logical, ranks, slots)
    if logical_load.is_complex() or logical_load.dtype == torch.bool:
        raise PlacementError("logical_load", f"must be a real numeric tensor, got {logical_load.dtype}")
    loads = logical_load.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(loads).all()):
        raise PlacementError("logical_load", "must be finite")
    if bool((loads < 0).any()):
        raise PlacementError("logical_load", "must be non-negative")
    table = tuple(_rebalance_layer(row, ranks, slots)[0] for row in loads.tolist())
    return ExpertPlacement(num_logical, ranks, slots, layer_ids, table)


def _rebalance_layer(loads: list[float], num_ranks: int, slots_per_rank: int) -> tuple[tuple[int, ...], int]:
    """One layer of ``rebalance``: (physical_to_logical row [P], number of repair swaps it needed)."""
    counts = _replica_counts(loads, num_ranks, num_ranks * slots_per_rank - len(loads))
    members, repairs = _pack(loads, counts, num_ranks, slots_per_rank)
    return tuple(expert for rank_members in members for expert in sorted(rank_members)), repairs


def _replica_counts(loads: list[float], num_ranks: int, spare: int) -> list[int]:
    """Replicas per expert: 1 each, then each spare slot to the highest load/replicas (ties -> lower id), <= N."""
    counts = [1] * len(loads)
    heap = [(-load, expert) for expert, load in enumerate(loads)]  # (-load per replica, expert)
    heapq.heapify(heap)
    for _ in range(spare):
        # Never empty: S <= E means spare = N*S - E <= E*(N - 1), the room left under the N cap.
        _, expert = heapq.heappop(heap)
        counts[expert] += 1
        if counts[expert] < num_ranks:
            heapq.heappush(heap, (-loads[expert] / counts[expert], expert))
    return counts


def _pack(loads: list[float], counts: list[int], num_ranks: int, slots_per_rank: int) -> tuple[list[list[int]], int]:
    """Greedy packing of replicas onto ranks (see ``rebalance``): (experts per rank, repair swaps)."""
    weight = [load / count for load, count in zip(loads, counts, strict=True)]
    replicas = sorted(
        ((weight[expert], expert) for expert, count in enumerate(counts) for _ in range(count)),
        key=lambda item: (-item[0], item[1]),
    )
    members: list[list[int]] = [[] for _ in range(num_ranks)]
    held: list[set[int]] = [set() for _ in range(num_ranks)]
    rank_loads = [0.0] * num_ranks
    open_ranks = [(0.0, rank) for rank in range(num_ranks)]  # heap of (load, rank) over ranks with a free slot
    repairs = 0
    for replica_weight, expert in replicas:
        skipped = []
        while open_ranks and expert in held[open_ranks[0][1]]:
            skipped.append(heapq.heappop(open_ranks))
        if open_ranks:
            _, rank = heapq.heappop(open_ranks)
            for item in skipped:
                heapq.heappush(open_ranks, item)
        else:
            # Every rank with a free slot holds ``expert``: swap one replica over, then use the freed slot.
            rank = _repair(expert, members, held, rank_loads, weight, slots_per_rank)
            repairs += 1
            open_ranks = [
                (rank_loads[r], r) for r in range(num_ranks) if r != rank and len(members[r]) < slots_per_rank
            ]
            heapq.heapify(open_ranks)
        members[rank].append(expert)
        held[rank].add(expert)
        rank_loads[rank] += replica_weight
        if len(members[rank]) < slots_per_rank:
            heapq.heappush(open_ranks, (rank_loads[rank], rank))
    return members, repairs


def _repair(
    expert: int,
    members: list[list[int]],
    held: list[set[int]],
    rank_loads: list[float],
    weight: list[float],
    slots_per_rank: int,
) -> int:
    """Move one replica so that a rank without ``expert`` gets a free slot; returns that rank.

    Called when every rank with a free slot (``a``) holds ``expert``. Some rank ``b`` lacks it (the
    expert has fewer than N replicas placed) and is therefore full; ``a`` holds at most S-2 experts
    besides ``expert`` while ``b`` holds S others, so ``b`` has a replica ``x`` that ``a`` lacks.
    Moving ``x`` from ``b`` to ``a`` keeps every rank's experts distinct.
    """
    best: tuple[float, int, int, int] | None = None
    num_ranks = len(members)
    for a in range(num_ranks):
        if len(members[a]) >= slots_per_rank:
            continue
        for b in range(num_ranks):
            if expert in held[b]:
                continue
            for x in sorted(held[b] - held[a]):
                peak = max(rank_loads[a] + weight[x], rank_loads[b] - weight[x] + weight[expert])
                key = (peak, a, b, x)
                if best is None or key < best:
                    best = key
    if best is None:  # unreachable, see the docstring
        raise RuntimeError(f"expert placement: no repair swap for expert {expert}")
    _, a, b, x = best
    members[b].remove(x)
    held[b].discard(x)
    members[a].append(x)
    held[a].add(x)
    rank_loads[a] += weight[x]
    rank_loads[b] -= weight[x]
    return b


def imbalance(rank_load: torch.Tensor) -> torch.Tensor:
    """``[L, N]`` per-rank load -> ``[L]`` max/mean per layer (1.0 = perfect; a layer with zero load -> 1.0).

    Floating inputs keep their dtype; integer inputs give float64.
    """
    if not isinstance(rank_load, torch.Tensor):
        raise PlacementError("rank_load", f"must be a torch.Tensor, got {type(rank_load).__name__}")
    if rank_load.dim() != 2 or rank_load.shape[1] < 1:
        raise PlacementError("rank_load", f"must be 2-D [L, N] with N >= 1, got shape {list(rank_load.shape)}")
    values = rank_load if rank_load.is_floating_point() else rank_load.to(torch.float64)
    mean = values.mean(dim=1)
    peak = values.amax(dim=1)
    return torch.where(mean > 0, peak / mean, torch.ones_like(mean))
