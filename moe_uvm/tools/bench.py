"""The end-to-end decode benchmark behind `moe-uvm bench`: L MoE layers of a real model shape
with random weights, routing replayed from a trace so every method reads the same experts, and
a sweep over resident counts comparing moe-uvm with the other ways to offload experts.

Methods (same weights, same routing, one process), each given the same GPU budget: X% of the
layers' expert bytes for resident experts, slots and caches:
  device       all experts in ordinary device memory (the upper bound)
  uva          that many experts per layer in device memory, the rest read in place from pinned
               host memory through its mapped address (zero-copy, vLLM's --cpu-offload-gb way)
  layer_split  whole layers' experts in device memory, the other layers' read in place over PCIe
               (llama.cpp's --n-cpu-moe split, with the GPU reading the offloaded experts);
               rounds to whole layers
  lru          a GPU cache of that many experts per layer filled on miss (mixtral-offloading's
               design), least recently used evicted
  freq_lru     the same cache evicting llama.cpp's way (lowest decayed-frequency class, then
               least recently used; counts' half-life 128 tokens)
  first_n      moe-uvm, experts 0..n-1 resident (ExpertOffloadConfig's default selection)
  profile      moe-uvm, per-layer most-used experts from a profile calibrated on other sequences
  global       moe-uvm, the same total resident count split across layers by the profile
  auto         moe-uvm, the split moe_uvm.autosplit plans for the budget (resident experts,
               slots, eviction, prefetch) from calibration routing and this machine's costs
  cacheS / speculativeS / frequencyS
               moe-uvm, `profile` residency plus S GPU slots per layer caching offloaded experts
               (fill-on-read), with no / speculative / frequency prefetch
  hybrid       (not a method: `--cpu-experts auto|on`, the default auto) moe-uvm, `profile`
               residency with the CPU computing a share of each layer's offloaded experts
               from their pages (moe_uvm.hybrid)
Every method runs as a captured CUDA graph; caches run on moe_uvm.slots' device-side
planners, and the hybrid's split, hand-off to the CPU (a doorbell word or a host node) and
final add are in the graph, so no method syncs with the host inside a step.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from moe_uvm import ceilings, uvm
from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.hybrid import DEFAULT_SIGNAL, CpuShare, measured_shares
from moe_uvm.kernels import fp8, fused_moe
from moe_uvm.manager import ExpertOffloadManager
from moe_uvm.policies.residency import ResidentBudget, frequency, select_resident
from moe_uvm.profile import Profile
from moe_uvm.slots import SlotCache
from moe_uvm.store import TENSOR_ALIGNMENT, ManagedExpertStore
from moe_uvm.trace import RoutingTrace

METHODS = ("device", "uva", "layer_split", "lru", "freq_lru", "first_n", "profile", "global",
           "auto")
DEFAULT_METHODS = tuple(m for m in METHODS if m != "global")
MANAGED = ("first_n", "profile", "global")
CACHES = ("lru", "freq_lru")
FP8_BENCH_BLOCK = (128, 128)


@dataclass(frozen=True)
class Workload:
    """What every method shares: shape, weights (device copies), and the evaluation routing."""

    num_layers: int
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    dtype: torch.dtype
    device: torch.device
    w13: list[torch.Tensor]
    w2: list[torch.Tensor]
    eval_trace: RoutingTrace
    profile: Profile
    calibration: RoutingTrace
    seed: int = 0
    quant: list[dict] = field(default_factory=list)
    """Per layer, fused_moe's FP8 arguments (scales on the device, block_shape); empty for
    16/32-bit weights."""
    expert_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        # Bytes the kernels read per expert: the weights' real dtype (FP8 or dtype). The FP8
        # scales (~1 KB an expert at 128 x 128 blocks) stay on the GPU and are not counted.
        item = (self.w13[0] if self.w13 else torch.empty((), dtype=self.dtype)).element_size()
        object.__setattr__(self, "expert_bytes", 3 * self.hidden * self.intermediate * item)

    def layer_quant(self, layer: int) -> dict:
        return self.quant[layer] if self.quant else {}

    def routing(self, batch: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [steps, L, B, k] int32 and weights [steps, L, B, k] fp32 on the device: step s
        is tokens s*B..(s+1)*B-1 of the evaluation sequences at every layer."""
        ids = self.eval_trace.topk_ids[:, : steps * batch].astype(np.int32)
        ids = ids.reshape(self.num_layers, steps, batch, self.top_k).transpose(1, 0, 2, 3)
        gen = torch.Generator().manual_seed(self.seed + batch)
        weights = torch.rand(ids.shape, generator=gen) + 0.1
        weights = weights / weights.sum(-1, keepdim=True)
        return (torch.from_numpy(np.ascontiguousarray(ids)).to(self.device),
                weights.to(self.device))


