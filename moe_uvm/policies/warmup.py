"""Frequency warmup: count routed experts per layer where the ids live, then re-decide the resident
sets once after `warmup_tokens`, and optionally keep adapting (decayed counts, hysteresis, a cap on
swaps per decision). The manager calls `record` from the layer's forward (device work only,
captured in CUDA graphs too) and, on its worker thread, `fold`s asynchronous copies of the
counters and `decide`s when a decision is due; it carries out the returned sets with
`readvise`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from moe_uvm.kernels.expert_ids import count_routing
from moe_uvm.policies.residency import (
    ResidentBudget,
    as_counts,
    first_n,
    resident_lists,
    select_resident,
)


@dataclass(frozen=True)
class AdaptiveSettings:
    """How residency keeps following routing after the warmup decision.

    An expert's score is its decayed count plus `prior_weight` windows of its long-run rate
    (profile prior plus everything recorded): the recent window alone is too few routings to
    rank experts by, the long-run rate alone cannot follow the current sequences.

    interval_tokens: recorded tokens between decisions.
    half_life_tokens: recent counts lose half their weight after this many tokens; a window is
        half_life / ln 2 tokens, the weight decayed counts carry in steady state.
    margin, min_gain: an offloaded expert replaces the weakest resident one only when
        score_in > (1 + margin) * score_out + min_gain. A swap moves one expert in, which costs
        about as much PCIe traffic as reading it through once, so it must be expected to win
        more than a routing or two; the relative margin keeps near-equal experts from swapping
        back and forth, each swap being a host-blocking re-advise.
    max_swaps: most swaps per decision over all layers (a swap re-advises two experts, one in
        and one out); bounds the re-advise bytes and host time of one decision.

    Defaults were chosen on traces made by `trace.synthetic_trace`, not on the sample traces.
    """

    interval_tokens: int = 16
    half_life_tokens: float = 32.0
    prior_weight: float = 1.0
    margin: float = 0.25
    min_gain: float = 2.0
    max_swaps: int = 64

    def __post_init__(self) -> None:
        if self.interval_tokens < 1 or self.max_swaps < 0:
            raise ValueError(
                f"need interval_tokens >= 1 and max_swaps >= 0, got {self.interval_tokens} and "
                f"{self.max_swaps}"
            )
        if not (self.half_life_tokens > 0 and min(self.prior_weight, self.margin,
                                                   self.min_gain) >= 0):
            raise ValueError(
                f"need half_life_tokens > 0 and prior_weight, margin, min_gain >= 0, got "
                f"{self.half_life_tokens}, {self.prior_weight}, {self.margin}, {self.min_gain}"
            )

    @classmethod
    def from_bytes(
        cls, readvise_bytes: int, bytes_per_expert: int, **settings: float
    ) -> AdaptiveSettings:
        """Settings whose swap cap keeps one decision's re-advice within `readvise_bytes`."""
        return cls(max_swaps=int(readvise_bytes // (2 * bytes_per_expert)), **settings)


def swap_weakest(
    scores: np.ndarray, resident: np.ndarray, margin: float, min_gain: float, max_swaps: int
) -> np.ndarray:
    """The resident mask after hysteresis swaps: per layer the best offloaded experts replace the
    weakest resident ones while score_in > (1 + margin) * score_out + min_gain; at most
    `max_swaps` swaps in all, the largest score gains first. Layer sizes stay as they are."""
    L, E = scores.shape
    cand_order = np.argsort(-np.where(resident, -np.inf, scores), axis=1, kind="stable")
    weak_order = np.argsort(np.where(resident, scores, np.inf), axis=1, kind="stable")
    cand = np.take_along_axis(scores, cand_order, axis=1)
    weak = np.take_along_axis(scores, weak_order, axis=1)
    n_res = resident.sum(axis=1, keepdims=True)
    pairs = np.arange(E)[None, :] < np.minimum(n_res, E - n_res)
    # Candidates fall and residents rise along a row, so each layer's swaps form a prefix.
    ok = pairs & (cand > (1.0 + margin) * weak + min_gain)
    layer, slot = np.nonzero(ok)
    gain = (cand - weak)[layer, slot]
    keep = np.argsort(-gain, kind="stable")[:max_swaps]
    layer, slot = layer[keep], slot[keep]
    new = resident.copy()
    new[layer, cand_order[layer, slot]] = True
    new[layer, weak_order[layer, slot]] = False
    return new


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def wrapped_delta(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """new - old for int32 counters that may have wrapped around, as int64 (the signed
    difference modulo 2**32: exact while fewer than 2**31 increments separate the two)."""
    diff = new.astype(np.int64) - old.astype(np.int64)
    return (diff + 2**31) % 2**32 - 2**31


def tokens_to_follow_shift(
    settings: AdaptiveSettings, tokens_before: int, rate: float, max_tokens: int = 10**7
) -> int:
    """Tokens after a routing shift until adaptive residency has swapped a newly hot expert in
    for one that went cold, in the model of `FrequencyWarmup.decide`'s scores.

    Before the shift, expert `a` was routed `rate` times per token for `tokens_before` tokens
    and expert `b` never; after it, the other way round. Decisions come every D =
    `interval_tokens`; with q = 2**(-D/h) (h = half-life) the decayed count after n decisions
    is rate*D*(1 - q**n)/(1 - q) for `b` and rate*D*q**n/(1 - q) for `a`, and the long-run
    term is prior_weight * (h / ln 2) * rate * t / (tokens_before + t) for `b` (t = n*D) and
    the same with tokens_before in the numerator for `a`. The swap happens at the first
    decision where score_b > (1 + margin) * score_a + min_gain; the answer adds one interval
    for the decision in flight. A long history before the shift slows it (its long-run rate
    weighs on `a`); a short half-life and interval speed it up."""
    a = settings
    step = a.interval_tokens
    q = 0.5 ** (step / a.half_life_tokens)
    window = a.prior_weight * a.half_life_tokens / math.log(2)
    for n in range(1, max_tokens // step + 1):
        t = n * step
        long_run = rate * window / (tokens_before + t)
        score_b = rate * step * (1 - q**n) / (1 - q) + long_run * t
        score_a = rate * step * q**n / (1 - q) + long_run * tokens_before
        if score_b > (1 + a.margin) * score_a + a.min_gain:
            return t + step
    raise ValueError(f"no swap within {max_tokens} tokens at rate {rate}")


class FrequencyWarmup:
    """Counts routing per (layer, expert) and turns the counts into resident sets.

    Phase 1 (warmup): after `warmup_tokens` recorded tokens, one decision gives every layer its
    most-used experts within `budget` (a total budget is split across layers by the counts).
    Phase 2 (only with `adaptive`): a decision every `interval_tokens` tokens from exponentially
    decayed counts, with hysteresis and a swap cap (`swap_weakest`). Start directly in phase 2
    with `warmup_tokens=0`, e.g. from a profile's sets, passing the profile's counts as `prior`.

    Counting (`record`) is device work only, so it runs inside CUDA graphs too (each replay
    counts) when the counters exist before capture: pass `device`. Decisions read a host copy
    of the counters: `fold(snapshot)` with a copy taken elsewhere (the manager copies them
    asynchronously and decides on its worker thread), or `refresh()`, a host sync, which
    `decision_due()`, `decide()` and `tokens_recorded` do by default.

    `decide` assumes its sets are carried out; if a re-advise fails, tell it with `set_resident`.
    """

    def __init__(
        self,
        budget: ResidentBudget,
        *,
        warmup_tokens: int,
        min_batch_tokens: int = 1,
        adaptive: AdaptiveSettings | None = None,
        resident: np.ndarray | None = None,
        prior: np.ndarray | torch.Tensor | None = None,
        prior_tokens: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if warmup_tokens < 0 or min_batch_tokens < 1:
            raise ValueError(
                f"need warmup_tokens >= 0 and min_batch_tokens >= 1, got {warmup_tokens} and "
                f"{min_batch_tokens}"
            )
        if warmup_tokens == 0 and adaptive is None:
            raise ValueError("warmup_tokens=0 decides nothing without adaptive settings")
        L, E = budget.num_layers, budget.num_experts
        self.budget = budget
        self.num_layers, self.num_experts = L, E
        self.warmup_tokens = warmup_tokens
        self.min_batch_tokens = min_batch_tokens
        self.adaptive = adaptive
        if resident is None:
            resident = first_n(E, budget.layer_counts())
        if resident.shape != (L, E) or resident.dtype != bool:
            raise ValueError(f"resident must be a bool mask of shape {(L, E)}, got "
                             f"{resident.dtype} {resident.shape}")
        self.resident = resident.copy()
        self.phase = "warmup" if warmup_tokens > 0 else "adaptive"
        # int32 on the device (int64 atomics are compare-and-swap loops on CUDA, slow under
        # contention), never reset: folds take wrap-safe differences of successive copies into
        # `_folded` (host, int64). Column E collects padding ids, so every token adds top_k
        # to its layer's row and the row sum gives the tokens recorded.
        self._device_counts: torch.Tensor | None = None
        if device is not None:
            self._allocate(torch.device(device))
        self._top_k = 0
        self._last = np.zeros((L, E + 1), np.int64)
        self._folded = np.zeros((L, E + 1), np.int64)
        self._seen = np.zeros((L, E))
        self._seen_tokens = 0
        self._recent = np.zeros((L, E))
        self._prior = np.zeros((L, E))
        self._prior_tokens = 0
        if prior is not None:
            if adaptive is None or prior_tokens < 1:
                raise ValueError("prior counts need adaptive settings and prior_tokens >= 1")
            prior = as_counts(prior, "prior")
            if prior.shape != (L, E):
                raise ValueError(f"prior has shape {prior.shape}, expected {(L, E)}")
            self._prior, self._prior_tokens = prior, prior_tokens

    def _allocate(self, device: torch.device) -> None:
        self._device_counts = torch.zeros(
            self.num_layers, self.num_experts + 1, dtype=torch.int32, device=device
        )

    def release(self) -> None:
        """Drop the device counters (their memory goes back; host-side counts stay)."""
        self._device_counts = None

    @property
    def device_counts(self) -> torch.Tensor | None:
        """The live counters [layers, experts + 1] (int32; column E = padding), or None before
        the first record when no device was given."""
        return self._device_counts

    def record(self, layer: int, topk_ids: torch.Tensor) -> bool:
        """Count one batch's routing at `layer`; returns whether it was counted. HOT PATH (every
        layer of every step): device ops only, no host sync, no loop over experts, capturable.
        Batches under `min_batch_tokens` tokens are not counted, nor a capture made before the
        counters exist. Ids outside [0, num_experts) are not counted as experts: -1 is
        padding, the others FusedMoE reports (RoutingError). Counting goes on after the last
        decision, so `host_counts` stays a live profile."""
        num_tokens = topk_ids.shape[0]
        if num_tokens < self.min_batch_tokens:
            return False
        if self._device_counts is None:
            if _capturing():
                return False  # allocating inside a capture would tie the counters to the graph
            self._allocate(topk_ids.device)
        if topk_ids.dim() == 2:
            self._top_k = topk_ids.shape[1]
        ids = topk_ids.reshape(-1)
        if ids.dtype not in (torch.int32, torch.int64):
            ids = ids.to(torch.int64)
        # One launch; ids outside [0, num_experts) are counted in the padding column, never
        # used as an index (past the counts that would be a device-side assert on CUDA).
        count_routing(ids.contiguous(), self._device_counts[layer])
        return True

    def fold(self, snapshot: np.ndarray | torch.Tensor) -> None:
        """Take in a host copy of the counters ([layers, experts + 1], int32). Copies may come
        out of order (one taken by a side stream while another was queued): only increases
        count."""
        snap = snapshot.numpy() if isinstance(snapshot, torch.Tensor) else snapshot
        delta = wrapped_delta(snap, self._last)
        grew = delta > 0
        self._folded += np.where(grew, delta, 0)
        self._last = np.where(grew, snap.astype(np.int64), self._last)

    def refresh(self) -> None:
        """Fold the counters in now (a host sync: call it from the thread and stream that
        record)."""
        if self._device_counts is not None:
            self.fold(self._device_counts.cpu())

    def _tokens(self) -> int:
        return int(self._folded.sum(axis=1).max()) // max(self._top_k, 1)

    @property
    def tokens_recorded(self) -> int:
        """Most tokens recorded at any layer (a host sync: `refresh`)."""
        self.refresh()
        return self._tokens()

    def tokens_until_due(self) -> float:
        """Recorded tokens still needed for the next decision, from the last fold (inf: no more
        decisions)."""
        if self.phase == "warmup":
            return self.warmup_tokens - self._tokens()
        if self.phase == "adaptive":
            return self.adaptive.interval_tokens - (self._tokens() - self._seen_tokens)
        return math.inf

    def decision_due(self, fresh: bool = True) -> bool:
        """Has enough been recorded for the next decision? `fresh`: `refresh` first; otherwise
        from the last fold."""
        if fresh:
            self.refresh()
        return self.tokens_until_due() <= 0

    def host_counts(self, fresh: bool = True) -> np.ndarray:
        """All recorded counts [layers, experts] (int64, on the host; for decisions and
        profiles). `fresh`: `refresh` first (a host sync)."""
        if fresh:
            self.refresh()
        return self._folded[:, : self.num_experts].copy()

    def decide(self, fresh: bool = True) -> dict[int, list[int]]:
        """New resident ids for the layers whose sets change (`fresh`: `refresh` first, a host
        sync; otherwise the counts of the last fold)."""
        if self.phase == "done":
            return {}
        counts = self.host_counts(fresh).astype(np.float64)
        tokens = self._tokens()
        if self.phase == "warmup":
            new = select_resident(counts, self.budget)
            self.phase = "adaptive" if self.adaptive is not None else "done"
        else:
            a = self.adaptive
            decay = 0.5 ** ((tokens - self._seen_tokens) / a.half_life_tokens)
            self._recent = self._recent * decay + (counts - self._seen)
            rate = (self._prior + counts) / max(self._prior_tokens + tokens, 1)
            window = a.half_life_tokens / math.log(2)
            scores = self._recent + a.prior_weight * window * rate
            new = swap_weakest(scores, self.resident, a.margin, a.min_gain, a.max_swaps)
        self._seen, self._seen_tokens = counts, tokens
        changed = np.flatnonzero(np.any(new != self.resident, axis=1))
        self.resident = new
        return dict(zip(changed.tolist(), resident_lists(new[changed]), strict=True))

    def set_resident(self, layer: int, resident_ids: list[int]) -> None:
        """Record the residency a layer actually has (after a failed re-advise)."""
        row = np.zeros(self.num_experts, bool)
        row[list(resident_ids)] = True
        self.resident[layer] = row
