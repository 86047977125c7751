"""CPU/GPU hybrid decode against GPU-only, on MoE layers in managed memory (issue 18).

N Qwen3-30B-A3B-shaped MoE layers (random bf16 weights, the residual stream through each, as
`moe-uvm bench` times them) driven by a routing trace, at resident fractions of the experts
(profile residency, the rest offloaded: CPU-preferred managed pages read in place). Per
(resident, batch): the GPU-only step eager and captured in a CUDA graph, and the hybrid step
(eager: its split needs each layer's routing on the host), in tokens/s, medians; the hybrid's
layer outputs against the all-device GPU-only ones (||a-b||/||b||; the CPU's fp32 sum is added
to the GPU's bf16 output), and the split it made. The CPU kernel's bandwidth at each
batch is measured first on these layers' pages, the read-through in the same run; the split
uses both. Outputs are compared layer by layer (max_layer_error says why).

    python benchmarks/hybrid_decode.py --trace T [--layers 24] [--resident 0%,50%]
        [--batch 1,4] [--steps 24] [--threads N] [--out benchmarks/results/hybrid_decode.json]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import torch

from moe_uvm import ceilings
from moe_uvm.hybrid import CpuShare, HybridStats
from moe_uvm.kernels import fused_moe
from moe_uvm.kernels.cpu_experts import cpu_experts
from moe_uvm.simulate import resident_sizes
from moe_uvm.tools.bench import (
    LayerWeights,
    decode_step,
    managed_layers,
    managed_residency,
    run_captured,
)
from moe_uvm.tools.bench_sweep import BenchConfig, make_workload


def eager_ms(step, steps: int) -> tuple[float, torch.Tensor]:
    """Median wall time of `step(s)` over s in 1..steps-1 (step 0 warms up), each synced; and
    step 0's output."""
    first = step(0)
    torch.cuda.synchronize()
    times = []
    for s in range(1, steps):
        t0 = time.perf_counter()
        step(s)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, first


def cpu_gbps(share: CpuShare, ids: torch.Tensor, weights: torch.Tensor, x: torch.Tensor) -> float:
    """The CPU kernel's bandwidth on one layer's managed pages with this routing (all of it on
    the CPU): distinct experts' bytes over the median time."""
    ids_h, weights_h, x_h = ids.cpu(), weights.cpu(), x.cpu()
    run = lambda: cpu_experts(x_h, share.host13, share.host2, weights_h, ids_h,  # noqa: E731
                              threads=share.threads, **share.host_quant)
    run()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    experts = int(ids_h[ids_h >= 0].unique().numel())
    return experts * share.expert_nbytes / statistics.median(times) / 1e9


def max_layer_error(shares, device_layers, h0, ids, weights) -> float:
    """The largest ||hybrid - GPU-only|| / ||GPU-only|| over the layers of one step, each layer
    given the GPU-only step's input to it. (Not the step's final output: this harness's stream
    of random layers has no normalisation and grows ~1e9-fold over 24 layers, so any rounding
    difference, bf16's included, is amplified to ~0.1 there.)"""
    h, worst = h0, 0.0
    for layer, (share, dev) in enumerate(zip(shares, device_layers, strict=True)):
        ref = fused_moe(h, dev.w13, dev.w2, weights[layer], ids[layer], **dev.quant)
        out = share(h, weights[layer], ids[layer])
        worst = max(worst, ((out.float() - ref.float()).norm() / ref.float().norm()).item())
        h = h + ref
    return worst


