"""MoE experts on the CPU: the CPU's share of the CPU/GPU hybrid (issue 18), reading bf16 or e4m3
expert weights in place (host memory, or managed pages advised to the host through a CPU
tensor aliasing them).

Plain torch reaches ~37 GB/s on 8 Qwen3-sized bf16 experts with 16 threads of the H200 host
(benchmarks/results/h200/hybrid_ceiling.json): it widens bf16 at the fp32 element rate and
pays an op per matrix. cpu_experts.c streams each weight row once, widened in L1 and dotted
with every token routed to its expert, in one OpenMP region per call. It is compiled on first
use with the machine's C compiler (`cc`, or $CC; -O3 -march=native -fopenmp -pthread) into a cache
directory ($MOE_UVM_CACHE, else $XDG_CACHE_HOME/moe-uvm, else ~/.cache/moe-uvm) keyed by the
source, compiler and CPU; `available()` says whether that works here and why not.

The reference is kernels/reference.py's fused_moe_reference (fp32 math); outputs agree to fp32
rounding (accumulation order differs), and are bitwise independent of the thread count."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from .fp8 import FP8_DTYPE, check_block_shape, scale_shape

_SOURCE = Path(__file__).with_name("cpu_experts.c")
_ABI = 5
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-pthread", "-fPIC", "-shared")
_KINDS = {torch.bfloat16: 0, FP8_DTYPE: 1}
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int


class CpuKernelUnavailable(RuntimeError):
    """The CPU expert kernel cannot be built or loaded on this machine (the message says why)."""


def _cache_dir() -> Path:
    if os.environ.get("MOE_UVM_CACHE"):
        return Path(os.environ["MOE_UVM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moe-uvm"


def _cpu_identity() -> str:
    """Model and ISA flags of this CPU: -march=native code built on one CPU may not run on
    another sharing the cache directory."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return platform.machine() + "\n" + "\n".join(sorted(set(lines)))


def _compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise CpuKernelUnavailable(
            "no C compiler found (cc or gcc on PATH, or $CC): the CPU expert kernel is compiled "
            "on first use; install gcc, or run with cpu_experts='off'")
    return compiler


@functools.cache
def _library() -> ctypes.CDLL:
    compiler = _compiler()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CpuKernelUnavailable(f"C compiler {compiler!r} does not run: {exc}") from None
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), " ".join(_FLAGS), version,
                                    _cpu_identity()]).encode()).hexdigest()[:16]
    path = _cache_dir() / f"cpu_experts-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            result = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"],
                                    capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise CpuKernelUnavailable(
                    f"compiling {_SOURCE.name} with {compiler} {' '.join(_FLAGS)} failed:\n"
                    f"{result.stderr.strip()[-2000:]}")
            os.replace(built, path)  # atomic: concurrent first uses each build, one wins
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise CpuKernelUnavailable(f"loading {path} failed: {exc}") from None
    lib.moe_uvm_cpu_experts_init.restype = _INT
    if lib.moe_uvm_cpu_experts_init() != _ABI:
        raise CpuKernelUnavailable(f"{path} has another ABI than this moe_uvm (expected {_ABI})")
    lib.moe_uvm_cpu_experts.restype = _INT
    lib.moe_uvm_cpu_experts.argtypes = [
        _P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _I64, _P, _I64, _INT, _P, _P, _INT, _P, _INT,
        _INT, _P, _P, _INT, _P]
    lib.moe_uvm_touch_pages.restype = _I64
    lib.moe_uvm_touch_pages.argtypes = [_P, _P, _I64, _I64, _INT]
    lib.moe_uvm_hybrid_state_size.restype = _I64
    lib.moe_uvm_hybrid_compute.restype = None
    lib.moe_uvm_hybrid_compute.argtypes = [_P]
    lib.moe_uvm_doorbell_start.restype = _P
    lib.moe_uvm_doorbell_start.argtypes = [_P, _I64, ctypes.c_double]
    lib.moe_uvm_doorbell_register.restype = _I64
    lib.moe_uvm_doorbell_register.argtypes = [_P, _P]
    lib.moe_uvm_doorbell_served.restype = _I64
    lib.moe_uvm_doorbell_stop.restype = None
    lib.moe_uvm_doorbell_stop.argtypes = [_P]
    lib.moe_uvm_doorbell_served.argtypes = [_P]
    return lib


def hybrid_library() -> ctypes.CDLL:
    """The compiled library, for the hybrid's host function (moe_uvm_hybrid_compute over
    moe_uvm.hybrid's state struct). Raises CpuKernelUnavailable."""
    return _library()


def available() -> tuple[bool, str]:
    """(whether the CPU expert kernel builds and loads here, why not)."""
    try:
        _library()
    except CpuKernelUnavailable as exc:
        return False, str(exc)
    return True, ""


