"""Which experts stay resident: `first_n`, `manual`, `frequency` (most-used per layer) and the
global budget split (most-used (layer, expert) pairs overall). Decisions are boolean masks
[layers, experts] (True = resident); ties always go to the lower expert id, then the lower layer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


def as_counts(counts: np.ndarray | torch.Tensor, what: str = "counts") -> np.ndarray:
    """A [layers, experts] float64 host copy of routing counts (a torch tensor on any device or
    an array), checked finite and non-negative."""
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().to("cpu", torch.float64).numpy()
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[1] < 1:
        raise ValueError(f"{what} must be [layers, experts], got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f"{what} must be finite and >= 0, found min {counts.min()}")
    return counts


def _ranks(counts: np.ndarray) -> np.ndarray:
    """rank[l, e]: 0 for layer l's most-used expert; equal counts rank by expert id."""
    order = np.argsort(-counts, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(counts.shape[1])[None, :], axis=1)
    return ranks


def _checked_sizes(num_resident: Sequence[int], num_layers: int, num_experts: int) -> np.ndarray:
    sizes = np.asarray(num_resident, dtype=np.int64).reshape(-1)
    if sizes.shape != (num_layers,) or np.any(sizes < 0) or np.any(sizes > num_experts):
        raise ValueError(
            f"num_resident must give {num_layers} per-layer counts in [0, {num_experts}], "
            f"got {list(map(int, sizes))}"
        )
    return sizes


def first_n(num_experts: int, num_resident: Sequence[int]) -> np.ndarray:
    """Experts 0..n_l-1 resident in layer l: the routing-blind default."""
    sizes = _checked_sizes(num_resident, len(num_resident), num_experts)
    return np.arange(num_experts)[None, :] < sizes[:, None]


def manual(num_experts: int, resident_ids: Sequence[Sequence[int]]) -> np.ndarray:
    """Exactly the given ids resident, one id list per layer."""
    mask = np.zeros((len(resident_ids), num_experts), bool)
    for layer, ids in enumerate(resident_ids):
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < num_experts]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(
                f"resident ids of layer {layer} must be distinct and in [0, {num_experts}), "
                f"got {ids}"
            )
        mask[layer, ids] = True
    return mask


def frequency(counts: np.ndarray | torch.Tensor, num_resident: Sequence[int]) -> np.ndarray:
    """The n_l most-used experts of each layer l resident."""
    counts = as_counts(counts)
    sizes = _checked_sizes(num_resident, counts.shape[0], counts.shape[1])
    return _ranks(counts) < sizes[:, None]


def global_split(
    counts: np.ndarray | torch.Tensor, total: int, min_per_layer: int = 0
) -> np.ndarray:
    """Per-layer resident counts holding `total` experts in all that cover the most routings:
    every layer keeps its `min_per_layer` most-used experts, the rest of the budget goes to the
    most-used remaining (layer, expert) pairs. Skewed layers thus keep fewer experts, flat ones
    more. Optimal for the counts: any selection can swap a pick for a more-used one in the
    same layer without breaking the minimum, so the best one is a per-layer prefix by use."""
    counts = as_counts(counts)
    L, E = counts.shape
    if not 0 <= min_per_layer <= E:
        raise ValueError(f"min_per_layer must be in [0, {E}], got {min_per_layer}")
    if not L * min_per_layer <= total <= L * E:
        raise ValueError(
            f"total resident experts must be in [{L * min_per_layer}, {L * E}] for {L} layers "
            f"x {E} experts with min_per_layer={min_per_layer}, got {total}"
        )
    ranks = _ranks(counts)
    free = ranks >= min_per_layer
    layer_of = np.broadcast_to(np.arange(L)[:, None], (L, E))
    # lexsort: last key first; within a layer the lower rank (more used) always comes first.
    order = np.lexsort((ranks[free], layer_of[free], -counts[free]))
    picked_layers = layer_of[free][order[: total - L * min_per_layer]]
    return min_per_layer + np.bincount(picked_layers, minlength=L)


@dataclass(frozen=True)
class ResidentBudget:
    """How many experts stay resident: `per_layer` counts, or a `total` over all layers split by
    routing counts (evenly, remainder to the first layers, while no counts are known)."""

    num_layers: int
    num_experts: int
    per_layer: tuple[int, ...] | None = None
    total: int | None = None
    min_per_layer: int = 0

    def __post_init__(self) -> None:
        L, E = self.num_layers, self.num_experts
        if L < 1 or E < 1:
            raise ValueError(f"need >= 1 layer and expert, got {L} layers x {E} experts")
        if (self.per_layer is None) == (self.total is None):
            raise ValueError("give exactly one of per_layer or total resident experts")
        if self.per_layer is not None:
            per_layer = self.per_layer
            if isinstance(per_layer, int):
                per_layer = (per_layer,) * L
            object.__setattr__(
                self, "per_layer", tuple(int(n) for n in _checked_sizes(per_layer, L, E))
            )
        else:
            global_split(np.zeros((L, E)), self.total, self.min_per_layer)

    @classmethod
    def from_bytes(
        cls,
        num_layers: int,
        num_experts: int,
        budget_bytes: float,
        bytes_per_expert: int,
        min_per_layer: int = 0,
    ) -> ResidentBudget:
        """As many experts as `budget_bytes` holds (all of them if it holds more)."""
        if bytes_per_expert < 1 or not (math.isfinite(budget_bytes) and budget_bytes >= 0):
            raise ValueError(
                f"need bytes_per_expert >= 1 and finite budget_bytes >= 0, got "
                f"{bytes_per_expert} and {budget_bytes}"
            )
        total = min(int(budget_bytes // bytes_per_expert), num_layers * num_experts)
        if total < num_layers * min_per_layer:
            raise ValueError(
                f"a budget of {budget_bytes / 1e9:.3f} GB holds {total} experts of "
                f"{bytes_per_expert} bytes, fewer than min_per_layer={min_per_layer} x "
                f"{num_layers} layers"
            )
        return cls(num_layers, num_experts, total=total, min_per_layer=min_per_layer)

    def layer_counts(self, counts: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        """Resident experts per layer."""
        if self.per_layer is not None:
            return np.array(self.per_layer, dtype=np.int64)
        if counts is None:
            base, extra = divmod(self.total, self.num_layers)
            return base + (np.arange(self.num_layers) < extra)
        counts = as_counts(counts)
        if counts.shape != (self.num_layers, self.num_experts):
            raise ValueError(
                f"counts have shape {counts.shape}, the budget is for "
                f"{(self.num_layers, self.num_experts)}"
            )
        return global_split(counts, self.total, self.min_per_layer)


def select_resident(counts: np.ndarray | torch.Tensor, budget: ResidentBudget) -> np.ndarray:
    """The resident mask for a budget: per-layer sizes from the budget (split by `counts` when it
    is a total), each filled with the layer's most-used experts."""
    return frequency(counts, budget.layer_counts(counts))


def resident_lists(mask: np.ndarray) -> list[list[int]]:
    """Per-layer sorted resident ids of a mask, the form `manager.readvise` takes."""
    return [np.flatnonzero(row).tolist() for row in mask]
