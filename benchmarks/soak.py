"""Soak: 10,000 batch-1 decode steps as CUDA-graph replays, adaptive re-advise and the slot cache
on, routing drifting so residency keeps moving (DeepSeek-V2-Lite's layer shape). Checks that
torch's allocated memory stays flat, that the driver's used memory never exceeds what was used
before building + the runtime's budget (resident experts, slots, other torch allocations) + the
pool demotion does not give back (measured first), that sampled replays are bitwise equal to an
all-resident model's, and that the worker hit no error.

    python benchmarks/soak.py [--layers 4] [--steps 10000] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

# Run as a script its folder is on sys.path: the model, step and argument helpers are shared.
from readvise_latency import RESULTS, SHAPE, at_least, build, decode, device_folder

from moe_uvm import ceilings, uvm
from moe_uvm.config import ExpertOffloadConfig

MIB = 1 << 20
FLAT_ALLOCATED = 64 * MIB
# Driver memory outside torch's allocator that lands after the "before building" reading:
# kernel modules loaded on first launch (Triton, cuBLAS) and CUDA graph executables (measured
# about 70 MiB at the first sample on an H200); this bounds it.
CODE_ALLOWANCE = 256 * MIB


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=at_least(1), default=4)
    parser.add_argument("--resident", type=at_least(1), default=16)
    parser.add_argument("--slots", type=at_least(1), default=8)
    parser.add_argument("--steps", type=at_least(1000), default=10_000)
    parser.add_argument("--phase-steps", type=at_least(1), default=500,
                        help="steps before the hot experts move on by half a resident set")
    parser.add_argument("--sample-every", type=at_least(1), default=100)
    parser.add_argument("--check-every", type=at_least(1), default=1000,
                        help="steps between bitwise checks against the all-resident graph")
    parser.add_argument("--settle-steps", type=at_least(0), default=500,
                        help="warm-up steps before torch's allocated memory must stay flat")
    parser.add_argument("--out", default=None,
                        help="JSON path (default: benchmarks/results/<gpu>/soak.json)")
    args = parser.parse_args(argv)
    if 2 * args.resident + args.slots > SHAPE.num_experts:
        parser.error(f"--resident {args.resident} --slots {args.slots}: two disjoint resident "
                     f"sets and the slots must fit in {SHAPE.num_experts} experts")
    if args.settle_steps >= args.steps:
        parser.error(f"--settle-steps {args.settle_steps} must be < --steps {args.steps}")
    return args


def driver_used(device: int) -> int:
    free, total = uvm.mem_get_info(device)
    return total - free


def settled_free(device: int, managers) -> int:
    for manager in managers:
        manager.wait_idle()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return uvm.mem_get_info(device)[0]


def retained_pool(device: int, manager, num_layers: int, resident: int) -> dict:
    """GPU memory demotion keeps. Every layer's resident set rotates through all its experts
    (each offloaded expert promoted once, then demoted) and back; what free memory lost is the
    pool. One swap is not enough: the driver keeps a page for every expert page it ever
    promoted (measured: the pool grows with each distinct expert and stops at all of them), so
    drifting routing reaches the whole rotation's worth."""
    before = settled_free(device, [manager])
    original = [manager.resident_ids(layer) for layer in range(num_layers)]
    E = SHAPE.num_experts
    for layer, ids in enumerate(original):
        others = [e for e in range(E) if e not in ids]
        for first in range(0, len(others), resident):
            chunk = others[first:first + resident]
            chunk += [e for e in ids if e not in chunk][: resident - len(chunk)]
            manager.readvise(layer, chunk)
        manager.readvise(layer, ids)
    after = settled_free(device, [manager])
    offloaded = num_layers * (E - resident) * manager.stores[0].slot_nbytes
    return dict(bytes=max(before - after, 0), offloaded_expert_bytes=offloaded)


