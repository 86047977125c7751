"""Prefetch decisions: how many experts to prefetch per layer and step, and the predictors that
score the next layer's experts (routing frequency, co-occurrence with this layer's experts, or
the next router applied to this layer's hidden states).

HOT PATH: the predictors are torch ops on the tensors' device with shapes fixed by E and the
ids' shape (no host sync, capturable in a CUDA graph); each takes a leading batch of pools.
"""

from __future__ import annotations

import torch


def default_prefetch_experts(top_k: int, slots: int) -> int:
    """Experts prefetched per layer and step when none is asked for: a token's top_k, at most
    the slots (what ExpertOffloadConfig.prefetch_experts documents)."""
    if top_k < 1 or slots < 1:
        raise ValueError(f"need top_k >= 1 and slots >= 1, got top_k={top_k}, slots={slots}")
    return min(top_k, slots)


def frequency_scores(counts_next: torch.Tensor) -> torch.Tensor:
    """float32 [..., E]: the next layer's routing counts (a static prediction)."""
    return counts_next.to(torch.float32, copy=True)


def speculative_scores(cooc_l: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """float32 [..., E]: the sum of co-occurrence rows cooc_l[a] ([..., E, E], a at this layer,
    b at the next) over this layer's ids a in topk_ids [..., T, k]; padding ids (< 0) add
    nothing. Rows are gathered and summed in a fixed order, not multiplied by a count vector:
    a TF32 matmul would round large counts."""
    E = cooc_l.shape[-1]
    ids = topk_ids.flatten(-2).long()
    rows = torch.gather(cooc_l, -2, ids.clamp(min=0)[..., None].expand(*ids.shape, E))
    return (rows.to(torch.float32) * (ids >= 0)[..., None]).sum(-2)


def lookahead_scores(
    hidden: torch.Tensor, next_gate_weight: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 [..., E]: the next layer's router (next_gate_weight [E, H]) applied to this
    layer's hidden states [..., T, H], softmax probabilities summed over tokens. `token_mask`
    (bool [..., T]) leaves out padding rows of a fixed-size graph batch."""
    logits = hidden.to(torch.float32) @ next_gate_weight.to(torch.float32).T
    probs = torch.softmax(logits, dim=-1)
    if token_mask is not None:
        probs = probs * token_mask[..., None]
    return probs.sum(-2)


def update_cooccurrence(
    cooc_l: torch.Tensor, ids_l: torch.Tensor, ids_next: torch.Tensor
) -> None:
    """cooc_l[a, b] += 1 for each token routed to a at this layer (ids_l [..., T, k]) and to b
    at the next (ids_next [..., T, k']); pairs with a padding id are skipped. cooc_l
    [..., E, E] must be contiguous. index_add_ rather than index_put_(accumulate=True): the
    latter's sort-based CUDA path has failed under graph capture; additions of ones are exact in
    any order (float32 up to 2**24 per entry)."""
    E = cooc_l.shape[-1]
    a, b = ids_l.long()[..., :, :, None], ids_next.long()[..., :, None, :]
    valid = (a >= 0) & (b >= 0)
    lead = cooc_l.shape[:-2]
    pools = torch.arange(lead.numel(), device=cooc_l.device).reshape(*lead, 1, 1, 1)
    flat = (pools * E + a.clamp(min=0)) * E + b.clamp(min=0)
    cooc_l.view(-1).index_add_(0, flat.reshape(-1), valid.reshape(-1).to(cooc_l.dtype))
