"""CPU/GPU hybrid for offloaded experts (issue 18): per layer and step, the CPU computes a share
of the routed offloaded experts from their managed pages, in place (moe_uvm/kernels/cpu_experts.c),
while the GPU reads the rest over PCIe in the fused kernel; the CPU's weighted sum is added to
the GPU's.

Measured first on the H200 host (benchmarks/results/h200/hybrid_ceiling.json): GPU read-through
alone 51.4 GB/s; the CPU kernel alone 51 GB/s on 15 threads at batch 1; both at once 51.3 + 45.5
GB/s. With all 16 threads the CPU side collapses (14 GB/s: the thread driving the GPU has no
core), so the default leaves one core free.

One step of a layer (`CpuShare.__call__`, eager):
1. the routing, weights and token rows go to pinned host buffers; one sync;
2. the split (`split_offloaded`): the offloaded experts with the fewest tokens go to the CPU,
   as many as make both sides finish together under the current per-expert costs;
3. the GPU's ids are copied and its kernel launched (asynchronously), then the calling thread
   computes the CPU share (the OpenMP team's master; ctypes drops the GIL) while the GPU runs.
   An earlier version handed the CPU share to a worker thread first: the worker then waited
   for the GIL while this thread launched the GPU kernel, about 0.5 ms per layer on the H200
   host, which lost every batch-1 step;
4. the CPU's fp32 sum goes back through a pinned buffer and is added to the GPU's output in
   one kernel.
The per-expert costs start from measured bandwidths and follow what each step observes (the
CPU side's wall time; the GPU kernel's CUDA-event time, read at the next step's sync), so the
split tracks the machine under the real concurrency rather than a calibration run's caches.

It does not run inside a CUDA graph (the split needs each layer's routing on the host): under
capture the layer runs the GPU kernel alone. Accumulation order differs from the GPU-only path
(the CPU's fp32 sum is added to the GPU's bf16 output in fp32 and rounded once), so outputs
agree within bf16 rounding, not bitwise; the bitwise promises hold with the hybrid off, the
default."""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from moe_uvm import uvm
from moe_uvm.config import CPU_EXPERTS_MODES
from moe_uvm.kernels import fused_moe
from moe_uvm.kernels.cpu_experts import GroupedExperts

_EMA = 0.25  # weight of each new observation in the per-expert costs


def default_threads() -> int:
    """CPU threads of the hybrid: every core but one, which drives the GPU (with all of them,
    the CPU side collapses on the H200 host: 14 against 51 GB/s)."""
    return max(1, (os.cpu_count() or 2) - 1)


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


@dataclass
class ExpertCosts:
    """Per-expert times the split balances, in microseconds. GPU: one offloaded expert read
    through PCIe (its token count hardly matters at decode sizes). CPU: one expert streamed
    from DRAM plus `cpu_pair_us` per routed (token, expert) pair. Fixed: each side's cost per
    layer and step whatever its share (kernel launch and tail; OpenMP wake-up,
    the copies)."""

    gpu_expert_us: float
    cpu_expert_us: float
    cpu_pair_us: float = 0.0
    gpu_fixed_us: float = 15.0
    cpu_fixed_us: float = 40.0

    @classmethod
    def from_bandwidths(cls, expert_nbytes: int, gpu_gbps: float, cpu_gbps: float,
                        **fixed) -> ExpertCosts:
        if gpu_gbps <= 0 or cpu_gbps <= 0:
            raise ValueError(f"bandwidths must be > 0 GB/s; got gpu {gpu_gbps}, cpu {cpu_gbps}")
        return cls(expert_nbytes / gpu_gbps / 1e3, expert_nbytes / cpu_gbps / 1e3, **fixed)

    def check(self) -> None:
        values = dict(gpu_expert_us=self.gpu_expert_us, cpu_expert_us=self.cpu_expert_us,
                      cpu_pair_us=self.cpu_pair_us, gpu_fixed_us=self.gpu_fixed_us,
                      cpu_fixed_us=self.cpu_fixed_us)
        bad = {k: v for k, v in values.items() if not (np.isfinite(v) and v >= 0)}
        if bad or self.gpu_expert_us == 0 or self.cpu_expert_us == 0:
            raise ValueError(f"expert costs must be finite, >= 0, and the per-expert times > 0; "
                             f"got {values}")


