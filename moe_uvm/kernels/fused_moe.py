"""Fused-MoE forward in Triton. Grouped path (here): align (token, expert) pairs by expert on the
GPU (moe_align.py; one token needs no alignment: choice j is row block j), grouped gate/up GEMM
with SiLU-and-mul fused, grouped down GEMM (optional split-K), deterministic top-k sum. The
one-token GEMV path: fused_moe_decode.py. Every kernel is launched with programmatic dependent
launch where the GPU has it (pdl.py). Weights are read in place through their strides (device,
managed or mapped host memory); fill_slot copies them into GPU slots."""

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from .expert_address import expert_base, fill_targets
from .fp8 import check_block_shape
from .fp8_widen import alu_widen_applies, widen_bf16
from .fused_moe_checks import check_inputs
from .fused_moe_configs import (
    NO_TABLES,
    MoeBlockConfig,
    MoeDecodeConfig,
    TunedTables,
    select_config,
    select_decode_config,
    tuned_tables,
)
from .fused_moe_decode import one_token_moe
from .moe_align import align_by_expert
from .pdl import pdl_enter, pdl_launch
from .reference import fused_moe_reference


@triton.jit
def _block_rows(sorted_ptr, block_expert_ptr, stride_bj, pid_m, num_pairs, num_experts,
                PAIR_BLOCKS: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, pair of each row, whether the block has work) of row block pid_m. With
    PAIR_BLOCKS (one token: its top-k experts are distinct), block j is choice j alone, read
    from topk_ids (block_expert_ptr, stride stride_bj): no alignment launch."""
    lanes = tl.arange(0, BLOCK_M)
    if PAIR_BLOCKS:
        expert = tl.load(block_expert_ptr + pid_m * stride_bj).to(tl.int32)
        pairs = tl.where(lanes == 0, pid_m, num_pairs).to(tl.int32)
        work = (expert >= 0) & (expert < num_experts)
    else:
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int32)
        pairs = tl.load(sorted_ptr + pid_m * BLOCK_M + lanes).to(tl.int32)
        work = expert >= 0
    return expert, pairs, work


@triton.jit
def _fills_first_block(slot_w_ptr, stride_se, expert_slot_ptr, fill_slot_ptr, block_expert_ptr,
                       pid_m, expert, HAS_SLOTS: tl.constexpr, PAIR_BLOCKS: tl.constexpr):
    """fill_targets for the expert of row block pid_m; only the expert's first row block fills
    (every block loads the same weight tiles; with PAIR_BLOCKS each expert has one block)."""
    fill_base, fill = fill_targets(slot_w_ptr, stride_se, expert_slot_ptr, fill_slot_ptr, expert,
                                   expert >= 0, HAS_SLOTS)
    if PAIR_BLOCKS:
        return fill_base, fill
    previous = tl.load(block_expert_ptr + pid_m - 1, mask=pid_m > 0, other=-1)
    return fill_base, fill & (previous != expert)


@triton.jit
def _scaled_dot(x, w, acc, scale_ptrs, k0, stride_sk, col_ok, QUANT: tl.constexpr,
                SCALE_K: tl.constexpr, PRECISION: tl.constexpr, ALU: tl.constexpr):
    """acc + x @ w. FP8 weights (QUANT > 0) are widened to x's dtype in registers (exact: every
    finite e4m3 value is a bf16/fp16 value; with ALU by integer ops, fp8_widen.py); with block
    scales (QUANT == 2) this K step's scale of each output column multiplies its product (a K
    step never crosses a scale block)."""
    if QUANT == 0:
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    else:
        if ALU:
            wide = widen_bf16(w)
        else:
            wide = w.to(x.dtype)
        if QUANT == 2:
            scale = tl.load(scale_ptrs + (k0 // SCALE_K) * stride_sk, mask=col_ok, other=0.0)
            acc += tl.dot(x, wide, input_precision=PRECISION) * scale[None, :]
        else:
            acc = tl.dot(x, wide, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _channel_scaled(acc, scale_ptrs, col_ok, QUANT: tl.constexpr):
    """Per-output-channel scales (QUANT == 1) multiply the finished accumulator."""
    if QUANT == 1:
        acc = acc * tl.load(scale_ptrs, mask=col_ok, other=0.0)[None, :]
    return acc


@triton.jit
def _gate_up_loop(x_ptrs, gate_ptrs, up_ptrs, fill_ptrs, gate_scales, up_scales, stride_sk,
                  row_ok, col_ok, ks, hidden, intermediate, FILL: tl.constexpr,
                  EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, QUANT: tl.constexpr,
                  SCALE_K: tl.constexpr, ALU: tl.constexpr):
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if EVEN_K:
            w_ok = col_ok[None, :]
            x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            k_ok = k0 + ks < hidden
            w_ok = col_ok[None, :] & k_ok[:, None]
            x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_gate = tl.load(gate_ptrs, mask=w_ok, other=0.0)
        w_up = tl.load(up_ptrs, mask=w_ok, other=0.0)
        if FILL:
            tl.store(fill_ptrs, w_gate, mask=w_ok)
            tl.store(fill_ptrs + intermediate * hidden, w_up, mask=w_ok)
            fill_ptrs += BLOCK_K
        gate = _scaled_dot(x, w_gate, gate, gate_scales, k0, stride_sk, col_ok, QUANT, SCALE_K,
                           PRECISION, ALU)
        up = _scaled_dot(x, w_up, up, up_scales, k0, stride_sk, col_ok, QUANT, SCALE_K,
                         PRECISION, ALU)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    return (_channel_scaled(gate, gate_scales, col_ok, QUANT),
            _channel_scaled(up, up_scales, col_ok, QUANT))


@triton.jit(do_not_specialize=["num_pairs"])
def _gate_up_kernel(x_ptr, stride_xt, w_ptr, stride_we, slot_w_ptr, stride_se, expert_slot_ptr,
                    fill_slot_ptr, first_col_ptr, act_ptr, sorted_ptr, block_expert_ptr, stride_bj,
                    num_pairs, num_experts, hidden, intermediate, scale_ptr, stride_sc_e,
                    stride_sc_n, stride_sc_k, up_scale_row, QUANT: tl.constexpr,
                    SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, TOP_K: tl.constexpr,
                    HAS_SLOTS: tl.constexpr, HAS_FILL: tl.constexpr, HAS_FIRST: tl.constexpr,
                    PAIR_BLOCKS: tl.constexpr,
                    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, ALU: tl.constexpr,
                    PDL: tl.constexpr):
    """act[pair, n] = silu(x @ w1[e]^T) * (x @ w3[e]^T) for one row tile of one expert (0 for
    the columns n < first_col[e] with HAS_FIRST: their weights are not read)."""
    pdl_enter(PDL)
    pid_m = tl.program_id(0)
    expert, pairs, work = _block_rows(sorted_ptr, block_expert_ptr, stride_bj, pid_m, num_pairs,
                                      num_experts, PAIR_BLOCKS, BLOCK_M)
    if not work:
        return
    row_ok = pairs < num_pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = cols < intermediate
    col_ok = col_in
    if HAS_FIRST:
        col_ok = col_ok & (cols >= tl.load(first_col_ptr + expert))
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (pairs // TOP_K).to(tl.int64)[:, None] * stride_xt + ks[None, :]
    base = expert_base(w_ptr, stride_we, slot_w_ptr, stride_se, expert_slot_ptr, expert, HAS_SLOTS)
    gate_ptrs = base + cols.to(tl.int64)[None, :] * hidden + ks[:, None]
    up_ptrs = gate_ptrs + intermediate * hidden
    # Scales are indexed by expert (never by slot: they stay on the GPU, slots or not).
    gate_scales = (scale_ptr + expert.to(tl.int64) * stride_sc_e
                   + (cols // SCALE_N).to(tl.int64) * stride_sc_n)
    up_scales = gate_scales + up_scale_row * stride_sc_n
    # A loop of its own for the filling programs: the others run the loop of the no-fill
    # kernel, whose loads feed only the dots and are pipelined as tuned.
    if HAS_FILL:
        fill_base, fill = _fills_first_block(slot_w_ptr, stride_se, expert_slot_ptr,
                                             fill_slot_ptr, block_expert_ptr, pid_m, expert,
                                             HAS_SLOTS, PAIR_BLOCKS)
        if fill:
            fill_ptrs = fill_base + cols.to(tl.int64)[None, :] * hidden + ks[:, None]
            gate, up = _gate_up_loop(x_ptrs, gate_ptrs, up_ptrs, fill_ptrs, gate_scales,
                                     up_scales, stride_sc_k, row_ok, col_ok, ks, hidden,
                                     intermediate, True, EVEN_K, BLOCK_M, BLOCK_N,
                                     BLOCK_K, PRECISION, QUANT, SCALE_K, ALU)
        else:
            gate, up = _gate_up_loop(x_ptrs, gate_ptrs, up_ptrs, gate_ptrs, gate_scales,
                                     up_scales, stride_sc_k, row_ok, col_ok, ks, hidden,
                                     intermediate, False, EVEN_K, BLOCK_M, BLOCK_N,
                                     BLOCK_K, PRECISION, QUANT, SCALE_K, ALU)
    else:
        gate, up = _gate_up_loop(x_ptrs, gate_ptrs, up_ptrs, gate_ptrs, gate_scales, up_scales,
                                 stride_sc_k, row_ok, col_ok, ks, hidden, intermediate, False,
                                 EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, QUANT, SCALE_K,
                                 ALU)
    act = gate * tl.sigmoid(gate) * up
    tl.store(act_ptr + pairs.to(tl.int64)[:, None] * intermediate + cols[None, :],
             act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & col_in[None, :])


@triton.jit
def _down_loop(a_ptrs, w_ptrs, fill_ptrs, scales, stride_sk, row_ok, col_ok, ks, k_start, k_end,
               k_first, intermediate, FILL: tl.constexpr, HAS_FIRST: tl.constexpr,
               EVEN_K: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr, QUANT: tl.constexpr, SCALE_K: tl.constexpr,
               ALU: tl.constexpr):
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            w_ok = col_ok[None, :]
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            k_ok = k0 + ks < intermediate
            w_ok = col_ok[None, :] & k_ok[:, None]
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_FIRST:
            # K blocks wholly below the expert's first column are not read. A scalar, so the
            # mask stays constant along K and the loads stay vectorised (an element-wise K mask
            # made them scalar: 2-3x slower reading through PCIe); the block holding
            # first_col is read whole, its columns below multiplying activations that are 0.
            # (tl.where, not `&`: triton 3.9's interpreter refuses a splatted scalar comparison
            # as a mask.)
            w_ok = tl.where(k0 + BLOCK_K > k_first, w_ok, False)
        w = tl.load(w_ptrs, mask=w_ok, other=0.0)
        if FILL:
            tl.store(fill_ptrs, w, mask=w_ok)
            fill_ptrs += BLOCK_K
        acc = _scaled_dot(a, w, acc, scales, k0, stride_sk, col_ok, QUANT, SCALE_K, PRECISION,
                         ALU)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return _channel_scaled(acc, scales, col_ok, QUANT)


@triton.jit(do_not_specialize=["num_pairs"])
def _down_kernel(act_ptr, w_ptr, stride_we, slot_w_ptr, stride_se, expert_slot_ptr,
                 fill_slot_ptr, first_col_ptr, partial_ptr, sorted_ptr, block_expert_ptr,
                 stride_bj, num_pairs, num_experts, hidden, intermediate, k_per_split, scale_ptr,
                 stride_sc_e, stride_sc_n, stride_sc_k, QUANT: tl.constexpr,
                 SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, HAS_SLOTS: tl.constexpr,
                 HAS_FILL: tl.constexpr, HAS_FIRST: tl.constexpr, PAIR_BLOCKS: tl.constexpr,
                 EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, ALU: tl.constexpr,
                 PDL: tl.constexpr):
    """partial[split, pair, n] = act[pair, k-range] @ w2[e][n, k-range]^T, fp32. With split-K,
    each split loads (and fills) its own K range of the weight tile. With HAS_FIRST the K
    blocks wholly below first_col[e] are not read (the gate/up kernel left the activations
    below it 0)."""
    pdl_enter(PDL)
    pid_m = tl.program_id(0)
    split = tl.program_id(2)
    expert, pairs, work = _block_rows(sorted_ptr, block_expert_ptr, stride_bj, pid_m, num_pairs,
                                      num_experts, PAIR_BLOCKS, BLOCK_M)
    if not work:
        return
    row_ok = pairs < num_pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    ks = tl.arange(0, BLOCK_K)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, intermediate)
    k_first = 0
    if HAS_FIRST:
        k_first = tl.load(first_col_ptr + expert)
    a_ptrs = act_ptr + pairs.to(tl.int64)[:, None] * intermediate + (k_start + ks)[None, :]
    base = expert_base(w_ptr, stride_we, slot_w_ptr, stride_se, expert_slot_ptr, expert, HAS_SLOTS)
    w_ptrs = base + cols.to(tl.int64)[None, :] * intermediate + (k_start + ks)[:, None]
    scales = (scale_ptr + expert.to(tl.int64) * stride_sc_e
              + (cols // SCALE_N).to(tl.int64) * stride_sc_n)
    if HAS_FILL:  # a loop of its own for the filling programs, as in _gate_up_kernel
        fill_base, fill = _fills_first_block(slot_w_ptr, stride_se, expert_slot_ptr,
                                             fill_slot_ptr, block_expert_ptr, pid_m, expert,
                                             HAS_SLOTS, PAIR_BLOCKS)
        if fill:
            fill_ptrs = (fill_base + cols.to(tl.int64)[None, :] * intermediate
                         + (k_start + ks)[:, None])
            acc = _down_loop(a_ptrs, w_ptrs, fill_ptrs, scales, stride_sc_k, row_ok, col_ok,
                             ks, k_start, k_end, k_first, intermediate, True, HAS_FIRST, EVEN_K,
                             BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, QUANT, SCALE_K, ALU)
        else:
            acc = _down_loop(a_ptrs, w_ptrs, w_ptrs, scales, stride_sc_k, row_ok, col_ok, ks,
                             k_start, k_end, k_first, intermediate, False, HAS_FIRST, EVEN_K,
                             BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, QUANT, SCALE_K, ALU)
    else:
        acc = _down_loop(a_ptrs, w_ptrs, w_ptrs, scales, stride_sc_k, row_ok, col_ok, ks, k_start,
                         k_end, k_first, intermediate, False, HAS_FIRST, EVEN_K, BLOCK_M, BLOCK_N,
                         BLOCK_K, PRECISION, QUANT, SCALE_K, ALU)
    rows = split.to(tl.int64) * num_pairs + pairs
    tl.store(partial_ptr + rows[:, None] * hidden + cols[None, :], acc,
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["num_pairs"])
def _sum_topk_kernel(partial_ptr, ids_ptr, stride_it, stride_ij, weights_ptr, stride_wt,
                     stride_wj, out_ptr, stride_ot, num_pairs, num_experts, hidden,
                     TOP_K: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_H: tl.constexpr,
                     PDL: tl.constexpr):
    """out[t] = sum_j w[t, j] * sum_s partial[s, t*k+j]: a fixed order, so bitwise reproducible."""
    pdl_enter(PDL)
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < hidden
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + token * stride_it + j * stride_ij)
        routed = (expert >= 0) & (expert < num_experts)
        weight = tl.load(weights_ptr + token * stride_wt + j * stride_wj).to(tl.float32)
        weight = tl.where(routed, weight, 0.0)
        row = token.to(tl.int64) * TOP_K + j
        y = tl.zeros([BLOCK_H], dtype=tl.float32)
        # tl.where, not `col_ok & routed`: triton 3.9's interpreter splats a scalar comparison
        # as int32, which it then refuses as a load mask.
        load_ok = tl.where(routed, col_ok, False)
        for s in tl.static_range(SPLIT_K):
            y += tl.load(partial_ptr + (s * num_pairs + row) * hidden + cols,
                         mask=load_ok, other=0.0)
        total += weight * y
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + cols,
             total.to(out_ptr.dtype.element_ty), mask=col_ok)


def _scale_args(w: torch.Tensor, scale: torch.Tensor | None, block_shape, up_rows: int):
    """Launch arguments for one matrix's scales: (pointer, stride per expert, per scale row,
    per scale column, row offset of w3's scales) and the QUANT/SCALE_N/SCALE_K constexprs.
    Unscaled weights pass their own pointer, never read."""
    if scale is None:
        return (w, 0, 0, 0, 0), dict(QUANT=0, SCALE_N=1, SCALE_K=1)
    if block_shape is None:  # [E, rows]: one scale per output channel
        return ((scale, scale.stride(0), scale.stride(1), 0, up_rows),
                dict(QUANT=1, SCALE_N=1, SCALE_K=1))
    bn, bk = block_shape
    return ((scale, scale.stride(0), scale.stride(1), scale.stride(2), triton.cdiv(up_rows, bn)),
            dict(QUANT=2, SCALE_N=bn, SCALE_K=bk))


def _grouped(hidden_states, w13, w2, topk_weights, topk_ids, expert_slot, w13_slots, w2_slots,
             fill_slot, config: MoeBlockConfig, w13_scale=None, w2_scale=None,
             block_shape=None, first_col=None) -> torch.Tensor:
    num_tokens, hidden = hidden_states.shape
    num_experts, intermediate, top_k = w13.shape[0], w2.shape[2], topk_ids.shape[1]
    dtype, device = hidden_states.dtype, hidden_states.device
    num_pairs = num_tokens * top_k
    if block_shape is not None:  # a K step must stay inside one scale block
        config = dataclasses.replace(config, gate_up_block_k=min(config.gate_up_block_k,
                                                                 block_shape[1]),
                                     down_block_k=min(config.down_block_k, block_shape[1]))
    # One token: its top-k experts are distinct, so choice j is row block j as it stands.
    pair_blocks = num_tokens == 1
    if pair_blocks:
        sorted_pairs, block_expert, stride_bj = topk_ids, topk_ids, topk_ids.stride(1)
        num_blocks = top_k
    else:
        sorted_pairs, block_expert = align_by_expert(topk_ids, num_experts, config.block_m)
        stride_bj, num_blocks = 1, block_expert.numel()
    slot_strides = (w13_slots.stride(0), w2_slots.stride(0)) if w13_slots is not None else (0, 0)
    flags = dict(HAS_SLOTS=expert_slot is not None, HAS_FILL=fill_slot is not None,
                 HAS_FIRST=first_col is not None, PAIR_BLOCKS=pair_blocks)
    # fp32 callers get fp32 products (as torch matmul does by default), not TF32.
    precision = "ieee" if dtype == torch.float32 else None
    alu = w13_scale is not None and alu_widen_applies(dtype, device)
    act = torch.empty((num_pairs, intermediate), dtype=dtype, device=device)
    grid = (num_blocks, triton.cdiv(intermediate, config.gate_up_block_n))
    scales13, quant13 = _scale_args(w13, w13_scale, block_shape, intermediate)
    _gate_up_kernel[grid](
        hidden_states, hidden_states.stride(0), w13, w13.stride(0), w13_slots, slot_strides[0],
        expert_slot, fill_slot, first_col, act, sorted_pairs, block_expert, stride_bj, num_pairs,
        num_experts, hidden, intermediate, *scales13, **quant13, TOP_K=top_k, **flags,
        EVEN_K=hidden % config.gate_up_block_k == 0, BLOCK_M=config.block_m,
        BLOCK_N=config.gate_up_block_n, BLOCK_K=config.gate_up_block_k, PRECISION=precision,
        ALU=alu,
        num_warps=config.gate_up_warps, num_stages=config.gate_up_stages,
        **pdl_launch(device),
    )
    split_k = config.down_split_k
    k_per_split = triton.cdiv(triton.cdiv(intermediate, config.down_block_k), split_k)
    k_per_split *= config.down_block_k
    partial = torch.empty((split_k, num_pairs, hidden), dtype=torch.float32, device=device)
    grid = (num_blocks, triton.cdiv(hidden, config.down_block_n), split_k)
    scales2, quant2 = _scale_args(w2, w2_scale, block_shape, 0)
    _down_kernel[grid](
        act, w2, w2.stride(0), w2_slots, slot_strides[1], expert_slot, fill_slot, first_col,
        partial, sorted_pairs, block_expert, stride_bj, num_pairs, num_experts, hidden,
        intermediate, k_per_split, *scales2[:4], **quant2, **flags,
        EVEN_K=intermediate % config.down_block_k == 0,
        BLOCK_M=config.block_m, BLOCK_N=config.down_block_n, BLOCK_K=config.down_block_k,
        PRECISION=precision, ALU=alu, num_warps=config.down_warps,
        num_stages=config.down_stages,
        **pdl_launch(device),
    )
    out = torch.empty((num_tokens, hidden), dtype=dtype, device=device)
    block_h = min(512, triton.next_power_of_2(hidden))
    _sum_topk_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        partial, topk_ids, topk_ids.stride(0), topk_ids.stride(1), topk_weights,
        topk_weights.stride(0), topk_weights.stride(1), out, out.stride(0), num_pairs,
        num_experts, hidden, TOP_K=top_k, SPLIT_K=split_k, BLOCK_H=block_h,
        **pdl_launch(device),
    )
    return out


@functools.cache
def _tables(device: torch.device) -> TunedTables:
    """The tuned tables of the device's GPU model (rules alone in the interpreter)."""
    if device.type != "cuda":
        return NO_TABLES
    return tuned_tables(torch.cuda.get_device_name(device),
                        torch.cuda.get_device_capability(device))


