"""Bandwidth ceilings, measured in the same run as what is compared against them: HBM read, GPU
read-through of host-resident managed memory, zero-copy reads of mapped pinned host memory,
pinned host-to-device copy, promote/demote migration, and the host cost of advice calls."""

from __future__ import annotations

import ctypes
import statistics
import time

import torch
import triton

from moe_uvm import uvm
from moe_uvm.kernels.streaming_read import streaming_read


def time_ms(fn, *, warmup: int = 3, repeat: int = 20) -> float:
    """Median milliseconds of `fn()` timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def hbm_read_gbps(nbytes: int = 2 << 30) -> float:
    x = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: streaming_read(x))
    return nbytes / ms / 1e6


def _host_filled_managed(nbytes: int) -> tuple[uvm.ManagedBuffer, torch.Tensor]:
    """A managed range advised PreferredLocation=CPU + AccessedBy=GPU, pages written by the CPU."""
    buf = uvm.ManagedBuffer(nbytes, 0)
    uvm.set_preferred_location(buf.ptr, nbytes, uvm.CPU)
    uvm.set_accessed_by(buf.ptr, nbytes, 0)
    ctypes.memset(buf.ptr, 0x3C, nbytes)  # bf16 0x3C3C ~ 0.011: non-zero, finite
    view = uvm.typed_view(buf.bytes_tensor(), torch.bfloat16, (nbytes // 2,))
    return buf, view


def read_through_gbps(nbytes: int = 1 << 30) -> float:
    buf, view = _host_filled_managed(nbytes)
    ms = time_ms(lambda: streaming_read(view), repeat=10)
    torch.cuda.synchronize()
    buf.free()
    return nbytes / ms / 1e6


def pinned_read_gbps(nbytes: int = 1 << 30) -> float:
    """GPU kernel reading pinned host memory in place through its mapped (UVA) address."""
    host = torch.empty(nbytes // 2, dtype=torch.bfloat16).pin_memory()
    host.fill_(0.5)
    view = uvm.mapped_host_view(host)
    return nbytes / time_ms(lambda: streaming_read(view), repeat=10) / 1e6


def h2d_gbps(nbytes: int = 1 << 30) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    ms = time_ms(lambda: dev.copy_(host, non_blocking=True), repeat=10)
    return nbytes / ms / 1e6


def migration_gbps(nbytes: int = 1 << 30, rounds: int = 3) -> dict[str, float]:
    """Promote (PreferredLocation=GPU + prefetch to GPU) and demote (PreferredLocation=CPU +
    prefetch to host) of a host-written range, host-timed around advice + prefetch + sync."""
    buf, view = _host_filled_managed(nbytes)
    promote, demote = [], []
    stream = torch.cuda.current_stream().cuda_stream
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        uvm.set_preferred_location(buf.ptr, nbytes, 0)
        uvm.prefetch(buf.ptr, nbytes, 0, stream)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        uvm.set_preferred_location(buf.ptr, nbytes, uvm.CPU)
        uvm.prefetch(buf.ptr, nbytes, uvm.CPU, stream)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        promote.append(t1 - t0)
        demote.append(t2 - t1)
    buf.free()
    return {
        "promote_gbps": nbytes / statistics.median(promote) / 1e9,
        "demote_gbps": nbytes / statistics.median(demote) / 1e9,
    }


def advise_ms_per_10mb(nbytes: int = 256 << 20, chunk: int = 10 << 20) -> dict[str, float]:
    """Host time of SetPreferredLocation calls alone (no prefetch), per 10 MB, on pages that
    live on the host (to GPU) and on the GPU (to CPU)."""
    buf, view = _host_filled_managed(nbytes)
    chunks = [(buf.ptr + off, min(chunk, nbytes - off)) for off in range(0, nbytes, chunk)]
    out = {}
    for name, location in (
        ("advise_to_gpu_ms_per_10mb", 0),
        ("advise_to_cpu_ms_per_10mb", uvm.CPU),
    ):
        if location == uvm.CPU:  # make the pages GPU-resident first so the advice has work to do
            uvm.set_preferred_location(buf.ptr, nbytes, 0)
            uvm.prefetch(buf.ptr, nbytes, 0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for ptr, size in chunks:
            uvm.set_preferred_location(ptr, size, location)
        t1 = time.perf_counter()
        out[name] = (t1 - t0) * 1e3 / (nbytes / (10 << 20))
    buf.free()
    return out


def device_summary() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {
        "device": props.name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda_driver": uvm.driver_version(),
        "sms": props.multi_processor_count,
    }
