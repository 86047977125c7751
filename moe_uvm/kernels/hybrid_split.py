"""The CPU/GPU hybrid's split of one layer's routed offloaded experts, on the GPU, in one launch
(no host sync; capturable in a CUDA graph): the rule of moe_uvm.hybrid.split_offloaded, its
plain-Python reference. The offloaded experts with the fewest tokens (ties by id) go to the
CPU, as many as minimise max(GPU side, CPU side) under the per-expert costs; none when the CPU
would not shorten the step. Outputs: the GPU's ids (the CPU's pairs as -1), the CPU's experts
as a [E] uint8 mask, and the ids as int64 (for the CPU side's grouping).

The costs ([5] float64: GPU per expert, CPU per expert, CPU per pair, GPU fixed, CPU fixed,
in microseconds) and the resident mask are read at every launch, so in a graph each replay
splits by the current values (the hybrid keeps them in pinned host memory, read over PCIe).
Sides' times are in float64, as in the reference; the CPU side's as fixed + n * per expert +
per pair * tokens, which the reference computes the same way."""

import torch
import triton
import triton.language as tl

COSTS = ("gpu_expert_us", "cpu_expert_us", "cpu_pair_us", "gpu_fixed_us", "cpu_fixed_us")
"""The order of the costs vector (ExpertCosts' fields)."""

_BLOCK_P = 16
_NONE = 2**62  # sort key of experts that are not candidates


@triton.jit
def _split_kernel(ids_ptr, stride_it, stride_ij, num_pairs, num_experts, resident_ptr, costs_ptr,
                  gpu_ids_ptr, ids_out_ptr, chosen_ptr, TOP_K: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr, NONE: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)
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
    tokens_sorted = tl.where(ordered < NONE, ordered // BLOCK_E, 0)
    tokens_first_n = tl.cumsum(tokens_sorted, axis=0)  # [i]: tokens of the first i + 1
    gpu_expert = tl.load(costs_ptr)
    cpu_expert = tl.load(costs_ptr + 1)
    cpu_pair = tl.load(costs_ptr + 2)
    gpu_fixed = tl.load(costs_ptr + 3)
    cpu_fixed = tl.load(costs_ptr + 4)
    n = (experts + 1).to(tl.float64)  # the CPU taking the first n
    m_f = m.to(tl.float64)
    cpu = cpu_fixed + n * cpu_expert + cpu_pair * tokens_first_n.to(tl.float64)
    gpu = tl.where(n < m_f, gpu_fixed + (m_f - n) * gpu_expert, 0.0)
    step = tl.where(n <= m_f, tl.maximum(cpu, gpu), 1e300)  # beyond m: never
    gpu_only = tl.where(m > 0, gpu_fixed + m_f * gpu_expert, 0.0)
    best, best_i = tl.min(step, axis=0, return_indices=True)  # the first of equal minima
    take = tl.where(best < gpu_only, best_i + 1, 0)
    last_key = tl.sum(tl.where(experts == take - 1, ordered, 0), axis=0)
    chosen = candidate & (key <= last_key) & (take > 0)
    tl.store(chosen_ptr + experts, chosen.to(tl.uint8), mask=expert_ok)
    for p0 in range(0, num_pairs, BLOCK_P):
        pairs = p0 + tl.arange(0, BLOCK_P)
        inside = pairs < num_pairs
        ids = tl.load(ids_ptr + (pairs // TOP_K).to(tl.int64) * stride_it
                      + (pairs % TOP_K) * stride_ij, mask=inside, other=-1)
        to_cpu = tl.sum(((ids[:, None] == experts[None, :]) & chosen[None, :]).to(tl.int32),
                        axis=1) > 0
        tl.store(gpu_ids_ptr + pairs, tl.where(to_cpu, -1, ids), mask=inside)


def split_on_device(topk_ids: torch.Tensor, num_experts: int, resident: torch.Tensor,
                    costs: torch.Tensor, gpu_ids: torch.Tensor, ids_out: torch.Tensor,
                    chosen: torch.Tensor) -> None:
    """One launch: `gpu_ids` ([T, k] contiguous, topk_ids' dtype) = topk_ids with the CPU's
    pairs as -1; `chosen` (uint8 [E]) marks the CPU's experts; `ids_out` (int64 [T*k]) the ids.
    `resident` (uint8 [E], 1 = the GPU's) and `costs` (float64 [5], COSTS' order) are read by
    the kernel. Tensors on the ids' device (or views of pinned host memory from it)."""
    num_tokens, top_k = topk_ids.shape
    if (gpu_ids.shape != topk_ids.shape or gpu_ids.dtype != topk_ids.dtype
            or not gpu_ids.is_contiguous()):
        raise ValueError(f"gpu_ids must be contiguous {topk_ids.dtype} {list(topk_ids.shape)}; "
                         f"got {gpu_ids.dtype} {list(gpu_ids.shape)}")
    wanted = {"resident": (resident, torch.uint8, num_experts),
              "costs": (costs, torch.float64, len(COSTS)),
              "ids_out": (ids_out, torch.int64, num_tokens * top_k),
              "chosen": (chosen, torch.uint8, num_experts)}
    for name, (t, dtype, size) in wanted.items():
        if t.dtype != dtype or t.numel() != size or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous {dtype} with {size} elements; got "
                             f"{t.dtype} {list(t.shape)}")
    block_e = triton.next_power_of_2(max(num_experts, 2))
    _split_kernel[(1,)](topk_ids, topk_ids.stride(0), topk_ids.stride(1), num_tokens * top_k,
                        num_experts, resident, costs, gpu_ids, ids_out, chosen, TOP_K=top_k,
                        BLOCK_E=block_e, BLOCK_P=_BLOCK_P, NONE=_NONE,
                        num_warps=4 if block_e <= 128 else 8)
