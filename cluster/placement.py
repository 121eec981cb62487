"""Placement groups: one per expert-parallel group, one bundle per rank.

Lifecycle: ``group_strategy`` decides from the alive nodes' total resources whether the whole group
fits one node (``STRICT_PACK``: every rank on one machine, all-to-all over the fastest links) or
must span nodes (``PACK``: as few nodes as possible); ``reserve`` creates the placement group and
waits, bounded, until Ray has reserved every bundle; ``release`` removes it after the group's
actors are gone (removing it kills any actor still inside).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

Strategy = Literal["STRICT_PACK", "PACK"]


def group_strategy(rank_resources: Mapping[str, float], ep_size: int, nodes: Sequence[Mapping[str, float]]) -> Strategy:
    """``STRICT_PACK`` when one node's total resources hold ``ep_size`` ranks, else ``PACK``."""
    need = {name: amount * ep_size for name, amount in rank_resources.items()}
    for node in nodes:
        if all(node.get(name, 0.0) + 1e-9 >= amount for name, amount in need.items()):
            return "STRICT_PACK"
    return "PACK"


def alive_node_resources() -> list[dict[str, float]]:
    """Total resources of every alive node of the connected Ray cluster."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def fits_cluster(rank_resources: Mapping[str, float], ep_size: int, nodes: Sequence[Mapping[str, float]]) -> bool:
    """Whether the cluster's total resources could hold the group at all (else it would wait forever)."""
    for name, amount in rank_resources.items():
        total = sum(node.get(name, 0.0) for node in nodes)
        per_node_ranks = sum(math.floor(node.get(name, 0.0) / amount + 1e-9) for node in nodes)
        if total + 1e-9 < amount * ep_size or per_node_ranks < ep_size:
            return False
    return True


async def reserve(name: str, rank_resources: Mapping[str, float], ep_size: int, timeout_s: float) -> PlacementGroup:
    """Create the group's placement group and wait until it is reserved; raises ``TimeoutError``."""
    strategy = group_strategy(rank_resources, ep_size, alive_node_resources())
    bundles: list[dict[str, float]] = [dict(rank_resources) for _ in range(ep_size)]
    group = placement_group(bundles, strategy=strategy, name=name)
    try:
        async with asyncio.timeout(timeout_s):
            await _ready(group)
    except BaseException:
        remove_placement_group(group)
        raise
    return group


async def _ready(group: PlacementGroup) -> Any:
    return await group.ready()


def nodes_of(group: PlacementGroup) -> set[str]:
    """The ids of the nodes holding a reserved group's bundles."""
    table = ray.util.placement_group_table(group)
    return {str(node) for node in table.get("bundles_to_node_id", {}).values()}


def release(group: PlacementGroup | None) -> None:
    if group is not None:
        remove_placement_group(group)
