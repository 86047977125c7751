"""Which rank owns which expert under expert parallelism (issue 19): every layer's experts are
split over the ranks, the same number on each (give or take one: each rank's store and budget
are alike), and the routing counts of a profile balanced across them, so the hot experts are
spread over the GPUs and their PCIe links.

Greedy longest-processing-time: a layer's experts in descending count (ties by expert id) each
go to the rank with the least routing load so far among those with room left (ties by rank).
Deterministic, and within one expert's count of the best possible max load when experts are
many per rank. Without counts, experts are dealt round-robin (expert e to rank e % world)."""

from __future__ import annotations

import numpy as np
import torch

from .residency import as_counts


def place_experts(num_experts: int, world_size: int,
                  counts: np.ndarray | torch.Tensor | None = None,
                  num_layers: int | None = None) -> np.ndarray:
    """owner[l, e] (int64): the rank that holds expert e of layer l. `counts` [layers, experts]
    of a profile balance the load; without them, `num_layers` rows of round-robin."""
    if num_experts < 1 or world_size < 1:
        raise ValueError(f"need num_experts and world_size >= 1, got {num_experts}, "
                         f"{world_size}")
    if world_size > num_experts:
        raise ValueError(f"{world_size} ranks for {num_experts} experts per layer: every rank "
                         "must own at least one expert")
    if counts is None:
        if num_layers is None or num_layers < 1:
            raise ValueError("place_experts needs counts, or num_layers >= 1 for round-robin")
        return np.tile(np.arange(num_experts, dtype=np.int64) % world_size, (num_layers, 1))
    counts = as_counts(counts)
    if counts.shape[1] != num_experts:
        raise ValueError(f"counts are for {counts.shape[1]} experts per layer, not "
                         f"{num_experts}")
    capacity = np.full(world_size, num_experts // world_size, dtype=np.int64)
    capacity[: num_experts % world_size] += 1
    owner = np.empty(counts.shape, dtype=np.int64)
    for layer, row in enumerate(counts):
        load = np.zeros(world_size)
        room = capacity.copy()
        for expert in np.argsort(-row, kind="stable"):
            open_ranks = np.flatnonzero(room > 0)
            rank = open_ranks[np.argmin(load[open_ranks])]  # first minimum: lowest rank
            owner[layer, expert] = rank
            load[rank] += row[expert]
            room[rank] -= 1
    return owner


def rank_loads(owner: np.ndarray, counts: np.ndarray | torch.Tensor) -> np.ndarray:
    """loads[l, r]: the routing count layer l's experts on rank r received."""
    counts = as_counts(counts)
    world = int(owner.max()) + 1
    return np.stack([np.bincount(o, weights=c, minlength=world)
                     for o, c in zip(owner, counts, strict=True)])
