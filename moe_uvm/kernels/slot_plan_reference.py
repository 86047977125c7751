"""Plain-torch slot-cache planning, the reference of the one-launch planners in slot_plan.py and
their path for CPU tensors: which offloaded experts a layer's pool of S slots holds, filled on
read (`plan_fill` / `commit_fill`) or ahead of use (`plan_prefetch`), and the prefetch counters.

HOT PATH: every function here is torch ops on the tensors' device with shapes fixed by E, S, m
and the ids' shape: no host sync, no Python loop over experts, capturable in a CUDA graph
(temporaries then come from the graph's pool: no allocation at replay).
Every function also takes a leading batch of independent pools ([..., E], [..., S],
[..., T, k]); the simulation runs all layers' pools at once that way.

Eviction order: slots whose expert is not protected (needed now by `plan_fill`, chosen now by
`plan_prefetch`), oldest stamp first, ties to the lower slot. Empty slots carry EMPTY_STAMP and
so go first. The stamp is the step of a slot's last use, fill or prefetch: consecutive tokens
share experts (topic locality), so the expert used longest ago is the one least likely to be
needed next, and a prefetched expert that went unused ages out like any other.
"""

from __future__ import annotations

import torch

EMPTY_STAMP = -(1 << 62)
"""slot_stamp of an empty slot: older than any step, so empty slots are filled first."""

METRICS = ("predicted", "correct", "needed_offloaded", "slot_hits")
"""The columns of prefetch counters, see `count_prefetch`."""


