"""The GPU slot cache replayed on the CPU: per layer a pool of slots over a static resident set,
filled on read and ahead of use by a prefetch mode, through the planning reference
(kernels.slot_plan_reference) and predictors (policies.prefetch) of the GPU executor
(moe_uvm.slots). Used by moe_uvm.simulate."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moe_uvm.config import PREFETCH_MODES
from moe_uvm.kernels.slot_evict import (
    add_routed,
    frequency_class_key,
    plan_admit,
    prior_scores,
    restore_stamps,
)
from moe_uvm.kernels.slot_plan_reference import (
    commit_fill,
    count_prefetch,
    empty_slot_state,
    plan_fill,
    plan_prefetch,
    predicted_mask,
)
from moe_uvm.policies.prefetch import (
    default_prefetch_experts,
    frequency_scores,
    speculative_scores,
    update_cooccurrence,
)
from moe_uvm.profile import Profile
from moe_uvm.slots import EVICTIONS, HALF_LIFE_TOKENS, LFU_PRIOR_TOKENS
from moe_uvm.trace import RoutingTrace

TRACE_PREFETCH_MODES = tuple(m for m in PREFETCH_MODES if m != "lookahead")
"""The modes a trace replays: lookahead needs hidden states, which a trace does not hold."""
COOCCURRENCE_SOURCES = ("auto", "profile", "online", "both")


@dataclass(frozen=True)
class SlotSettings:
    """The GPU slot caches to simulate: every slot count in `slots` (per layer; 0 = no cache)
    with every prefetch mode in `prefetch` (a mode other than none needs slots). Each step
    prefetches `num_predicted` experts per layer (default: `default_prefetch_experts`), at most
    the slot count. Speculative co-occurrence comes from `cooccurrence`: profile (the profile's
    counts), online (learned from the replayed steps), both (profile counts plus online), auto
    (profile when it has them, else online). `eviction` (slots.EVICTIONS) is the pools' policy;
    lfu and freq_lru run with prefetch none only."""

    slots: tuple[int, ...] = (0,)
    prefetch: tuple[str, ...] = ("none",)
    num_predicted: int | None = None
    cooccurrence: str = "auto"
    eviction: str = "lru"

    def __post_init__(self) -> None:
        object.__setattr__(self, "slots", tuple(int(n) for n in self.slots))
        object.__setattr__(self, "prefetch", tuple(self.prefetch))
        if not self.slots or min(self.slots) < 0:
            raise ValueError(f"slot counts must be >= 0, got {list(self.slots)}")
        bad = [m for m in self.prefetch if m not in TRACE_PREFETCH_MODES]
        if bad or not self.prefetch:
            raise ValueError(f"unknown prefetch modes {bad}; known: "
                             f"{', '.join(TRACE_PREFETCH_MODES)} "
                             "(lookahead needs hidden states, which a trace does not hold)")
        if max(self.slots) == 0 and self.prefetch != ("none",):
            raise ValueError(f"prefetch {', '.join(self.prefetch)} needs slots > 0")
        if self.num_predicted is not None and self.num_predicted < 1:
            raise ValueError(f"num_predicted must be >= 1, got {self.num_predicted}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {', '.join(EVICTIONS)}, got "
                             f"{self.eviction!r}")
        if self.eviction != "lru" and self.prefetch != ("none",):
            raise ValueError(f"eviction={self.eviction} fills slots on read only: prefetch "
                             f"must be none, got {', '.join(self.prefetch)}")
        if self.cooccurrence not in COOCCURRENCE_SOURCES:
            raise ValueError(f"cooccurrence source must be one of "
                             f"{', '.join(COOCCURRENCE_SOURCES)}, got {self.cooccurrence!r}")

    def predicted(self, num_slots: int, top_k: int) -> int:
        if self.num_predicted is None:
            return default_prefetch_experts(top_k, num_slots)
        return min(self.num_predicted, num_slots)

    def jobs(self) -> list[tuple[int, str]]:
        return [(n, m) for n in self.slots for m in self.prefetch if n > 0 or m == "none"]


@dataclass(frozen=True)
class SlotReplay:
    """Per step and layer: experts read from HBM (resident or slot), of those from a slot, slots
    filled on read and experts prefetched; prefetch totals over all layers (predicted, correct,
    needed offloaded as in kernels.slot_plan_reference.METRICS, and copies the kernel then
    read), None without prefetch."""

    hits: np.ndarray
    slot_hits: np.ndarray
    fills: np.ndarray
    copies: np.ndarray
    prefetch: tuple[int, int, int, int] | None


def step_ids(trace: RoutingTrace, batch: int) -> torch.Tensor:
    """int64 [steps, L, batch, k]: each step's ids, the last step padded with -1."""
    L, T, k = trace.topk_ids.shape
    steps = -(-T // batch)
    ids = np.full((L, steps * batch, k), -1, np.int64)
    ids[:, :T] = trace.topk_ids
    return torch.from_numpy(ids.reshape(L, steps, batch, k).transpose(1, 0, 2, 3).copy())


def cooccurrence_start(
    settings: SlotSettings, profile: Profile | None, L: int, E: int
) -> tuple[torch.Tensor, bool, str]:
    """(starting counts [L-1, E, E] float32, learn online?, source name) for speculative."""
    source = settings.cooccurrence
    has = profile is not None and profile.cooccurrence is not None
    if source == "auto":
        source = "profile" if has else "online"
    if source in ("profile", "both") and not has:
        raise ValueError(f"cooccurrence source {source} needs a profile with co-occurrence "
                         "(moe-uvm calibrate --cooccurrence)")
    cooc = torch.zeros(max(L - 1, 1), E, E)
    if source != "online":
        cooc.copy_(torch.from_numpy(profile.cooccurrence))
    return cooc, source != "profile", source


def replay(
    ids: torch.Tensor,
    resident_hits: np.ndarray,
    mask: np.ndarray,
    num_slots: int,
    prefetch: str,
    num_predicted: int,
    counts: np.ndarray | None,
    cooccurrence: torch.Tensor | None,
    learn_online: bool,
    eviction: str = "lru",
    top_k: int = 1,
) -> SlotReplay:
    """Per layer a pool of `num_slots` slots over the static resident `mask`, step by step as the
    executor runs it: prefetch for layer l+1 predicted from layer l's ids (layer 0 has no
    predecessor in the step and is not prefetched), then at each layer the fill plan of
    `eviction` (plan_fill for lru and freq_lru, plan_admit for lfu, with usage counts of this
    step included and lfu's prior from `counts`) with the true ids and commit_fill; online
    co-occurrence learns from each step after its predictions.
    Layers' pools are independent, so all layers advance together as one batch of pools."""
    steps, L, batch, _ = ids.shape
    E = mask.shape[1]
    resident = torch.from_numpy(mask)
    pools = empty_slot_state(E, num_slots, (L,))
    nxt, nxt_resident = tuple(t[1:] for t in pools), resident[1:]
    counters = torch.zeros(steps, L, 4, dtype=torch.int64)
    fills = torch.zeros(steps, L, dtype=torch.int64)
    copies = torch.zeros(steps, L, dtype=torch.int64)
    used = torch.zeros((), dtype=torch.int64)
    predicted = torch.zeros(L, E, dtype=torch.bool)
    predicting = prefetch != "none" and L > 1
    scores = None
    if prefetch == "frequency":
        scores = frequency_scores(torch.from_numpy(counts[1:]))
    step = torch.zeros((), dtype=torch.int64)
    usage = torch.zeros(L, E)
    decay = 0.5 ** (batch / HALF_LIFE_TOKENS.get(eviction, 1.0))
    prior = torch.zeros(L, E)
    if eviction == "lfu" and counts is not None:
        prior = prior_scores(torch.from_numpy(counts), top_k, LFU_PRIOR_TOKENS)
    for s in range(steps):
        step.fill_(s)
        now = ids[s]
        if predicting:
            if prefetch == "speculative":
                scores = speculative_scores(cooccurrence, now[:-1])
            experts, _ = plan_prefetch(scores, nxt_resident, *nxt, step, num_predicted)
            copies[s, 1:] = (experts >= 0).sum(-1)
            needed = torch.zeros(L - 1, E + 1, dtype=torch.bool)
            needed.scatter_(-1, torch.where(now[1:] >= 0, now[1:], E).flatten(1), True)
            used += (torch.gather(needed, -1, experts.long().clamp(min=0)) & (experts >= 0)).sum()
            predicted[1:] = predicted_mask(scores, nxt_resident, num_predicted)
        if eviction != "lru":
            add_routed(usage, now, decay)
        count_prefetch(counters[s], now, resident, pools[0], predicted if predicting else None)
        if eviction == "lfu":
            fill = plan_admit(now, resident, pools[0], pools[1], usage + prior)
        elif eviction == "freq_lru":
            key = frequency_class_key(usage, pools[1], pools[2])
            fill = plan_fill(now, resident, pools[0], pools[1], key, step)
            restore_stamps(key, pools[2], step)
        else:
            fill = plan_fill(now, resident, *pools, step)
        commit_fill(fill, pools[0])
        fills[s] = (fill >= 0).sum(-1)
        if learn_online and L > 1:
            update_cooccurrence(cooccurrence, now[:-1], now[1:])
    slot_hits = counters[..., 3].numpy()
    totals = counters[..., :3].sum((0, 1)).tolist() + [int(used)]
    return SlotReplay(resident_hits + slot_hits, slot_hits, fills.numpy(), copies.numpy(),
                      tuple(totals) if predicting else None)