def split_offloaded(tokens_per_expert: dict[int, int], costs: ExpertCosts) -> list[int]:
    """The offloaded experts the CPU takes: those with the fewest tokens (the CPU's cost grows
    with tokens, the GPU's read-through hardly does), ties by id, as many as minimise
    max(GPU fixed + GPU experts' time, CPU fixed + CPU experts' time). Empty when the CPU would
    not shorten the step."""
    order = sorted(tokens_per_expert, key=lambda e: (tokens_per_expert[e], e))
    m = len(order)
    best_n = 0
    best = costs.gpu_fixed_us + m * costs.gpu_expert_us if m else 0.0
    cpu = costs.cpu_fixed_us
    for n in range(1, m + 1):
        cpu += costs.cpu_expert_us + costs.cpu_pair_us * tokens_per_expert[order[n - 1]]
        gpu = costs.gpu_fixed_us + (m - n) * costs.gpu_expert_us if n < m else 0.0
        if max(gpu, cpu) < best:
            best_n, best = n, max(gpu, cpu)
    return sorted(order[:best_n])


def _predicted(offloaded: float, tokens_per_expert: float,
               costs: ExpertCosts) -> tuple[float, float, int]:
    """`predicted_layer_us` and the number of experts the split gives the CPU."""
    m = int(round(offloaded))
    if m <= 0:
        return 0.0, 0.0, 0
    gpu_only = costs.gpu_fixed_us + m * costs.gpu_expert_us
    n = len(split_offloaded(dict.fromkeys(range(m), tokens_per_expert), costs))
    if n == 0:
        return gpu_only, gpu_only, 0
    cpu = costs.cpu_fixed_us + n * (costs.cpu_expert_us + costs.cpu_pair_us * tokens_per_expert)
    gpu = costs.gpu_fixed_us + (m - n) * costs.gpu_expert_us if n < m else 0.0
    return gpu_only, max(gpu, cpu), n


def predicted_layer_us(offloaded: float, tokens_per_expert: float,
                       costs: ExpertCosts) -> tuple[float, float]:
    """(GPU-only, hybrid) predicted time of a layer's offloaded experts, microseconds: `offloaded`
    experts (rounded) with `tokens_per_expert` tokens each, the hybrid split as
    `split_offloaded` makes it. (0, 0) with nothing offloaded."""
    return _predicted(offloaded, tokens_per_expert, costs)[:2]


def choose_cpu_experts(mode: str, *, offloaded_per_layer: float, tokens_per_expert: float,
                       costs: ExpertCosts, measured_ms: tuple[float, float] | None = None,
                       margin: float = 0.05) -> tuple[bool, str]:
    """Whether the hybrid runs, and why. off / on decide by themselves. auto: off with nothing
    offloaded, or where the cost model predicts less than `margin` gain; else, given
    `measured_ms` = (GPU-only, hybrid) step times, on only where the hybrid measured at least
    `margin` faster; without a measurement, on where predicted (measure before committing)."""
    if mode not in CPU_EXPERTS_MODES:
        raise ValueError(f"cpu_experts must be one of {', '.join(CPU_EXPERTS_MODES)}; "
                         f"got {mode!r}")
    if mode != "auto":
        return mode == "on", f"cpu_experts={mode!r}"
    if offloaded_per_layer < 0.5:
        return False, "no offloaded experts to share"
    gpu_only, hybrid = predicted_layer_us(offloaded_per_layer, tokens_per_expert, costs)
    if hybrid > gpu_only * (1 - margin):
        return False, (f"predicted {hybrid:.0f} us a layer against {gpu_only:.0f} GPU-only: "
                       "not faster")
    if measured_ms is None:
        return True, f"predicted {hybrid:.0f} us a layer against {gpu_only:.0f} GPU-only"
    gpu_ms, hybrid_ms = measured_ms
    faster = hybrid_ms < gpu_ms * (1 - margin)
    return faster, (f"measured {hybrid_ms:.2f} ms a step against {gpu_ms:.2f} GPU-only: "
                    f"{'faster' if faster else 'not faster'}")


