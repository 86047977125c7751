"""Where the CPU/GPU hybrid's per-layer overhead goes (issue 18): N MoE layers of a model shape
in managed memory, all experts offloaded, one batch size, each variant captured in a CUDA
graph and timed two ways: `wall` (replay, then sync, per step: what a decode loop sees) and
`gpu` (CUDA events around back-to-back replays: the GPU's time alone). Variants, each adding
one piece of the hybrid's step to the one before:

- gpu_only:      the fused kernel per layer (what `moe-uvm bench` times);
- split:         + the split kernel, the copies into pinned memory, the add of the (zero) CPU
                 sum: the hybrid's GPU work with no host node;
- idle_doorbell: + the hand-off to the host through the doorbell (a stream write the host
                 thread spins on, a stream wait for its answer), the CPU given nothing;
- idle_host_node: the same through a host node on a side stream and the join;
- hybrid_doorbell, hybrid_host_node: the CPU takes its share (costs from the calibration);
- host_nodes:    only the layers' host nodes (a no-op function), one after the other on one
                 stream: the GPU -> host -> GPU latency of one node.

    python benchmarks/hybrid_overhead.py [--model-shape S] [--layers 24] [--batch 1] [--steps 40]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import pathlib
import statistics
import sys
import time

import torch

from moe_uvm import ceilings, uvm
from moe_uvm.hybrid import CpuShare, ExpertCosts, default_threads
from moe_uvm.kernels.fused_moe import fused_moe
from moe_uvm.kernels.hybrid_split import split_on_device
from moe_uvm.tools.bench import decode_step, hybrid_shares, managed_layers
from moe_uvm.tools.bench_sweep import BenchConfig, make_workload


def time_graph(body, set_step, steps: int, warmup: int) -> dict:
    """Capture `body` and time its replays: wall (replay + sync) and GPU (events)."""
    set_step(0)
    body()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    walls = []
    for s in range(steps):
        set_step(s)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        if s >= warmup:
            walls.append((time.perf_counter() - t0) * 1e3)
    gpus = []
    for s in range(warmup, steps):
        set_step(s)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        gpus.append(start.elapsed_time(end))
    del graph
    return dict(wall_ms=statistics.median(walls), gpu_ms=statistics.median(gpus))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-shape", default="qwen3-30b-a3b")
    parser.add_argument("--trace", default="flat")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"
                                             / "hybrid_overhead.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("hybrid_overhead.py needs a CUDA GPU")
    cfg = BenchConfig(trace=args.trace, model_shape=args.model_shape, layers=args.layers,
                      resident="0%", batches=(args.batch,), steps=args.steps, warmup_tokens=0)
    work = make_workload(cfg)
    manager, managed = managed_layers(work)
    for layer in range(work.num_layers):
        manager.readvise(layer, [])
    manager.synchronize()
    ids, weights = work.routing(args.batch, args.steps)
    h0 = torch.randn(args.batch, work.hidden, device=work.device).to(work.dtype)
    static_ids, static_w = ids[0].clone(), weights[0].clone()

    def set_step(s: int) -> None:
        static_ids.copy_(ids[s])
        static_w.copy_(weights[s])

    never = ExpertCosts(gpu_expert_us=1.0, cpu_expert_us=1e12)

    def shares_of(costs, signal, adapt):
        return [CpuShare(w.w13, w.w2, lambda layer=layer: manager.resident_ids(layer),
                         costs=costs, quant=w.quant, threads=args.threads, adapt=adapt,
                         signal=signal) for layer, w in enumerate(managed)]

    idle = shares_of(never, "host_node", False)
    shares = hybrid_shares(work, manager, managed, args.threads, signal="doorbell")
    variants = [("gpu_only", None), ("split", None),
                ("idle_doorbell", shares_of(never, "doorbell", False)),
                ("idle_host_node", idle), ("hybrid_doorbell", shares),
                ("hybrid_host_node", shares_of(shares[0].costs, "host_node", True)),
                ("host_nodes", None)]

    def gpu_only():
        return decode_step(h0, static_ids, static_w, managed)

    def split_only():
        h = h0
        for layer, share in enumerate(idle):
            step = share._step(h, static_ids[layer])
            split_on_device(static_ids[layer], share.num_experts, share.kernel.intermediate,
                            step.resident, step.costs, step.gpu_ids, step.ids, step.cols,
                            step.gpu_cols)
            step.weights.copy_(static_w[layer].reshape(-1))
            step.x.copy_(h)
            out = fused_moe(h, share.w13, share.w2, static_w[layer], step.gpu_ids,
                            first_col=step.gpu_cols, **share.quant)
            h = h + out.add_(step.out)
        return h

    def hybrid_of(group):
        def body():
            h = h0
            for layer, share in enumerate(group):
                h = h + share(h, static_w[layer], static_ids[layer])
            return h
        return body

    free = ctypes.cast(ctypes.CDLL(None).free, ctypes.c_void_p).value  # free(NULL): a no-op

    def host_nodes():
        stream = torch.cuda.current_stream().cuda_stream
        for _ in range(work.num_layers):
            uvm.launch_host_func(stream, free, 0)

    rows = {}
    for name, group in variants:
        body = dict(gpu_only=gpu_only, split=split_only, host_nodes=host_nodes).get(name) \
            or hybrid_of(group)
        rows[name] = time_graph(body, set_step, args.steps, args.warmup)
        if group is not None:
            rows[name]["signal"] = group[0].signal
            stats = [s.stats.summary() for s in group]
            rows[name]["cpu_experts"] = sum(st["cpu_experts"] for st in stats)
            rows[name]["cpu_ms_median"] = statistics.median(
                [st["cpu_ms_median"] for st in stats if st["cpu_experts"]] or [0.0])
        r = rows[name]
        print(f"{name:12s} wall {r['wall_ms']:8.3f} ms  gpu {r['gpu_ms']:8.3f} ms  "
              f"per layer: wall {r['wall_ms'] / work.num_layers * 1e3:7.1f} us, "
              f"gpu {r['gpu_ms'] / work.num_layers * 1e3:7.1f} us", flush=True)
    result = dict(ceilings.device_summary(), shape=args.model_shape, layers=work.num_layers,
                  batch=args.batch, threads=args.threads, steps=args.steps, warmup=args.warmup,
                  rows=rows, costs=vars(shares[0].current_costs()))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    variants.clear()
    manager.close()


if __name__ == "__main__":
    main()
