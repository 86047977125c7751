"""Joint ceiling of a CPU/GPU hybrid (issue 18; the joint ceiling comes first): can the CPU
compute MoE experts from host memory while the GPU reads other host-resident managed memory over
PCIe, and how much does each slow the other? Measures, as medians:

1. host DRAM read bandwidth (a multithreaded `x.sum()` over a 2 GiB CPU tensor), for reference;
2. GPU read-through alone: `streaming_read` over a managed buffer advised PreferredLocation=CPU
   + AccessedBy=GPU and filled by the CPU (the pattern of `moe_uvm.ceilings`);
3. CPU expert compute alone: Qwen3-30B-A3B experts (H=2048, I=768, bf16), 8 distinct experts
   of a pool of 64 per step, plain torch, weights in ordinary CPU memory, in a CPU-preferred
   managed buffer read in place through CPU tensors aliasing it (what the hybrid will do), and
   pre-converted to fp32;
4. both at once over the same interval: the GPU loop in a thread, the CPU loop (managed pool) in
   the main thread, each side's GB/s against its own alone.

CPU GB/s counts the expert bytes as stored (fp32 weights: twice the bf16 bytes); compare step
times across dtypes.

    python benchmarks/hybrid_ceiling.py [--gpu-gib 4] [--seconds 3] [--threads 8,16]
        [--out benchmarks/results/hybrid_ceiling.json]
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import os
import pathlib
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from moe_uvm import ceilings
from moe_uvm.kernels import fp8
from moe_uvm.kernels.cpu_experts import cpu_experts
from moe_uvm.kernels.streaming_read import streaming_read
from moe_uvm.presets import ModelShape

SHAPE = ModelShape.from_name("qwen3-30b-a3b")
H, I, TOP_K = SHAPE.hidden_size, SHAPE.moe_intermediate_size, SHAPE.top_k
POOL_EXPERTS = 64  # ~600 MB of bf16: well past any L3, so every step reads DRAM
BATCHES = (1, 4, 16)
CONCURRENT_BATCHES = (1, 4)
CPU_SECONDS = 1.0  # per CPU-alone case
DRAM_BYTES = 2 << 30
RESULTS = pathlib.Path(__file__).parent / "results"


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def thread_counts(text: str) -> list[int]:
    try:
        counts = [int(item) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a comma list of integers, got {text!r}") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return sorted(set(counts))


def host_summary() -> dict:
    """What the CPU numbers depend on: the CPU, its vector/matrix extensions, torch's CPU build."""
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    field = lambda name: next(
        (line.split(":", 1)[1].strip() for line in lines if line.startswith(name)), "")
    config = [line.strip(" -") for line in torch.__config__.show().splitlines()
              if not line.strip().startswith("Build settings")
              and any(key in line for key in ("CPU capability", "Math Kernel", "MKL-DNN",
                                              "oneDNN"))]
    return {
        "cpu_model": field("model name") or "unknown",
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "simd_flags": sorted({f for f in field("flags").split() if "avx512" in f or "amx" in f}),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_config": config,
    }


