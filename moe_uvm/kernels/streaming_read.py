"""A pure streaming read: the kernel bandwidth ceilings are measured with (HBM, managed
read-through, mapped pinned host memory), so every path is read by the same code."""

import torch
import triton
import triton.language as tl


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # Each program sums ITERS consecutive blocks: a streaming read with one tiny write.
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    base = pid.to(tl.int64) * BLOCK * ITERS
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc))


def streaming_read(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-program partial sums of a flat CUDA tensor: reads every element exactly once."""
    block, iters = 4096, 16
    grid = triton.cdiv(x.numel(), block * iters)
    if out is None:
        out = torch.empty(grid, device=x.device, dtype=torch.float32)
    _read_kernel[(grid,)](x, out, x.numel(), BLOCK=block, ITERS=iters, num_warps=8)
    return out
