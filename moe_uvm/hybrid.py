"""CPU/GPU hybrid for offloaded experts (issue 18): per layer and step, the CPU computes a share
of the routed offloaded experts from their managed pages, in place (moe_uvm/kernels/cpu_experts.c),
while the GPU reads the rest over PCIe in the fused kernel; the CPU's weighted sum is added to
the GPU's.

Measured first on the H200 host (benchmarks/results/h200/hybrid_ceiling.json): GPU read-through
alone 51.4 GB/s; the CPU kernel alone 51 GB/s on 15 threads at batch 1; both at once 51.3 + 45.5
GB/s. With all 16 threads the CPU side collapses (14 GB/s: the thread driving the GPU has no
core), so the default leaves one core free.

A step of a layer (`CpuShare.__call__`) is enqueued, never waited on, so it runs the same
eagerly and inside a captured CUDA graph. A GPU kernel splits the routed offloaded experts
(kernels/hybrid_split.py, `split_offloaded`'s rule: the experts with the fewest tokens go to
the CPU, whole while its side stays shorter, then the leading intermediate columns of the next
that make both sides finish together under the current per-expert costs, the GPU computing
that expert's other columns) and writes the routing and the CPU's columns of each expert into
pinned host memory; the host computes the CPU's share while the GPU's kernel reads the rest;
the stream then adds the CPU's fp32 sum. The host
is asked in stream order, so the whole decode step, hybrid layers included, stays one CUDA
graph with no Python between layers, and the GPU never waits for the host before its kernel
(rather than piecewise graphs, which would return to Python at every layer). Two ways
(`signal`): a doorbell (a host thread spinning on a pinned word per layer, which the stream
writes and then waits on with stream memory operations: no driver thread, no interrupt), the
default where those operations work; or a CUDA host function (cuLaunchHostFunc; a host node in
a graph) on a side stream, which the driver's thread runs. (The first version synced the host
at each layer and split in Python: 190-320 us a layer on the H200 host, no graphs. A second
ran the split as a host node too: the GPU then waited for a host-thread wake-up before each
layer's kernel, 125-175 us a layer at batch 1 on an H100.)

The GPU's per-expert cost comes from the fused kernel on the layer's offloaded pages, timed
in a CUDA graph as decode runs it; the CPU's starts from its kernel on cold experts. With the
doorbell, the split then follows which side finished first: the stream also sets a second
word once its own kernel is done, the host reads it when its share is done, and the CPU's
per-expert cost goes up 2% if the GPU was first, down 2% if not (the layers of a model
share one set of costs, so a 24-layer token makes 24 such steps). That balances the sides
whatever the CPU's real time is made of (its fixed cost per call, a split expert's strided w2
rows, the GPU beside it), where a model of it fitted to the observed times drifted: with
small shares, the error in its fixed part swung the per-expert estimate, which shrank the
share further (an H100 run ended with 15% of the offloaded experts on the CPU at 50%
resident, batch 1, and 1.06x). With host nodes the CPU's estimate follows its observed wall
time (a share under one expert moves it in proportion; a step that gives the CPU nothing
moves an estimate above the starting one back toward it).

Accumulation order differs from the GPU-only path (the CPU's fp32 sum is added to the GPU's
bf16 output in fp32 and rounded once), so outputs agree within bf16 rounding, not bitwise; the
bitwise promises hold with the hybrid off, the default. With the costs fixed (adapt=False) the
split depends only on the routing, and a graph's replay equals the eager step bitwise."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from moe_uvm import uvm
from moe_uvm.config import CPU_EXPERTS_MODES
from moe_uvm.kernels import cpu_experts as cpu_kernel
from moe_uvm.kernels import fused_moe
from moe_uvm.kernels.cpu_experts import GroupedExperts
from moe_uvm.kernels.hybrid_split import COL_GRANULE, COSTS, split_on_device

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


def split_offloaded(tokens_per_expert: dict[int, int], costs: ExpertCosts, intermediate: int,
                    granule: int = COL_GRANULE) -> dict[int, int]:
    """The CPU's share of a layer's routed offloaded experts, as {expert: leading intermediate
    columns the CPU computes} (`intermediate` for a whole expert; the GPU computes the rest of
    a split one): the experts with the fewest tokens go first (the CPU's cost grows with
    tokens, the GPU's read-through hardly does), ties by id. Whole experts while the CPU's side
    stays no longer than the GPU's, then the columns of the next expert that make both sides
    finish together, rounded to `granule` columns (an expert's output is the sum over its
    intermediate columns, so it splits exactly; a layer with 3 offloaded experts is no longer
    cut 1 : 2). All to the CPU where that is quicker still (the GPU's side then costs nothing).
    Empty when the CPU would not shorten the step. kernels/hybrid_split.py computes the same on
    the GPU, in the same float64 operations."""
    order = sorted(tokens_per_expert, key=lambda e: (tokens_per_expert[e], e))
    m = len(order)
    if m == 0:
        return {}
    granule = min(granule, intermediate)
    g, c, p = costs.gpu_expert_us, costs.cpu_expert_us, costs.cpu_pair_us
    tokens = [float(tokens_per_expert[e]) for e in order] + [0.0]
    first = [0.0]  # tokens of the first i
    for t in tokens[:m]:
        first.append(first[-1] + t)

    def cpu_side(i: int) -> float:
        return costs.cpu_fixed_us + float(i) * c + p * first[i]

    def gpu_side(i: int) -> float:
        return costs.gpu_fixed_us + float(m - i) * g

    def step_us(n: int, cols: int) -> float:  # n whole experts and `cols` of the next
        frac = float(cols) / float(intermediate)
        cpu = cpu_side(n) + frac * (c + p * tokens[n])
        gpu = costs.gpu_fixed_us + (float(m - n) - frac) * g if n < m else 0.0
        return max(cpu, gpu)

    gpu_only = gpu_side(0)
    ok = [i for i in range(m + 1) if cpu_side(i) <= gpu_side(i)]  # a prefix: 0..n
    if not ok:
        return {}
    n, cols = len(ok) - 1, 0
    if n < m:
        f = (gpu_side(n) - cpu_side(n)) / (c + p * tokens[n] + g)
        cols = min(int(f * float(intermediate) / float(granule) + 0.5) * granule, intermediate)
    # The balance point rounded to a granule, then the whole-expert splits around it (rounding
    # can overshoot where one side is much slower) and everything on the CPU (the GPU's side
    # then costs nothing): the first quickest.
    candidates = [(n + 1, 0) if cols == intermediate else (n, cols), (n, 0),
                  (min(n + 1, m), 0), (m, 0)]
    best = min(candidates, key=lambda nc: step_us(*nc))  # min keeps the first of equals
    n, cols = best
    if (n == 0 and cols == 0) or step_us(n, cols) >= gpu_only:
        return {}
    share = dict.fromkeys(order[:n], intermediate)
    if cols:
        share[order[n]] = cols
    return dict(sorted(share.items()))


def cpu_share_experts(share: dict[int, int], intermediate: int) -> float:
    """The CPU's share in experts (a split expert counts its fraction)."""
    return sum(share.values()) / intermediate


_NOMINAL_COLUMNS = 1024  # the cost model's expert width where no layer is given: 1/16 steps


def _predicted(offloaded: float, tokens_per_expert: float,
               costs: ExpertCosts) -> tuple[float, float, float]:
    """`predicted_layer_us` and the CPU's share in experts the split gives it."""
    m = int(round(offloaded))
    if m <= 0:
        return 0.0, 0.0, 0.0
    gpu_only = costs.gpu_fixed_us + m * costs.gpu_expert_us
    share = split_offloaded(dict.fromkeys(range(m), tokens_per_expert), costs, _NOMINAL_COLUMNS)
    if not share:
        return gpu_only, gpu_only, 0.0
    x = cpu_share_experts(share, _NOMINAL_COLUMNS)
    cpu = costs.cpu_fixed_us + x * (costs.cpu_expert_us + costs.cpu_pair_us * tokens_per_expert)
    gpu = costs.gpu_fixed_us + (m - x) * costs.gpu_expert_us if x < m else 0.0
    return gpu_only, max(gpu, cpu), x


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
    """Totals over steps: the routed offloaded experts the CPU and the GPU computed, an expert
    split between them counting its fraction of the columns on each side."""

    steps: int = 0
    cpu_experts: float = 0.0
    gpu_offloaded_experts: float = 0.0
    cpu_ms: list[float] = field(default_factory=list)
    """Wall time of the CPU side of the last split steps (at most 256 a batch size)."""
    balanced: int = 0
    """Steps whose split was adapted by which side finished first (the doorbell's)."""
    gpu_first: int = 0
    """Of them, the steps in which the GPU's kernel finished before the CPU's share."""

    def summary(self) -> dict:
        total = self.cpu_experts + self.gpu_offloaded_experts
        return dict(steps=self.steps, cpu_experts=self.cpu_experts,
                    gpu_offloaded_experts=self.gpu_offloaded_experts,
                    cpu_share=self.cpu_experts / total if total else 0.0,
                    cpu_ms_median=float(np.median(self.cpu_ms)) if self.cpu_ms else 0.0,
                    # slow throughout, or slow spells: the spread of the CPU side's time
                    cpu_ms_p90=float(np.percentile(self.cpu_ms, 90)) if self.cpu_ms else 0.0,
                    gpu_first=self.gpu_first / self.balanced if self.balanced else None)


_RING = 256  # HYBRID_RING of cpu_experts.c
_P, _I64, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double


class _State(ctypes.Structure):
    """cpu_experts.c's HybridState, field for field (its size is checked against the C one)."""

    _fields_ = [(name, _I64) for name in ("tokens", "top_k", "num_experts", "hidden",
                                          "intermediate", "threads")]
    _fields_ += [("w13", _P), ("w2", _P), ("w13_stride", _I64), ("w2_stride", _I64),
                 ("w13_scale", _P), ("w2_scale", _P), ("scale_strides", _P)]
    _fields_ += [(name, _I64) for name in ("kind", "scale_kind", "block_n", "block_k")]
    _fields_ += [(name, _P) for name in ("ids", "weights", "x", "cols", "out", "resident",
                                         "costs", "gate_up", "experts", "expert_cols",
                                         "offsets", "pair_tokens", "pair_weights", "seen",
                                         "gpu_done")]
    _fields_ += [("ema", _F64), ("cpu_expert_start", _F64), ("m", _I64), ("pairs", _I64),
                 ("share", _F64), ("offloaded", _I64),
                 ("steps", _I64), ("cpu_experts", _F64), ("gpu_offloaded_experts", _F64),
                 ("timed", _I64), ("status", _I64), ("balanced", _I64), ("gpu_first", _I64)]
    _fields_ += [("cpu_us", _F64 * _RING)]


class HostStep:
    """The host side of one layer at one batch size: the pinned buffers the GPU writes the
    routing, token rows and split into (`ids`, `weights`, `x`, `cols`: the CPU's leading
    intermediate columns of each expert) and reads the CPU's sum
    and the costs from (`out`, `costs`), scratch, and the C state of the host function.
    `resident` is the layer's uint8 mask (1: the GPU's). Usable without a GPU (pin=False): the
    tests fill the inputs, run the split kernel under Triton's interpreter and call `compute`."""

    def __init__(self, kernel: GroupedExperts, tokens: int, top_k: int, resident: torch.Tensor,
                 costs: ExpertCosts, threads: int, adapt: bool, pin: bool,
                 shared_costs: torch.Tensor | None = None) -> None:
        lib = cpu_kernel.hybrid_library()
        if lib.moe_uvm_hybrid_state_size() != ctypes.sizeof(_State):
            raise cpu_kernel.CpuKernelUnavailable(
                f"the compiled hybrid state is {lib.moe_uvm_hybrid_state_size()} bytes, "
                f"hybrid.py's {ctypes.sizeof(_State)}: rebuild (clear the moe-uvm cache)")
        self.lib = lib
        pairs, hidden, inter, E = tokens * top_k, kernel.hidden, kernel.intermediate, \
            kernel.num_experts
        host = dict(pin_memory=pin)
        self.ids = torch.full((pairs,), -1, dtype=torch.int64, **host)
        self.weights = torch.zeros(pairs, dtype=torch.float32, **host)
        self.x = torch.zeros(tokens, hidden, dtype=torch.float32, **host)
        self.cols = torch.zeros(E, dtype=torch.int32, **host)
        self.out = torch.zeros(tokens, hidden, dtype=torch.float32, **host)
        if shared_costs is not None:  # another layer's, adapted by both (CpuShare's cost_pool)
            if shared_costs.dtype != torch.float64 or shared_costs.shape != (len(COSTS),):
                raise ValueError(f"shared_costs must be float64 of shape ({len(COSTS)},); got "
                                 f"{shared_costs.dtype} {tuple(shared_costs.shape)}")
            self.costs = shared_costs
        else:
            self.costs = torch.tensor([getattr(costs, name) for name in COSTS],
                                      dtype=torch.float64)
            self.costs = self.costs.pin_memory() if pin else self.costs
        i64 = dict(dtype=torch.int64)
        self.scratch = dict(gate_up=torch.empty(pairs, 2 * inter),
                            experts=torch.empty(min(pairs, E), **i64),
                            expert_cols=torch.empty(min(pairs, E), **i64),
                            offsets=torch.zeros(pairs + 1, **i64),
                            pair_tokens=torch.empty(pairs, **i64),
                            pair_weights=torch.empty(pairs),
                            seen=torch.empty(E, dtype=torch.uint8))
        self.resident = resident
        self.kernel = kernel  # the weights' aliases, kept alive
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        s = _State(tokens=tokens, top_k=top_k, num_experts=E, hidden=hidden,
                   intermediate=inter, threads=threads, w13=kernel.w13.data_ptr(),
                   w2=kernel.w2.data_ptr(), w13_stride=kernel.w13.stride(0),
                   w2_stride=kernel.w2.stride(0), w13_scale=ptr(kernel.w13_scale),
                   w2_scale=ptr(kernel.w2_scale), scale_strides=kernel.strides.data_ptr(),
                   kind=kernel.kind, scale_kind=kernel.scale_kind, block_n=kernel.bn,
                   block_k=kernel.bk, ids=self.ids.data_ptr(), weights=self.weights.data_ptr(),
                   x=self.x.data_ptr(), cols=self.cols.data_ptr(),
                   out=self.out.data_ptr(), resident=resident.data_ptr(),
                   costs=self.costs.data_ptr(), ema=_EMA if adapt else 0.0,
                   cpu_expert_start=costs.cpu_expert_us)
        for name, tensor in self.scratch.items():
            setattr(s, name, tensor.data_ptr())
        self.state = s
        self.address = ctypes.addressof(s)
        self.compute_fn = ctypes.cast(lib.moe_uvm_hybrid_compute, ctypes.c_void_p).value

    def compute(self) -> None:
        """The host function, called here (CPU tests; the GPU path enqueues it)."""
        self.lib.moe_uvm_hybrid_compute(self.address)
        self.check()

    def check(self) -> None:
        if self.state.status:
            raise MemoryError("cpu_experts: the CPU share's per-thread buffers could not be "
                              "allocated (a host node's step added nothing)")

    def groups(self) -> tuple[np.ndarray, ...]:
        """The last step's CPU pairs as group_pairs lays them out: (experts, offsets, tokens,
        weights)."""
        m, pairs = self.state.m, self.state.pairs
        sc = self.scratch
        return (sc["experts"][:m].numpy().copy(), sc["offsets"][:m + 1].numpy().copy(),
                sc["pair_tokens"][:pairs].numpy().copy(), sc["pair_weights"][:pairs].numpy().copy())

    def group_cols(self) -> np.ndarray:
        """The last step's columns of each of `groups`' experts."""
        return self.scratch["expert_cols"][:self.state.m].numpy().copy()

    def current_costs(self) -> ExpertCosts:
        return ExpertCosts(*self.costs.tolist())

    def stats(self) -> HybridStats:
        s = self.state
        timed = min(s.timed, _RING)
        return HybridStats(steps=s.steps, cpu_experts=s.cpu_experts,
                           gpu_offloaded_experts=s.gpu_offloaded_experts,
                           cpu_ms=[v / 1e3 for v in s.cpu_us[:timed]], balanced=s.balanced,
                           gpu_first=s.gpu_first)

    def reset_stats(self) -> None:
        s = self.state
        s.steps = s.cpu_experts = s.gpu_offloaded_experts = s.timed = 0
        s.balanced = s.gpu_first = 0


_side_streams: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream the CPU's host function goes on, beside the GPU's kernel (one per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


class Doorbell:
    """A host thread (cpu_experts.c's doorbell) that runs the layers' host functions when the
    GPU's stream asks, through pinned words and stream memory operations rather than host
    nodes: each registered HostStep has a word; the stream writes 1 into it
    (cuStreamWriteValue32, fenced after the layer's writes), the thread, spinning over the
    words, computes the layer and writes 2, and the stream waits for the 2
    (cuStreamWaitValue32) before it adds the CPU's sum. Usable without a GPU (the tests write
    the words from the host). CpuShare uses one per device, for the process's lifetime; `close`
    (or the object's collection) stops the thread, after which no graph may ask it."""

    CAPACITY = 8192  # layer-batch states
    SPIN_US = 20_000.0  # spin this long after each request, then poll
    REQUEST, DONE = 1, 2  # a word's values (0 until its first request)

    def __init__(self, device: int | None = None) -> None:
        self.lib = cpu_kernel.hybrid_library()
        pin = device is not None
        self.words = torch.zeros(self.CAPACITY, dtype=torch.int32, pin_memory=pin)
        self.words_device = uvm.mapped_host_view(self.words, device) if pin else None
        # a second word per state: the GPU's own kernel done (0 before it asks, 1 after), read
        # by the host when its share is done: which side was last, which adaptation balances
        self.gpu_words = torch.zeros(self.CAPACITY, dtype=torch.int32, pin_memory=pin)
        self.gpu_words_device = uvm.mapped_host_view(self.gpu_words, device) if pin else None
        self.handle = self.lib.moe_uvm_doorbell_start(self.words.data_ptr(), self.CAPACITY,
                                                      self.SPIN_US)
        if not self.handle:
            raise cpu_kernel.CpuKernelUnavailable("the hybrid's doorbell thread could not be "
                                                  "started (pthread_create failed)")
        self.states: list[HostStep] = []  # registered: kept alive while graphs can name them
        self._lock = threading.Lock()

    def register(self, host: HostStep) -> int:
        """The index of `host`'s words (their device addresses: word_address,
        gpu_word_address); `host` reads its GPU word when its share is done."""
        if not self.handle:
            raise RuntimeError("the doorbell is closed")
        with self._lock:
            index = self.lib.moe_uvm_doorbell_register(self.handle, host.address)
            if index < 0:
                raise RuntimeError(f"the hybrid's doorbell is full ({self.CAPACITY} layer-batch "
                                   "states): fewer CpuShares or batch sizes, or "
                                   "signal='host_node'")
            host.state.gpu_done = self.gpu_words.data_ptr() + 4 * index
            self.states.append(host)
        return index

    def close(self) -> None:
        """Stop the thread (before the words and the states it reads go)."""
        if self.handle:
            self.lib.moe_uvm_doorbell_stop(self.handle)
            self.handle = None

    def __del__(self) -> None:
        self.close()

    def word_address(self, index: int) -> int:
        return self.words_device.data_ptr() + 4 * index

    def gpu_word_address(self, index: int) -> int:
        return self.gpu_words_device.data_ptr() + 4 * index

    def served(self) -> int:
        return self.lib.moe_uvm_doorbell_served(self.handle)


_doorbells: dict[int, Doorbell] = {}

SIGNALS = ("auto", "doorbell", "host_node")
DEFAULT_SIGNAL = "auto"
"""CpuShare's default hand-off: the doorbell where stream memory operations work (on an H100,
24 Qwen3-shaped layers at batch 1: 806 us a layer against 970 with host nodes,
benchmarks/results/h100/hybrid_overhead.json), host nodes elsewhere."""


def _check_signal(signal: str) -> None:
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {', '.join(SIGNALS)}; got {signal!r}")


def resolve_signal(signal: str, device: int) -> tuple[str, str]:
    """(the way CpuShare hands a layer to the host on `device`, why): `doorbell` where stream
    memory operations work (checked once per device) and `auto` or `doorbell` asks for it,
    else `host_node`. `doorbell` asked for where they do not work raises."""
    _check_signal(signal)
    if signal == "host_node":
        return "host_node", "signal='host_node'"
    works, why = uvm.stream_memops_work(device)
    if not works:
        if signal == "doorbell":
            raise RuntimeError(f"signal='doorbell': stream memory operations do not work on "
                               f"cuda:{device}: {why}")
        return "host_node", f"stream memory operations do not work: {why}"
    return "doorbell", "stream memory operations work"


def _doorbell(device: int) -> Doorbell:
    if device not in _doorbells:
        _doorbells[device] = Doorbell(device)
    return _doorbells[device]


class _GpuStep:
    """HostStep plus the device side: CUDA views of its pinned buffers, the GPU's ids, and the
    hand-off to the host: the device address of its doorbell word, or two events around a host
    node on the side stream."""

    def __init__(self, host: HostStep, resident: torch.Tensor, tokens: int, top_k: int,
                 ids_dtype: torch.dtype, device: torch.device, signal: str) -> None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.host = host
        view = lambda t: uvm.mapped_host_view(t, index)  # noqa: E731
        self.ids, self.weights, self.x = view(host.ids), view(host.weights), view(host.x)
        self.cols, self.out, self.costs = view(host.cols), view(host.out), view(host.costs)
        self.resident = view(resident)
        self.gpu_ids = torch.full((tokens, top_k), -1, dtype=ids_dtype, device=device)
        self.gpu_cols = torch.zeros(host.cols.shape, dtype=torch.int32, device=device)
        self.signal = signal
        if signal == "doorbell":
            bell = _doorbell(index)
            slot = bell.register(host)
            self.word, self.gpu_word = bell.word_address(slot), bell.gpu_word_address(slot)
        else:
            self.split_done = torch.cuda.Event()
            self.cpu_done = torch.cuda.Event()


class CpuShare:
    """The hybrid for one MoE layer whose experts live in a managed store: call it as
    `share(hidden, topk_weights, topk_ids)` in place of `fused_moe`, eagerly or inside a CUDA
    graph capture (run it once at each batch size before capturing: the pinned buffers are
    allocated then). `resident_ids` gives the layer's resident experts now (e.g.
    `lambda: manager.resident_ids(layer)`; read at each eager call while `follow_calls`, else
    set through `set_gpu_experts`, which the offload manager calls around each re-advise so
    captured graphs follow it); `costs` the per-expert costs the split starts from
    (ExpertCosts.from_bandwidths with the machine's read-through and CPU-kernel bandwidths);
    `adapt`: the split adapts each step (with the doorbell, to which side finished first;
    with host nodes, to the CPU's observed time; the module's docstring). `cost_pool`: a dict
    shared by the CpuShares of one model's layers (`measured_shares` passes one), so they
    adapt one set of costs per batch size: the layers' experts have the same shapes and the
    same CPU computes them, and a decode token then brings one observation per layer, not one
    in all (per-layer costs adapt once a token each, from costs calibrated with the GPU idle).

    A step, all in stream order (nothing waits on the host, nothing on the GPU waits for the
    host but the final add):
    1. the split kernel (kernels/hybrid_split.py) picks the CPU's share from the routing,
       the resident mask and the costs (whole experts, and the leading intermediate columns of
       one more), writes the GPU's ids (the pairs of the experts the CPU takes whole as -1),
       each expert's CPU columns (into pinned memory for the host, and on the device, where
       the GPU's kernel starts a split expert at the next column: fused_moe's first_col) and
       the ids into pinned memory; the weights and token rows (fp32) follow;
    2. the host runs `moe_uvm_hybrid_compute` (cpu_experts.c: groups the CPU's pairs and
       computes them into a pinned fp32 buffer) while the GPU runs its kernel. `signal` says how
       the host is asked: `doorbell` (the stream sets the layer's pinned word, which a spinning
       host thread watches, and later waits for the thread's answer in the same word: no
       driver thread or interrupt on the way), `host_node` (a CUDA host function on a side stream,
       which the driver's thread runs), `auto` (the default: the doorbell where stream memory
       operations work);
    3. the main stream waits for the host and adds the CPU's sum to the GPU's output (in fp32,
       rounded once)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor,
                 resident_ids: Callable[[], Iterable[int]], *, costs: ExpertCosts,
                 quant: dict | None = None, threads: int | None = None,
                 adapt: bool = True, signal: str = DEFAULT_SIGNAL,
                 cost_pool: dict | None = None) -> None:
        costs.check()
        _check_signal(signal)
        self.signal = signal  # resolved at the first GPU call (resolve_signal)
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
        self.resident = torch.zeros(self.num_experts, dtype=torch.uint8, pin_memory=True)
        self.follow_calls = True  # re-read resident_ids() at each eager call
        self.set_gpu_experts(self.resident_ids())
        self._steps: dict[tuple, _GpuStep] = {}  # by (tokens, top_k, ids dtype)
        self.cost_pool = cost_pool  # by the same key: the pinned costs the layers share

    def set_gpu_experts(self, ids: Iterable[int]) -> None:
        """The experts the split leaves to the GPU (the resident ones), for the steps enqueued
        or replayed from now: the mask is built whole, then copied over the old one, so a split
        running meanwhile sees, per expert, the old or the new value. (The offload manager
        calls this around each re-advise with the old and new sets together while pages move,
        so the CPU never reads a page bound for the GPU.)"""
        mask = torch.zeros(self.num_experts, dtype=torch.uint8)
        ids = list(ids)
        if ids:
            mask[ids] = 1
        self.resident.copy_(mask)

    def _step(self, hidden: torch.Tensor, topk_ids: torch.Tensor) -> _GpuStep:
        key = (hidden.shape[0], topk_ids.shape[1], topk_ids.dtype)
        step = self._steps.get(key)
        if step is None:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"CpuShare: first call at {key[0]} tokens inside a CUDA graph capture; run "
                    "the step once eagerly at this batch size first (its pinned buffers are "
                    "allocated then)")
            if not self._steps:
                index = hidden.device.index
                index = torch.cuda.current_device() if index is None else index
                self.signal, _ = resolve_signal(self.signal, index)
            pooled = None if self.cost_pool is None else self.cost_pool.get(key)
            host = HostStep(self.kernel, key[0], key[1], self.resident, self.costs,
                            self.threads, self.adapt, pin=True, shared_costs=pooled)
            if self.cost_pool is not None:
                self.cost_pool.setdefault(key, host.costs)
            step = self._steps[key] = _GpuStep(host, self.resident, key[0], key[1], key[2],
                                               hidden.device, self.signal)
        return step

    def touch_offloaded(self, page: int = 4096) -> float:
        """The CPU's first touch of every page of the experts it may compute (those not
        resident now), on its threads; seconds it took. Over managed memory a page the CPU
        never read costs it a fault (mapping the page, or bringing it back to host memory)
        at its first read: done here once, at load, rather than inside the first decode steps
        that hand it each expert, and before the calibrations time anything."""
        start = time.perf_counter()
        self.kernel.touch(np.flatnonzero(self.resident.numpy() == 0), self.threads, page)
        return time.perf_counter() - start

    @property
    def stats(self) -> HybridStats:
        """Totals over every batch size since the last `reset_stats` (waits for the GPU)."""
        torch.cuda.synchronize()
        total = HybridStats()
        for step in self._steps.values():
            step.host.check()
            one = step.host.stats()
            total.steps += one.steps
            total.cpu_experts += one.cpu_experts
            total.gpu_offloaded_experts += one.gpu_offloaded_experts
            total.cpu_ms += one.cpu_ms
            total.balanced += one.balanced
            total.gpu_first += one.gpu_first
        return total

    def reset_stats(self) -> None:
        torch.cuda.synchronize()
        for step in self._steps.values():
            step.host.reset_stats()

    def current_costs(self) -> ExpertCosts:
        """The costs as the last batch size's steps left them (the starting costs before any)."""
        torch.cuda.synchronize()
        if not self._steps:
            return self.costs
        return list(self._steps.values())[-1].host.current_costs()

    def __call__(self, hidden: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor) -> torch.Tensor:
        """HOT PATH: the hybrid's step, enqueued (captured inside a CUDA graph)."""
        step = self._step(hidden, topk_ids)
        host = step.host
        if not torch.cuda.is_current_stream_capturing():
            host.check()  # a failure of an earlier step's host function
            if self.follow_calls:
                self.set_gpu_experts(self.resident_ids())
        stream = torch.cuda.current_stream(hidden.device)
        split_on_device(topk_ids, self.num_experts, self.kernel.intermediate, step.resident,
                        step.costs, step.gpu_ids, step.ids, step.cols, step.gpu_cols)
        step.weights.copy_(topk_weights.reshape(-1))
        step.x.copy_(hidden)
        if step.signal == "doorbell":
            if self.adapt:  # the host reads, when its share is done, whether the GPU was first
                uvm.stream_write_value32(stream.cuda_stream, step.gpu_word, 0)
            uvm.stream_write_value32(stream.cuda_stream, step.word, Doorbell.REQUEST)
            out = fused_moe(hidden, self.w13, self.w2, topk_weights, step.gpu_ids,
                            first_col=step.gpu_cols, **self.quant)
            if self.adapt:
                uvm.stream_write_value32(stream.cuda_stream, step.gpu_word, 1)
            uvm.stream_wait_value32(stream.cuda_stream, step.word, Doorbell.DONE)
            return out.add_(step.out)
        step.split_done.record(stream)
        side = _side_stream(hidden.device)
        side.wait_event(step.split_done)
        uvm.launch_host_func(side.cuda_stream, host.compute_fn, host.address)
        step.cpu_done.record(side)
        out = fused_moe(hidden, self.w13, self.w2, topk_weights, step.gpu_ids,
                        first_col=step.gpu_cols, **self.quant)
        stream.wait_event(step.cpu_done)
        # In fp32, rounded once to the output's dtype (one kernel).
        return out.add_(step.out)


def calibrate_cpu_us(kernel: GroupedExperts, threads: int, experts_per_call: int = 8,
                     calls: int = 5, seed: int = 0,
                     experts: Iterable[int] | None = None) -> tuple[float, float]:
    """(microseconds per expert, per extra (token, expert) pair) of `kernel`: medians of
    `calls` calls at 1 and at 8 tokens per expert. The experts come from `experts` (default:
    all of the kernel's): up to three groups of `experts_per_call` drawn at random, each read
    once untimed first, then taken in turn, so a timed call reads experts that the CPU has
    mapped but that two other groups' reads have since pushed out of its caches, as in decode.
    Over a managed store, pass the offloaded ones: the CPU reading a resident expert's pages
    pulls them off the GPU (on the H100, at 50% resident, that calibration read 499-531 us an
    expert against 198-248 at 0%, and left the GPU to fault the pages back). The untimed reads
    keep the CPU's first touch of a page out of the timing: without them, calibrations over
    freshly written stores on the H100 read 1632-1736 us an expert, against 154-172 from
    experts already read (2026-12-07, `benchmarks/results/h100/*cpu_calibration_fix*`)."""
    pool = np.arange(kernel.num_experts) if experts is None else np.asarray(sorted(experts))
    if pool.size == 0 or pool.min() < 0 or pool.max() >= kernel.num_experts:
        raise ValueError(f"calibrate_cpu_us: experts must be a non-empty subset of "
                         f"0..{kernel.num_experts - 1}; got {pool.tolist()[:8]}")
    rng = np.random.default_rng(seed)
    n = min(experts_per_call, pool.size)
    groups = max(1, min(3, pool.size // n))
    chosen = rng.choice(pool, groups * n, replace=False).reshape(groups, n)
    chosen = [np.sort(g).astype(np.int64) for g in chosen]
    medians = []
    for per_expert in (1, 8):
        pairs = n * per_expert
        x = torch.randn(pairs, kernel.hidden)
        gate_up = torch.empty(pairs, 2 * kernel.intermediate)
        out = torch.zeros(pairs, kernel.hidden)
        offsets = np.arange(0, pairs + 1, per_expert, dtype=np.int64)
        tokens = np.arange(pairs, dtype=np.int64)
        weights = np.full(pairs, 1.0 / n, np.float32)
        for group in chosen:  # untimed: the first touch of every page, and the kernel warm
            kernel(x, group, offsets, tokens, weights, gate_up, out, threads)
        times = []
        for call in range(calls):
            start = time.perf_counter()
            kernel(x, chosen[call % groups], offsets, tokens, weights, gate_up, out, threads)
            times.append(time.perf_counter() - start)
        medians.append(float(np.median(times)) * 1e6)
    pair_us = max(0.0, (medians[1] - medians[0]) / (7 * n))
    return medians[0] / n, pair_us


def calibrate_gpu_us(w13: torch.Tensor, w2: torch.Tensor, offloaded: list[int], top_k: int,
                     quant: dict | None = None, calls: int = 7,
                     seed: int = 0) -> tuple[float, float] | None:
    """(fixed microseconds, microseconds per expert) of the fused kernel reading offloaded
    experts through PCIe at one token, as decode runs it: at least `calls` calls captured
    back to back in one CUDA graph (up to 64 where they would read under 256 MB), routed
    to 1 and to min(top_k, len(offloaded)) experts of `offloaded` (drawn in turn from a
    shuffle, so a call finds none in the GPU's L2 from the call before), the median of 3
    replays, per call, as a line through the two. None with fewer than two offloaded
    experts.

    (Timed eagerly, the host's launch of each call, tens of microseconds of Python before its
    first kernel, fell between the events and read as a GPU cost: 124-156 us of "fixed" cost
    a layer on the H200 and the H100, against 4-6 us timed this way on the H100, so the split
    gave the CPU too much, most at 50% resident, batch 1.)"""
    n = min(top_k, len(offloaded))
    if n < 2:
        return None
    quant = quant or {}
    rng = np.random.default_rng(seed)
    pool = rng.permutation(np.asarray(offloaded, dtype=np.int64))
    device = w13.device
    x = torch.randn(1, w13.shape[2], device=device).to(torch.bfloat16 if w13.element_size() == 1
                                                        else w13.dtype)
    weights = torch.full((1, top_k), 1.0 / top_k, device=device)
    per_call, drawn = [], 0
    expert_nbytes = w13[0].nbytes + w2[0].nbytes
    for count in (1, n):
        ids = []
        for _ in range(max(calls, min(64, -(-(1 << 28) // (count * expert_nbytes))))):
            pick = [int(pool[(drawn + j) % len(pool)]) for j in range(count)]
            drawn += count
            ids.append(torch.tensor([pick + [-1] * (top_k - count)], device=device))
        fused_moe(x, w13, w2, weights, ids[0], **quant)  # compiled and tuned outside the capture
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for routed in ids:
                fused_moe(x, w13, w2, weights, routed, **quant)
        times = []
        for _ in range(4):  # the first replay (its upload) untimed
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / len(ids))
        per_call.append(float(np.median(times[1:])))
        del graph
    per_expert = max((per_call[1] - per_call[0]) / (n - 1), 1e-3)
    return max(per_call[0] - per_expert, 0.0), per_expert


def measured_shares(layers: list[tuple[torch.Tensor, torch.Tensor, dict]],
                    resident_ids: Callable[[int], Iterable[int]], *, expert_nbytes: int,
                    read_through_gbps: float, top_k: int,
                    threads: int | None = None,
                    signal: str = DEFAULT_SIGNAL) -> list[CpuShare]:
    """One CpuShare per (w13, w2, quant) of managed layers, all starting from one ExpertCosts:
    the GPU's from its fused kernel on layer 0's offloaded experts (`calibrate_gpu_us`; from
    `read_through_gbps` when fewer than two are offloaded), the CPU's from its kernel on cold
    offloaded experts of the first layer that has any (`calibrate_cpu_us`; never a resident
    one, whose pages the CPU would pull off the GPU; the GPU's cost where nothing is
    offloaded), which each share's steps then follow. Before any of it the CPU touches every
    offloaded page of every layer once (`CpuShare.touch_offloaded`).
    `resident_ids(layer)` gives a layer's resident experts now; `top_k` the routing's. The
    shares adapt one set of costs per batch size together (CpuShare's `cost_pool`)."""
    threads = default_threads() if threads is None else threads
    costs = ExpertCosts.from_bandwidths(expert_nbytes, read_through_gbps, 1.0)
    pool: dict = {}
    shares = [CpuShare(w13, w2, lambda i=i: resident_ids(i), costs=costs, quant=quant,
                       threads=threads, signal=signal, cost_pool=pool)
              for i, (w13, w2, quant) in enumerate(layers)]
    for share in shares:  # the CPU's first touch of every offloaded page, before any timing
        share.touch_offloaded()
    w13, w2, quant = layers[0]
    offloaded = sorted(set(range(w13.shape[0])) - set(resident_ids(0)))
    gpu = calibrate_gpu_us(w13, w2, offloaded, top_k, quant)
    if gpu is not None:
        costs.gpu_fixed_us, costs.gpu_expert_us = gpu
    for i, share in enumerate(shares):
        cold = sorted(set(range(share.num_experts)) - set(resident_ids(i)))
        if cold:
            costs.cpu_expert_us, costs.cpu_pair_us = calibrate_cpu_us(share.kernel, threads,
                                                                      experts=cold)
            break
    else:  # nothing offloaded: nothing to split until a re-advise offloads some
        costs.cpu_expert_us = costs.gpu_expert_us
    return shares


PENDING = "waiting for the weights (moe_uvm.offload.finish_hybrid measures and attaches it)"


def attach_cpu_shares(manager, layers, config, *, has_slots: bool,
                      defer: bool = False) -> tuple[bool, str]:
    """`config.cpu_experts` applied to an offload manager's layers (offload_experts calls it):
    each layer gets a CpuShare (`layer.cpu_share`), all sharing one ExpertCosts measured now
    (the read-through of 256 MB of managed memory; the CPU kernel on cold experts of layer 0),
    when the mode is on, or auto and the cost model predicts a decode step (one token) at least
    5% faster. Returns (on, why); `on` with no CUDA, no CPU kernel or a slot cache raises.
    First the manager's advice prefetches and the weights' writes are waited for and the CPU
    touches every offloaded page once (`CpuShare.touch_offloaded`), so neither the calibrations
    nor the first decode steps pay for pages in flux or never mapped for the CPU. `defer`: only
    the checks now;
    where they pass, (False, PENDING), and the caller measures and attaches once the weights
    are written (calibrating on stores not yet filled measures the wrong pages)."""
    from moe_uvm import ceilings

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
    if defer:
        return False, PENDING
    manager.synchronize()  # the advice's prefetches
    torch.cuda.synchronize(manager.device)  # and the weights' writes, on the caller's stream
    first = layers[0]
    shares = measured_shares(
        [(m.w13_weight, m.w2_weight, m.quantization()) for m in layers], manager.resident_ids,
        expert_nbytes=first.w13_weight[0].nbytes + first.w2_weight[0].nbytes,
        read_through_gbps=ceilings.read_through_gbps(1 << 28), top_k=top_k,
        threads=config.cpu_threads)
    on, why = choose_cpu_experts(mode, offloaded_per_layer=offloaded, tokens_per_expert=1.0,
                                 costs=shares[0].costs)
    if on:
        for module, share in zip(layers, shares, strict=True):
            module.cpu_share = share
            share.follow_calls = False  # the manager tells it (graphs replay no Python)
        manager.add_gpu_set_listener(lambda layer, ids: shares[layer].set_gpu_experts(ids))
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
    `predicted_layer_us`, the CPU's share in experts (fractional), and the step's saving in ms
    over `layers`."""
    costs = ExpertCosts.from_bandwidths(expert_nbytes, read_through_gbps, cpu_gbps)
    gpu_only, hybrid, cpu = _predicted(offloaded_per_layer, tokens_per_expert, costs)
    return dict(gpu_only_layer_us=gpu_only, hybrid_layer_us=hybrid, cpu_experts_per_layer=cpu,
                offloaded_per_layer=offloaded_per_layer,
                saved_step_ms=(gpu_only - hybrid) * layers / 1e3)
