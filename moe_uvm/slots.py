"""SlotCache: per-layer pools of GPU slots holding copies of offloaded experts, filled ahead of
use by a side stream (prefetch of the next layer's predicted experts) and by the fused kernel
itself (fill-on-read), kept across decode steps. Scores experts with policies.prefetch's
predictors and plans through kernels.slot_plan (one launch per plan, bitwise the same as
kernels.slot_plan_reference); every piece is a device op, so a decode step with the cache
captures in a CUDA graph.

Ordering per layer l of a step (compute stream C, side stream P):
  C waits copied[l]                     prefetch of layer l done before its kernel reads slots
  C: plan_fill(l), record ready[l]      slots for layer l's uncached experts
  P waits ready[l]: predict + plan_prefetch(l+1) + copy -> record copied[l+1]
                                        (everything earlier on C has finished, including the
                                        previous step's use of layer l+1's slots)
  C: fused_moe(l, fill_slot), commit_fill(l)
Correctness never depends on the cache: a slot is named in `expert_slot` only when it holds an
exact copy, otherwise the kernel reads managed memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from moe_uvm.config import PREFETCH_MODES, SLOT_EVICTIONS
from moe_uvm.kernels import copy_experts_to_slots
from moe_uvm.kernels.slot_admit import frequency_key_fused, plan_admit_fused
from moe_uvm.kernels.slot_evict import prior_scores, restore_stamps
from moe_uvm.kernels.slot_plan import plan_fill_fused, plan_prefetch_fused
from moe_uvm.kernels.slot_plan_reference import (
    EMPTY_STAMP,
    METRICS,
    commit_fill,
    count_prefetch,
)
from moe_uvm.policies import prefetch as predict

EVICTIONS = SLOT_EVICTIONS
"""How a pool picks what it holds: lru (every miss admitted, the least recently used slot goes),
lfu (decayed-frequency admission, kernels.slot_evict.plan_admit) and freq_lru (llama.cpp's: every
miss admitted, least recently used within the lowest frequency class)."""
HALF_LIFE_TOKENS = {"lfu": 64.0, "freq_lru": 128.0}
"""Default half-life of the usage counts: lfu's was chosen on synthetic traces made by
trace.synthetic_trace (32 to 256 tokens do about as well); freq_lru's is llama.cpp's."""
LFU_PRIOR_TOKENS = 8.0
"""lfu starts each expert's count at what `counts` (a profile) predicts for 8 tokens."""


class PrefetchStats:
    """Per-layer prefetch counters on the device (columns METRICS). `record` is hot-path safe;
    `summary` reads them back (a host sync)."""

    def __init__(self, num_layers: int, device: torch.device | str | None = None) -> None:
        self.counters = torch.zeros(num_layers, len(METRICS), dtype=torch.int64, device=device)

    def record(
        self,
        layer: int,
        topk_ids: torch.Tensor,
        resident: torch.Tensor,
        expert_slot: torch.Tensor,
        predicted: torch.Tensor | None = None,
    ) -> None:
        count_prefetch(self.counters[layer], topk_ids, resident, expert_slot, predicted)

    def reset(self) -> None:
        self.counters.zero_()

    def summary(self) -> dict[str, float | int | None]:
        """Totals over layers with precision = correct / predicted, recall = correct /
        needed_offloaded and slot_hit_rate = slot_hits / needed_offloaded (None over zero)."""
        total = dict(zip(METRICS, self.counters.sum(0).tolist(), strict=True))
        ratio = lambda num, den: total[num] / total[den] if total[den] else None
        return {**total, "precision": ratio("correct", "predicted"),
                "recall": ratio("correct", "needed_offloaded"),
                "slot_hit_rate": ratio("slot_hits", "needed_offloaded")}


@dataclass
class LayerSlots:
    """One layer's slot pool and its maps (the tensors the kernel and the planner share)."""

    w13_slots: torch.Tensor
    w2_slots: torch.Tensor
    expert_slot: torch.Tensor
    slot_expert: torch.Tensor
    slot_stamp: torch.Tensor
    resident: torch.Tensor
    predicted: torch.Tensor  # bool [E]: the last prefetch's prediction for this layer (metrics)