def empty_slot_state(
    num_experts: int,
    num_slots: int,
    batch_shape: tuple[int, ...] = (),
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(expert_slot int32 [..., E], slot_expert int32 [..., S], slot_stamp int64 [..., S]) of
    empty pools."""
    if num_experts < 1 or num_slots < 1:
        raise ValueError(f"need num_experts >= 1 and num_slots >= 1, got {num_experts} and "
                         f"{num_slots}")
    return (
        torch.full((*batch_shape, num_experts), -1, dtype=torch.int32, device=device),
        torch.full((*batch_shape, num_slots), -1, dtype=torch.int32, device=device),
        torch.full((*batch_shape, num_slots), EMPTY_STAMP, dtype=torch.int64, device=device),
    )


def _mark(ids: torch.Tensor, size: int) -> torch.Tensor:
    """bool [..., size]: which of 0..size-1 occur in ids [..., n]; negative ids are skipped (they
    land in a spare column that is cut off)."""
    index = torch.where(ids >= 0, ids, size).long()
    marks = torch.zeros((*ids.shape[:-1], size + 1), dtype=torch.bool, device=ids.device)
    marks.scatter_(-1, index, True)
    return marks[..., :size]


def _put(dest: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> None:
    """dest[..., index] = src where index >= 0, in place; the indices >= 0 must be distinct along
    the last dim (the others all write a spare column, which is dropped)."""
    n = dest.shape[-1]
    padded = torch.cat([dest, dest[..., :1]], dim=-1)
    padded.scatter_(-1, torch.where(index >= 0, index, n).long(), src.to(dest.dtype))
    dest.copy_(padded[..., :n])


def _victim_order(slot_stamp: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """int64 [..., S]: slot ids in eviction order (unprotected first, then older stamp, then lower
    slot): two stable sorts, so ties are exact on every device and any stamp values work."""
    order = torch.argsort(slot_stamp, dim=-1, stable=True)
    unprotected_first = torch.gather(protected, -1, order).to(torch.uint8)
    return torch.gather(order, -1, torch.argsort(unprotected_first, dim=-1, stable=True))


def plan_fill(
    topk_ids: torch.Tensor,
    resident: torch.Tensor,
    expert_slot: torch.Tensor,
    slot_expert: torch.Tensor,
    slot_stamp: torch.Tensor,
    step: torch.Tensor,
) -> torch.Tensor:
    """fill_slot int32 [..., E]: for each expert needed now (in topk_ids [..., T, k], ids >= 0)
    that is offloaded and in no slot, the slot the kernel fills while reading it, or -1 when no
    victim is left (needed experts claim victims in expert-id order). Victims are slots whose
    expert is not needed now, in eviction order.

    Updates the pool in place: evicted experts' expert_slot -> -1 (they are not read this
    step), slot_expert[victim] = new expert, slot_stamp = step for every slot holding a needed
    expert (hits and fills). expert_slot of newly filled experts stays -1 until `commit_fill`,
    so the kernel reads them from managed memory while it writes the slot."""
    E, S = expert_slot.shape[-1], slot_expert.shape[-1]
    needed = _mark(topk_ids.flatten(-2), E)
    missing = needed & ~resident & (expert_slot < 0)
    held = slot_expert >= 0
    slot_needed = held & torch.gather(needed, -1, slot_expert.clamp(min=0).long())
    order = _victim_order(slot_stamp, slot_needed)
    victims = S - slot_needed.sum(-1, keepdim=True)
    rank = missing.long().cumsum(-1) - 1
    filled = missing & (rank < victims)
    fill_slot = torch.where(filled, torch.gather(order, -1, rank.clamp(0, S - 1)), -1)
    # Victim slots are exactly the first `fills` of `order`; their old experts leave.
    refilled = _mark(fill_slot, S)
    evicted = torch.where(refilled & held, slot_expert.long(), -1)
    _put(expert_slot, evicted, torch.full_like(evicted, -1))
    _put(slot_expert, fill_slot, torch.arange(E, device=fill_slot.device).expand_as(fill_slot))
    slot_stamp.copy_(torch.where(slot_needed | refilled, step, slot_stamp))
    return fill_slot.int()


def commit_fill(fill_slot: torch.Tensor, expert_slot: torch.Tensor) -> None:
    """After the kernel wrote the slots: expert_slot[e] = fill_slot[e] where fill_slot[e] >= 0."""
    expert_slot.copy_(torch.where(fill_slot >= 0, fill_slot.to(expert_slot.dtype), expert_slot))


def top_offloaded(scores: torch.Tensor, resident: torch.Tensor, m: int) -> torch.Tensor:
    """int64 [..., m]: the m offloaded experts with the highest score > 0, best first, ties to the
    lower id; -1 where fewer than m qualify."""
    E = scores.shape[-1]
    if m < 1:
        raise ValueError(f"number of predicted experts must be >= 1, got {m}")
    # A float32 >= 0 orders like its bit pattern read as an integer: the key packs score bits
    # above the inverted id, so keys are distinct and top-k's tie order does not matter.
    scores = scores.to(torch.float32).contiguous()
    bits = scores.view(torch.int32).long()
    inverted_id = E - 1 - torch.arange(E, device=scores.device)
    key = torch.where((scores > 0) & ~resident, bits * (1 << 32) + inverted_id, -1)
    top, ids = key.topk(min(m, E), dim=-1)
    chosen = torch.where(top >= 0, ids, -1)
    if m > E:
        chosen = torch.cat([chosen, chosen.new_full((*chosen.shape[:-1], m - E), -1)], -1)
    return chosen


def predicted_mask(scores: torch.Tensor, resident: torch.Tensor, m: int) -> torch.Tensor:
    """bool [..., E]: the experts `top_offloaded` picks (what `plan_prefetch` holds in slots)."""
    return _mark(top_offloaded(scores, resident, m), scores.shape[-1])


def plan_prefetch(
    scores: torch.Tensor,
    resident: torch.Tensor,
    expert_slot: torch.Tensor,
    slot_expert: torch.Tensor,
    slot_stamp: torch.Tensor,
    step: torch.Tensor,
    num_experts: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(copy_experts, copy_slots) int32 [..., m], m = num_experts <= S: the top-m offloaded
    experts by score (`top_offloaded`) that are in no slot, each with its victim slot (slots not
    holding a chosen expert, in eviction order); -1 entries copy nothing (chosen expert already
    in a slot, or fewer than m candidates). Chosen experts already in a slot get stamp = step.

    Updates the pool in place for the copies: evicted expert's expert_slot -> -1,
    slot_expert[s] = e, slot_stamp[s] = step and expert_slot[e] = s ahead of the copy (the
    executor joins the copy before the layer's kernel reads)."""
    S = slot_expert.shape[-1]
    if not 1 <= num_experts <= S:
        raise ValueError(f"prefetch of {num_experts} experts into {S} slots: need 1 <= m <= S")
    chosen = top_offloaded(scores, resident, num_experts)
    current = torch.gather(expert_slot, -1, chosen.clamp(min=0)).long()
    cached = (chosen >= 0) & (current >= 0)
    protected = _mark(torch.where(cached, current, -1), S)
    copy = (chosen >= 0) & ~cached
    # At most m - cached copies and S - cached unprotected slots: m <= S leaves enough victims.
    order = _victim_order(slot_stamp, protected)
    rank = copy.long().cumsum(-1) - 1
    copy_slots = torch.where(copy, torch.gather(order, -1, rank.clamp(0, S - 1)), -1)
    copy_experts = torch.where(copy, chosen, -1)
    evicted = torch.where(copy, torch.gather(slot_expert, -1, copy_slots.clamp(min=0)).long(), -1)
    # Evicted experts sit in slots and copied ones do not: the two index sets are disjoint.
    _put(expert_slot, torch.cat([evicted, copy_experts], -1),
         torch.cat([torch.full_like(evicted, -1), copy_slots], -1))
    _put(slot_expert, copy_slots, copy_experts)
    slot_stamp.copy_(torch.where(protected | _mark(copy_slots, S), step, slot_stamp))
    return copy_experts.int(), copy_slots.int()


def count_prefetch(
    counters: torch.Tensor,
    topk_ids: torch.Tensor,
    resident: torch.Tensor,
    expert_slot: torch.Tensor,
    predicted: torch.Tensor | None = None,
) -> None:
    """counters int64 [..., 4] += (predicted, correct, needed_offloaded, slot_hits) of one layer
    step: offloaded experts predicted (`predicted`, bool [..., E], e.g. `predicted_mask`; None
    when nothing was predicted), predicted and needed, needed (in topk_ids) and offloaded, and
    needed offloaded experts in a slot. Call it between `plan_prefetch` and `commit_fill`: there
    expert_slot of a needed expert says whether the kernel finds it in a slot."""
    needed = _mark(topk_ids.flatten(-2), expert_slot.shape[-1]) & ~resident
    hits = needed & (expert_slot >= 0)
    pred = torch.zeros_like(needed) if predicted is None else predicted & ~resident
    counts = [pred.sum(-1), (pred & needed).sum(-1), needed.sum(-1), hits.sum(-1)]
    counters.add_(torch.stack(counts, dim=-1))