def cpu_alias(ptr: int, nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor over `nbytes` at host address `ptr`, no copy: the CPU computes in place
    from managed pages. The caller keeps the memory alive while the tensor is used."""
    return torch.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=torch.uint8)


def expert_pool(flat: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2I, H] and w2 [E, H, I] over one flat tensor, laid out as a FusedMoE layer's."""
    split = num_experts * 2 * I * H
    return flat[:split].view(num_experts, 2 * I, H), flat[split:].view(num_experts, H, I)


def random_weights(num_experts: int) -> torch.Tensor:
    """Flat bf16 weights of `num_experts` experts: one expert's worth of random values repeated
    (filling 600 MB with fresh random numbers takes seconds; the values do not change timing)."""
    block = torch.empty(3 * H * I, dtype=torch.bfloat16).uniform_(-0.03, 0.03)
    return block.repeat(num_experts)


def expert_step(w13, w2, x: torch.Tensor, experts: list[int], out: torch.Tensor) -> None:
    """The experts' SwiGLU MLPs on the token rows x [b, H], summed into out [b, H]."""
    out.zero_()
    for e in experts:
        gate, up = F.linear(x, w13[e]).split(I, dim=-1)
        out += F.linear(F.silu(gate) * up, w2[e])


def kernel_step(pool, x: torch.Tensor, experts: list[int], threads: int) -> None:
    """The same step with moe-uvm's CPU expert kernel (moe_uvm/kernels/cpu_experts.c): every token
    routed to the step's experts, equal weights."""
    w13, w2, quant = pool
    ids = torch.tensor(experts, dtype=torch.int64).expand(x.shape[0], -1)
    cpu_experts(x, w13, w2, torch.full(ids.shape, 1.0 / len(experts)), ids, threads=threads,
                **quant)


def cpu_expert_loop(pool, batch: int, threads: int, seconds: float,
                    barrier: threading.Barrier | None = None) -> dict:
    """Median step time and effective GB/s (expert bytes touched / time) of `expert_step` (a
    pool of two tensors) or `kernel_step` (a pool of three: weights and FP8 scales) with TOP_K
    distinct random experts per step, run for `seconds` after the barrier (if any)."""
    torch.set_num_threads(threads)
    w13, w2 = pool[:2]
    x = torch.randn(batch, H, dtype=torch.bfloat16)
    out = torch.empty(batch, H, dtype=w13.dtype)
    rng = random.Random(0)
    pick = lambda: rng.sample(range(w13.shape[0]), TOP_K)
    if len(pool) == 3:
        step = lambda experts: kernel_step(pool, x, experts, threads)  # noqa: E731
    else:
        x = x.to(w13.dtype)
        step = lambda experts: expert_step(w13, w2, x, experts, out)  # noqa: E731
    for _ in range(3):  # spins up the thread pool and oneDNN's kernels for this shape
        step(pick())
    if barrier is not None:
        barrier.wait()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        experts = pick()
        t0 = time.perf_counter()
        step(experts)
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    nbytes = TOP_K * (w13[0].nbytes + w2[0].nbytes)
    return {"step_ms": step * 1e3, "gbps": nbytes / step / 1e9, "steps": len(times)}


def gpu_read_loop(view: torch.Tensor, seconds: float,
                  barrier: threading.Barrier | None = None) -> dict:
    """Median GB/s of `streaming_read(view)` repeated for `seconds` after the barrier (if any),
    on a stream of its own, timed with CUDA events."""
    nbytes = view.numel() * view.element_size()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # the current stream is per thread: set it in this one
        out = streaming_read(view)  # warm-up; its partial sums buffer is reused below
        stream.synchronize()
        if barrier is not None:
            barrier.wait()
        times, pending = [], []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            streaming_read(view, out)
            end.record()
            pending.append((start, end))
            if len(pending) == 2:  # one read queued behind the running one: no launch gaps
                start, end = pending.pop(0)
                end.synchronize()  # releases the GIL while it waits
                times.append(start.elapsed_time(end))
        for start, end in pending:
            end.synchronize()
            times.append(start.elapsed_time(end))
    return {"gbps": nbytes / statistics.median(times) / 1e6, "reads": len(times)}


def run_together(view: torch.Tensor, pool, batch: int, threads: int,
                 seconds: float) -> tuple[dict, dict]:
    """The GPU loop in a thread and the CPU loop here, released together by a barrier."""
    barrier = threading.Barrier(2, timeout=120)

    def guarded(fn, *args):
        try:
            return fn(*args, barrier=barrier)
        except BaseException:
            barrier.abort()  # the other side must not wait for a partner that is gone
            raise

    with ThreadPoolExecutor(max_workers=1) as executor:
        gpu = executor.submit(guarded, gpu_read_loop, view, seconds)
        try:
            cpu = guarded(cpu_expert_loop, pool, batch, threads, seconds)
        except threading.BrokenBarrierError:
            gpu.result()  # the GPU side failed first: raise its error rather than the barrier's
            raise
        return gpu.result(), cpu


def dram_read_gbps(threads: int, nbytes: int = DRAM_BYTES) -> float:
    torch.set_num_threads(threads)
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()  # warm-up
    times = []
    deadline = time.perf_counter() + CPU_SECONDS
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-gib", type=positive_float, default=4.0,
                        help="managed buffer the GPU reads through (GiB)")
    parser.add_argument("--seconds", type=positive_float, default=3.0,
                        help="wall time of each concurrent case and of the GPU-alone loop")
    parser.add_argument("--threads", type=thread_counts, default=thread_counts("8,16"),
                        help="CPU thread counts of the CPU-alone cases; the concurrent cases "
                        "use the largest and one fewer (a core left to drive the GPU)")
    parser.add_argument("--out", default=str(RESULTS / "hybrid_ceiling.json"))
    return parser.parse_args(argv)