class SlotCache:
    """GPU slot caches for offloaded experts of every layer, and the hooks a decode step calls.

    `weights[l]` is layer l's (w13, w2) as the kernel reads them (managed views); `resident[l]`
    a bool [E] tensor of experts advised resident (updated by `set_resident`). `mode` picks the
    predictor of the next layer's experts: none (fill-on-read only: an LRU cache inside the
    graph), frequency (`counts` [L, E]), speculative (`cooccurrence` [L-1, E, E], learned
    online on top of any profile counts) or lookahead (`next_gates[l]`: layer l+1's router
    weight [E, H], applied to layer l's input). `num_predicted` experts (at most `num_slots`;
    default `default_prefetch_experts(top_k, num_slots)`) are prefetched per layer and step;
    `copies` counts the copies issued.

    `eviction` (EVICTIONS) picks what a pool holds; lfu and freq_lru count the tokens routed to
    each expert with a half-life of `half_life_tokens` (default HALF_LIFE_TOKENS), lfu starting
    from `counts` when given (LFU_PRIOR_TOKENS). They fill on read only (prefetch none).
    """

    def __init__(
        self,
        weights: Sequence[tuple[torch.Tensor, torch.Tensor]],
        resident: Sequence[Sequence[int]],
        num_slots: int,
        *,
        mode: str = "speculative",
        num_predicted: int | None = None,
        top_k: int | None = None,
        counts: torch.Tensor | None = None,
        cooccurrence: torch.Tensor | None = None,
        next_gates: Sequence[torch.Tensor] | None = None,
        learn_online: bool = True,
        eviction: str = "lru",
        half_life_tokens: float | None = None,
    ) -> None:
        if eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {', '.join(EVICTIONS)}, got {eviction!r}")
        if eviction != "lru" and mode != "none":
            raise ValueError(f"eviction={eviction} fills slots on read only: prefetch must be "
                             f"none, got {mode!r}")
        half_life = HALF_LIFE_TOKENS.get(eviction, 1.0) if half_life_tokens is None \
            else half_life_tokens
        if not half_life > 0:
            raise ValueError(f"half_life_tokens must be > 0, got {half_life_tokens}")
        if mode not in PREFETCH_MODES:
            raise ValueError(
                f"prefetch mode must be one of {', '.join(PREFETCH_MODES)}, got {mode!r}"
            )
        if num_slots < 1:
            raise ValueError(f"a slot cache needs num_slots >= 1, got {num_slots}")
        if num_predicted is None and top_k is None:
            raise ValueError("a slot cache needs num_predicted or top_k (its default's source)")
        w13, _ = weights[0]
        self.num_layers, self.num_experts = len(weights), w13.shape[0]
        self.device = w13.device
        self.mode, self.num_slots = mode, num_slots
        self.num_predicted = (predict.default_prefetch_experts(top_k, num_slots)
                              if num_predicted is None else min(num_predicted, num_slots))
        if mode == "frequency" and counts is None:
            raise ValueError("frequency prefetch needs routing counts [layers, experts]")
        if mode == "lookahead" and (next_gates is None or len(next_gates) != self.num_layers - 1):
            raise ValueError("lookahead prefetch needs the next layer's router weight per layer")
        self.weights = list(weights)
        self.layers = [self._pool(w13, w2) for w13, w2 in self.weights]
        # Host side of the resident masks, pinned on CUDA so a re-advise on another thread
        # updates them with an asynchronous copy (no allocation, no legacy-stream copy: safe
        # next to a graph capture).
        pinned = self.device.type == "cuda"
        self._host_resident = torch.zeros(len(self.layers), w13.shape[0], dtype=torch.bool,
                                          pin_memory=pinned)
        self.set_resident(resident)
        E, L = self.num_experts, self.num_layers
        self.counts = None if counts is None else counts.to(self.device, torch.float32)
        self.cooccurrence = torch.zeros(max(L - 1, 1), E, E, device=self.device)
        if cooccurrence is not None:
            self.cooccurrence.copy_(cooccurrence.to(self.device, torch.float32))
        self.learn_online = learn_online and mode == "speculative"
        self.next_gates = list(next_gates) if next_gates is not None else None
        self.step = torch.zeros((), dtype=torch.int64, device=self.device)
        self.stats = PrefetchStats(L, device=self.device)
        self.copies = torch.zeros(L, dtype=torch.int64, device=self.device)
        self._last_ids: list[torch.Tensor | None] = [None] * L
        cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if cuda else None
        self.ready = [torch.cuda.Event() for _ in range(L)] if cuda else None
        self.copied = [torch.cuda.Event() for _ in range(L)] if cuda else None
        self._issued = [False] * L
        self.eviction, self.half_life_tokens = eviction, half_life
        # Decayed tokens routed per expert, lfu's prior, and plan scratch: empty for lru
        # (moe_uvm.memory.slot_cache_nbytes counts them).
        counted = eviction != "lru"
        self.usage = torch.zeros(L if counted else 0, E, device=self.device)
        self.prior = torch.zeros(L if eviction == "lfu" else 0, E, device=self.device)
        if eviction == "lfu" and counts is not None:
            if top_k is None:
                raise ValueError("an lfu cache started from counts needs top_k (to turn counts "
                                 "into routings per token)")
            self.prior.copy_(prior_scores(self.counts, top_k, LFU_PRIOR_TOKENS))
        self._key = torch.zeros(num_slots if eviction == "freq_lru" else 0, dtype=torch.int64,
                                device=self.device)

    def _pool(self, w13: torch.Tensor, w2: torch.Tensor) -> LayerSlots:
        S, E, dev = self.num_slots, w13.shape[0], w13.device
        return LayerSlots(
            torch.empty((S, *w13.shape[1:]), dtype=w13.dtype, device=dev),
            torch.empty((S, *w2.shape[1:]), dtype=w2.dtype, device=dev),
            torch.full((E,), -1, dtype=torch.int32, device=dev),
            torch.full((S,), -1, dtype=torch.int32, device=dev),
            torch.full((S,), EMPTY_STAMP, dtype=torch.int64, device=dev),
            torch.zeros(E, dtype=torch.bool, device=dev),
            torch.zeros(E, dtype=torch.bool, device=dev),
        )

    @property
    def nbytes(self) -> int:
        """Device bytes of all slot pools (counted against the GPU memory budget)."""
        return sum(p.w13_slots.nbytes + p.w2_slots.nbytes for p in self.layers)

    def set_resident(self, resident: Sequence[Sequence[int]]) -> None:
        for layer, ids in enumerate(resident):
            self.set_layer_resident(layer, ids)

    def set_layer_resident(
        self, layer: int, resident_ids: Sequence[int], stream: torch.cuda.Stream | None = None
    ) -> None:
        """Tell the planner which experts of a layer are resident now (after a re-advise); on
        CUDA an asynchronous copy on `stream` (default: the current one). The mask is a hint
        that need not be ordered with the kernels: an expert marked resident is read from
        managed memory, one marked offloaded gets a slot copy, both exact. Slots holding an
        expert that became resident stay valid copies; the planner just stops adding it."""
        host = self._host_resident[layer]
        host.zero_()
        host[list(resident_ids)] = True
        target = self.layers[layer].resident
        if target.device.type != "cuda":
            target.copy_(host)
            return
        with torch.cuda.stream(stream or torch.cuda.current_stream(target.device)):
            target.copy_(host, non_blocking=True)

    def reset(self) -> None:
        """Empty every slot (e.g. before timing a new configuration)."""
        for pool in self.layers:
            pool.expert_slot.fill_(-1)
            pool.slot_expert.fill_(-1)
            pool.slot_stamp.fill_(EMPTY_STAMP)
        self.usage.zero_()
        self.stats.reset()
        self.copies.zero_()

    # --- the hooks around each layer's kernel (HOT PATH: device ops only) ----------------------

    def before_layer(self, layer: int, topk_ids: torch.Tensor, hidden: torch.Tensor) -> dict:
        """Join this layer's prefetch, plan its fill-on-read, fork the next layer's prefetch;
        returns the slot arguments for `fused_moe`."""
        pool = self.layers[layer]
        if layer == 0:
            self.step.add_(1)
        if self.side is not None and self._issued[layer]:
            torch.cuda.current_stream().wait_event(self.copied[layer])
        if self.eviction == "lru":
            # One launch: fill plan plus this layer's prefetch counters (with the prediction
            # made for it during the previous layer, if any).
            fill_slot = plan_fill_fused(
                topk_ids, pool.resident, pool.expert_slot, pool.slot_expert, pool.slot_stamp,
                self.step, counters=self.stats.counters[layer],
                predicted=pool.predicted if self._issued[layer] else None)
        else:
            fill_slot = self._plan_counted(layer, topk_ids)
        if self.learn_online and layer > 0 and self._last_ids[layer - 1] is not None:
            predict.update_cooccurrence(self.cooccurrence[layer - 1], self._last_ids[layer - 1],
                                     topk_ids)
        self._last_ids[layer] = topk_ids
        self._issued[layer] = False
        if layer + 1 < self.num_layers and self.mode != "none":
            self._prefetch_next(layer, topk_ids, hidden)
        return dict(expert_slot=pool.expert_slot, w13_slots=pool.w13_slots,
                    w2_slots=pool.w2_slots, fill_slot=fill_slot)

    def _plan_counted(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """lfu / freq_lru fill plan: usage counts first (this step included), then the plan."""
        pool = self.layers[layer]
        decay = 0.5 ** (topk_ids.shape[0] / self.half_life_tokens)
        if self.eviction == "lfu":  # one launch: counts, counters and plan
            return plan_admit_fused(topk_ids, pool.resident, pool.expert_slot, pool.slot_expert,
                                    self.usage[layer], self.prior[layer], decay,
                                    self.stats.counters[layer])
        frequency_key_fused(topk_ids, self.usage[layer], decay, pool.slot_expert,
                            pool.slot_stamp, self._key)
        fill_slot = plan_fill_fused(topk_ids, pool.resident, pool.expert_slot, pool.slot_expert,
                                    self._key, self.step, counters=self.stats.counters[layer])
        restore_stamps(self._key, pool.slot_stamp, self.step)
        return fill_slot

    def after_layer(self, layer: int, fill_slot: torch.Tensor) -> None:
        commit_fill(fill_slot, self.layers[layer].expert_slot)

    def _scores(self, layer: int, topk_ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        if self.mode == "frequency":
            return predict.frequency_scores(self.counts[layer + 1])
        if self.mode == "lookahead":
            return predict.lookahead_scores(hidden, self.next_gates[layer])
        return predict.speculative_scores(self.cooccurrence[layer], topk_ids)

    def _prefetch_next(self, layer: int, topk_ids: torch.Tensor, hidden: torch.Tensor) -> None:
        nxt = self.layers[layer + 1]
        w13, w2 = self.weights[layer + 1]
        if self.side is not None:
            self.ready[layer].record()
            self.side.wait_event(self.ready[layer])
            context = torch.cuda.stream(self.side)
        else:
            context = nullcontext()
        if self.side is not None:  # the side stream reads these: keep their memory alive
            topk_ids.record_stream(self.side)
            hidden.record_stream(self.side)
        with context:
            scores = self._scores(layer, topk_ids, hidden)
            experts, slots = plan_prefetch_fused(scores, nxt.resident, nxt.expert_slot,
                                                 nxt.slot_expert, nxt.slot_stamp, self.step,
                                                 self.num_predicted,
                                                 counters_predicted=nxt.predicted)
            copy_experts_to_slots(w13, w2, experts, slots, nxt.w13_slots, nxt.w2_slots)
            self.copies[layer + 1] += (slots >= 0).sum()
            if self.side is not None:
                self.copied[layer + 1].record(self.side)
        self._issued[layer + 1] = True

    def summary(self) -> str:
        return (f"slot cache: {self.num_slots} slots x {self.num_layers} layers "
                f"({self.nbytes / 2**30:.2f} GiB), eviction={self.eviction}, prefetch={self.mode}, "
                f"{self.num_predicted} predicted per layer and step")

