"""GPU expert slots: the copy kernel that fills slots ahead of use (prefetch) and its plain-torch
reference."""

import torch
import triton
import triton.language as tl

# One program moves one 32 KB chunk with a single load and a single store: 8 warps issue eight
# 16-byte loads per thread at once (48 registers on sm_90), so the ~1000 programs resident at
# once on an H100 keep ~34 MB of reads in flight and the PCIe link, not the number of
# outstanding loads, bounds a copy from host memory. 8 Qwen3-30B-A3B experts (9.4 MB each) make
# 2304 programs.
CHUNK_BYTES = 32 << 10


@triton.jit
def _copy_kernel(w13_ptr, stride_13, w2_ptr, stride_2, experts_ptr, slots_ptr, w13_slots_ptr,
                 stride_s13, w2_slots_ptr, stride_s2, w13_numel, w2_numel, w13_chunks,
                 CHUNK: tl.constexpr):
    """Program (c, p): chunk c of pair p's expert, counting w13's chunks first, then w2's."""
    chunk = tl.program_id(0)
    pair = tl.program_id(1)
    expert = tl.load(experts_ptr + pair)
    slot = tl.load(slots_ptr + pair)
    if (expert < 0) | (slot < 0):
        return
    lanes = tl.arange(0, CHUNK)
    if chunk < w13_chunks:
        offs = chunk.to(tl.int64) * CHUNK + lanes
        ok = offs < w13_numel
        values = tl.load(w13_ptr + expert.to(tl.int64) * stride_13 + offs, mask=ok)
        tl.store(w13_slots_ptr + slot.to(tl.int64) * stride_s13 + offs, values, mask=ok)
    else:
        offs = (chunk - w13_chunks).to(tl.int64) * CHUNK + lanes
        ok = offs < w2_numel
        values = tl.load(w2_ptr + expert.to(tl.int64) * stride_2 + offs, mask=ok)
        tl.store(w2_slots_ptr + slot.to(tl.int64) * stride_s2 + offs, values, mask=ok)


def _check_expert_stack(name: str, w: torch.Tensor, like: torch.Tensor) -> None:
    if w.dim() != 3 or w.shape[1:] != like.shape[1:] or w.dtype != like.dtype:
        raise ValueError(f"{name} is {w.dtype} of shape {tuple(w.shape)}: expected {like.dtype} "
                         f"[*, {like.shape[1]}, {like.shape[2]}] like the weights")
    if w.stride(2) != 1 or w.stride(1) != w.shape[2]:
        raise ValueError(f"{name} has strides {w.stride()}: dims 1 and 2 must be contiguous "
                         f"(stride(1)={w.shape[2]}, stride(2)=1); dim 0 may be any stride")


def _check_copy_inputs(w13, w2, copy_experts, copy_slots, w13_slots, w2_slots) -> None:
    if w13.dim() != 3 or w2.dim() != 3 or w2.shape[0] != w13.shape[0]:
        raise ValueError(f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)}: expected [E, 2I, H] "
                         "and [E, H, I] with the same E")
    _check_expert_stack("w13", w13, w13)
    _check_expert_stack("w2", w2, w2)
    _check_expert_stack("w13_slots", w13_slots, w13)
    _check_expert_stack("w2_slots", w2_slots, w2)
    if w2_slots.shape[0] != w13_slots.shape[0]:
        raise ValueError(f"w2_slots has {w2_slots.shape[0]} slots, w13_slots has "
                         f"{w13_slots.shape[0]}: must match")
    for name, ids in (("copy_experts", copy_experts), ("copy_slots", copy_slots)):
        if ids.dtype != torch.int32 or ids.dim() != 1 or not ids.is_contiguous():
            raise ValueError(f"{name} is {ids.dtype} of shape {tuple(ids.shape)}: expected a "
                             "contiguous int32 [m]")
        if ids.device != w13_slots.device:
            raise ValueError(f"{name} is on {ids.device}: the slots are on {w13_slots.device}")
    if copy_slots.shape != copy_experts.shape:
        raise ValueError(f"copy_slots has shape {tuple(copy_slots.shape)}: must equal "
                         f"copy_experts' {tuple(copy_experts.shape)}")


