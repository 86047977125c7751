"""Where the fused-MoE kernels find an expert's matrix: in the weights or in its GPU slot copy
(`expert_slot`), and which slot a fill-on-read writes (`fill_slot`)."""

import triton
import triton.language as tl


@triton.jit
def expert_base(w_ptr, stride_we, slot_w_ptr, stride_se, expert_slot_ptr, expert,
                HAS_SLOTS: tl.constexpr):
    """Base pointer of one expert's matrix: its slot copy when the run-time map says so."""
    base = w_ptr + expert.to(tl.int64) * stride_we
    if HAS_SLOTS:
        slot = tl.load(expert_slot_ptr + expert)
        if slot >= 0:
            base = slot_w_ptr + slot.to(tl.int64) * stride_se
    return base


@triton.jit
def expert_bases(w_ptr, stride_we, slot_w_ptr, stride_se, expert_slot_ptr, experts, routed,
                 HAS_SLOTS: tl.constexpr):
    """expert_base for a vector of experts (those not routed are never read through)."""
    bases = w_ptr + experts.to(tl.int64) * stride_we
    if HAS_SLOTS:
        slots = tl.load(expert_slot_ptr + experts, mask=routed, other=-1)
        bases = tl.where(slots >= 0, slot_w_ptr + slots.to(tl.int64) * stride_se, bases)
    return bases


@triton.jit
def fill_targets(slot_w_ptr, stride_se, expert_slot_ptr, fill_slot_ptr, experts, routed,
                 HAS_SLOTS: tl.constexpr):
    """(base pointer in the slot pool, whether to fill) for experts (a scalar or a vector):
    an expert is filled when routed, read from the weights (no slot copy) and given a slot."""
    fills = tl.load(fill_slot_ptr + experts, mask=routed, other=-1)
    if HAS_SLOTS:
        slots = tl.load(expert_slot_ptr + experts, mask=routed, other=-1)
        fills = tl.where(slots >= 0, -1, fills)
    return slot_w_ptr + tl.maximum(fills, 0).to(tl.int64) * stride_se, fills >= 0
