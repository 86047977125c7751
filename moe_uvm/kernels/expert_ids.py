"""Expert ids screened on the device in one launch: ids outside [0, E) other than -1 become -1
(padding), and the lowest and highest id seen accumulate in a persistent int64 [2] tensor, with
atomics: no host sync, capturable in a CUDA graph. FusedMoE.experts runs it on every layer's
topk_ids; its plain-torch reference is the CPU path."""

import torch
import triton
import triton.language as tl

# Eager cost per call, measured on an H200 (torch 2.11, triton 3.6, T=1, k=8): this launch
# ~28 us, the reference's torch ops ~105 us, a torch.library custom op around the launch
# 60-75 us. A FusedMoE.experts call there takes ~150 us without the screen.
_BLOCK = 256


@triton.jit(do_not_specialize=["num_ids"])
def _screen_kernel(ids_ptr, stride_it, stride_ij, out_ptr, id_range_ptr, num_ids, num_experts,
                   TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    pairs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = pairs < num_ids
    ids = tl.load(ids_ptr + (pairs // TOP_K).to(tl.int64) * stride_it + (pairs % TOP_K) * stride_ij,
                  mask=inside, other=-1)
    wide = ids.to(tl.int64)
    tl.atomic_min(id_range_ptr, tl.min(tl.where(inside, wide, 2**63 - 1), axis=0))
    tl.atomic_max(id_range_ptr + 1, tl.max(tl.where(inside, wide, -(2**63)), axis=0))
    routable = (ids >= -1) & (ids < num_experts)
    tl.store(out_ptr + pairs, tl.where(routable, ids, -1), mask=inside)


def screen_expert_ids_reference(topk_ids: torch.Tensor, num_experts: int,
                                id_range: torch.Tensor) -> torch.Tensor:
    """`topk_ids` with every id outside [0, num_experts) other than -1 set to -1;
    `id_range` (int64 [2]) becomes [min(id_range[0], min id), max(id_range[1], max id)]."""
    if topk_ids.numel():
        low, high = torch.aminmax(topk_ids)
        id_range.copy_(torch.stack((id_range[0].minimum(low), id_range[1].maximum(high))))
    routable = (topk_ids >= -1) & (topk_ids < num_experts)
    return torch.where(routable, topk_ids, -1)


# The interpreter is chosen when @triton.jit runs, so the kernel object says which one we got.
_INTERPRETED = not isinstance(_screen_kernel, triton.runtime.JITFunction)


def screen_expert_ids(topk_ids: torch.Tensor, num_experts: int,
                      id_range: torch.Tensor) -> torch.Tensor:
    """topk_ids [T, k] (int32/int64, any strides) as a new contiguous tensor with every id
    outside [0, num_experts) other than -1 set to -1, so nothing downstream reads out of bounds;
    `id_range` (int64 [2] on the ids' device; [-1, -1]: nothing wrong seen) accumulates in
    place the lowest and highest id seen, so a later host read tells whether a bad id came by,
    and which. Device ops only, a fixed grid: capturable in a CUDA graph. Under torch.compile,
    and for CPU tensors outside the Triton interpreter, the plain-torch reference runs instead.
    """
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids is {topk_ids.dtype} of shape {tuple(topk_ids.shape)}: "
                         "expected int32 or int64 [T, k]")
    if (id_range.dtype != torch.int64 or tuple(id_range.shape) != (2,)
            or not id_range.is_contiguous() or id_range.device != topk_ids.device):
        raise ValueError(f"id_range is {id_range.dtype} {tuple(id_range.shape)} on "
                         f"{id_range.device}: expected a contiguous int64 [2] on "
                         f"{topk_ids.device}")
    # Compiled, the reference's ops fuse into inductor's own kernels; eager callers get the bare
    # launch, the cheapest of the three measured above.
    if torch.compiler.is_compiling() or (topk_ids.device.type == "cpu" and not _INTERPRETED):
        return screen_expert_ids_reference(topk_ids, num_experts, id_range)
    out = torch.empty(topk_ids.shape, dtype=topk_ids.dtype, device=topk_ids.device)
    num_ids = topk_ids.numel()
    if num_ids == 0:
        return out
    device = topk_ids.device
    with torch.cuda.device(device.index if device.type == "cuda" else -1):
        _screen_kernel[(triton.cdiv(num_ids, _BLOCK),)](
            topk_ids, topk_ids.stride(0), topk_ids.stride(1), out, id_range, num_ids,
            num_experts, TOP_K=topk_ids.shape[1], BLOCK=_BLOCK,
        )
    return out


# --- distinct experts per forward, counted on the device --------------------------------------

_COUNT_IDS = 128  # ids compared per round against every expert lane


@triton.jit
def routed_per_expert(ids_ptr, num_ids, experts, CHUNK: tl.constexpr):
    """For a program's lanes `experts` (ids, [BLOCK_E]): how many of the `num_ids` ids at
    `ids_ptr` equal each (float32, exact at these sizes), CHUNK ids compared per round; -1 and
    ids no lane holds count nowhere. Shared by the one-program planners (slot_admit.py)."""
    routed = tl.zeros_like(experts).to(tl.float32)
    for start in range(0, num_ids, CHUNK):
        offs = start + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < num_ids, other=-1)
        routed += tl.sum((ids[:, None] == experts[None, :]).to(tl.float32), axis=0)
    return routed


