"""The lfu slot planner of slot_evict.py (usage counts, `plan_admit`, the layer's hit counters) as
one Triton program per call, and freq_lru's usage counts and eviction keys as another: one
CUDA-graph node each instead of ~70 (lfu) or ~20 (freq_lru) small torch ops per layer and step
(those cost ~0.1 ms a layer in a graph on an H200, more than the PCIe reads they save at batch
1). Same plans and in-place updates as the reference, bitwise whenever the counts' decay is
exact (a power of two; otherwise the GPU may fuse the decay's multiply-add, within 1 ulp of the
reference's counts)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import slot_evict as reference
from .expert_ids import routed_per_expert
from .slot_plan import _INTERPRETED, _block, _check_vector, _launch_device
from .slot_plan_reference import EMPTY_STAMP, count_prefetch

CLASS_SHIFT: tl.constexpr = tl.constexpr(reference.CLASS_SHIFT)
EMPTY_STAMP: tl.constexpr = tl.constexpr(EMPTY_STAMP)

_CHUNK = 32


# Long (~70 lines) on purpose, like slot_plan's kernels: one program whose in-place updates must
# stay in this order; threads share marks through global scratch between tl.debug_barrier()s.
@triton.jit(do_not_specialize=["num_ids", "num_experts", "num_slots"])
def _plan_admit_kernel(ids_ptr, num_ids, resident_ptr, expert_slot_ptr, slot_expert_ptr,
                       usage_ptr, prior_ptr, decay, work_ptr, counters_ptr, num_experts,
                       num_slots, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
                       CHUNK: tl.constexpr):
    """work[:E]: needed marks, then fill_slot; work[E:E+S] dropped-slot marks; work[E+S:E+2S]
    the free slots in order."""
    fill_ptr = work_ptr
    dropped_ptr = work_ptr + num_experts
    free_ptr = dropped_ptr + num_slots
    experts = tl.arange(0, BLOCK_E)
    in_e = experts < num_experts
    slots = tl.arange(0, BLOCK_S)
    in_s = slots < num_slots
    routed = routed_per_expert(ids_ptr, num_ids, experts, CHUNK)  # tokens routed to each
    needed = in_e & (routed > 0)
    usage = tl.load(usage_ptr + experts, mask=in_e, other=0) * decay + routed
    resident = tl.load(resident_ptr + experts, mask=in_e, other=0) != 0
    expert_slot = tl.load(expert_slot_ptr + experts, mask=in_e, other=-1)
    held = in_e & (expert_slot >= 0)
    candidate = (held | needed) & ~resident
    score = usage + tl.load(prior_ptr + experts, mask=in_e, other=0)
    tl.store(usage_ptr + experts, usage, mask=in_e)
    tl.store(fill_ptr + experts, needed.to(tl.int32), mask=in_e)
    tl.store(dropped_ptr + slots, 0, mask=in_s)
    tl.debug_barrier()
    # Each candidate's place: candidates with a higher score, or equal and held when it is not,
    # or equal, same holding and a lower id, come first.
    ahead = tl.zeros_like(experts)
    for start in range(0, num_experts, CHUNK):
        f = start + tl.arange(0, CHUNK)
        in_f = f < num_experts
        score_f = (tl.load(usage_ptr + f, mask=in_f, other=0, volatile=True)
                   + tl.load(prior_ptr + f, mask=in_f, other=0))[None, :]
        held_f = (tl.load(expert_slot_ptr + f, mask=in_f, other=-1) >= 0)[None, :]
        needed_f = (tl.load(fill_ptr + f, mask=in_f, other=0, volatile=True) != 0)[None, :]
        resident_f = (tl.load(resident_ptr + f, mask=in_f, other=0) != 0)[None, :]
        candidate_f = in_f[None, :] & (held_f | needed_f) & ~resident_f
        s_e, h_e, f = score[:, None], held[:, None], f[None, :]
        beats = candidate_f & ((score_f > s_e) | ((score_f == s_e) & (
            (held_f & ~h_e) | ((held_f == h_e) & (f < experts[:, None])))))
        ahead += tl.sum(beats.to(tl.int32), axis=1)
    keep = candidate & (ahead < num_slots)
    admit = keep & ~held
    dropped = held & ~keep
    tl.store(dropped_ptr + expert_slot, 1, mask=dropped)
    tl.debug_barrier()
    slot_expert = tl.load(slot_expert_ptr + slots, mask=in_s, other=-1)
    slot_dropped = in_s & (tl.load(dropped_ptr + slots, mask=in_s, other=0, volatile=True) != 0)
    free = in_s & ((slot_expert < 0) | slot_dropped)
    free_rank = tl.cumsum(free.to(tl.int32), axis=0) - 1
    tl.store(free_ptr + free_rank, slots, mask=free)
    tl.debug_barrier()
    admit_rank = tl.cumsum(admit.to(tl.int32), axis=0) - 1
    fill = tl.load(free_ptr + admit_rank, mask=admit, other=-1, volatile=True)
    tl.store(fill_ptr + experts, fill, mask=in_e)
    tl.store(expert_slot_ptr + experts, -1, mask=dropped)
    tl.store(slot_expert_ptr + slots, -1, mask=slot_dropped)
    tl.debug_barrier()
    tl.store(slot_expert_ptr + fill, experts, mask=admit)
    # Counters as count_prefetch adds them before the plan (nothing predicted).
    columns = tl.arange(0, 4)
    needed_offloaded = needed & ~resident
    hits = needed_offloaded & held
    counts = tl.where(columns == 2, tl.sum(needed_offloaded.to(tl.int32), axis=0),
                      tl.where(columns == 3, tl.sum(hits.to(tl.int32), axis=0), 0))
    tl.store(counters_ptr + columns, tl.load(counters_ptr + columns) + counts.to(tl.int64))


def plan_admit_fused(
    topk_ids: torch.Tensor,
    resident: torch.Tensor,
    expert_slot: torch.Tensor,
    slot_expert: torch.Tensor,
    usage: torch.Tensor,
    prior: torch.Tensor,
    decay: float,
    counters: torch.Tensor,
) -> torch.Tensor:
    """One layer's lfu step in one launch: `slot_evict.add_routed(usage, topk_ids, decay)`, then
    `count_prefetch(counters, topk_ids, resident, expert_slot)`, then
    `plan_admit(topk_ids, resident, expert_slot, slot_expert, usage + prior)`; returns fill_slot
    int32 [E]. usage and prior float32 [E], counters int64 [4], the pool as plan_fill_fused's.
    HOT PATH: no host sync, shapes fixed by E, S and T*k. CPU tensors outside the Triton
    interpreter take the torch reference."""
    E, S, device = expert_slot.shape[0], slot_expert.shape[0], expert_slot.device
    if expert_slot.dim() != 1 or slot_expert.dim() != 1 or E < 1 or S < 1:
        raise ValueError(f"expert_slot {tuple(expert_slot.shape)} and slot_expert "
                         f"{tuple(slot_expert.shape)}: expected one layer's [E] and [S], E, S >= 1")
    _check_vector("expert_slot", expert_slot, (torch.int32,), E, device)
    _check_vector("slot_expert", slot_expert, (torch.int32,), S, device)
    _check_vector("resident", resident, (torch.bool,), E, device)
    _check_vector("usage", usage, (torch.float32,), E, device)
    _check_vector("prior", prior, (torch.float32,), E, device)
    _check_vector("counters", counters, (torch.int64,), 4, device)
    if topk_ids.dtype not in (torch.int32, torch.int64) or topk_ids.device != device:
        raise ValueError(f"topk_ids is {topk_ids.dtype} on {topk_ids.device}: expected int32 or "
                         f"int64 on {device}")
    if not 0 < decay <= 1:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    if device.type == "cpu" and not _INTERPRETED:
        reference.add_routed(usage, topk_ids, decay)
        count_prefetch(counters, topk_ids, resident, expert_slot)
        return reference.plan_admit(topk_ids, resident, expert_slot, slot_expert, usage + prior)
    ids = topk_ids.reshape(-1)
    work = torch.empty(E + 2 * S, dtype=torch.int32, device=device)
    block_e = _block(E)
    with _launch_device(work):
        _plan_admit_kernel[(1,)](
            ids, ids.numel(), resident.view(torch.uint8), expert_slot, slot_expert, usage,
            prior, float(decay), work, counters, E, S, BLOCK_E=block_e, BLOCK_S=_block(S),
            CHUNK=_CHUNK, num_warps=4 if block_e <= 128 else 8,
        )
    return work[:E]


@triton.jit(do_not_specialize=["num_ids", "num_experts", "num_slots"])
def _frequency_key_kernel(ids_ptr, num_ids, usage_ptr, decay, slot_expert_ptr, stamp_ptr,
                          key_ptr, num_experts, num_slots, BLOCK_E: tl.constexpr,
                          BLOCK_S: tl.constexpr, CHUNK: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)
    in_e = experts < num_experts
    routed = routed_per_expert(ids_ptr, num_ids, experts, CHUNK)
    usage = tl.load(usage_ptr + experts, mask=in_e, other=0) * decay + routed
    tl.store(usage_ptr + experts, usage, mask=in_e)
    tl.debug_barrier()
    slots = tl.arange(0, BLOCK_S)
    in_s = slots < num_slots
    slot_expert = tl.load(slot_expert_ptr + slots, mask=in_s, other=-1)
    held = in_s & (slot_expert >= 0)
    count = tl.load(usage_ptr + slot_expert, mask=held, other=0, volatile=True)
    # floor(log2(1 + count)) exactly: the float's exponent field (1 + count >= 1 is normal).
    level = ((((1.0 + count).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127).to(tl.int64)
    stamp = tl.load(stamp_ptr + slots, mask=in_s, other=0)
    key = tl.where(held, level * CLASS_SHIFT + stamp, EMPTY_STAMP)
    tl.store(key_ptr + slots, key, mask=in_s)


def frequency_key_fused(
    topk_ids: torch.Tensor,
    usage: torch.Tensor,
    decay: float,
    slot_expert: torch.Tensor,
    slot_stamp: torch.Tensor,
    key: torch.Tensor,
) -> None:
    """freq_lru's step before `plan_fill_fused` in one launch: `add_routed(usage, topk_ids,
    decay)`, then key = `frequency_class_key(usage, slot_expert, slot_stamp)` written into `key`
    (int64 [S]). HOT PATH; CPU tensors outside the Triton interpreter take the torch reference.
    The counts may differ from the reference by 1 ulp where the GPU fuses the decay's
    multiply-add (a class boundary is then off by as much)."""
    E, S, device = usage.shape[0], slot_expert.shape[0], usage.device
    _check_vector("usage", usage, (torch.float32,), E, device)
    _check_vector("slot_expert", slot_expert, (torch.int32,), S, device)
    _check_vector("slot_stamp", slot_stamp, (torch.int64,), S, device)
    _check_vector("key", key, (torch.int64,), S, device)
    if device.type == "cpu" and not _INTERPRETED:
        reference.add_routed(usage, topk_ids, decay)
        key.copy_(reference.frequency_class_key(usage, slot_expert, slot_stamp))
        return
    ids = topk_ids.reshape(-1)
    with _launch_device(usage):
        _frequency_key_kernel[(1,)](
            ids, ids.numel(), usage, float(decay), slot_expert, slot_stamp, key, E, S,
            BLOCK_E=_block(E), BLOCK_S=_block(S), CHUNK=_CHUNK, num_warps=4,
        )
