"""Plain-torch fused-MoE with fp32 math: the reference the Triton kernels are tested against,
and the compute path for CPU tensors outside the Triton interpreter."""

import torch
import torch.nn.functional as F

from .fp8 import dequantize


def fused_moe_reference(
    hidden_states: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_slot: torch.Tensor | None = None,
    w13_slots: torch.Tensor | None = None,
    w2_slots: torch.Tensor | None = None,
    fill_slot: torch.Tensor | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    block_shape: tuple[int, int] | None = None,
    first_col: torch.Tensor | None = None,
) -> torch.Tensor:
    """`out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(w1[e] @ x_t) * (w3[e] @ x_t))`,
    `e = topk_ids[t, j]`, with w1 = w13[e, :I] and w3 = w13[e, I:]; ids < 0 contribute nothing.

    With `expert_slot` given, expert e with `expert_slot[e] = s >= 0` is read from
    `w13_slots[s]` / `w2_slots[s]` instead. With `fill_slot` given, each routed expert read from
    w13/w2 with `fill_slot[e] = s >= 0` is copied to `w13_slots[s]` / `w2_slots[s]` (what the
    kernel's fill-on-read leaves there). FP8 weights (w13_scale, w2_scale; fp8.py here says
    the layouts) are dequantised to fp32 first, with the scales of the expert (not the slot).
    With `first_col`, expert e's intermediate columns below first_col[e] are left out.
    Loops over experts and syncs with the host: for tests and the CPU path only. Returns
    [T, H] in hidden_states' dtype.
    """
    num_experts = w13.shape[0]
    intermediate = w2.shape[2]
    slot_of = expert_slot.tolist() if expert_slot is not None else [-1] * num_experts
    fill_of = fill_slot.tolist() if fill_slot is not None else [-1] * num_experts
    first_of = first_col.tolist() if first_col is not None else [0] * num_experts
    x = hidden_states.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    fills = []
    for expert in range(num_experts):
        tokens, choice = (topk_ids == expert).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        slot = slot_of[expert]
        if slot >= 0:
            gate_up_w, down_w = w13_slots[slot], w2_slots[slot]
        else:
            gate_up_w, down_w = w13[expert], w2[expert]
            if fill_of[expert] >= 0:
                fills.append((expert, fill_of[expert]))
        gate_up_w, down_w = gate_up_w.float(), down_w.float()
        if w13_scale is not None:
            gate_up_w = dequantize(gate_up_w[None], w13_scale[expert:expert + 1], block_shape,
                                   halves=2)[0]
            down_w = dequantize(down_w[None], w2_scale[expert:expert + 1], block_shape)[0]
        gate_up = x[tokens] @ gate_up_w.t()
        act = F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
        c = first_of[expert]
        y = act[:, c:] @ down_w[:, c:].t()
        out.index_add_(0, tokens, y * topk_weights[tokens, choice].float()[:, None])
    for expert, slot in fills:  # after every read: a slot filled is never read in the same call
        w13_slots[slot].copy_(w13[expert])
        w2_slots[slot].copy_(w2[expert])
    return out.to(hidden_states.dtype)