def drift_bias(num_phases: int, num_layers: int, resident: int) -> torch.Tensor:
    """[phases, layers, experts] logit bias: a window of `resident` hot experts per layer that
    moves by resident/2 each phase (layers offset from one another)."""
    E = SHAPE.num_experts
    bias = torch.zeros(num_phases, num_layers, E)
    for phase in range(num_phases):
        for layer in range(num_layers):
            first = phase * max(resident // 2, 1) + layer * 7
            bias[phase, layer, [(first + i) % E for i in range(resident)]] = 4.0
    return bias.cuda()


def capture(fn):
    """Warm-up on a side stream, then a capture (torch's rule for CUDA graphs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def budget(manager, ref_manager, num_layers: int, reserved0: int) -> dict:
    """What the runtime may hold on the GPU now, from the managers and torch's allocator."""
    slot_nbytes = manager.stores[0].slot_nbytes
    resident = sum(len(manager.resident_ids(layer)) for layer in range(num_layers)) * slot_nbytes
    reference = sum(len(ref_manager.resident_ids(layer)) for layer in range(num_layers))
    slots = manager.slot_cache.nbytes if manager.slot_cache is not None else 0
    torch_bytes = torch.cuda.memory_reserved() - reserved0  # slots, counts, graph pools
    return dict(resident=resident, reference_resident=reference * slot_nbytes, slots=slots,
                torch_other=torch_bytes - slots,
                total=resident + reference * slot_nbytes + torch_bytes)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def soak(args, device: int, used0: int, reserved0: int) -> dict:
    L = args.layers
    config = ExpertOffloadConfig(
        num_resident=args.resident, resident_selection="frequency", warmup_tokens=64,
        min_batch_tokens=1, adaptive=True, adaptive_interval_tokens=64,
        adaptive_half_life_tokens=128, prefetch="speculative", prefetch_slots=args.slots,
    )
    (layers, manager), (ref_layers, ref_manager) = build(
        L, config, ExpertOffloadConfig(num_resident=-1))
    with manager, ref_manager:
        retained = retained_pool(device, manager, L, args.resident)
        x = torch.randn(1, SHAPE.hidden_size, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(L, 1, SHAPE.num_experts, device="cuda")
        bias = drift_bias(args.steps // args.phase_steps + 1, L, args.resident)
        graph, out = capture(lambda: decode(layers, x, logits))
        ref_graph, ref_out = capture(lambda: decode(ref_layers, x, logits))
        samples, checks = [], []
        started = time.perf_counter()
        for step in range(args.steps):
            x.normal_()
            logits.normal_().add_(bias[step // args.phase_steps][:, None, :])
            graph.replay()
            if step % args.check_every == 0 or step == args.steps - 1:
                ref_graph.replay()
                torch.cuda.synchronize()
                checks.append(dict(step=step, bitwise=torch.equal(out, ref_out)))
            if step % args.sample_every == 0 or step == args.steps - 1:
                torch.cuda.synchronize()
                b = budget(manager, ref_manager, L, reserved0)
                limit = used0 + b["total"] + retained["bytes"] + CODE_ALLOWANCE
                samples.append(dict(step=step, allocated=torch.cuda.memory_allocated(),
                                    used=driver_used(device), limit=limit, budget=b))
        manager.wait_idle()
        soak_seconds = time.perf_counter() - started
        stats, failures = manager.stats(), [str(f) for f in manager.failures]
    settled = [s["allocated"] for s in samples if s["step"] >= args.settle_steps]
    over = max(s["used"] - s["limit"] for s in samples)
    criteria = {
        "allocated flat after warm-up (MiB spread, <= 64)": dict(
            value=(max(settled) - min(settled)) / MIB,
            verdict=verdict(max(settled) - min(settled) <= FLAT_ALLOCATED)),
        "driver used <= before + budget + retained pool (worst MiB over, <= 0)": dict(
            value=over / MIB, verdict=verdict(over <= 0)),
        "sampled replays bitwise equal to all-resident": dict(
            value=f"{sum(c['bitwise'] for c in checks)}/{len(checks)}",
            verdict=verdict(all(c["bitwise"] for c in checks))),
        "worker errors (manager.failures, 0)": dict(
            value=len(failures), verdict=verdict(not failures and stats["failures"] == 0)),
        "adaptive re-advises happened (> 0)": dict(
            value=stats["readvises"], verdict=verdict(stats["readvises"] > 0)),
    }
    return dict(retained_pool=retained, stats=stats, failures=failures, criteria=criteria,
                soak_seconds=soak_seconds, steps_per_s=args.steps / soak_seconds,
                checks=checks, samples=samples)


def table(criteria: dict) -> str:
    lines = ["| criterion | value | verdict |", "| --- | ---: | --- |"]
    for name, c in criteria.items():
        value = f"{c['value']:.1f}" if isinstance(c["value"], float) else str(c["value"])
        lines.append(f"| {name} | {value} | {c['verdict']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("soak.py needs a CUDA GPU", file=sys.stderr)
        raise SystemExit(2)
    started = time.perf_counter()
    device = torch.cuda.current_device()
    torch.zeros(1, device="cuda")  # the CUDA context is not part of what the runtime uses
    torch.cuda.synchronize()
    used0, reserved0 = driver_used(device), torch.cuda.memory_reserved()
    result = dict(ceilings.device_summary(), shape=SHAPE.name, layers=args.layers,
                  experts=SHAPE.num_experts, top_k=SHAPE.top_k, resident=args.resident,
                  slots=args.slots, steps=args.steps, phase_steps=args.phase_steps,
                  used_before_build=used0, code_allowance=CODE_ALLOWANCE)
    result.update(soak(args, device, used0, reserved0))
    ok = all(c["verdict"] == "PASS" for c in result["criteria"].values())
    result.update(verdict=verdict(ok), seconds=time.perf_counter() - started)
    out = pathlib.Path(args.out or RESULTS / device_folder(result["device"]) / "soak.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    s = result["stats"]
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}; "
          f"{args.layers} layers of {SHAPE.name}, {args.resident} resident + {args.slots} slots "
          f"per layer, {args.steps} graph replays at {result['steps_per_s']:.0f} steps/s, "
          f"{result['seconds']:.0f} s in all\n")
    print(table(result["criteria"]))
    print(f"\nre-advise: {s['decisions']} decisions, {s['readvises']} re-advises, "
          f"{s['promoted']} promoted / {s['demoted']} demoted ({s['bytes_moved'] / 1e9:.2f} GB); "
          f"retained pool {result['retained_pool']['bytes'] / MIB:.0f} MiB of "
          f"{result['retained_pool']['offloaded_expert_bytes'] / MIB:.0f} MiB offloaded; "
          f"{result['verdict']}; results in {out}")


if __name__ == "__main__":
    main()
