"""Slot-pool planning by usage counts, beside the LRU of slot_plan_reference: decayed per-expert
usage counts, the decayed-frequency cache `plan_admit` (lfu) and the key that makes plan_fill
evict like llama.cpp's MoE cache (freq_lru: least recently used within the lowest frequency
class).

lfu keeps in a layer's S slots the S offloaded experts with the highest score (decayed count of
tokens routed to the expert, plus an optional prior), among those it holds and those needed now:
a missed expert is admitted (filled while the kernel reads it) only when it outranks the weakest
held one, otherwise it is read in place and the cache is left alone. LRU admits every miss, so a
burst of rare experts flushes the popular ones; admission by count is what keeps lfu's reads
within 1.4-2x of the clairvoyant bound on our traces where LRU is at 2.4x (README, simulate).

HOT PATH: torch ops only, shapes fixed by E, S and the ids' shape, no host sync: capturable in
a CUDA graph. Leading batch dims are independent pools ([..., E], [..., S], [..., T, k]), as in
slot_plan_reference, so the simulation replays every layer at once.
"""

from __future__ import annotations

import torch

from moe_uvm.kernels.slot_plan_reference import EMPTY_STAMP, _mark, _put

CLASS_SHIFT = 1 << 40
"""freq_lru key = frequency class x CLASS_SHIFT + stamp: above any step count."""


def add_routed(counts: torch.Tensor, topk_ids: torch.Tensor, decay: float) -> None:
    """counts float32 [..., E] *= decay, then += tokens routed to each expert in topk_ids
    [..., T, k] (negative ids are padding), in place."""
    E = counts.shape[-1]
    flat = topk_ids.flatten(-2)
    index = torch.where(flat >= 0, flat, E).long()
    routed = torch.zeros((*counts.shape[:-1], E + 1), dtype=counts.dtype, device=counts.device)
    routed.scatter_add_(-1, index, torch.ones_like(index, dtype=counts.dtype))
    counts.mul_(decay).add_(routed[..., :E])


def _rank(score: torch.Tensor, held: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """int64 [..., E]: each expert's place when candidates are ordered by higher score, then held
    before not held, then lower id (non-candidates after all candidates). Two stable sorts, so
    ties are exact on every device."""
    order = torch.argsort((~held).to(torch.uint8), dim=-1, stable=True)
    key = torch.where(candidate, -score, torch.inf)
    order = torch.gather(order, -1, torch.argsort(torch.gather(key, -1, order), dim=-1,
                                                  stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(score.shape[-1], device=score.device).expand_as(order))
    return rank


def plan_admit(
    topk_ids: torch.Tensor,
    resident: torch.Tensor,
    expert_slot: torch.Tensor,
    slot_expert: torch.Tensor,
    score: torch.Tensor,
) -> torch.Tensor:
    """fill_slot int32 [..., E] for an lfu pool: of the offloaded experts held in a slot or
    needed now (topk_ids [..., T, k]), the S ranked first by `score` [..., E] (ties: held first,
    then the lower id) are kept; a kept expert not held is needed now and gets a free slot (free
    slots in slot order, admitted experts in id order); the rest of the needed are read in place.

    Updates the pool in place like `slot_plan_reference.plan_fill`: dropped experts'
    expert_slot -> -1, slot_expert of their slots -> -1 or the admitted expert; expert_slot of an
    admitted expert stays -1 until `commit_fill`, so the kernel reads it while writing the slot."""
    E, S = expert_slot.shape[-1], slot_expert.shape[-1]
    needed = _mark(topk_ids.flatten(-2), E)
    held = expert_slot >= 0
    candidate = (held | needed) & ~resident
    keep = candidate & (_rank(score, held, candidate) < S)
    admit = keep & ~held
    dropped = held & ~keep
    # Slots that are empty or hold a dropped expert are free, taken in slot order.
    slot_held = slot_expert >= 0
    slot_dropped = slot_held & torch.gather(dropped, -1, slot_expert.clamp(min=0).long())
    free = ~slot_held | slot_dropped
    free_rank = free.long().cumsum(-1) - 1
    slot = torch.arange(S, device=slot_expert.device).expand_as(slot_expert)
    by_rank = torch.full((*slot_expert.shape[:-1], S + 1), -1, dtype=torch.long,
                         device=slot_expert.device)
    by_rank.scatter_(-1, torch.where(free, free_rank, S), slot)
    admit_rank = admit.long().cumsum(-1) - 1
    fill_slot = torch.where(admit, torch.gather(by_rank, -1, admit_rank.clamp(0, S)), -1)
    _put(expert_slot, torch.where(dropped, torch.arange(E, device=held.device), -1),
         torch.full_like(expert_slot, -1))
    slot_expert.copy_(torch.where(slot_dropped, -1, slot_expert))
    _put(slot_expert, fill_slot, torch.arange(E, device=fill_slot.device).expand_as(fill_slot))
    return fill_slot.int()


def frequency_class_key(
    counts: torch.Tensor, slot_expert: torch.Tensor, slot_stamp: torch.Tensor
) -> torch.Tensor:
    """int64 [..., S] stamps for `plan_fill` that evict llama.cpp's way: a held slot's key is
    its expert's frequency class floor(log2(1 + count)) x CLASS_SHIFT + its stamp, so the
    oldest slot of the lowest class goes first; empty slots keep EMPTY_STAMP."""
    held = slot_expert >= 0
    level = torch.frexp(1.0 + counts).exponent.long() - 1  # exact floor(log2), no rounding up
    slot_level = torch.gather(level, -1, slot_expert.clamp(min=0).long())
    return torch.where(held, slot_level * CLASS_SHIFT + slot_stamp, EMPTY_STAMP)


def restore_stamps(key: torch.Tensor, slot_stamp: torch.Tensor, step: torch.Tensor) -> None:
    """After `plan_fill` ran on `frequency_class_key` stamps: slots it stamped with `step` (hits
    and fills) get that step as their stamp; the others keep theirs."""
    slot_stamp.copy_(torch.where(key == step, step, slot_stamp))


def prior_scores(counts: torch.Tensor, top_k: int, tokens: float) -> torch.Tensor:
    """float32 [..., E]: profile routing counts as the decayed count they would leave after
    `tokens` tokens routed at the profile's rates (counts / routings x top_k x tokens); zero
    rows stay zero."""
    counts = counts.to(torch.float32)
    total = counts.sum(-1, keepdim=True)
    return torch.where(total > 0, counts / total.clamp(min=1) * (top_k * tokens), 0.0)
