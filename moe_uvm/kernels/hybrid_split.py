"""The CPU/GPU hybrid's split of one layer's routed offloaded experts, on the GPU, in one launch
(no host sync; capturable in a CUDA graph): the rule of moe_uvm.hybrid.split_offloaded, its
plain-Python reference. The offloaded experts with the fewest tokens (ties by id) go to the
CPU whole while its side stays no longer than the GPU's, then the leading intermediate columns
of the next one that make both sides finish together (rounded to COL_GRANULE columns; the GPU
computes the rest of that expert), or everything where that is quicker; nothing when the CPU
would not shorten the step. Outputs: the GPU's ids (the pairs of experts the CPU takes whole as
-1), the columns the CPU computes of each expert as int32 [E] (0: none; I: whole) written
twice (for the host, and for the GPU's kernel, which starts each expert at that column), and
the ids as int64 (for the CPU side's grouping).

The costs ([5] float64: GPU per expert, CPU per expert, CPU per pair, GPU fixed, CPU fixed,
in microseconds) and the resident mask are read at every launch, so in a graph each replay
splits by the current values (the hybrid keeps them in pinned host memory, read over PCIe).
Both sides' times are float64 in the reference's operations, so both make the same choice."""

import torch
import triton
import triton.language as tl

COSTS = ("gpu_expert_us", "cpu_expert_us", "cpu_pair_us", "gpu_fixed_us", "cpu_fixed_us")
"""The order of the costs vector (ExpertCosts' fields)."""

COL_GRANULE = 64
"""A split expert's CPU columns are a multiple of this (or all of them)."""

_BLOCK_P = 16
_NONE = 2**62  # sort key of experts that are not candidates


@triton.jit
def _at(values, index, lanes):
    """values[index] of a vector, as a scalar."""
    return tl.sum(tl.where(lanes == index, values, 0), axis=0)


@triton.jit
def _step_us(n, frac, cpu_side, tokens, lanes, c, p, g, gpu_fixed, m):
    """The step's time with n whole experts on the CPU and the fraction `frac` of the next's
    columns."""
    cpu = _at(cpu_side, n, lanes) + frac * (c + p * _at(tokens, n, lanes))
    gpu = tl.where(n < m, gpu_fixed + ((m - n).to(tl.float64) - frac) * g, 0.0)
    return tl.maximum(cpu, gpu)


@triton.jit
def _if_quicker(n, best_n, best_c, best_t, cpu_side, tokens, lanes, c, p, g, gpu_fixed, m):
    """(n whole experts, no split one) where strictly quicker than the best so far."""
    t = _step_us(n, 0.0, cpu_side, tokens, lanes, c, p, g, gpu_fixed, m)
    better = t < best_t
    return (tl.where(better, n, best_n), tl.where(better, 0, best_c),
            tl.where(better, t, best_t))