def print_tables(result: dict) -> None:
    host = result["host"]
    print(f"\n{result['device']['device']} + {host['cpu_model']} ({host['cpus_usable']} CPUs, "
          f"{host['torch_cpu_capability']}, {' '.join(host['simd_flags']) or 'no avx512/amx'}), "
          "medians")
    print(f"host DRAM read (x.sum, {max(result['threads'])} threads): "
          f"{result['dram_read_gbps']:.1f} GB/s")
    print(f"GPU managed read-through alone: {result['gpu_alone']['gbps']:.1f} GB/s")
    print("\n| CPU experts alone: weights | batch | threads | step ms | GB/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in result["cpu_alone"]:
        print(f"| {r['weights']} | {r['batch']} | {r['threads']} | {r['step_ms']:.2f} | "
              f"{r['gbps']:.1f} |")
    print("\n| together: CPU weights, kernel | batch | CPU threads | GPU GB/s (alone) | "
          "CPU GB/s (alone) | sum GB/s (alone sum) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in result["concurrent"]:
        print(f"| {r['weights']} | {r['batch']} | {r['threads']} | {r['gpu_gbps']:.1f} "
              f"({r['gpu_alone_gbps']:.1f}) | {r['cpu_gbps']:.1f} ({r['cpu_alone_gbps']:.1f}) | "
              f"{r['sum_gbps']:.1f} "
              f"({r['gpu_alone_gbps'] + r['cpu_alone_gbps']:.1f}) |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("hybrid_ceiling.py needs a CUDA GPU", file=sys.stderr)
        raise SystemExit(2)
    started = time.perf_counter()
    gpu_bytes = int(args.gpu_gib * 2**30) // 2 * 2  # whole bf16 elements
    pool_bytes = POOL_EXPERTS * SHAPE.bytes_per_expert
    free, _ = torch.cuda.mem_get_info()
    if gpu_bytes + pool_bytes > free // 2:  # managed pages can land on the GPU: stay far below
        print(f"hybrid_ceiling.py: refusing to allocate {(gpu_bytes + pool_bytes) / 2**30:.2f} "
              f"GiB of managed memory, more than half of the GPU's {free / 2**30:.2f} GiB free; "
              "use a smaller --gpu-gib", file=sys.stderr)
        raise SystemExit(2)
    top = max(args.threads)
    result = {
        "host": host_summary(),
        "device": ceilings.device_summary(),
        "gpu_bytes": gpu_bytes,
        "seconds": args.seconds,
        "threads": args.threads,
        "expert": {"hidden": H, "intermediate": I, "dtype": "bfloat16", "pool": POOL_EXPERTS,
                   "per_step": TOP_K, "bytes": SHAPE.bytes_per_expert},
        "dram_read_gbps": dram_read_gbps(top),
    }

    gpu_buf, gpu_view = ceilings._host_filled_managed(gpu_bytes)
    result["gpu_alone"] = gpu_read_loop(gpu_view, args.seconds)

    flat = random_weights(POOL_EXPERTS)
    pool_buf, _ = ceilings._host_filled_managed(pool_bytes)
    managed_flat = cpu_alias(pool_buf.ptr, pool_bytes).view(torch.bfloat16)
    managed_flat.copy_(flat)  # the same weights, now read from CPU-preferred managed pages
    fp8_buf, _ = ceilings._host_filled_managed(pool_bytes // 2)
    managed_fp8 = cpu_alias(fp8_buf.ptr, pool_bytes // 2).view(fp8.FP8_DTYPE)
    managed_fp8.copy_(flat.to(fp8.FP8_DTYPE))
    scales = {k: torch.ones(fp8.scale_shape(POOL_EXPERTS, rows, cols, (128, 128), halves))
              for k, rows, cols, halves in (("w13_scale", 2 * I, H, 2), ("w2_scale", H, I, 1))}
    pools = {
        "cpu bf16": expert_pool(flat, POOL_EXPERTS),
        "managed bf16": expert_pool(managed_flat, POOL_EXPERTS),
        "cpu fp32": expert_pool(flat.float(), POOL_EXPERTS),
        "managed bf16, moe-uvm kernel": (*expert_pool(managed_flat, POOL_EXPERTS), {}),
        "managed fp8, moe-uvm kernel": (*expert_pool(managed_fp8, POOL_EXPERTS),
                                        dict(scales, block_shape=(128, 128))),
    }
    result["cpu_alone"] = [
        {"weights": name, "batch": b, "threads": n, **cpu_expert_loop(pool, b, n, CPU_SECONDS)}
        for name, pool in pools.items() for b in BATCHES for n in args.threads
    ]

    result["concurrent"] = []
    kernels = ("managed bf16", "managed bf16, moe-uvm kernel", "managed fp8, moe-uvm kernel")
    threads_together = sorted({top, top - 1} - {0}, reverse=True)
    for name, b, n in itertools.product(kernels, CONCURRENT_BATCHES, threads_together):
        alone = cpu_expert_loop(pools[name], b, n, CPU_SECONDS)
        gpu, cpu = run_together(gpu_view, pools[name], b, n, args.seconds)
        result["concurrent"].append({
            "weights": name, "batch": b, "threads": n,
            "gpu_gbps": gpu["gbps"], "gpu_reads": gpu["reads"],
            "gpu_alone_gbps": result["gpu_alone"]["gbps"],
            "cpu_gbps": cpu["gbps"], "cpu_steps": cpu["steps"],
            "cpu_alone_gbps": alone["gbps"],
            "sum_gbps": gpu["gbps"] + cpu["gbps"],
        })

    del pools, managed_flat, managed_fp8  # no CPU tensor may alias a managed pool once freed
    torch.cuda.synchronize()
    pool_buf.free()
    fp8_buf.free()
    gpu_buf.free()
    result["wall_s"] = time.perf_counter() - started
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    print(f"\nwrote {path} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