@triton.jit(do_not_specialize=["num_ids"])
def _count_distinct_kernel(ids_ptr, reads_ptr, num_ids, num_experts,
                           BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    experts = tl.arange(0, BLOCK_E)
    routed = routed_per_expert(ids_ptr, num_ids, experts, BLOCK_N)
    inside = experts < num_experts
    reads = tl.load(reads_ptr + experts, mask=inside, other=0)
    tl.store(reads_ptr + experts, reads + (routed > 0).to(tl.int64), mask=inside)


def count_distinct_experts_reference(topk_ids: torch.Tensor, reads: torch.Tensor) -> None:
    """reads[e] += 1 for every expert e in [0, len(reads)) that `topk_ids` holds at least once
    (-1 and other ids outside that range count for nothing)."""
    E = reads.shape[0]
    flat = topk_ids.reshape(-1).long()
    flat = flat[(flat >= 0) & (flat < E)]
    used = torch.zeros(E, dtype=torch.bool, device=reads.device)
    used[flat] = True
    reads.add_(used)


def count_distinct_experts(topk_ids: torch.Tensor, reads: torch.Tensor) -> None:
    """One forward's expert reads: reads (int64 [E], contiguous, on the ids' device) gains 1 for
    every expert the ids [T, k] (contiguous, int32/int64) use at least once; -1 and ids outside
    [0, E) count for nothing. One launch, a fixed grid, no host sync: capturable. For CPU
    tensors outside the Triton interpreter, and under torch.compile, the plain-torch reference
    runs instead."""
    if topk_ids.dtype not in (torch.int32, torch.int64) or not topk_ids.is_contiguous():
        raise ValueError(f"topk_ids is {topk_ids.dtype}, contiguous={topk_ids.is_contiguous()}:"
                         " expected contiguous int32 or int64")
    if (reads.dtype != torch.int64 or reads.dim() != 1 or not reads.is_contiguous()
            or reads.device != topk_ids.device):
        raise ValueError(f"reads is {reads.dtype} {tuple(reads.shape)} on {reads.device}: "
                         f"expected a contiguous int64 [E] on {topk_ids.device}")
    if torch.compiler.is_compiling() or (topk_ids.device.type == "cpu" and not _INTERPRETED):
        count_distinct_experts_reference(topk_ids, reads)
        return
    if topk_ids.numel() == 0:
        return
    device = topk_ids.device
    with torch.cuda.device(device.index if device.type == "cuda" else -1):
        _count_distinct_kernel[(1,)](
            topk_ids, reads, topk_ids.numel(), reads.shape[0],
            BLOCK_E=triton.next_power_of_2(reads.shape[0]), BLOCK_N=_COUNT_IDS)


# --- routing counts (the warm-up policy's counters) --------------------------------------------

_ROUTE_BLOCK = 256


@triton.jit(do_not_specialize=["num_ids"])
def _count_routing_kernel(ids_ptr, counts_ptr, num_ids, num_experts, BLOCK: tl.constexpr):
    at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = at < num_ids
    ids = tl.load(ids_ptr + at, mask=inside, other=-1).to(tl.int64)
    column = tl.where((ids >= 0) & (ids < num_experts), ids, num_experts)
    tl.atomic_add(counts_ptr + column, tl.full([BLOCK], 1, tl.int32), mask=inside)


def count_routing_reference(topk_ids: torch.Tensor, counts: torch.Tensor) -> None:
    """counts[e] += how often e occurs in `topk_ids`, for e in [0, E) with E = len(counts) - 1;
    every other id (-1 padding, out of range) adds to counts[E]."""
    E = counts.shape[0] - 1
    ids = topk_ids.reshape(-1).long()
    ids = torch.where((ids >= 0) & (ids < E), ids, E)
    counts.index_add_(0, ids, torch.ones_like(ids, dtype=counts.dtype))


def count_routing(topk_ids: torch.Tensor, counts: torch.Tensor) -> None:
    """Routing counts of one batch in one launch: counts (int32 [E + 1], contiguous, on the ids'
    device) gains one per id [T, k] (contiguous int32/int64) at its expert, column E taking -1
    and anything outside [0, E). Integer atomics: exact, so replays and eager agree. Capturable;
    the plain-torch reference runs for CPU tensors outside the Triton interpreter and under
    torch.compile."""
    if topk_ids.dtype not in (torch.int32, torch.int64) or not topk_ids.is_contiguous():
        raise ValueError(f"topk_ids is {topk_ids.dtype}, contiguous={topk_ids.is_contiguous()}:"
                         " expected contiguous int32 or int64")
    if (counts.dtype != torch.int32 or counts.dim() != 1 or counts.shape[0] < 2
            or not counts.is_contiguous() or counts.device != topk_ids.device):
        raise ValueError(f"counts is {counts.dtype} {tuple(counts.shape)} on {counts.device}: "
                         f"expected a contiguous int32 [E + 1] on {topk_ids.device}")
    if torch.compiler.is_compiling() or (topk_ids.device.type == "cpu" and not _INTERPRETED):
        count_routing_reference(topk_ids, counts)
        return
    num_ids = topk_ids.numel()
    if num_ids == 0:
        return
    device = topk_ids.device
    with torch.cuda.device(device.index if device.type == "cuda" else -1):
        _count_routing_kernel[(triton.cdiv(num_ids, _ROUTE_BLOCK),)](
            topk_ids, counts, num_ids, counts.shape[0] - 1, BLOCK=_ROUTE_BLOCK)
