"""CPU/GPU hybrid decode against GPU-only, on MoE layers in managed memory (issue 18).

N MoE layers of a model shape (random weights, the residual stream through each, as
`moe-uvm bench` times them) driven by the routing trace, at resident fractions of the experts
(profile residency; the rest offloaded: CPU-preferred managed pages read in place). Per
(resident, batch), medians in tokens/s:
- GPU-only, captured in a CUDA graph (what `moe-uvm bench` reports) and eager;
- host round trip: the hybrid's step in a CUDA graph with the CPU given nothing (its copies
  and two host nodes a layer), so its cost per layer is (this - GPU-only graph) / layers;
- hybrid, captured in a CUDA graph (its host functions are host nodes) and enqueued eagerly,
  after a few warm-up steps in which the CPU's per-expert cost adapts;
and the hybrid's layer outputs against the all-device GPU-only ones (||a-b||/||b||; the CPU's
fp32 sum is added to the GPU's output in fp32), and the split it made. The CPU kernel's cost
per expert is measured first on cold experts of layer 0's pages, the read-through in the same
run.

    python benchmarks/hybrid_decode.py --trace T [--model-shape S] [--layers 24] [--resident 0%,50%]
        [--batch 1,4] [--steps 24] [--warmup 4] [--threads N] [--sweep 0.6,1,1.6]
        [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch

from moe_uvm import ceilings
from moe_uvm.hybrid import CpuShare, ExpertCosts, default_threads
from moe_uvm.simulate import resident_sizes
from moe_uvm.tools.bench import (
    LayerWeights,
    decode_step,
    hybrid_layer_error,
    hybrid_shares,
    managed_layers,
    managed_residency,
    run_captured,
    run_hybrid,
)
from moe_uvm.tools.bench_sweep import BenchConfig, make_workload


def eager_ms(step, steps: int, warmup: int) -> float:
    """Median wall time of `step(s)`, each ending in a sync, over the steps after `warmup`."""
    times = []
    for s in range(steps):
        t0 = time.perf_counter()
        step(s)
        torch.cuda.synchronize()
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(work, manager, managed, device_layers, shares, batch: int, args) -> dict:
    ids, weights = work.routing(batch, args.steps)
    h0 = torch.randn(batch, work.hidden, device=work.device).to(work.dtype)
    ref = decode_step(h0, ids[args.warmup], weights[args.warmup], device_layers)
    graph_ms, graph_out = run_captured(work, managed, ids, weights, h0, warmup=args.warmup)
    eager = eager_ms(lambda s: decode_step(h0, ids[s], weights[s], managed), args.steps,
                     args.warmup)
    # The host round trip alone: the hybrid's path with a CPU that never takes an expert.
    never = ExpertCosts(gpu_expert_us=1.0, cpu_expert_us=1e12)
    idle = [CpuShare(w.w13, w.w2, lambda layer=layer: manager.resident_ids(layer), costs=never,
                     quant=w.quant, threads=shares[0].threads, adapt=False,
                     signal=args.signal)
            for layer, w in enumerate(managed)]
    trip_ms, _ = run_hybrid(idle, ids, weights, h0, args.warmup)
    del idle
    err = hybrid_layer_error(shares, device_layers, h0, ids[args.warmup],
                             weights[args.warmup])
    eager_hybrid_ms, _ = run_hybrid(shares, ids, weights, h0, args.warmup, graph=False)
    hybrid_ms, _ = run_hybrid(shares, ids, weights, h0, args.warmup)
    stats = [s.stats.summary() for s in shares]
    cpu_n = sum(st["cpu_experts"] for st in stats)
    total = cpu_n + sum(st["gpu_offloaded_experts"] for st in stats)
    costs = shares[0].current_costs()
    sweep = []
    for scale in args.sweep:
        # The split fixed at the adapted costs with the CPU's per-expert time scaled: where
        # the adapted split sits against the best fixed one of this pipeline.
        fixed = ExpertCosts(**dict(vars(costs), cpu_expert_us=costs.cpu_expert_us * scale))
        pinned = [CpuShare(w.w13, w.w2, lambda layer=layer: manager.resident_ids(layer),
                           costs=fixed, quant=w.quant, threads=shares[0].threads, adapt=False,
                           signal=args.signal)
                  for layer, w in enumerate(managed)]
        ms, _ = run_hybrid(pinned, ids, weights, h0, args.warmup)
        st = [p.stats.summary() for p in pinned]
        cpu = sum(x["cpu_experts"] for x in st)
        sweep.append(dict(cpu_cost_scale=scale, hybrid_ms=ms, hybrid_over_graph=graph_ms / ms,
                          cpu_share_of_offloaded=cpu / max(cpu + sum(
                              x["gpu_offloaded_experts"] for x in st), 1)))
        print(f"  fixed split, CPU cost x{scale:g}: {ms:.2f} ms ({graph_ms / ms:.2f}x graph), "
              f"CPU share {sweep[-1]['cpu_share_of_offloaded']:.0%}", flush=True)
        del pinned
    return dict(batch=batch, gpu_graph_ms=graph_ms, gpu_eager_ms=eager, round_trip_ms=trip_ms,
                round_trip_us_per_layer=(trip_ms - graph_ms) / len(managed) * 1e3,
                hybrid_ms=hybrid_ms, hybrid_eager_ms=eager_hybrid_ms,
                gpu_graph_tok_s=batch / graph_ms * 1e3,
                hybrid_tok_s=batch / hybrid_ms * 1e3, hybrid_over_graph=graph_ms / hybrid_ms,
                cpu_share_of_offloaded=cpu_n / max(total, 1),
                gpu_first_share=statistics.mean(
                    [st["gpu_first"] for st in stats if st["gpu_first"] is not None] or [0.0]),
                cpu_layer_ms_median=statistics.median(
                    [st["cpu_ms_median"] for st in stats if st["cpu_experts"]] or [0.0]),
                cpu_layer_ms_p90=statistics.median(
                    [st["cpu_ms_p90"] for st in stats if st["cpu_experts"]] or [0.0]),
                cpu_expert_us=costs.cpu_expert_us, cpu_pair_us=costs.cpu_pair_us,
                gpu_expert_us=costs.gpu_expert_us, gpu_fixed_us=costs.gpu_fixed_us,
                cpu_fixed_us=costs.cpu_fixed_us, fixed_split_sweep=sweep,
                max_layer_rel_err=err,
                gpu_only_equal=torch.equal(graph_out, ref))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", required=True, help="routing trace (.npz, or a bundled name)")
    parser.add_argument("--model-shape", default="qwen3-30b-a3b",
                        help="expert sizes (a preset: qwen3-30b-a3b, mixtral-8x7b)")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--resident", default="0%,50%")
    parser.add_argument("--batch", default="1,4")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps first (the "
                        "hybrid's costs adapt in them)")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="CPU threads (default: all cores but one, which drives the GPU)")
    parser.add_argument("--signal", default="auto", choices=("auto", "doorbell", "host_node"),
                        help="how the GPU's stream hands the CPU its share (CpuShare's signal; "
                        "auto: the doorbell where stream memory operations work)")
    parser.add_argument("--sweep", type=lambda v: [float(x) for x in v.split(",")],
                        default=[], help="after the adaptive hybrid, fixed splits at the "
                        "adapted costs with the CPU's per-expert time scaled by each of these "
                        "(e.g. 0.6,0.8,1,1.25,1.6): how near the adaptive split is to the best")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"
                                             / "hybrid_decode.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("hybrid_decode.py needs a CUDA GPU")
    if not 0 <= args.warmup < args.steps - 1:
        sys.exit(f"--warmup {args.warmup} must leave at least 2 timed steps of {args.steps}")
    batches = [int(b) for b in args.batch.split(",")]
    cfg = BenchConfig(trace=args.trace, model_shape=args.model_shape, layers=args.layers,
                      resident=args.resident, batches=tuple(batches), steps=args.steps,
                      warmup_tokens=0)
    work = make_workload(cfg)
    counts = resident_sizes(args.resident, work.num_experts)
    manager, managed = managed_layers(work)
    manager.synchronize()
    shares = hybrid_shares(work, manager, managed, args.threads, signal=args.signal)
    start_costs = dict(vars(shares[0].costs))
    print(f"start costs: {start_costs}", flush=True)
    device_layers = [LayerWeights(w13, w2, quant=work.layer_quant(i))
                     for i, (w13, w2) in enumerate(zip(work.w13, work.w2, strict=True))]
    rows = []
    for n in counts:
        for layer, ids in enumerate(managed_residency(work, "profile", n)):
            manager.readvise(layer, ids)
        manager.synchronize()
        for batch in batches:
            row = measure(work, manager, managed, device_layers, shares, batch, args)
            rows.append(dict(resident=n, resident_fraction=n / work.num_experts, **row))
            print(f"resident {n}/{work.num_experts} B={batch}: GPU graph "
                  f"{row['gpu_graph_ms']:.2f} ms, eager {row['gpu_eager_ms']:.2f}, round trip "
                  f"{row['round_trip_us_per_layer']:.0f} us a layer, hybrid "
                  f"{row['hybrid_ms']:.2f} ms ({row['hybrid_over_graph']:.2f}x graph; eager "
                  f"{row['hybrid_eager_ms']:.2f} ms), CPU took "
                  f"{row['cpu_share_of_offloaded']:.0%} of the offloaded experts "
                  f"({row['cpu_expert_us']:.0f} us each vs GPU {row['gpu_expert_us']:.0f}; "
                  f"GPU first in {row['gpu_first_share']:.0%} of the layers), "
                  f"layer error {row['max_layer_rel_err']:.1e}", flush=True)
    result = dict(ceilings.device_summary(), layers=work.num_layers, trace=args.trace,
                  shape=dict(name=args.model_shape, experts=work.num_experts, hidden=work.hidden,
                             expert_bytes=work.expert_bytes),
                  threads=args.threads, signal=shares[0].signal, start_costs=start_costs,
                  steps=args.steps,
                  warmup=args.warmup, rows=rows)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['device']}, {work.num_layers} layers, {args.threads} CPU threads; "
          f"medians over {args.steps - args.warmup} steps\n")
    print("| resident | batch | GPU-only graph tok/s | hybrid tok/s | hybrid / GPU-only | "
          "round trip us/layer | CPU share | layer error |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['resident_fraction']:.0%} | {r['batch']} | {r['gpu_graph_tok_s']:.1f} | "
              f"{r['hybrid_tok_s']:.1f} | {r['hybrid_over_graph']:.2f}x | "
              f"{r['round_trip_us_per_layer']:.0f} | {r['cpu_share_of_offloaded']:.0%} | "
              f"{r['max_layer_rel_err']:.1e} |")
    del shares
    manager.close()


if __name__ == "__main__":
    main()
