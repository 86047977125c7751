"""The one-token (T == 1) path of fused_moe: two GEMV kernels (gate/up with SiLU-and-mul fused,
then down over all top-k experts with a fixed-order sum), no alignment. With fill_slot, each
program also stores the weight tiles it loads into the expert's fill slot."""

import torch
import triton
import triton.language as tl

from .expert_address import expert_base, expert_bases, fill_targets
from .fused_moe_configs import MoeDecodeConfig
from .pdl import pdl_enter, pdl_launch


@triton.jit
def _decode_gate_up_kernel(x_ptr, w_ptr, stride_we, slot_w_ptr, stride_se, expert_slot_ptr,
                           fill_slot_ptr, first_col_ptr, ids_ptr, stride_ij, act_ptr,
                           num_experts, hidden, intermediate, HAS_SLOTS: tl.constexpr,
                           HAS_FILL: tl.constexpr, HAS_FIRST: tl.constexpr,
                           EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           PDL: tl.constexpr):
    """act[j, n] = silu(w1[e] . x) * (w3[e] . x), fp32, for choice j of the only token (0 for
    the rows n < first_col[e] with HAS_FIRST: their weights are not read)."""
    pdl_enter(PDL)
    choice = tl.program_id(1)
    expert = tl.load(ids_ptr + choice * stride_ij)
    if (expert < 0) | (expert >= num_experts):
        return  # padding: the down kernel reads no activation for this choice
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = rows < intermediate
    row_ok = in_range
    if HAS_FIRST:
        row_ok = row_ok & (rows >= tl.load(first_col_ptr + expert))
    ks = tl.arange(0, BLOCK_K)
    base = expert_base(w_ptr, stride_we, slot_w_ptr, stride_se, expert_slot_ptr, expert, HAS_SLOTS)
    gate_ptrs = base + rows.to(tl.int64)[:, None] * hidden + ks[None, :]
    up_ptrs = gate_ptrs + intermediate * hidden
    x_ptrs = x_ptr + ks
    if HAS_FILL:
        fill_base, fill = fill_targets(slot_w_ptr, stride_se, expert_slot_ptr, fill_slot_ptr,
                                       expert, expert >= 0, HAS_SLOTS)
        fill_ptrs = fill_base + rows.to(tl.int64)[:, None] * hidden + ks[None, :]
    # Reduced every K step: [BLOCK_N] accumulators keep registers low (56-64 on sm_90 for 4096-
    # element tiles, 4 warps), so ~8 programs fit per SM and their loads cover the latency.
    gate = tl.zeros([BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = (k0 + ks < hidden) | EVEN_K  # folds away when EVEN_K (same SASS as no mask)
        x = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        w_gate = tl.load(gate_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_up = tl.load(up_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_FILL:
            # The tile just loaded, stored once: this program is the only one covering it.
            # tl.where, not `& fill`: triton 3.9's interpreter splats a scalar comparison as
            # int32, which it then refuses as a mask.
            fill_ok = tl.where(fill, row_ok[:, None] & k_ok[None, :], False)
            tl.store(fill_ptrs, w_gate, mask=fill_ok)
            tl.store(fill_ptrs + intermediate * hidden, w_up, mask=fill_ok)
            fill_ptrs += BLOCK_K
        gate += tl.sum(w_gate.to(tl.float32) * x, axis=1)
        up += tl.sum(w_up.to(tl.float32) * x, axis=1)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    tl.store(act_ptr + choice * intermediate + rows, gate * tl.sigmoid(gate) * up, mask=in_range)


@triton.jit
def _decode_down_kernel(act_ptr, w_ptr, stride_we, slot_w_ptr, stride_se, expert_slot_ptr,
                        fill_slot_ptr, first_col_ptr, ids_ptr, stride_ij, weights_ptr,
                        stride_wj, out_ptr, num_experts, hidden, intermediate,
                        TOP_K: tl.constexpr, K_PAD: tl.constexpr, HAS_SLOTS: tl.constexpr,
                        HAS_FILL: tl.constexpr, HAS_FIRST: tl.constexpr,
                        EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        PDL: tl.constexpr):
    """out[n] = sum_j w[j] * (w2[e_j][n] . act[j]): all top-k experts in one [k, n, K] tile, so
    each K step has every expert's loads in flight and the sum over j has a fixed order. With
    HAS_FIRST, expert e's K blocks wholly below first_col[e] are not read (the gate/up kernel
    left its activations below first_col[e] 0)."""
    pdl_enter(PDL)
    choices = tl.arange(0, K_PAD)
    ids = tl.load(ids_ptr + choices * stride_ij, mask=choices < TOP_K, other=-1)
    routed = (ids >= 0) & (ids < num_experts)
    bases = expert_bases(w_ptr, stride_we, slot_w_ptr, stride_se, expert_slot_ptr,
                         tl.where(routed, ids, 0), routed, HAS_SLOTS)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < hidden
    ks = tl.arange(0, BLOCK_K)
    w_ptrs = (bases[:, None, None] + rows.to(tl.int64)[None, :, None] * intermediate
              + ks[None, None, :])
    a_ptrs = act_ptr + choices[:, None] * intermediate + ks[None, :]
    w_ok = routed[:, None, None] & row_ok[None, :, None]
    if HAS_FILL:
        fill_bases, fills = fill_targets(slot_w_ptr, stride_se, expert_slot_ptr, fill_slot_ptr,
                                         tl.where(routed, ids, 0), routed, HAS_SLOTS)
        fill_ptrs = (fill_bases[:, None, None] + rows.to(tl.int64)[None, :, None] * intermediate
                     + ks[None, None, :])
        fill_ok = w_ok & fills[:, None, None]
    if HAS_FIRST:
        firsts = tl.load(first_col_ptr + tl.where(routed, ids, 0), mask=routed, other=0)
    y = tl.zeros([K_PAD, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, intermediate, BLOCK_K):
        # Padding choices load zeros for both factors: nothing unwritten or NaN is multiplied.
        k_ok = (k0 + ks < intermediate) | EVEN_K
        w_mask = w_ok & k_ok[None, None, :]
        if HAS_FIRST:
            # Per choice, constant along K: the loads stay vectorised (an element-wise K mask
            # would make them scalar); the block holding first_col is read whole, its columns
            # below multiplying activations that are 0.
            w_mask = w_mask & (k0 + BLOCK_K > firsts)[:, None, None]
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        a = tl.load(a_ptrs, mask=routed[:, None] & k_ok[None, :], other=0.0)
        if HAS_FILL:
            tl.store(fill_ptrs, w, mask=fill_ok & k_ok[None, None, :])
            fill_ptrs += BLOCK_K
        y += tl.sum(w.to(tl.float32) * a[:, None, :], axis=2)
        w_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    weights = tl.load(weights_ptr + choices * stride_wj, mask=routed, other=0.0).to(tl.float32)
    out = tl.sum(y * weights[:, None], axis=0)
    tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_ok)


def one_token_moe(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  expert_slot: torch.Tensor | None, w13_slots: torch.Tensor | None,
                  w2_slots: torch.Tensor | None, fill_slot: torch.Tensor | None,
                  config: MoeDecodeConfig, first_col: torch.Tensor | None = None) -> torch.Tensor:
    """fused_moe for T == 1 on checked inputs (fused_moe_triton checks them)."""
    # No alignment: one token's top-k experts are distinct, so choice j is its own row block
    # and each expert is streamed once. Two launches instead of four.
    hidden = hidden_states.shape[1]
    num_experts, intermediate, top_k = w13.shape[0], w2.shape[2], topk_ids.shape[1]
    slot_strides = (w13_slots.stride(0), w2_slots.stride(0)) if w13_slots is not None else (0, 0)
    flags = dict(HAS_SLOTS=expert_slot is not None, HAS_FILL=fill_slot is not None,
                 HAS_FIRST=first_col is not None)
    act = torch.empty((top_k, intermediate), dtype=torch.float32, device=hidden_states.device)
    grid = (triton.cdiv(intermediate, config.gate_up_block_n), top_k)
    _decode_gate_up_kernel[grid](
        hidden_states, w13, w13.stride(0), w13_slots, slot_strides[0], expert_slot, fill_slot,
        first_col, topk_ids, topk_ids.stride(1), act, num_experts, hidden, intermediate, **flags,
        EVEN_K=hidden % config.gate_up_block_k == 0, BLOCK_N=config.gate_up_block_n,
        BLOCK_K=config.gate_up_block_k, num_warps=config.gate_up_warps,
        **pdl_launch(hidden_states.device),
    )
    out = torch.empty((1, hidden), dtype=hidden_states.dtype, device=hidden_states.device)
    _decode_down_kernel[(triton.cdiv(hidden, config.down_block_n),)](
        act, w2, w2.stride(0), w2_slots, slot_strides[1], expert_slot, fill_slot, first_col,
        topk_ids, topk_ids.stride(1), topk_weights, topk_weights.stride(1), out, num_experts,
        hidden, intermediate, TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), **flags,
        EVEN_K=intermediate % config.down_block_k == 0, BLOCK_N=config.down_block_n,
        BLOCK_K=config.down_block_k, num_warps=config.down_warps,
        **pdl_launch(hidden_states.device),
    )
    return out