def measure(work, manager, managed, device_layers, batch: int, args, read_through: float) -> dict:
    """One (residency, batch) row: GPU-only eager and captured, hybrid eager, the hybrid's
    error against the all-device step and its split."""
    ids, weights = work.routing(batch, args.steps)
    h0 = torch.randn(batch, work.hidden, device=work.device).to(work.dtype)
    shares, rate = [], None
    for layer, w in enumerate(managed):
        share = CpuShare(w.w13, w.w2, lambda layer=layer: manager.resident_ids(layer),
                         quant=w.quant, gpu_gbps=read_through, cpu_gbps=rate or 1.0,
                         threads=args.threads)
        if rate is None:  # measured once, on layer 0's pages with this batch's routing
            rate = cpu_gbps(share, ids[0, 0], weights[0, 0], h0)
            share.cpu_gbps = rate
        shares.append(share)

    def hybrid_step(s):
        h = h0
        for layer, share in enumerate(shares):
            h = h + share(h, weights[s, layer], ids[s, layer])
        return h

    err = max_layer_error(shares, device_layers, h0, ids[0], weights[0])
    for share in shares:
        share.stats = HybridStats()  # the split's counts over the timed steps only
    ref = decode_step(h0, ids[0], weights[0], device_layers)
    gpu_ms, gpu_out = eager_ms(lambda s: decode_step(h0, ids[s], weights[s], managed),
                               args.steps)
    graph_ms, _ = run_captured(work, managed, ids, weights, h0)
    hybrid_ms, _ = eager_ms(hybrid_step, args.steps)
    cpu_share = sum(s.stats.cpu_experts for s in shares)
    gpu_share = sum(s.stats.gpu_offloaded_experts for s in shares)
    return dict(batch=batch, gpu_eager_ms=gpu_ms, gpu_graph_ms=graph_ms, hybrid_ms=hybrid_ms,
                gpu_graph_tok_s=batch / graph_ms * 1e3, hybrid_tok_s=batch / hybrid_ms * 1e3,
                hybrid_over_graph=graph_ms / hybrid_ms, hybrid_over_eager=gpu_ms / hybrid_ms,
                cpu_gbps=rate, cpu_share_of_offloaded=cpu_share / max(1, cpu_share + gpu_share),
                max_layer_rel_err=err, gpu_only_equal=torch.equal(gpu_out, ref))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", required=True, help="routing trace (.npz) of the Qwen3 shape")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--resident", default="0%,50%")
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="CPU threads (default: all cores but one, which drives the GPU)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"
                                             / "hybrid_decode.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("hybrid_decode.py needs a CUDA GPU")
    batches = [int(b) for b in args.batch.split(",")]
    cfg = BenchConfig(trace=args.trace, layers=args.layers, resident=args.resident,
                      batches=tuple(batches), steps=args.steps, warmup_tokens=0)
    work = make_workload(cfg)
    counts = resident_sizes(args.resident, work.num_experts)
    manager, managed = managed_layers(work)
    manager.synchronize()
    read_through = ceilings.read_through_gbps()
    device_layers = [LayerWeights(w13, w2, quant=work.layer_quant(i))
                     for i, (w13, w2) in enumerate(zip(work.w13, work.w2, strict=True))]
    rows = []
    for n in counts:
        sets = managed_residency(work, "profile", n)
        for layer, ids in enumerate(sets):
            manager.readvise(layer, ids)
        manager.synchronize()
        for batch in batches:
            row = measure(work, manager, managed, device_layers, batch, args, read_through)
            rows.append(dict(resident=n, resident_fraction=n / work.num_experts, **row))
            print(f"resident {n}/{work.num_experts} B={batch}: GPU graph "
                  f"{row['gpu_graph_ms']:.2f} ms, eager {row['gpu_eager_ms']:.2f}, hybrid "
                  f"{row['hybrid_ms']:.2f} ms ({row['hybrid_over_graph']:.2f}x graph), CPU "
                  f"{row['cpu_gbps']:.1f} GB/s took {row['cpu_share_of_offloaded']:.0%} of the "
                  f"offloaded experts, layer error {row['max_layer_rel_err']:.1e}", flush=True)
    result = dict(ceilings.device_summary(), layers=work.num_layers, trace=args.trace,
                  threads=args.threads, read_through_gbps=read_through, steps=args.steps,
                  rows=rows)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['device']}, {work.num_layers} layers, read-through {read_through:.1f} "
          f"GB/s, {args.threads} CPU threads; medians over {args.steps - 1} steps\n")
    print("| resident | batch | GPU-only graph tok/s | hybrid tok/s | hybrid / GPU-only | "
          "CPU GB/s | CPU share | layer error |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['resident_fraction']:.0%} | {r['batch']} | {r['gpu_graph_tok_s']:.1f} | "
              f"{r['hybrid_tok_s']:.1f} | {r['hybrid_over_graph']:.2f}x | {r['cpu_gbps']:.1f} | "
              f"{r['cpu_share_of_offloaded']:.0%} | {r['max_layer_rel_err']:.1e} |")
    manager.close()


if __name__ == "__main__":
    main()
