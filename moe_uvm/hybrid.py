"""CPU/GPU hybrid for offloaded experts (issue 18, first part): per layer and step, the CPU
computes a share of the routed offloaded experts from their managed pages, in place
(kernels/cpu_experts.c), while the GPU reads the rest over PCIe in the fused kernel; the CPU's
weighted sum is added to the GPU's.

Measured first on the H200 host (benchmarks/results/h200/hybrid_ceiling.json): GPU read-through
alone 51.4 GB/s; the CPU kernel alone 51 GB/s on 15 threads at batch 1; both at once 51.3 + 45.5
GB/s. With all 16 threads the CPU side collapses (14 GB/s: the thread driving the GPU has no
core), so the default leaves one core free.

What this part does: eager steps (the split needs each layer's routing on the host, one sync
per layer, so it does not run inside a CUDA graph; piecewise capture around the CPU work is not
built yet), a split that equalises the two sides' predicted times from measured bandwidths,
and the host alias of managed tensors. Not yet: the `cpu_experts="auto"` config switch, the
planner's and `moe-uvm bench`'s accounting. Accumulation order differs from the GPU-only path
(CPU fp32 sum added to the GPU's bf16 output), so outputs agree within bf16 rounding, not
bitwise; the bitwise promises hold with the hybrid off, which is the default."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from moe_uvm import uvm
from moe_uvm.kernels import fused_moe
from moe_uvm.kernels.cpu_experts import cpu_experts


def host_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor over the same bytes as `tensor`, a CUDA tensor in managed memory (same
    dtype, shape and strides; no copy). The CPU reads pages advised to the host at DRAM speed.
    The managed allocation must outlive the alias; other device memory is refused (the CPU
    cannot read it)."""
    if tensor.device.type != "cuda":
        raise ValueError(f"host_alias takes a CUDA tensor in managed memory; got {tensor.device}")
    rt = uvm._runtime()
    attributes = uvm._check(rt.cudaPointerGetAttributes(tensor.data_ptr()),
                            "cudaPointerGetAttributes")
    if attributes.type != rt.cudaMemoryType.cudaMemoryTypeManaged:
        raise ValueError(f"host_alias: the tensor is in {attributes.type.name}, not managed "
                         "memory: the CPU cannot read it in place")
    elements = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(),
                                                                    strict=True))
    raw = (ctypes.c_char * (elements * tensor.element_size())).from_address(tensor.data_ptr())
    flat = torch.frombuffer(raw, dtype=torch.uint8).view(tensor.dtype)
    return flat.as_strided(tensor.shape, tensor.stride())


def split_offloaded(tokens_per_expert: dict[int, int], expert_nbytes: int, gpu_gbps: float,
                    cpu_gbps: float, cpu_fixed_s: float = 0.0) -> list[int]:
    """The offloaded experts the CPU takes: those with the fewest tokens (the CPU's cost grows
    with tokens, the GPU's read-through hardly does), ties by id, as many as minimise
    max(GPU time of the others, fixed CPU cost + CPU time of its share), each side's time its
    bytes over its bandwidth. Empty when the CPU would not shorten the step."""
    order = sorted(tokens_per_expert, key=lambda e: (tokens_per_expert[e], e))
    m = len(order)
    gpu_s = expert_nbytes / (gpu_gbps * 1e9)
    cpu_s = expert_nbytes / (cpu_gbps * 1e9)
    best_n, best = 0, m * gpu_s
    for n in range(1, m + 1):
        step = max((m - n) * gpu_s, cpu_fixed_s + n * cpu_s)
        if step < best:
            best_n, best = n, step
    return sorted(order[:best_n])


@dataclass
class HybridStats:
    steps: int = 0
    cpu_experts: int = 0
    gpu_offloaded_experts: int = 0


class CpuShare:
    """The hybrid for one MoE layer whose experts live in a managed store: call it as
    `share(hidden, topk_weights, topk_ids)` in place of `fused_moe` (eager). `resident_ids`
    gives the layer's resident experts now (e.g. `lambda: manager.resident_ids(layer)`);
    `gpu_gbps` / `cpu_gbps` are the read-through and CPU-kernel bandwidths the split uses,
    `cpu_fixed_us` the CPU side's fixed cost per layer (host copies, thread start)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor,
                 resident_ids: Callable[[], Iterable[int]], *, quant: dict | None = None,
                 gpu_gbps: float, cpu_gbps: float, cpu_fixed_us: float = 50.0,
                 threads: int | None = None) -> None:
        if gpu_gbps <= 0 or cpu_gbps <= 0 or cpu_fixed_us < 0:
            raise ValueError(f"need gpu_gbps, cpu_gbps > 0 and cpu_fixed_us >= 0; got "
                             f"{gpu_gbps}, {cpu_gbps}, {cpu_fixed_us}")
        self.w13, self.w2 = w13, w2
        self.host13, self.host2 = host_alias(w13), host_alias(w2)
        self.quant = dict(quant or {})
        self.host_quant = {k: v.cpu() if torch.is_tensor(v) else v for k, v in self.quant.items()}
        self.resident_ids = resident_ids
        self.num_experts = w13.shape[0]
        self.expert_nbytes = 3 * w13.shape[1] // 2 * w13.shape[2] * w13.element_size()
        self.gpu_gbps, self.cpu_gbps = gpu_gbps, cpu_gbps
        self.cpu_fixed_s = cpu_fixed_us * 1e-6
        self.threads = threads if threads is not None else max(1, (os.cpu_count() or 2) - 1)
        self.stats = HybridStats()

    def __call__(self, hidden: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor) -> torch.Tensor:
        # One sync: the routing, weights and rows on the host (pinned, copied together).
        ids_host = topk_ids.to("cpu", non_blocking=True)
        weights_host = topk_weights.to("cpu", non_blocking=True)
        x_host = hidden.to("cpu", non_blocking=True)
        torch.cuda.current_stream(hidden.device).synchronize()
        resident = np.zeros(self.num_experts, bool)
        resident[list(self.resident_ids())] = True
        ids = ids_host.numpy()
        routed = ids[(ids >= 0) & (ids < self.num_experts)]
        offloaded = routed[~resident[routed]]
        experts, counts = np.unique(offloaded, return_counts=True)
        cpu_set = split_offloaded(dict(zip(experts.tolist(), counts.tolist(), strict=True)),
                                  self.expert_nbytes, self.gpu_gbps, self.cpu_gbps,
                                  self.cpu_fixed_s)
        self.stats.steps += 1
        self.stats.cpu_experts += len(cpu_set)
        self.stats.gpu_offloaded_experts += len(experts) - len(cpu_set)
        if not cpu_set:
            return fused_moe(hidden, self.w13, self.w2, topk_weights, topk_ids, **self.quant)
        on_cpu = torch.from_numpy(np.isin(ids, cpu_set))
        # Plain (blocking) copies: a few bytes, and the stream is idle here.
        gpu_ids = torch.where(on_cpu, -1, ids_host).to(topk_ids.device)
        cpu_ids = torch.where(on_cpu, ids_host, -1)
        out = fused_moe(hidden, self.w13, self.w2, topk_weights, gpu_ids, **self.quant)
        # The kernel runs on the GPU while the CPU computes its share (ctypes drops the GIL).
        cpu_out = cpu_experts(x_host, self.host13, self.host2, weights_host, cpu_ids,
                              threads=self.threads, **self.host_quant)
        # This copy waits for the GPU's share, which it is added to.
        return (out.float() + cpu_out.to(hidden.device)).to(hidden.dtype)