def check_workload(trace: RoutingTrace, num_layers: int, calibrate_sequences: int) -> None:
    """Refuse more layers than the trace has, or a calibration split leaving no sequence on
    one side."""
    if not 0 < calibrate_sequences < trace.num_sequences:
        raise ValueError(
            f"calibrate sequences must leave sequences on both sides: allowed 1 to "
            f"{trace.num_sequences - 1} of the trace's {trace.num_sequences}, got "
            f"{calibrate_sequences}"
        )
    if not 1 <= num_layers <= trace.num_layers:
        raise ValueError(f"layers must be in [1, {trace.num_layers}] (the trace's MoE layers), "
                         f"got {num_layers}")


def build_workload(
    trace: RoutingTrace, *, num_layers: int, hidden: int, intermediate: int,
    calibrate_sequences: int, dtype: torch.dtype, device: torch.device, seed: int = 0,
    weight_dtype: str = "bf16",
) -> Workload:
    """Random weights (never zeros) and the calibration/evaluation split of the trace.
    weight_dtype "fp8": the same draws quantised to e4m3 with 128 x 128 block scales (the FP8
    checkpoints' layout); activations stay in `dtype`."""
    check_workload(trace, num_layers, calibrate_sequences)
    layers = RoutingTrace(trace.topk_ids[:num_layers], trace.num_experts, trace.top_k,
                          trace.seq_starts, None)
    cal = layers.sequences(0, calibrate_sequences)
    gen = torch.Generator(device=device).manual_seed(seed)
    E = trace.num_experts
    w13 = [(torch.randn(E, 2 * intermediate, hidden, device=device, generator=gen)
            * hidden**-0.5).to(dtype) for _ in range(num_layers)]
    w2 = [(torch.randn(E, hidden, intermediate, device=device, generator=gen)
           * intermediate**-0.5).to(dtype) for _ in range(num_layers)]
    quant = []
    if weight_dtype == "fp8":
        block = FP8_BENCH_BLOCK
        for layer in range(num_layers):
            w13[layer], s13 = fp8.quantize(w13[layer], block, halves=2)
            w2[layer], s2 = fp8.quantize(w2[layer], block)
            quant.append(dict(w13_scale=s13, w2_scale=s2, block_shape=block))
    elif weight_dtype != "bf16":
        raise ValueError(f"weight_dtype must be bf16 or fp8, got {weight_dtype!r}")
    return Workload(num_layers, E, trace.top_k, hidden, intermediate, dtype, device, w13, w2,
                    layers.sequences(calibrate_sequences, None),
                    Profile.from_trace(cal, cooccurrence=True), cal, seed, quant)


@dataclass
class LayerWeights:
    """What one layer's kernel call reads (the slot arguments of `fused_moe`)."""

    w13: torch.Tensor
    w2: torch.Tensor
    expert_slot: torch.Tensor | None = None
    w13_slots: torch.Tensor | None = None
    w2_slots: torch.Tensor | None = None
    quant: dict = field(default_factory=dict)  # FP8 scales (always on the GPU), block_shape


def decode_step(h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                layers: list[LayerWeights], reduce=None) -> torch.Tensor:
    """HOT PATH: one decode step over all MoE layers (residual stream through each); `reduce`
    (expert parallelism): applied to each layer's output before the add (the ranks' sum)."""
    for layer, w in enumerate(layers):
        out = fused_moe(h, w.w13, w.w2, weights[layer], ids[layer], expert_slot=w.expert_slot,
                        w13_slots=w.w13_slots, w2_slots=w.w2_slots, **w.quant)
        h = h + (out if reduce is None else reduce(out))
    return h