@triton.jit(do_not_specialize=["num_pairs", "intermediate", "granule"])
def _split_kernel(ids_ptr, stride_it, stride_ij, num_pairs, num_experts, intermediate, granule,
                  resident_ptr, costs_ptr, gpu_ids_ptr, ids_out_ptr, cols_ptr, gpu_cols_ptr,
                  TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr,
                  NONE: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)  # also the lanes of the sorted candidates
    expert_ok = experts < num_experts
    counts = tl.zeros([BLOCK_E], dtype=tl.int64)
    for p0 in range(0, num_pairs, BLOCK_P):
        pairs = p0 + tl.arange(0, BLOCK_P)
        inside = pairs < num_pairs
        ids = tl.load(ids_ptr + (pairs // TOP_K).to(tl.int64) * stride_it
                      + (pairs % TOP_K) * stride_ij, mask=inside, other=-1).to(tl.int64)
        tl.store(ids_out_ptr + pairs, ids, mask=inside)
        hit = (ids[:, None] == experts[None, :]) & inside[:, None]
        counts += tl.sum(hit.to(tl.int64), axis=0)
    resident = tl.load(resident_ptr + experts, mask=expert_ok, other=1)
    candidate = (counts > 0) & (resident == 0) & expert_ok
    m = tl.sum(candidate.to(tl.int64), axis=0)
    key = tl.where(candidate, counts * BLOCK_E + experts, NONE)  # by tokens, then id
    ordered = tl.sort(key)
    tokens = tl.where(ordered < NONE, ordered // BLOCK_E, 0).to(tl.float64)  # [i]: the i+1-th's
    first = tl.cumsum(tokens, axis=0) - tokens  # [i]: tokens of the first i
    g = tl.load(costs_ptr)
    c = tl.load(costs_ptr + 1)
    p = tl.load(costs_ptr + 2)
    gpu_fixed = tl.load(costs_ptr + 3)
    cpu_fixed = tl.load(costs_ptr + 4)
    i_f = experts.to(tl.float64)  # lane i: the CPU taking the first i whole
    m_f = m.to(tl.float64)
    cpu_side = cpu_fixed + i_f * c + p * first
    gpu_side = gpu_fixed + (m_f - i_f) * g
    ok = (experts <= m) & (cpu_side <= gpu_side)  # a prefix of the lanes (BLOCK_E > m)
    n = tl.sum(ok.to(tl.int64), axis=0) - 1
    gpu_only = gpu_fixed + m_f * g
    f = (_at(gpu_side, n, experts) - _at(cpu_side, n, experts)) / (
        c + p * _at(tokens, n, experts) + g)
    cols = tl.minimum((f * intermediate.to(tl.float64) / granule.to(tl.float64)
                       + 0.5).to(tl.int64) * granule, intermediate)
    cols = tl.where((n >= 0) & (n < m), cols, 0)
    # Candidates in the reference's order, the first quickest kept: the balance point rounded,
    # n whole, n + 1 whole, all.
    whole = cols == intermediate
    best_n = tl.where(whole, n + 1, n)
    best_c = tl.where(whole, 0, cols)
    best_t = _step_us(best_n, best_c.to(tl.float64) / intermediate.to(tl.float64), cpu_side,
                      tokens, experts, c, p, g, gpu_fixed, m)
    best_n, best_c, best_t = _if_quicker(n, best_n, best_c, best_t, cpu_side, tokens, experts,
                                         c, p, g, gpu_fixed, m)
    best_n, best_c, best_t = _if_quicker(tl.minimum(n + 1, m), best_n, best_c, best_t, cpu_side,
                                         tokens, experts, c, p, g, gpu_fixed, m)
    best_n, best_c, best_t = _if_quicker(m, best_n, best_c, best_t, cpu_side, tokens, experts,
                                         c, p, g, gpu_fixed, m)
    take = (n >= 0) & ((best_n > 0) | (best_c > 0)) & (best_t < gpu_only)
    n = tl.where(take, best_n, 0)
    cols = tl.where(take, best_c, 0)
    # The CPU's experts: the first n of the order whole, the n+1-th's first `cols` columns.
    last_whole = _at(ordered, n - 1, experts)  # n == 0: none
    split_key = _at(ordered, n, experts)
    mine = tl.where(candidate & (n > 0) & (key <= last_whole), intermediate, 0)
    mine = tl.where(candidate & (cols > 0) & (key == split_key), cols, mine).to(tl.int32)
    tl.store(cols_ptr + experts, mine, mask=expert_ok)
    tl.store(gpu_cols_ptr + experts, mine, mask=expert_ok)
    whole_mask = mine == intermediate
    for p0 in range(0, num_pairs, BLOCK_P):
        pairs = p0 + tl.arange(0, BLOCK_P)
        inside = pairs < num_pairs
        ids = tl.load(ids_ptr + (pairs // TOP_K).to(tl.int64) * stride_it
                      + (pairs % TOP_K) * stride_ij, mask=inside, other=-1)
        to_cpu = tl.sum(((ids[:, None] == experts[None, :]) & whole_mask[None, :]).to(tl.int32),
                        axis=1) > 0
        tl.store(gpu_ids_ptr + pairs, tl.where(to_cpu, -1, ids), mask=inside)


def split_on_device(topk_ids: torch.Tensor, num_experts: int, intermediate: int,
                    resident: torch.Tensor, costs: torch.Tensor, gpu_ids: torch.Tensor,
                    ids_out: torch.Tensor, cols: torch.Tensor, gpu_cols: torch.Tensor) -> None:
    """One launch: `gpu_ids` ([T, k] contiguous, topk_ids' dtype) = topk_ids with the pairs of
    the experts the CPU takes whole as -1; `cols` and `gpu_cols` (int32 [E], the same values):
    the leading intermediate columns of each expert the CPU computes (0 none, `intermediate`
    all); `ids_out` (int64 [T*k]) the ids. `resident` (uint8 [E], 1 = the GPU's) and `costs`
    (float64 [5], COSTS' order) are read by the kernel. Tensors on the ids' device (or views of
    pinned host memory from it)."""
    num_tokens, top_k = topk_ids.shape
    if (gpu_ids.shape != topk_ids.shape or gpu_ids.dtype != topk_ids.dtype
            or not gpu_ids.is_contiguous()):
        raise ValueError(f"gpu_ids must be contiguous {topk_ids.dtype} {list(topk_ids.shape)}; "
                         f"got {gpu_ids.dtype} {list(gpu_ids.shape)}")
    if intermediate < 1:
        raise ValueError(f"intermediate must be >= 1; got {intermediate}")
    wanted = {"resident": (resident, torch.uint8, num_experts),
              "costs": (costs, torch.float64, len(COSTS)),
              "ids_out": (ids_out, torch.int64, num_tokens * top_k),
              "cols": (cols, torch.int32, num_experts),
              "gpu_cols": (gpu_cols, torch.int32, num_experts)}
    for name, (t, dtype, size) in wanted.items():
        if t.dtype != dtype or t.numel() != size or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous {dtype} with {size} elements; got "
                             f"{t.dtype} {list(t.shape)}")
    block_e = triton.next_power_of_2(num_experts + 1)  # a lane for every count 0..m
    _split_kernel[(1,)](topk_ids, topk_ids.stride(0), topk_ids.stride(1), num_tokens * top_k,
                        num_experts, intermediate, min(COL_GRANULE, intermediate), resident,
                        costs, gpu_ids, ids_out, cols, gpu_cols, TOP_K=top_k,
                        BLOCK_E=block_e, BLOCK_P=_BLOCK_P, NONE=_NONE,
                        num_warps=4 if block_e <= 128 else 8)