def copy_experts_to_slots_reference(w13: torch.Tensor, w2: torch.Tensor,
                                    copy_experts: torch.Tensor, copy_slots: torch.Tensor,
                                    w13_slots: torch.Tensor, w2_slots: torch.Tensor) -> None:
    """`w13_slots[s] = w13[e]`, `w2_slots[s] = w2[e]` for each pair (e, s) with both >= 0.
    Syncs with the host: for tests and the CPU path only."""
    for expert, slot in zip(copy_experts.tolist(), copy_slots.tolist(), strict=True):
        if expert >= 0 and slot >= 0:
            w13_slots[slot].copy_(w13[expert])
            w2_slots[slot].copy_(w2[expert])


def _copy_triton(w13, w2, copy_experts, copy_slots, w13_slots, w2_slots) -> None:
    if copy_experts.numel() == 0:
        return
    chunk = CHUNK_BYTES // w13.element_size()
    w13_numel, w2_numel = w13[0].numel(), w2[0].numel()
    w13_chunks = triton.cdiv(w13_numel, chunk)
    # Static grid (shapes only, no ids read on the host): capturable in a CUDA graph.
    grid = (w13_chunks + triton.cdiv(w2_numel, chunk), copy_experts.numel())
    device = w13_slots.device
    with torch.cuda.device(device.index if device.type == "cuda" else -1):
        _copy_kernel[grid](
            w13, w13.stride(0), w2, w2.stride(0), copy_experts, copy_slots, w13_slots,
            w13_slots.stride(0), w2_slots, w2_slots.stride(0), w13_numel, w2_numel, w13_chunks,
            CHUNK=chunk, num_warps=8,
        )


# The interpreter is chosen when @triton.jit runs, so the kernel object says which one we got.
_INTERPRETED = not isinstance(_copy_kernel, triton.runtime.JITFunction)


@torch.library.custom_op("moe_uvm::copy_experts_to_slots", mutates_args=("w13_slots", "w2_slots"))
def _copy_op(w13: torch.Tensor, w2: torch.Tensor, copy_experts: torch.Tensor,
             copy_slots: torch.Tensor, w13_slots: torch.Tensor, w2_slots: torch.Tensor) -> None:
    if w13_slots.device.type == "cpu" and not _INTERPRETED:
        copy_experts_to_slots_reference(w13, w2, copy_experts, copy_slots, w13_slots, w2_slots)
    else:
        _copy_triton(w13, w2, copy_experts, copy_slots, w13_slots, w2_slots)


@_copy_op.register_fake
def _(w13, w2, copy_experts, copy_slots, w13_slots, w2_slots) -> None:
    return None


def copy_experts_to_slots(w13: torch.Tensor, w2: torch.Tensor, copy_experts: torch.Tensor,
                          copy_slots: torch.Tensor, w13_slots: torch.Tensor,
                          w2_slots: torch.Tensor) -> None:
    """Copy whole experts into slots: `w13_slots[s] = w13[e]` and `w2_slots[s] = w2[e]` for each
    pair `(e, s) = (copy_experts[i], copy_slots[i])`; pairs with e < 0 or s < 0 are skipped.

    w13 [E, 2I, H] and w2 [E, H, I] may have any stride on dim 0 and are read in place (device
    memory, managed memory whose host-resident pages cross PCIe at the read-through rate, or
    pinned host memory); w13_slots [S, 2I, H] and w2_slots [S, H, I] may have any stride on
    dim 0; copy_experts and copy_slots are int32 [m] on the slots' device, ids < E and < S.
    The ids are read on the device only and the grid is fixed by the shapes, so the copy is
    capturable in a CUDA graph. Slots on the CPU outside the Triton interpreter take the
    plain-torch path (copy_experts_to_slots_reference)."""
    _check_copy_inputs(w13, w2, copy_experts, copy_slots, w13_slots, w2_slots)
    torch.ops.moe_uvm.copy_experts_to_slots(w13, w2, copy_experts, copy_slots, w13_slots,
                                            w2_slots)
