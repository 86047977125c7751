"""Group a step's (token, expert) pairs by expert on the GPU, each expert's rows padded to the
GEMM row block: the row order the grouped fused-MoE kernels walk (fused_moe.py). Two launches
of up to MAX_PROGRAMS programs each (count per chunk of pairs, then scatter), so the time stays
a few microseconds from decode batches to prefill chunks."""

import torch
import triton
import triton.language as tl

from .pdl import pdl_enter, pdl_launch

# Programs per launch: enough to spread a prefill chunk's pairs, few enough that every program
# of the scatter can load all chunks' counts as one [programs, experts] tile.
MAX_PROGRAMS = 64
# Elements of a [pairs, experts] one-hot tile (8 warps: 16 int32 a thread, no spills).
_TILE = 4096


@triton.jit
def _expert_hits(ids_ptr, stride_it, stride_ij, pairs, num_pairs, num_experts, experts,
                 TOP_K: tl.constexpr):
    """One-hot [pairs, experts] int32 of each pair's expert; padding ids (< 0) hit nothing."""
    ids = tl.load(ids_ptr + (pairs // TOP_K) * stride_it + (pairs % TOP_K) * stride_ij,
                  mask=pairs < num_pairs, other=-1)
    hit = (ids[:, None] == experts[None, :]) & (experts[None, :] < num_experts)
    return hit.to(tl.int32)


@triton.jit(do_not_specialize=["num_pairs"])
def _align_count_kernel(ids_ptr, stride_it, stride_ij, counts_ptr, sorted_ptr, num_pairs,
                        num_experts, pairs_per_program, num_rows, rows_per_program,
                        TOP_K: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
                        FILL: tl.constexpr, PDL: tl.constexpr):
    """counts[p, e] = pairs of program p's range routed to e; program p also writes the
    sentinel (num_pairs) into its stripe of the row array (the scatter overwrites real rows)."""
    pdl_enter(PDL)
    p = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    lanes = tl.arange(0, CHUNK)
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    first = p * pairs_per_program
    for start in range(first, first + pairs_per_program, CHUNK):
        counts += tl.sum(_expert_hits(ids_ptr, stride_it, stride_ij, start + lanes, num_pairs,
                                      num_experts, experts, TOP_K), axis=0)
    tl.store(counts_ptr + p * E_PAD + experts, counts)
    fill = tl.arange(0, FILL)
    sentinel = tl.zeros([FILL], dtype=tl.int32) + num_pairs
    row0 = p * rows_per_program
    for start in range(row0, row0 + rows_per_program, FILL):
        rows = start + fill
        tl.store(sorted_ptr + rows, sentinel, mask=(rows < row0 + rows_per_program)
                 & (rows < num_rows))


@triton.jit(do_not_specialize=["num_pairs"])
def _align_scatter_kernel(ids_ptr, stride_it, stride_ij, counts_ptr, sorted_ptr,
                          block_expert_ptr, num_pairs, num_experts, num_programs,
                          pairs_per_program, num_blocks, TOP_K: tl.constexpr,
                          BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, P_PAD: tl.constexpr,
                          CHUNK: tl.constexpr, BLOCKS: tl.constexpr, PDL: tl.constexpr):
    """Each program reads every program's counts, so it knows each expert's padded start and
    how many of the expert's pairs come before its own range; it scatters its pairs in pair
    order (a stable, reproducible order) and writes the owner expert of BLOCKS row blocks."""
    pdl_enter(PDL)
    p = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    programs = tl.arange(0, P_PAD)
    all_counts = tl.load(counts_ptr + programs[:, None] * E_PAD + experts[None, :],
                         mask=(programs < num_programs)[:, None], other=0)
    counts = tl.sum(all_counts, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    seen = tl.sum(tl.where((programs < p)[:, None], all_counts, 0), axis=0)
    lanes = tl.arange(0, CHUNK)
    first = p * pairs_per_program
    for start in range(first, first + pairs_per_program, CHUNK):
        pairs = start + lanes
        hit = _expert_hits(ids_ptr, stride_it, stride_ij, pairs, num_pairs, num_experts,
                           experts, TOP_K)
        rank = tl.cumsum(hit, axis=0) - 1 + seen[None, :]
        dest = tl.sum(tl.where(hit > 0, starts[None, :] + rank, 0), axis=1)
        tl.store(sorted_ptr + dest, pairs, mask=tl.sum(hit, axis=1) > 0)
        seen += tl.sum(hit, axis=0)
    total = tl.sum(padded, axis=0)
    blocks = p * BLOCKS + tl.arange(0, BLOCKS)
    first_row = blocks * BLOCK_M
    owner = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
    owner = tl.where(first_row < total, owner, -1)
    tl.store(block_expert_ptr + blocks, owner, mask=blocks < num_blocks)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int,
                    block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the T*k (token, choice) pairs by expert, each expert padded to a multiple of block_m.

    Returns `sorted_pairs` int32 [num_blocks * block_m] (pair index t*k+j, or the sentinel T*k
    on padding) and `block_expert` int32 [num_blocks] (expert of each row block, -1 past the
    end). num_blocks is the static bound ceil((T*k + min(E, T*k)*(block_m-1)) / block_m).
    """
    num_pairs = topk_ids.numel()
    num_blocks = triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m)
    device = topk_ids.device
    sorted_pairs = torch.empty(num_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)
    e_pad = max(16, triton.next_power_of_2(num_experts))
    chunk = max(16, _TILE // e_pad)
    # Static from the shapes (no host sync): whole chunks per program, at most MAX_PROGRAMS.
    programs = min(MAX_PROGRAMS, triton.cdiv(num_pairs, chunk))
    pairs_per_program = triton.cdiv(triton.cdiv(num_pairs, programs), chunk) * chunk
    programs = triton.cdiv(num_pairs, pairs_per_program)
    counts = torch.empty((programs, e_pad), dtype=torch.int32, device=device)
    num_rows = num_blocks * block_m
    rows_per_program = triton.cdiv(num_rows, programs)
    ids = (topk_ids, topk_ids.stride(0), topk_ids.stride(1))
    top_k = topk_ids.shape[1]
    _align_count_kernel[(programs,)](
        *ids, counts, sorted_pairs, num_pairs, num_experts, pairs_per_program, num_rows,
        rows_per_program, TOP_K=top_k, E_PAD=e_pad, CHUNK=chunk,
        FILL=min(2048, triton.next_power_of_2(rows_per_program)), num_warps=8,
        **pdl_launch(device),
    )
    _align_scatter_kernel[(programs,)](
        *ids, counts, sorted_pairs, block_expert, num_pairs, num_experts, programs,
        pairs_per_program, num_blocks, TOP_K=top_k, BLOCK_M=block_m, E_PAD=e_pad,
        P_PAD=max(2, triton.next_power_of_2(programs)), CHUNK=chunk,
        BLOCKS=max(2, triton.next_power_of_2(triton.cdiv(num_blocks, programs))), num_warps=8,
        **pdl_launch(device),
    )
    return sorted_pairs, block_expert
