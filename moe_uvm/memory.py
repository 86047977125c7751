"""Device memory a load will take, counted before its first allocation: `MemoryPlan` (named parts
-> bytes), reserved as a whole through `uvm.reserve`, and the sizes of the parts that are not
managed expert stores (slot caches, routing counters)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from moe_uvm import uvm
from moe_uvm.kernels.slot_plan_reference import METRICS

EXPERT_STORES = "managed expert stores"
SLOT_CACHES = "slot caches"
ROUTING_COUNTERS = "routing counters"
EXPERT_SCALES = "FP8 expert scales"
NON_EXPERT_WEIGHTS = "non-expert weights"
DENSE_POOL = "dense-offload buffer pool"


def target_device(device: torch.device | str | None) -> torch.device:
    """`device`, by default CUDA when usable (else the CPU); a CUDA device gets its index."""
    if device is None:
        device = "cuda" if uvm.available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class MemoryPlan:
    """Bytes one load will allocate on `device`, by part (e.g. "managed expert stores")."""

    device: torch.device
    parts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, nbytes: int) -> None:
        self.parts[name] = self.parts.get(name, 0) + int(nbytes)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @contextmanager
    def reserve(
        self, *, allow_oversubscription: bool = False, headroom_bytes: int | None = None
    ) -> Iterator[uvm.Reservation | None]:
        """Refuse the plan unless all of it fits on its GPU (`uvm.OversubscriptionError` naming
        each part), then hold it until the block ends (`uvm.reserve`). No check on the CPU
        (nothing goes to a GPU) or with `allow_oversubscription`."""
        if self.device.type != "cuda" or allow_oversubscription:
            yield None
            return
        with uvm.reserve(self.parts, self.device.index, headroom_bytes=headroom_bytes) as held:
            yield held


def _nbytes(dtype: torch.dtype, *shape: int) -> int:
    return math.prod(shape) * dtype.itemsize


def slot_cache_nbytes(
    num_layers: int,
    num_experts: int,
    num_slots: int,
    w13_shape: tuple[int, int],
    w2_shape: tuple[int, int],
    dtype: torch.dtype,
    with_counts: bool,
    eviction: str = "lru",
) -> int:
    """Device bytes of a `moe_uvm.slots.SlotCache` over `num_layers` layers of this shape: per
    layer, `num_slots` copies of an expert's w13 [2I, H] and w2 [H, I] and the slot maps; for the
    whole cache the co-occurrence matrix, the profile counts (`with_counts`), the prefetch
    counters and the step; lfu and freq_lru eviction add decayed usage counts (and lfu its
    prior, freq_lru a key per slot)."""
    L, E, S = num_layers, num_experts, num_slots
    per_layer = (
        _nbytes(dtype, S, *w13_shape)
        + _nbytes(dtype, S, *w2_shape)
        + _nbytes(torch.int32, E)  # expert_slot
        + _nbytes(torch.int32, S)  # slot_expert
        + _nbytes(torch.int64, S)  # slot_stamp
        + 2 * _nbytes(torch.bool, E)  # resident, predicted
    )
    shared = (
        _nbytes(torch.float32, max(L - 1, 1), E, E)  # cooccurrence
        + (_nbytes(torch.float32, L, E) if with_counts else 0)
        + _nbytes(torch.int64, L, len(METRICS))  # prefetch stats
        + _nbytes(torch.int64, L)  # copies
        + _nbytes(torch.int64)  # step
        + (_nbytes(torch.float32, L, E) if eviction != "lru" else 0)  # usage
        + (_nbytes(torch.float32, L, E) if eviction == "lfu" else 0)  # prior
        + (_nbytes(torch.int64, S) if eviction == "freq_lru" else 0)  # plan key
    )
    return L * per_layer + shared


def routing_counters_nbytes(num_layers: int, num_experts: int) -> int:
    """Device bytes of the routing counts the manager keeps (int32 [L, E + 1] and a one) and of
    each FusedMoE layer's expert-id range (int64 [2])."""
    return (
        _nbytes(torch.int32, num_layers, num_experts + 1)
        + _nbytes(torch.int32, 1)
        + num_layers * _nbytes(torch.int64, 2)
    )
