"""Group a step's (token, expert) pairs by expert on the GPU in one launch, each expert's rows
padded to the GEMM row block: the row order the grouped fused-MoE kernels walk
(fused_moe.py)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _expert_hits(ids_ptr, stride_it, stride_ij, pairs, num_pairs, num_experts, experts,
                 TOP_K: tl.constexpr):
    """One-hot [pairs, experts] int32 of each pair's expert; padding ids (< 0) hit nothing."""
    ids = tl.load(ids_ptr + (pairs // TOP_K) * stride_it + (pairs % TOP_K) * stride_ij,
                  mask=pairs < num_pairs, other=-1)
    hit = (ids[:, None] == experts[None, :]) & (experts[None, :] < num_experts)
    return hit.to(tl.int32)


@triton.jit(do_not_specialize=["num_pairs"])
def _align_kernel(ids_ptr, stride_it, stride_ij, sorted_ptr, block_expert_ptr, num_pairs,
                  num_experts, num_blocks, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr,
                  E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    # One program does it all: a decode step has tens of pairs, and one launch beats a chain.
    experts = tl.arange(0, E_PAD)
    lanes = tl.arange(0, CHUNK)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        hit = _expert_hits(ids_ptr, stride_it, stride_ij, start + lanes, num_pairs, num_experts,
                           experts, TOP_K)
        counts += tl.sum(hit, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    for start in range(0, num_blocks, CHUNK):
        blocks = start + lanes
        first_row = blocks * BLOCK_M
        owner = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
        owner = tl.where(first_row < total, owner, -1)
        tl.store(block_expert_ptr + blocks, owner, mask=blocks < num_blocks)
    # Sentinels go only where no pair lands, so the scatter below needs no barrier.
    for start in range(0, num_blocks * BLOCK_M, CHUNK):
        rows = start + lanes
        inside = (rows[:, None] >= starts[None, :]) & (rows[:, None] < (starts + counts)[None, :])
        is_pair = tl.max(inside.to(tl.int32), axis=1) > 0
        sentinel = tl.zeros([CHUNK], dtype=tl.int32) + num_pairs
        tl.store(sorted_ptr + rows, sentinel, mask=(rows < num_blocks * BLOCK_M) & ~is_pair)
    # Stable order inside each expert (rank = earlier pairs with the same expert): reproducible.
    seen = tl.zeros([E_PAD], dtype=tl.int32)
    for start in range(0, num_pairs, CHUNK):
        pairs = start + lanes
        hit = _expert_hits(ids_ptr, stride_it, stride_ij, pairs, num_pairs, num_experts,
                           experts, TOP_K)
        rank = tl.cumsum(hit, axis=0) - 1 + seen[None, :]
        dest = tl.sum(tl.where(hit > 0, starts[None, :] + rank, 0), axis=1)
        tl.store(sorted_ptr + dest, pairs, mask=tl.sum(hit, axis=1) > 0)
        seen += tl.sum(hit, axis=0)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int,
                    block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the T*k (token, choice) pairs by expert, each expert padded to a multiple of block_m.

    Returns `sorted_pairs` int32 [num_blocks * block_m] (pair index t*k+j, or the sentinel T*k
    on padding) and `block_expert` int32 [num_blocks] (expert of each row block, -1 past the
    end). num_blocks is the static bound ceil((T*k + min(E, T*k)*(block_m-1)) / block_m).
    """
    num_pairs = topk_ids.numel()
    num_blocks = triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m)
    sorted_pairs = torch.empty(num_blocks * block_m, dtype=torch.int32, device=topk_ids.device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=topk_ids.device)
    e_pad = max(16, triton.next_power_of_2(num_experts))
    _align_kernel[(1,)](
        topk_ids, topk_ids.stride(0), topk_ids.stride(1), sorted_pairs, block_expert, num_pairs,
        num_experts, num_blocks, TOP_K=topk_ids.shape[1], BLOCK_M=block_m, E_PAD=e_pad,
        CHUNK=max(16, 4096 // e_pad), num_warps=8,  # [CHUNK, E] tiles of 4096: no spills
    )
    return sorted_pairs, block_expert