def group_pairs(ids: np.ndarray, on_cpu: np.ndarray, weights: np.ndarray,
                top_k: int) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """The CPU's pairs in the layout GroupedExperts takes, from flat [T*k] routing: (experts
    ascending, offsets, tokens, weights as float32), and the GPU's flat ids with the CPU's
    pairs turned into padding (-1)."""
    pairs = np.flatnonzero(on_cpu)
    order = pairs[np.argsort(ids[pairs], kind="stable")]  # pairs grouped by expert
    experts, counts = np.unique(ids[order], return_counts=True)
    offsets = np.zeros(len(experts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    groups = (experts.astype(np.int64), offsets, (order // top_k).astype(np.int64),
              weights[order].astype(np.float32))
    return groups, np.where(on_cpu, -1, ids)


@dataclass
class HybridStats:
    steps: int = 0
    cpu_experts: int = 0
    gpu_offloaded_experts: int = 0
    cpu_ms: list[float] = field(default_factory=list)
    """Wall time of the CPU side of each split step (hand-off to done)."""

    def summary(self) -> dict:
        total = self.cpu_experts + self.gpu_offloaded_experts
        return dict(steps=self.steps, cpu_experts=self.cpu_experts,
                    gpu_offloaded_experts=self.gpu_offloaded_experts,
                    cpu_share=self.cpu_experts / total if total else 0.0,
                    cpu_ms_median=float(np.median(self.cpu_ms)) if self.cpu_ms else 0.0)


class _Buffers:
    """Pinned host buffers and device buffers of one batch size (decode reuses them)."""

    def __init__(self, tokens: int, top_k: int, hidden: int, intermediate: int,
                 dtype: torch.dtype, ids_dtype: torch.dtype, device: torch.device) -> None:
        pin = dict(pin_memory=True)
        self.shape = (tokens, top_k, dtype, ids_dtype)
        self.x = torch.empty(tokens, hidden, dtype=dtype, **pin)
        self.x32 = torch.empty(tokens, hidden, dtype=torch.float32)
        self.ids = torch.empty(tokens, top_k, dtype=ids_dtype, **pin)
        self.weights = torch.empty(tokens, top_k, dtype=torch.float32, **pin)
        self.gpu_ids = torch.empty(tokens, top_k, dtype=ids_dtype, **pin)
        self.out = torch.empty(tokens, hidden, dtype=torch.float32, **pin)
        self.gate_up = torch.empty(tokens * top_k, 2 * intermediate, dtype=torch.float32)
        self.gpu_ids_dev = torch.empty(tokens, top_k, dtype=ids_dtype, device=device)
        self.out_dev = torch.empty(tokens, hidden, dtype=torch.float32, device=device)
        self.ready = torch.cuda.Event()
        self.gpu_start = torch.cuda.Event(enable_timing=True)
        self.gpu_end = torch.cuda.Event(enable_timing=True)


class CpuShare:
    """The hybrid for one MoE layer whose experts live in a managed store: call it as
    `share(hidden, topk_weights, topk_ids)` in place of `fused_moe` (eager). `resident_ids`
    gives the layer's resident experts now (e.g. `lambda: manager.resident_ids(layer)`);
    `costs` the per-expert costs the split starts from (ExpertCosts.from_bandwidths with the
    machine's read-through and CPU-kernel bandwidths); `adapt`: follow the observed times."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor,
                 resident_ids: Callable[[], Iterable[int]], *, costs: ExpertCosts,
                 quant: dict | None = None, threads: int | None = None,
                 adapt: bool = True) -> None:
        costs.check()
        self.w13, self.w2 = w13, w2
        self.quant = dict(quant or {})
        host_quant = {k: v.cpu() if torch.is_tensor(v) else v for k, v in self.quant.items()}
        self.kernel = GroupedExperts(host_alias(w13), host_alias(w2), **host_quant)
        self.resident_ids = resident_ids
        self.num_experts = w13.shape[0]
        self.costs = costs
        self.adapt = adapt
        self.threads = default_threads() if threads is None else int(threads)
        if self.threads < 1:
            raise ValueError(f"threads={threads}: must be >= 1")
        self.stats = HybridStats()
        self._buffers: _Buffers | None = None
        self._pending_gpu: tuple[_Buffers, int] | None = None  # event timing to read next step

    def _get_buffers(self, hidden: torch.Tensor, topk_ids: torch.Tensor) -> _Buffers:
        shape = (hidden.shape[0], topk_ids.shape[1], hidden.dtype, topk_ids.dtype)
        if self._buffers is None or self._buffers.shape != shape:
            self._buffers = _Buffers(shape[0], shape[1], self.w13.shape[2], self.w2.shape[2],
                                     hidden.dtype, topk_ids.dtype, hidden.device)
            self._pending_gpu = None
        return self._buffers

    def _observe_gpu(self) -> None:
        """Fold the previous split step's GPU kernel time (now complete) into the costs."""
        if self._pending_gpu is None:
            return
        buffers, experts = self._pending_gpu
        self._pending_gpu = None
        us = buffers.gpu_start.elapsed_time(buffers.gpu_end) * 1e3
        per_expert = (us - self.costs.gpu_fixed_us) / experts
        if per_expert > 0:
            self.costs.gpu_expert_us += _EMA * (per_expert - self.costs.gpu_expert_us)

    def _observe_cpu(self, seconds: float, experts: int, pairs: int) -> None:
        us = seconds * 1e6 - self.costs.cpu_fixed_us - self.costs.cpu_pair_us * pairs
        per_expert = us / experts
        if per_expert > 0:
            self.costs.cpu_expert_us += _EMA * (per_expert - self.costs.cpu_expert_us)

    def _run_cpu(self, buffers: _Buffers, experts, offsets, tokens, weights) -> float:
        start = time.perf_counter()
        buffers.x32.copy_(buffers.x)
        buffers.out.zero_()
        self.kernel(buffers.x32, experts, offsets, tokens, weights, buffers.gate_up,
                    buffers.out, self.threads)
        return time.perf_counter() - start

    def __call__(self, hidden: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor) -> torch.Tensor:
        if torch.cuda.is_current_stream_capturing():
            return fused_moe(hidden, self.w13, self.w2, topk_weights, topk_ids, **self.quant)
        b = self._get_buffers(hidden, topk_ids)
        # One sync: the routing, weights and rows in pinned buffers.
        b.ids.copy_(topk_ids, non_blocking=True)
        b.weights.copy_(topk_weights, non_blocking=True)
        b.x.copy_(hidden, non_blocking=True)
        b.ready.record()
        b.ready.synchronize()
        if self.adapt:
            self._observe_gpu()
        num_experts = self.num_experts
        ids = b.ids.numpy().reshape(-1).astype(np.int64)
        cpu_side = np.ones(num_experts + 1, bool)  # index num_experts: padding, never the CPU's
        cpu_side[num_experts] = False
        cpu_side[list(self.resident_ids())] = False
        slot = np.where((ids >= 0) & (ids < num_experts), ids, num_experts)
        experts, counts = np.unique(slot[cpu_side[slot]], return_counts=True)
        cpu_set = split_offloaded(dict(zip(experts.tolist(), counts.tolist(), strict=True)),
                                  self.costs)
        self.stats.steps += 1
        self.stats.cpu_experts += len(cpu_set)
        self.stats.gpu_offloaded_experts += len(experts) - len(cpu_set)
        if not cpu_set:
            return fused_moe(hidden, self.w13, self.w2, topk_weights, topk_ids, **self.quant)
        cpu_side[:] = False
        cpu_side[cpu_set] = True
        groups, gpu_ids = group_pairs(ids, cpu_side[slot], b.weights.numpy().reshape(-1),
                                     topk_ids.shape[1])
        group_ids, offsets, tokens, weights = groups
        # The GPU's share first (the CPU's pairs are padding there): its launch returns at
        # once, then this thread computes the CPU's share while the kernel runs.
        b.gpu_ids.numpy().reshape(-1)[:] = gpu_ids
        b.gpu_ids_dev.copy_(b.gpu_ids, non_blocking=True)  # (a few bytes: even if unused)
        gpu_experts = len(experts) - len(cpu_set)
        out = None
        if (gpu_ids >= 0).any():  # else the CPU has every routed pair: no GPU kernel
            if self.adapt and gpu_experts:
                b.gpu_start.record()
            out = fused_moe(hidden, self.w13, self.w2, topk_weights, b.gpu_ids_dev, **self.quant)
            if self.adapt and gpu_experts:
                b.gpu_end.record()
                self._pending_gpu = (b, gpu_experts)
        seconds = self._run_cpu(b, group_ids, offsets, tokens, weights)
        self.stats.cpu_ms.append(seconds * 1e3)
        if self.adapt:
            self._observe_cpu(seconds, len(cpu_set), len(tokens))
        b.out_dev.copy_(b.out, non_blocking=True)
        if out is None:
            return b.out_dev.to(hidden.dtype)
        # In fp32, rounded once to the output's dtype (one kernel).
        return out.add_(b.out_dev)


def calibrate_cpu_us(kernel: GroupedExperts, threads: int, experts_per_call: int = 8,
                     calls: int = 5, seed: int = 0) -> tuple[float, float]:
    """(microseconds per expert, per extra (token, expert) pair) of `kernel`: medians of
    `calls` calls at 1 and at 8 tokens per expert, on experts drawn at random from its pool
    for every call (cold in the caches, as in decode)."""
    rng = np.random.default_rng(seed)
    n = min(experts_per_call, kernel.num_experts)
    medians = []
    for per_expert in (1, 8):
        pairs = n * per_expert
        x = torch.randn(pairs, kernel.hidden)
        gate_up = torch.empty(pairs, 2 * kernel.intermediate)
        out = torch.zeros(pairs, kernel.hidden)
        offsets = np.arange(0, pairs + 1, per_expert, dtype=np.int64)
        tokens = np.arange(pairs, dtype=np.int64)
        weights = np.full(pairs, 1.0 / n, np.float32)
        times = []
        for _ in range(calls + 1):
            experts = np.sort(rng.choice(kernel.num_experts, n, replace=False)).astype(np.int64)
            start = time.perf_counter()
            kernel(x, experts, offsets, tokens, weights, gate_up, out, threads)
            times.append(time.perf_counter() - start)
        medians.append(float(np.median(times[1:])) * 1e6)
    pair_us = max(0.0, (medians[1] - medians[0]) / (7 * n))
    return medians[0] / n, pair_us


def measured_shares(layers: list[tuple[torch.Tensor, torch.Tensor, dict]],
                    resident_ids: Callable[[int], Iterable[int]], *, expert_nbytes: int,
                    read_through_gbps: float, threads: int | None = None) -> list[CpuShare]:
    """One CpuShare per (w13, w2, quant) of managed layers, all sharing one ExpertCosts: the GPU's
    per-expert time from `read_through_gbps`, the CPU's from its kernel on cold experts of the
    first layer (`calibrate_cpu_us`); both then follow the observed times.
    `resident_ids(layer)` gives a layer's resident experts now."""
    threads = default_threads() if threads is None else threads
    costs = ExpertCosts.from_bandwidths(expert_nbytes, read_through_gbps, 1.0)
    shares = [CpuShare(w13, w2, lambda i=i: resident_ids(i), costs=costs, quant=quant,
                       threads=threads) for i, (w13, w2, quant) in enumerate(layers)]
    costs.cpu_expert_us, costs.cpu_pair_us = calibrate_cpu_us(shares[0].kernel, threads)
    return shares


def attach_cpu_shares(manager, layers, config, *, has_slots: bool) -> tuple[bool, str]:
    """`config.cpu_experts` applied to an offload manager's layers (offload_experts calls it):
    each layer gets a CpuShare (`layer.cpu_share`), all sharing one ExpertCosts measured now
    (the read-through of 256 MB of managed memory; the CPU kernel on cold experts of layer 0),
    when the mode is on, or auto and the cost model predicts a decode step (one token) at least
    5% faster. Returns (on, why); `on` with no CUDA, no CPU kernel or a slot cache raises."""
    from moe_uvm import ceilings
    from moe_uvm.kernels import cpu_experts as cpu_kernel

    mode = config.cpu_experts
    if mode == "off":
        return False, "cpu_experts='off'"
    problem = None
    if not manager.is_managed:
        problem = "the experts are not in CUDA managed memory (no GPU)"
    elif has_slots:
        problem = "a slot cache serves the offloaded experts"
    else:
        built, why = cpu_kernel.available()
        if not built:
            problem = f"the CPU expert kernel is unavailable: {why}"
    if problem is not None:
        if mode == "on":
            raise ValueError(f"cpu_experts='on': {problem}")
        return False, problem
    num_experts, top_k = manager.num_experts, layers[0].top_k
    offloaded = top_k * float(np.mean([1 - len(manager.resident_ids(i)) / num_experts
                                       for i in range(len(layers))]))
    if mode == "auto" and offloaded < 0.5:
        return False, "no offloaded experts to share"
    first = layers[0]
    shares = measured_shares(
        [(m.w13_weight, m.w2_weight, m.quantization()) for m in layers], manager.resident_ids,
        expert_nbytes=first.w13_weight[0].nbytes + first.w2_weight[0].nbytes,
        read_through_gbps=ceilings.read_through_gbps(1 << 28), threads=config.cpu_threads)
    on, why = choose_cpu_experts(mode, offloaded_per_layer=offloaded, tokens_per_expert=1.0,
                                 costs=shares[0].costs)
    if on:
        for module, share in zip(layers, shares, strict=True):
            module.cpu_share = share
    return on, why


def measure_cpu_gbps(hidden: int, intermediate: int, threads: int | None = None,
                     pool_bytes: float = 2e9) -> float:
    """The CPU expert kernel's rate on this host, GB/s of bf16 expert bytes at one token per
    expert: random experts of the given sizes in ordinary host memory (at most `pool_bytes` of
    them, at least 2), drawn cold for each call. Measured alone: beside a GPU reading through
    PCIe the H200 host gave 15% less (README)."""
    threads = default_threads() if threads is None else threads
    expert_nbytes = 3 * hidden * intermediate * 2
    n = int(max(2, min(16, pool_bytes // expert_nbytes)))
    gen = torch.Generator().manual_seed(0)
    w13 = (torch.randn(n, 2 * intermediate, hidden, generator=gen) * hidden**-0.5).bfloat16()
    w2 = (torch.randn(n, hidden, intermediate, generator=gen) * intermediate**-0.5).bfloat16()
    us, _ = calibrate_cpu_us(GroupedExperts(w13, w2), threads, experts_per_call=min(8, n))
    return expert_nbytes / us / 1e3


def predict_hybrid(offloaded_per_layer: float, tokens_per_expert: float, expert_nbytes: int,
                   read_through_gbps: float, cpu_gbps: float, layers: int) -> dict:
    """What the hybrid saves a decode step over the GPU-only read-through of the same offloaded
    experts (`moe-uvm plan --cpu-gbps`): per-layer (GPU-only, hybrid) microseconds from
    `predicted_layer_us`, the CPU's experts, and the step's saving in ms over `layers`."""
    costs = ExpertCosts.from_bandwidths(expert_nbytes, read_through_gbps, cpu_gbps)
    gpu_only, hybrid, cpu = _predicted(offloaded_per_layer, tokens_per_expert, costs)
    return dict(gpu_only_layer_us=gpu_only, hybrid_layer_us=hybrid, cpu_experts_per_layer=cpu,
                offloaded_per_layer=offloaded_per_layer,
                saved_step_ms=(gpu_only - hybrid) * layers / 1e3)