def _check(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape):
    tensors = dict(hidden_states=x, w13=w13, w2=w2, topk_weights=topk_weights,
                   topk_ids=topk_ids, w13_scale=w13_scale, w2_scale=w2_scale)
    on_gpu = [n for n, t in tensors.items() if t is not None and t.device.type != "cpu"]
    if on_gpu:
        raise ValueError(f"cpu_experts takes CPU tensors (managed pages through a CPU alias); "
                         f"{', '.join(on_gpu)} not on the CPU")
    if w13.dtype not in _KINDS or w2.dtype != w13.dtype:
        raise ValueError(f"cpu_experts reads bf16 or float8_e4m3fn weights; got w13 {w13.dtype}, "
                         f"w2 {w2.dtype}")
    if w13.dim() != 3 or w2.dim() != 3 or x.dim() != 2:
        raise ValueError(f"expected hidden_states [T, H], w13 [E, 2I, H], w2 [E, H, I]; got "
                         f"{list(x.shape)}, {list(w13.shape)}, {list(w2.shape)}")
    num_experts, two_i, hidden = w13.shape
    if (w2.shape[0] != num_experts or w2.shape[1] != hidden or 2 * w2.shape[2] != two_i
            or x.shape[1] != hidden):
        raise ValueError(f"shapes disagree: hidden_states {list(x.shape)}, w13 "
                         f"{list(w13.shape)}, w2 {list(w2.shape)}")
    for name, w in (("w13", w13), ("w2", w2)):
        if w.stride(2) != 1 or w.stride(1) != w.shape[2]:
            raise ValueError(f"{name} must have contiguous rows (stride(1) == {w.shape[2]}, "
                             f"stride(2) == 1; any stride(0)); got strides {w.stride()}")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids {list(topk_ids.shape)} and topk_weights "
                         f"{list(topk_weights.shape)} must both be [T={x.shape[0]}, k]")
    fp8 = w13.dtype == FP8_DTYPE
    if fp8 != (w13_scale is not None) or fp8 != (w2_scale is not None):
        raise ValueError("FP8 weights need w13_scale and w2_scale; bf16 weights take none")
    if not fp8:
        return None
    block_shape = check_block_shape(block_shape)
    for name, scale, (rows, cols), halves in (("w13_scale", w13_scale, (two_i, hidden), 2),
                                               ("w2_scale", w2_scale, (hidden, two_i // 2), 1)):
        expected = scale_shape(num_experts, rows, cols, block_shape, halves)
        if scale.dtype != torch.float32 or tuple(scale.shape) != expected:
            raise ValueError(f"{name} is {scale.dtype} {list(scale.shape)}: expected float32 "
                             f"{list(expected)} for block_shape={block_shape}")
        if block_shape is not None and scale.stride(2) != 1:
            raise ValueError(f"{name} needs contiguous scale columns (stride(2) == 1)")
        if block_shape is None and scale.stride(1) != 1:
            raise ValueError(f"{name} needs contiguous channel scales (stride(1) == 1)")
    return block_shape


class GroupedExperts:
    """The kernel bound to one layer's weights (CPU tensors as `cpu_experts` takes them, checked
    once): call it with the pairs already grouped by expert, as numpy arrays, for the hybrid's
    per-step path, where torch's per-op overhead on a few dozen pairs would cost more than the
    grouping itself. `x` [T, H] fp32 contiguous; `experts` [m] int64 (ascending for results
    equal to `cpu_experts`); `offsets` [m + 1], `tokens` and `weights` [P] (int64, int64,
    float32, contiguous; the pairs of experts[j] are offsets[j]..offsets[j+1]); `gate_up`
    scratch of at least P x 2I fp32; `out` [T, H] fp32, accumulated into; `cols` None, or [m]
    int64: the leading intermediate columns computed of each expert (1..I; the rest of a split
    expert is computed elsewhere)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, *,
                 w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                 block_shape: tuple[int, int] | None = None) -> None:
        x = torch.empty(1, w13.shape[2])
        ids = torch.zeros(1, 1, dtype=torch.int64)
        block_shape = _check(x, w13, w2, ids.float(), ids, w13_scale, w2_scale, block_shape)
        self._lib = _library()
        self.w13, self.w2, self.w13_scale, self.w2_scale = w13, w2, w13_scale, w2_scale
        self.num_experts, self.hidden, self.intermediate = w13.shape[0], w13.shape[2], w2.shape[2]
        self.kind = _KINDS[w13.dtype]
        self.scale_kind, self.bn, self.bk = 0, 1, 1
        self.strides = torch.zeros(4, dtype=torch.int64)
        if self.kind == 1:
            self.scale_kind = 1 if block_shape is None else 2
            self.strides = torch.tensor(
                [w13_scale.stride(0), w13_scale.stride(1) if block_shape else 0,
                 w2_scale.stride(0), w2_scale.stride(1) if block_shape else 0], dtype=torch.int64)
            self.bn, self.bk = block_shape if block_shape else (1, 1)

    def touch(self, experts, threads: int, page: int = 4096) -> int:
        """Read one byte of every `page` bytes of the weights of `experts` (any order), in
        parallel on `threads` threads: over a managed store, the CPU's first touch of those
        pages, done up front (CpuShare.touch_offloaded). Returns the bytes' sum."""
        experts = [int(e) for e in experts]
        if any(not 0 <= e < self.num_experts for e in experts):
            raise ValueError(f"touch: experts must be in 0..{self.num_experts - 1}; got {experts}")
        if page < 1 or threads < 1:
            raise ValueError(f"touch: page and threads must be >= 1; got {page}, {threads}")
        ranges = [(t[e].data_ptr(), t[e].nbytes) for e in experts for t in (self.w13, self.w2)]
        if not ranges:
            return 0
        starts = np.array([r[0] for r in ranges], dtype=np.uint64)
        sizes = np.array([r[1] for r in ranges], dtype=np.int64)
        return int(self._lib.moe_uvm_touch_pages(starts.ctypes.data, sizes.ctypes.data,
                                                 len(ranges), page, threads))

    def __call__(self, x: torch.Tensor, experts, offsets, tokens, weights,
                 gate_up: torch.Tensor, out: torch.Tensor, threads: int, cols=None) -> None:
        m = len(experts)
        if m == 0:
            return
        if cols is not None and (len(cols) != m or cols.dtype != np.int64
                                 or not ((cols >= 1) & (cols <= self.intermediate)).all()):
            raise ValueError(f"cols must be int64 [{m}] in 1..{self.intermediate}; got {cols}")
        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        status = self._lib.moe_uvm_cpu_experts(
            x.data_ptr(), self.hidden, self.intermediate, m, experts.ctypes.data,
            offsets.ctypes.data, tokens.ctypes.data, weights.ctypes.data, self.w13.data_ptr(),
            self.w13.stride(0), self.w2.data_ptr(), self.w2.stride(0), self.kind,
            ptr(self.w13_scale), ptr(self.w2_scale), self.scale_kind, self.strides.data_ptr(),
            self.bn, self.bk, gate_up.data_ptr(), out.data_ptr(), int(threads),
            None if cols is None else cols.ctypes.data)
        if status != 0:
            raise MemoryError(f"cpu_experts: per-thread buffers of "
                              f"{max(self.hidden, self.intermediate)} floats could not be "
                              "allocated")


def cpu_experts(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor, *,
                w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                block_shape: tuple[int, int] | None = None,
                threads: int | None = None) -> torch.Tensor:
    """fused_moe's sum on the CPU, in fp32: `out[t] = sum_j topk_weights[t, j] * w2[e] @
    (silu(w1[e] @ x_t) * (w3[e] @ x_t))` over the pairs with 0 <= e = topk_ids[t, j] < E (the
    hybrid passes its GPU share as -1). CPU tensors: hidden_states [T, H] (any float dtype),
    w13 [E, 2I, H] and w2 [E, H, I] in bf16 or float8_e4m3fn with contiguous rows and any
    stride(0) (read in place), FP8 scales as fused_moe takes them. `threads`: OpenMP threads
    (default torch.get_num_threads()). Returns [T, H] fp32."""
    _check(hidden_states, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block_shape)
    kernel = GroupedExperts(w13, w2, w13_scale=w13_scale, w2_scale=w2_scale,
                            block_shape=block_shape)
    threads = torch.get_num_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads={threads}: must be >= 1")
    num_tokens, hidden = hidden_states.shape
    num_experts, intermediate = w13.shape[0], w2.shape[2]
    ids = topk_ids.reshape(-1).to(torch.int64).numpy()
    routed = np.flatnonzero((ids >= 0) & (ids < num_experts))
    order = routed[np.argsort(ids[routed], kind="stable")]  # pairs grouped by expert
    experts, counts = np.unique(ids[order], return_counts=True)
    offsets = np.zeros(len(experts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    tokens = order // topk_ids.shape[1]
    weights = topk_weights.reshape(-1).float().numpy()[order].astype(np.float32)
    x = hidden_states.float().contiguous()
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    gate_up = torch.empty(len(order), 2 * intermediate, dtype=torch.float32)
    kernel(x, experts.astype(np.int64), offsets, tokens.astype(np.int64), weights, gate_up, out,
           threads)
    return out


def expert_bytes(hidden: int, intermediate: int, dtype: torch.dtype) -> int:
    """Bytes one expert's weights take (what the CPU streams per expert and step)."""
    return 3 * hidden * intermediate * (1 if dtype == FP8_DTYPE else 2)

