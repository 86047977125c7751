"""The slot-cache planners of slot_plan_reference.py (plan_fill, plan_prefetch) as one Triton
program per call, with the prefetch counters in the same launch: the same plans and in-place state
updates bitwise, as one CUDA-graph node instead of ~70-85 small torch ops per layer and step."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import slot_plan_reference as reference

# One program holds a layer's whole pool in registers (no spills on sm_90 up to E = 512,
# S = 256). Its threads share intermediate marks through global scratch between
# tl.debug_barrier()s (bar.sync makes a CTA's global writes visible to the whole CTA); each
# location is read and written in different phases, because a vector smaller than the CTA is
# held, and loaded, by several threads at once.
_CHUNK = 32
_MAX_IDS_BLOCK = 1024


@triton.jit
def _eviction_ranks(stamp_ptr, protected_ptr, stamps, protected, slots, num_slots,
                    BLOCK_J: tl.constexpr):
    """Rank of each slot in eviction order (unprotected first, then older stamp, then lower
    slot): the number of slots evicted before it. `protected` (int32 0/1) is also in scratch
    at protected_ptr; slots are compared in chunks of BLOCK_J to bound registers."""
    p_i, t_i, s_i = protected[:, None], stamps[:, None], slots[:, None]
    ranks = tl.zeros_like(slots)
    for start in range(0, num_slots, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        ok = j < num_slots
        t_j = tl.load(stamp_ptr + j, mask=ok, other=0)[None, :]
        p_j = tl.load(protected_ptr + j, mask=ok, other=0, volatile=True)[None, :]
        j = j[None, :]
        before = (p_j < p_i) | ((p_j == p_i) & ((t_j < t_i) | ((t_j == t_i) & (j < s_i))))
        ranks += tl.sum((before & ok[None, :]).to(tl.int32), axis=1)
    return ranks


# Long (~60 lines) on purpose: one program, whose in-place state updates must stay in this order
# (it replaces ~70 torch ops with one graph node); helpers would hide that order.
# Sizes are not specialized on (divisibility by 16, == 1): one compile per block shape.
@triton.jit(do_not_specialize=["num_ids", "num_experts", "num_slots"])
def _plan_fill_kernel(ids_ptr, num_ids, resident_ptr, expert_slot_ptr, slot_expert_ptr,
                      stamp_ptr, step_ptr, work_ptr, counters_ptr, predicted_ptr, num_experts,
                      num_slots, BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr,
                      BLOCK_IDS: tl.constexpr, BLOCK_J: tl.constexpr,
                      HAS_COUNTERS: tl.constexpr, HAS_PREDICTED: tl.constexpr):
    """work[:E] is the needed-marks scratch, then fill_slot; work[E:E+S] the slot scratch."""
    fill_ptr = work_ptr
    scratch_ptr = work_ptr + num_experts
    experts = tl.arange(0, BLOCK_E)
    in_e = experts < num_experts
    slots = tl.arange(0, BLOCK_S)
    in_s = slots < num_slots
    resident = tl.load(resident_ptr + experts, mask=in_e, other=0) != 0
    expert_slot = tl.load(expert_slot_ptr + experts, mask=in_e, other=-1)
    slot_expert = tl.load(slot_expert_ptr + slots, mask=in_s, other=-1)
    stamps = tl.load(stamp_ptr + slots, mask=in_s, other=0)
    step = tl.load(step_ptr)
    columns = tl.arange(0, 4)
    if HAS_COUNTERS:
        counters = tl.load(counters_ptr + columns)
    tl.store(fill_ptr + experts, 0, mask=in_e)
    tl.debug_barrier()
    for start in range(0, num_ids, BLOCK_IDS):
        offs = start + tl.arange(0, BLOCK_IDS)
        ids = tl.load(ids_ptr + offs, mask=offs < num_ids, other=-1)
        tl.store(fill_ptr + ids, 1, mask=(ids >= 0) & (ids < num_experts))
    tl.debug_barrier()
    needed = tl.load(fill_ptr + experts, mask=in_e, other=0, volatile=True) != 0
    held = in_s & (slot_expert >= 0) & (slot_expert < num_experts)
    slot_needed = held & (tl.load(fill_ptr + slot_expert, mask=held, other=0, volatile=True) != 0)
    missing = needed & ~resident & (expert_slot < 0)
    tl.store(scratch_ptr + slots, slot_needed.to(tl.int32), mask=in_s)
    tl.debug_barrier()
    order_rank = _eviction_ranks(stamp_ptr, scratch_ptr, stamps, slot_needed.to(tl.int32), slots,
                                 num_slots, BLOCK_J)
    tl.debug_barrier()
    tl.store(scratch_ptr + order_rank, slots, mask=in_s)  # scratch[r] = r-th victim
    tl.debug_barrier()
    victims = num_slots - tl.sum(slot_needed.to(tl.int32), axis=0)
    rank = tl.cumsum(missing.to(tl.int32), axis=0) - 1
    filled = missing & (rank < victims)
    fill = tl.load(scratch_ptr + rank, mask=filled, other=-1, volatile=True)
    num_filled = tl.minimum(tl.sum(missing.to(tl.int32), axis=0), victims)
    refilled = in_s & (order_rank < num_filled)
    tl.store(fill_ptr + experts, fill, mask=in_e)
    tl.store(expert_slot_ptr + slot_expert, -1, mask=refilled & held)
    tl.store(slot_expert_ptr + fill, experts, mask=filled)
    tl.store(stamp_ptr + slots, tl.where(slot_needed | refilled, step, stamps), mask=in_s)
    if HAS_COUNTERS:
        needed_offloaded = needed & ~resident
        hits = needed_offloaded & (expert_slot >= 0)
        if HAS_PREDICTED:
            predicted = (tl.load(predicted_ptr + experts, mask=in_e, other=0) != 0) & ~resident
        else:
            predicted = needed & False
        counts = tl.where(columns == 0, tl.sum(predicted.to(tl.int32), axis=0),
                          tl.where(columns == 1,
                                   tl.sum((predicted & needed_offloaded).to(tl.int32), axis=0),
                                   tl.where(columns == 2,
                                            tl.sum(needed_offloaded.to(tl.int32), axis=0),
                                            tl.sum(hits.to(tl.int32), axis=0))))
        tl.store(counters_ptr + columns, counters + counts.to(tl.int64))


# Long (~70 lines) for the same reason as _plan_fill_kernel.
@triton.jit(do_not_specialize=["num_experts", "num_slots", "num_chosen"])
def _plan_prefetch_kernel(scores_ptr, resident_ptr, expert_slot_ptr, slot_expert_ptr, stamp_ptr,
                          step_ptr, work_ptr, predicted_ptr, num_experts, num_slots, num_chosen,
                          BLOCK_E: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_F: tl.constexpr, BLOCK_J: tl.constexpr,
                          HAS_PREDICTED: tl.constexpr):
    """work[:m] is the chosen-experts scratch, then copy_experts; work[m:2m] copy_slots;
    work[2m:2m+S] the slot scratch."""
    copy_experts_ptr = work_ptr
    copy_slots_ptr = work_ptr + num_chosen
    scratch_ptr = work_ptr + 2 * num_chosen
    experts = tl.arange(0, BLOCK_E)
    in_e = experts < num_experts
    slots = tl.arange(0, BLOCK_S)
    in_s = slots < num_slots
    picks = tl.arange(0, BLOCK_M)
    in_m = picks < num_chosen
    scores = tl.load(scores_ptr + experts, mask=in_e, other=0).to(tl.float32)
    resident = tl.load(resident_ptr + experts, mask=in_e, other=0) != 0
    expert_slot = tl.load(expert_slot_ptr + experts, mask=in_e, other=-1)
    stamps = tl.load(stamp_ptr + slots, mask=in_s, other=0)
    step = tl.load(step_ptr)
    candidate = in_e & (scores > 0) & ~resident
    # A candidate's place among candidates: those with a higher score or an equal score and a
    # lower id come first (a float > 0 equals another exactly when their bits do).
    ahead = tl.zeros_like(experts)
    for start in range(0, num_experts, BLOCK_F):
        f = start + tl.arange(0, BLOCK_F)
        in_f = f < num_experts
        score_f = tl.load(scores_ptr + f, mask=in_f, other=0).to(tl.float32)
        resident_f = tl.load(resident_ptr + f, mask=in_f, other=0) != 0
        candidate_f = (in_f & (score_f > 0) & ~resident_f)[None, :]
        score_f, f = score_f[None, :], f[None, :]
        beats = candidate_f & ((score_f > scores[:, None])
                               | ((score_f == scores[:, None]) & (f < experts[:, None])))
        ahead += tl.sum(beats.to(tl.int32), axis=1)
    chosen = candidate & (ahead < num_chosen)
    num_candidates = tl.minimum(tl.sum(candidate.to(tl.int32), axis=0), num_chosen)
    tl.store(copy_experts_ptr + ahead, experts, mask=chosen)
    tl.store(copy_experts_ptr + picks, -1, mask=in_m & (picks >= num_candidates))
    tl.store(scratch_ptr + slots, 0, mask=in_s)
    if HAS_PREDICTED:
        tl.store(predicted_ptr + experts, chosen.to(tl.uint8), mask=in_e)
    tl.debug_barrier()
    cached = chosen & (expert_slot >= 0) & (expert_slot < num_slots)
    tl.store(scratch_ptr + expert_slot, 1, mask=cached)  # protected slots
    pick = tl.load(copy_experts_ptr + picks, mask=in_m, other=-1, volatile=True)
    tl.debug_barrier()
    protected = tl.load(scratch_ptr + slots, mask=in_s, other=0, volatile=True)
    order_rank = _eviction_ranks(stamp_ptr, scratch_ptr, stamps, protected, slots, num_slots,
                                 BLOCK_J)
    tl.debug_barrier()
    tl.store(scratch_ptr + order_rank, slots, mask=in_s)  # scratch[r] = r-th victim
    tl.debug_barrier()
    current = tl.load(expert_slot_ptr + pick, mask=pick >= 0, other=-1)
    copy = (pick >= 0) & (current < 0)
    copy_rank = tl.cumsum(copy.to(tl.int32), axis=0) - 1
    copy_slot = tl.load(scratch_ptr + copy_rank, mask=copy, other=-1, volatile=True)
    evicted = tl.load(slot_expert_ptr + copy_slot, mask=copy, other=-1)
    num_copies = tl.sum(copy.to(tl.int32), axis=0)
    refreshed = in_s & ((protected != 0) | (order_rank < num_copies))
    tl.debug_barrier()
    tl.store(copy_experts_ptr + picks, tl.where(copy, pick, -1), mask=in_m)
    tl.store(copy_slots_ptr + picks, copy_slot, mask=in_m)
    tl.store(expert_slot_ptr + evicted, -1, mask=copy & (evicted >= 0))
    tl.store(slot_expert_ptr + copy_slot, pick, mask=copy)
    tl.store(stamp_ptr + slots, tl.where(refreshed, step, stamps), mask=in_s)
    # The reference writes evicted entries first, then the copied experts' slots.
    tl.debug_barrier()
    tl.store(expert_slot_ptr + pick, copy_slot, mask=copy)


# The interpreter is chosen when @triton.jit runs, so the kernel object says which one we got.
_INTERPRETED = not isinstance(_plan_fill_kernel, triton.runtime.JITFunction)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _check_vector(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], size: int,
                  device: torch.device) -> None:
    if t.dtype not in dtypes or t.shape != (size,) or not t.is_contiguous():
        allowed = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"{name} is {t.dtype} of shape {tuple(t.shape)}: expected a contiguous "
                         f"{allowed} [{size}]")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}: the pool is on {device}")


def _check_pool(resident, expert_slot, slot_expert, slot_stamp, step) -> None:
    if expert_slot.dim() != 1 or slot_expert.dim() != 1:
        raise ValueError(f"expert_slot {tuple(expert_slot.shape)} and slot_expert "
                         f"{tuple(slot_expert.shape)}: expected one layer's [E] and [S]")
    E, S, device = expert_slot.shape[0], slot_expert.shape[0], expert_slot.device
    if E < 1 or S < 1:
        raise ValueError(f"a pool needs E >= 1 and S >= 1, got E={E}, S={S}")
    _check_vector("expert_slot", expert_slot, (torch.int32,), E, device)
    _check_vector("slot_expert", slot_expert, (torch.int32,), S, device)
    _check_vector("slot_stamp", slot_stamp, (torch.int64,), S, device)
    _check_vector("resident", resident, (torch.bool,), E, device)
    if step.dtype != torch.int64 or step.numel() != 1 or step.device != device:
        raise ValueError(f"step is {step.dtype} with {step.numel()} elements on {step.device}: "
                         f"expected one int64 on {device}")


def _launch_device(t: torch.Tensor):
    return torch.cuda.device(t.device.index if t.device.type == "cuda" else -1)


def plan_fill_fused(
    topk_ids: torch.Tensor,
    resident: torch.Tensor,
    expert_slot: torch.Tensor,
    slot_expert: torch.Tensor,
    slot_stamp: torch.Tensor,
    step: torch.Tensor,
    counters: torch.Tensor | None = None,
    predicted: torch.Tensor | None = None,
) -> torch.Tensor:
    """`slot_plan_reference.plan_fill` of one layer's pool in one launch: fill_slot int32 [E] and
    the same in-place updates of expert_slot int32 [E], slot_expert int32 [S] and slot_stamp
    int64 [S]. topk_ids [T, k] (int32/int64, ids < E; negative ids are padding), resident bool
    [E], step int64 scalar, all on one device.

    With `counters` (int64 [4], e.g. `PrefetchStats.counters[layer]`) the same launch adds what
    `count_prefetch(counters, topk_ids, resident, expert_slot, predicted)` adds before the plan,
    `predicted` being an optional bool [E] mask (e.g. filled by `plan_prefetch_fused`).
    HOT PATH: no host sync, grid and shapes fixed by E, S and T*k, so capturable in a CUDA graph.
    CPU tensors outside the Triton interpreter take the torch reference."""
    _check_pool(resident, expert_slot, slot_expert, slot_stamp, step)
    E, S, device = expert_slot.shape[0], slot_expert.shape[0], expert_slot.device
    if topk_ids.dtype not in (torch.int32, torch.int64) or topk_ids.device != device:
        raise ValueError(f"topk_ids is {topk_ids.dtype} on {topk_ids.device}: expected int32 or "
                         f"int64 on {device}")
    if counters is not None:
        _check_vector("counters", counters, (torch.int64,), len(reference.METRICS), device)
    if predicted is not None:
        _check_vector("predicted", predicted, (torch.bool,), E, device)
    if device.type == "cpu" and not _INTERPRETED:
        if counters is not None:
            reference.count_prefetch(counters, topk_ids, resident, expert_slot, predicted)
        return reference.plan_fill(topk_ids, resident, expert_slot, slot_expert, slot_stamp,
                                   step)
    ids = topk_ids.reshape(-1)
    work = torch.empty(E + S, dtype=torch.int32, device=device)
    block_e, block_s = _block(E), _block(S)
    with _launch_device(work):
        _plan_fill_kernel[(1,)](
            ids, ids.numel(), resident.view(torch.uint8), expert_slot, slot_expert, slot_stamp,
            step, work, slot_stamp if counters is None else counters,
            resident.view(torch.uint8) if predicted is None else predicted.view(torch.uint8),
            E, S, BLOCK_E=block_e, BLOCK_S=block_s,
            BLOCK_IDS=min(_block(ids.numel()), _MAX_IDS_BLOCK), BLOCK_J=min(block_s, _CHUNK),
            HAS_COUNTERS=counters is not None, HAS_PREDICTED=predicted is not None,
            num_warps=4 if block_e <= 128 else 8,
        )
    return work[:E]


def plan_prefetch_fused(
    scores: torch.Tensor,
    resident: torch.Tensor,
    expert_slot: torch.Tensor,
    slot_expert: torch.Tensor,
    slot_stamp: torch.Tensor,
    step: torch.Tensor,
    num_experts: int,
    counters_predicted: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`slot_plan_reference.plan_prefetch` of one layer's pool in one launch: (copy_experts,
    copy_slots) int32 [m], m = num_experts <= S, and the same in-place updates of expert_slot,
    slot_expert and slot_stamp. scores [E] float (compared as float32, like the reference).

    With `counters_predicted` (bool [E]) the same launch writes into it what
    `predicted_mask(scores, resident, m)` returns: the mask to pass as `predicted` to the next
    `plan_fill_fused` of this pool. HOT PATH like `plan_fill_fused`."""
    _check_pool(resident, expert_slot, slot_expert, slot_stamp, step)
    E, S, device = expert_slot.shape[0], slot_expert.shape[0], expert_slot.device
    if not 1 <= num_experts <= S:
        raise ValueError(f"prefetch of {num_experts} experts into {S} slots: need 1 <= m <= S")
    if not scores.is_floating_point():
        raise ValueError(f"scores is {scores.dtype}: expected a floating-point [{E}]")
    _check_vector("scores", scores, (scores.dtype,), E, device)
    if counters_predicted is not None:
        _check_vector("counters_predicted", counters_predicted, (torch.bool,), E, device)
    if device.type == "cpu" and not _INTERPRETED:
        if counters_predicted is not None:
            counters_predicted.copy_(reference.predicted_mask(scores, resident, num_experts))
        return reference.plan_prefetch(scores, resident, expert_slot, slot_expert, slot_stamp,
                                       step, num_experts)
    m = num_experts
    work = torch.empty(2 * m + S, dtype=torch.int32, device=device)
    block_e, block_s = _block(E), _block(S)
    with _launch_device(work):
        _plan_prefetch_kernel[(1,)](
            scores, resident.view(torch.uint8), expert_slot, slot_expert, slot_stamp, step, work,
            resident.view(torch.uint8) if counters_predicted is None
            else counters_predicted.view(torch.uint8),
            E, S, m, BLOCK_E=block_e, BLOCK_S=block_s, BLOCK_M=_block(m),
            BLOCK_F=min(block_e, _CHUNK), BLOCK_J=min(block_s, _CHUNK),
            HAS_PREDICTED=counters_predicted is not None,
            num_warps=4 if block_e <= 128 else 8,
        )
    return work[:m], work[m : 2 * m]