def fused_moe_triton(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     expert_slot: torch.Tensor | None = None, w13_slots: torch.Tensor | None = None,
                     w2_slots: torch.Tensor | None = None, fill_slot: torch.Tensor | None = None,
                     config: MoeBlockConfig | MoeDecodeConfig | None = None,
                     w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                     block_shape: tuple[int, int] | None = None,
                     first_col: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton path of fused_moe, with an explicit config for tuning. A MoeDecodeConfig runs
    the one-token GEMV path (T must be 1, weights not FP8), a MoeBlockConfig the grouped path;
    None picks: the GEMV path when T == 1 and select_decode_config gives a config, else
    select_config, with the tuned tables of the GPU model (kernels/configs/ here) or the rules where
    it has none. FP8 weights always take the grouped kernels."""
    args = (hidden_states, w13, w2, topk_weights, topk_ids, expert_slot, w13_slots, w2_slots,
            fill_slot)
    check_inputs(*args, w13_scale, w2_scale, block_shape, first_col)
    block_shape = check_block_shape(block_shape)
    quantized = w13_scale is not None
    num_tokens, hidden = hidden_states.shape
    shape = (w13.shape[0], hidden, w2.shape[2], topk_ids.shape[1],
             w13.dtype if quantized else hidden_states.dtype)
    if isinstance(config, MoeDecodeConfig) and (num_tokens != 1 or quantized):
        raise ValueError(f"a MoeDecodeConfig runs the one-token GEMV path: got T={num_tokens} "
                         f"tokens{' and FP8 weights (grouped kernels only)' if quantized else ''}")
    if num_tokens == 0:
        return hidden_states.new_empty((0, hidden))
    tables = _tables(hidden_states.device)
    if config is None and num_tokens == 1 and not quantized:
        config = select_decode_config(*shape, tables)
    if config is None:
        config = select_config(*shape, num_tokens, tables)
    if hidden_states.stride(1) != 1:
        args = (hidden_states.contiguous(), *args[1:])
    # Hot path from here: no host sync, grids from static bounds, workspaces from the caching
    # allocator (or the graph's pool when captured), so a decode step can be graph-captured.
    # Triton launches on the current device: make it the tensors' device.
    device = hidden_states.device
    with torch.cuda.device(device.index if device.type == "cuda" else -1):
        if isinstance(config, MoeDecodeConfig):
            return one_token_moe(*args, config, first_col)
        return _grouped(*args, config, w13_scale, w2_scale, block_shape, first_col)


# The interpreter is chosen when @triton.jit runs, so the kernel object says which one we got.
_INTERPRETED = not isinstance(_gate_up_kernel, triton.runtime.JITFunction)


def _run(hidden_states, w13, w2, topk_weights, topk_ids, expert_slot, w13_slots, w2_slots,
         fill_slot, w13_scale, w2_scale, block_shape, first_col=None):
    args = (hidden_states, w13, w2, topk_weights, topk_ids, expert_slot, w13_slots, w2_slots,
            fill_slot)
    quant = dict(w13_scale=w13_scale, w2_scale=w2_scale,
                 block_shape=None if block_shape is None else tuple(block_shape),
                 first_col=first_col)
    if hidden_states.device.type == "cpu" and not _INTERPRETED:
        check_inputs(*args, **quant)
        return fused_moe_reference(*args, **quant)
    return fused_moe_triton(*args, **quant)


@torch.library.custom_op("moe_uvm::fused_moe", mutates_args=())
def _fused_moe_op(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  expert_slot: torch.Tensor | None, w13_slots: torch.Tensor | None,
                  w2_slots: torch.Tensor | None, w13_scale: torch.Tensor | None,
                  w2_scale: torch.Tensor | None, block_shape: list[int] | None,
                  first_col: torch.Tensor | None = None) -> torch.Tensor:
    return _run(hidden_states, w13, w2, topk_weights, topk_ids, expert_slot, w13_slots,
                w2_slots, None, w13_scale, w2_scale, block_shape, first_col)


# fill_slot writes the slot pools, so this op declares them mutated (torch.compile keeps the
# writes and orders them). A separate op: inductor (torch 2.11) rejects optional mutated
# arguments, and the plain op must stay mutation-free.
@torch.library.custom_op("moe_uvm::fused_moe_fill", mutates_args=("w13_slots", "w2_slots"))
def _fused_moe_fill_op(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                       topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                       expert_slot: torch.Tensor | None, w13_slots: torch.Tensor,
                       w2_slots: torch.Tensor, fill_slot: torch.Tensor,
                       w13_scale: torch.Tensor | None, w2_scale: torch.Tensor | None,
                       block_shape: list[int] | None) -> torch.Tensor:
    return _run(hidden_states, w13, w2, topk_weights, topk_ids, expert_slot, w13_slots,
                w2_slots, fill_slot, w13_scale, w2_scale, block_shape)


@_fused_moe_op.register_fake
def _(hidden_states, w13, w2, topk_weights, topk_ids, expert_slot, w13_slots, w2_slots,
      w13_scale, w2_scale, block_shape, first_col=None):
    return hidden_states.new_empty(hidden_states.shape)


@_fused_moe_fill_op.register_fake
def _(hidden_states, w13, w2, topk_weights, topk_ids, expert_slot, w13_slots, w2_slots,
      fill_slot, w13_scale, w2_scale, block_shape):
    return hidden_states.new_empty(hidden_states.shape)


def fused_moe(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
              expert_slot: torch.Tensor | None = None, w13_slots: torch.Tensor | None = None,
              w2_slots: torch.Tensor | None = None,
              fill_slot: torch.Tensor | None = None, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None,
              block_shape: tuple[int, int] | None = None,
              first_col: torch.Tensor | None = None) -> torch.Tensor:
    """MoE forward: `out[t] = sum_j topk_weights[t, j] * w2[e] @ (silu(w1[e] x_t) * (w3[e] x_t))`
    with `e = topk_ids[t, j]`, w13[e] = [w1; w3]; ids < 0 are padding and contribute nothing.

    hidden_states [T, H] bf16/fp16/fp32; w13 [E, 2I, H] and w2 [E, H, I] with any stride on
    dim 0 (read in place: device, managed or mapped host memory); topk_weights [T, k];
    topk_ids [T, k] int32/int64. Slot pools w13_slots [S, 2I, H] and w2_slots [S, H, I] (any
    stride on dim 0) serve two int32 [E] maps, read by the kernel at run time:
    `expert_slot`: expert e with expert_slot[e] = s >= 0 is read from w13_slots[s] / w2_slots[s]
    (which must hold an exact copy). `fill_slot` (fill-on-read): a routed expert read from
    w13/w2 (no expert_slot, or expert_slot[e] < 0) with fill_slot[e] = s >= 0 also has every
    weight tile the kernel loads stored into slot s, so after the call w13_slots[s] /
    w2_slots[s] are bitwise copies of w13[e] / w2[e] (an HBM write, no extra read). Slot ids
    must be < S; a slot filled must not be read in the same call, nor filled for two experts.
    The output does not depend on fill_slot.

    FP8 experts (W8A16): w13/w2 (and slot pools) in float8_e4m3fn with fp32 scales that stay on
    the compute device, indexed by expert (slots carry weights only): block scales with
    `block_shape=(bn, bk)` (the checkpoint layout, 128 x 128 for DeepSeek-V3 / Qwen3-FP8),
    w13_scale [E, 2*ceil(I/bn), ceil(H/bk)] (w1's block rows, then w3's) and w2_scale
    [E, ceil(H/bn), ceil(I/bk)]; or, with block_shape None, one scale per output channel,
    w13_scale [E, 2I] and w2_scale [E, H]. Weights are widened to the activations' dtype in
    registers (exactly); block scales multiply each K step's product, channel scales the result.

    `first_col` (int32 [E], read by the kernels at run time): expert e's intermediate columns
    below first_col[e] are left out, their weights not read: the expert adds
    w2[e][:, c:] @ (silu(w1[e][c:] x) * (w3[e][c:] x)), the rest of its output being computed
    elsewhere (the CPU/GPU hybrid splits an expert so). 0 leaves an expert whole. Not with
    fill_slot (a slot would be filled in part).

    Returns [T, H] in hidden_states' dtype, bitwise reproducible. T == 1 never aligns: it takes
    the grouped kernels with one row block per choice, or, where the GPU's table picks it, a
    two-launch GEMV path (fp32 activations) whose reduction order follows the load vector
    width, so its bits match across placements and slot copies when weight bases and
    stride(0) are multiples of 16 elements (torch allocations, the expert store and slot pools
    from torch.empty are).
    CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) run the Triton kernels; other CPU
    tensors use the plain-torch path (fused_moe_reference). A custom op: capturable in CUDA
    graphs and torch.compile(fullgraph).
    """
    quant = (w13_scale, w2_scale, None if block_shape is None else list(block_shape))
    if fill_slot is None:
        return torch.ops.moe_uvm.fused_moe(hidden_states, w13, w2, topk_weights, topk_ids,
                                           expert_slot, w13_slots, w2_slots, *quant, first_col)
    if first_col is not None:
        raise ValueError("first_col cannot go with fill_slot: a slot would be filled in part")
    if w13_slots is None or w2_slots is None:
        raise ValueError("fill_slot needs w13_slots and w2_slots to fill")
    return torch.ops.moe_uvm.fused_moe_fill(hidden_states, w13, w2, topk_weights, topk_ids,
                                            expert_slot, w13_slots, w2_slots, fill_slot, *quant)