class Timer:
    """Per-step times: CUDA events on a GPU, the host clock on the CPU path."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, start) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.marks.append((start, end))
        else:
            self.marks.append((start, time.perf_counter()))

    def median_ms(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return statistics.median(s.elapsed_time(e) for s, e in self.marks)
        return statistics.median((e - s) * 1e3 for s, e in self.marks)


def decode_step_cached(h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                       layers: list[LayerWeights], cache: SlotCache) -> torch.Tensor:
    """HOT PATH: `decode_step` with the slot cache's hooks around each layer's kernel."""
    for layer, w in enumerate(layers):
        slots = cache.before_layer(layer, ids[layer], h)
        h = h + fused_moe(h, w.w13, w.w2, weights[layer], ids[layer], **slots, **w.quant)
        cache.after_layer(layer, slots["fill_slot"])
    return h


def run_captured(work: Workload, layers: list[LayerWeights], ids: torch.Tensor,
                 weights: torch.Tensor, h0: torch.Tensor, cache: SlotCache | None = None,
                 warmup: int = 0, reduce=None, step_fn=None) -> tuple[float, torch.Tensor]:
    """Median step time of a CUDA-graph-captured decode step (eager on the CPU path) over the
    routing steps after the first `warmup` (replayed untimed, so caches and policies settle),
    and the first timed step's output for the equality check. With a slot cache, it starts
    empty and its counters cover the timed steps only. `reduce`: decode_step's (no cache);
    `step_fn(h, ids, weights, layers)`: another step in decode_step's place (no cache)."""
    static_ids, static_w, static_h = ids[0].clone(), weights[0].clone(), h0.clone()

    def body():
        if step_fn is not None:
            return step_fn(static_h, static_ids, static_w, layers)
        if cache is None:
            return decode_step(static_h, static_ids, static_w, layers, reduce)
        return decode_step_cached(static_h, static_ids, static_w, layers, cache)

    if cache is not None:
        cache.reset()
    if work.device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = body()
        step = graph.replay
    else:
        static_out = None

        def step():
            nonlocal static_out
            static_out = body()

    if cache is not None:
        cache.reset()
    timer, first = Timer(work.device), None
    for s in range(ids.shape[0]):
        static_ids.copy_(ids[s])
        static_w.copy_(weights[s])
        if s == warmup and cache is not None:
            cache.stats.reset()
            cache.copies.zero_()
        if s < warmup:
            step()
            continue
        start = timer.start()
        step()
        timer.stop(start)
        if s == warmup:
            first = static_out.clone()
    return timer.median_ms(), first


def hybrid_shares(work: Workload, manager: ExpertOffloadManager, managed: list[LayerWeights],
                  threads: int | None = None, signal: str = DEFAULT_SIGNAL) -> list[CpuShare]:
    """`measured_shares` over the managed layers, with the read-through measured now."""
    return measured_shares([(w.w13, w.w2, w.quant) for w in managed], manager.resident_ids,
                           expert_nbytes=work.expert_bytes,
                           read_through_gbps=ceilings.read_through_gbps(), top_k=work.top_k,
                           threads=threads, signal=signal)


def run_hybrid(shares: list[CpuShare], ids: torch.Tensor, weights: torch.Tensor,
               h0: torch.Tensor, warmup: int = 0, graph: bool = True) -> tuple[float, torch.Tensor]:
    """`run_captured` for the hybrid: median time of a step over the steps after `warmup`, and
    the first timed step's output. `graph`: the step captured in a CUDA graph (the hybrid's
    host functions become host nodes), else enqueued eagerly; wall time of each step, which
    ends in a sync. The shares' stats cover the timed steps."""
    static_ids, static_w, static_h = ids[0].clone(), weights[0].clone(), h0.clone()

    def body():
        h = static_h
        for layer, share in enumerate(shares):
            h = h + share(h, static_w[layer], static_ids[layer])
        return h

    body()  # allocates the shares' pinned buffers for this batch size
    torch.cuda.synchronize()
    static_out, replay = None, None
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_out = body()
        replay = g.replay
    times, first = [], None
    for s in range(ids.shape[0]):
        static_ids.copy_(ids[s])
        static_w.copy_(weights[s])
        if s == warmup:
            for share in shares:
                share.reset_stats()
        start = time.perf_counter()
        if graph:
            replay()
        else:
            static_out = body()
        torch.cuda.synchronize()
        if s >= warmup:
            times.append(time.perf_counter() - start)
        if s == warmup:
            first = static_out.clone()
    return statistics.median(times) * 1e3, first


def hybrid_layer_error(shares: list[CpuShare], layers: list[LayerWeights], h0: torch.Tensor,
                       ids: torch.Tensor, weights: torch.Tensor) -> float:
    """The largest ||hybrid - GPU-only|| / ||GPU-only|| over the layers of one step, each layer
    given the GPU-only step's input. (Not the step's output: this harness's residual stream of
    random layers has no normalisation and grows many-fold over the layers, amplifying any
    rounding difference, bf16's own included.)"""
    h, worst = h0, 0.0
    for layer, (share, w) in enumerate(zip(shares, layers, strict=True)):
        ref = fused_moe(h, w.w13, w.w2, weights[layer], ids[layer], **w.quant)
        out = share(h, weights[layer], ids[layer])
        worst = max(worst, ((out.float() - ref.float()).norm() / ref.float().norm()).item())
        h = h + ref
    return worst


def managed_residency(work: Workload, policy: str, resident: int) -> list[list[int]]:
    """Per-layer resident ids for a moe-uvm policy at `resident` experts per layer."""
    L, E = work.num_layers, work.num_experts
    if policy == "first_n":
        return [list(range(resident)) for _ in range(L)]
    counts = work.profile.counts
    if policy == "profile":
        mask = frequency(counts, [resident] * L)
    elif policy == "global":
        mask = select_resident(counts, ResidentBudget(L, E, total=resident * L))
    else:
        raise ValueError(f"unknown moe-uvm policy {policy!r}")
    return [np.flatnonzero(row).tolist() for row in mask]


def managed_layers(work: Workload) -> tuple[ExpertOffloadManager, list[LayerWeights]]:
    """One managed store per layer (refused beyond free GPU memory), all offloaded at first;
    advice goes on before the weights are written so pages land on the host."""
    specs = {"w13": ((2 * work.intermediate, work.hidden), work.w13[0].dtype),
             "w2": ((work.hidden, work.intermediate), work.w2[0].dtype)}
    # CPU tensors take no advice: no need to align experts to the driver's 2 MiB blocks there.
    align = {} if work.device.type == "cuda" else {"alignment": TENSOR_ALIGNMENT}
    stores = [ManagedExpertStore(work.num_experts, specs, work.device, **align)
              for _ in range(work.num_layers)]
    manager = ExpertOffloadManager(stores, ExpertOffloadConfig(num_resident=0),
                                   top_k=work.top_k)
    for store, w13, w2 in zip(stores, work.w13, work.w2, strict=True):
        store["w13"].copy_(w13)
        store["w2"].copy_(w2)
    return manager, [LayerWeights(s["w13"], s["w2"], quant=work.layer_quant(i))
                     for i, s in enumerate(stores)]


def host_copies(work: Workload) -> tuple[list, list[LayerWeights]]:
    """Pinned host copies of every layer's experts and their mapped (zero-copy) GPU views."""
    host, mapped = [], []
    for layer, (w13, w2) in enumerate(zip(work.w13, work.w2, strict=True)):
        pin = work.device.type == "cuda"
        h13 = torch.empty(w13.shape, dtype=w13.dtype, pin_memory=pin)
        h2 = torch.empty(w2.shape, dtype=w2.dtype, pin_memory=pin)
        h13.copy_(w13)
        h2.copy_(w2)
        host.append((h13, h2))
        if pin:
            mapped.append(LayerWeights(uvm.mapped_host_view(h13), uvm.mapped_host_view(h2),
                                       quant=work.layer_quant(layer)))
        else:
            mapped.append(LayerWeights(h13, h2, quant=work.layer_quant(layer)))
    return host, mapped
