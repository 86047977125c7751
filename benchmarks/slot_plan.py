"""Slot-cache planning per MoE layer and decode step inside a CUDA graph, Qwen3-30B-A3B routing
(128 experts, top-8) with S = 8 / 32 slots and T = 1 / 16 tokens: the torch references of
moe_uvm.kernels.slot_plan_reference (plan_fill, + count_prefetch; plan_prefetch, + predicted_mask)
against the one-launch kernels of moe_uvm/kernels/slot_plan.py. Each graph makes 48 calls (one per
layer of a 48-layer step, each on its own pool and routing); per call = median replay time / 48.
The floor measured in the same run is a graph of 48 one-element kernels (one graph node each).

    python benchmarks/slot_plan.py [--out benchmarks/results/slot_plan.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import statistics
import sys
import time

import torch

from moe_uvm import ceilings
from moe_uvm.kernels import plan_fill_fused, plan_prefetch_fused
from moe_uvm.kernels import slot_plan_reference as plan

NUM_EXPERTS, TOP_K, LAYERS = 128, 8, 48
SLOTS, TOKENS = (8, 32), (1, 16)
RESIDENT_FRACTION = 0.3
WARMUP, REPEAT = 3, 20


def capture(fn) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `fn`, run once outside the capture first so the kernels compile."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def per_call_us(graph: torch.cuda.CUDAGraph) -> float:
    for _ in range(WARMUP):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(REPEAT)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) * 1e3 / LAYERS


class Layers:
    """LAYERS pools (each partly filled with offloaded experts, stamps with ties), resident
    masks, routing and scores; `twin()` gives an identical copy to run the other planner on."""

    def __init__(self, num_slots: int, num_tokens: int, gen: torch.Generator) -> None:
        dev, E = "cuda", NUM_EXPERTS
        self.resident = torch.rand(LAYERS, E, generator=gen, device=dev) < RESIDENT_FRACTION
        self.pools = []
        for layer in range(LAYERS):
            pool = plan.empty_slot_state(E, num_slots, device=dev)
            offloaded = (~self.resident[layer]).nonzero().flatten()
            held = offloaded[torch.randperm(len(offloaded), generator=gen, device=dev)]
            held = held[: num_slots * 3 // 4]
            slots = torch.randperm(num_slots, generator=gen, device=dev)[: len(held)]
            pool[0][held] = slots.int()
            pool[1][slots] = held.int()
            pool[2][slots] = torch.randint(0, 4, (len(held),), generator=gen, device=dev)
            self.pools.append(pool)
        logits = torch.rand(LAYERS, num_tokens, E, generator=gen, device=dev)
        self.ids = logits.topk(TOP_K, dim=-1).indices.int()
        self.scores = torch.randint(-1, 6, (LAYERS, E), generator=gen, device=dev).float()
        self.step = torch.tensor(10, device=dev)
        self.counters = torch.zeros(LAYERS, len(plan.METRICS), dtype=torch.int64, device=dev)
        self.masks = torch.zeros(LAYERS, E, dtype=torch.bool, device=dev)
        self.num_predicted = min(num_slots, TOP_K)

    def twin(self) -> Layers:
        other = copy.copy(self)
        other.pools = [[t.clone() for t in pool] for pool in self.pools]
        other.counters, other.masks = self.counters.clone(), self.masks.clone()
        return other

    def state(self) -> list[torch.Tensor]:
        return [t for pool in self.pools for t in pool] + [self.counters, self.masks]


def fill_reference(layers: Layers, counted: bool) -> None:
    for layer, pool in enumerate(layers.pools):
        if counted:
            plan.count_prefetch(layers.counters[layer], layers.ids[layer],
                                layers.resident[layer], pool[0], layers.masks[layer])
        plan.plan_fill(layers.ids[layer], layers.resident[layer], *pool, layers.step)


def fill_fused(layers: Layers, counted: bool) -> None:
    for layer, pool in enumerate(layers.pools):
        counters, mask = (layers.counters[layer], layers.masks[layer]) if counted else (None, None)
        plan_fill_fused(layers.ids[layer], layers.resident[layer], *pool, layers.step, counters,
                        mask)


def prefetch_reference(layers: Layers, masked: bool) -> None:
    for layer, pool in enumerate(layers.pools):
        plan.plan_prefetch(layers.scores[layer], layers.resident[layer], *pool, layers.step,
                           layers.num_predicted)
        if masked:
            layers.masks[layer].copy_(plan.predicted_mask(layers.scores[layer],
                                                          layers.resident[layer],
                                                          layers.num_predicted))


def prefetch_fused(layers: Layers, masked: bool) -> None:
    for layer, pool in enumerate(layers.pools):
        plan_prefetch_fused(layers.scores[layer], layers.resident[layer], *pool, layers.step,
                            layers.num_predicted, layers.masks[layer] if masked else None)


def compare(name: str, reference, fused, num_slots: int, num_tokens: int | None,
            gen: torch.Generator) -> dict:
    """Both planners captured on identical pools, replayed the same number of times: the pools
    must end identical (bitwise)."""
    ref_layers = Layers(num_slots, num_tokens or 1, gen)
    fused_layers = ref_layers.twin()
    ref_us = per_call_us(capture(lambda: reference(ref_layers)))
    fused_us = per_call_us(capture(lambda: fused(fused_layers)))
    bitwise = all(torch.equal(a, b) for a, b in zip(ref_layers.state(), fused_layers.state(),
                                                    strict=True))
    return dict(planner=name, slots=num_slots, tokens=num_tokens, torch_us=ref_us,
                fused_us=fused_us, speedup=ref_us / fused_us, bitwise=bitwise)


def floor_us() -> float:
    """One graph node: a one-element kernel per call."""
    x = torch.zeros(1, device="cuda")

    def nodes() -> None:
        for _ in range(LAYERS):
            x.add_(1)

    return per_call_us(capture(nodes))


def table(rows: list[dict], floor: float) -> str:
    lines = ["| planner (per layer call) | S | T | torch us | fused us | speedup | bitwise |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['planner']} | {r['slots']} | {r['tokens'] or '-'} | "
                     f"{r['torch_us']:.1f} | {r['fused_us']:.1f} | {r['speedup']:.1f}x | "
                     f"{'yes' if r['bitwise'] else 'NO'} |")
    lines.append(f"| floor: one 1-element kernel node | - | - | {floor:.1f} | - | - | - |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"
                                             / "slot_plan.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("slot_plan.py needs a CUDA GPU")
    started = time.perf_counter()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for num_slots in SLOTS:
        for num_tokens in TOKENS:
            for counted, name in ((False, "plan_fill"), (True, "plan_fill + counters")):
                rows.append(compare(name, lambda ls, c=counted: fill_reference(ls, c),
                                    lambda ls, c=counted: fill_fused(ls, c), num_slots,
                                    num_tokens, gen))
        for masked, name in ((False, "plan_prefetch"), (True, "plan_prefetch + predicted")):
            rows.append(compare(name, lambda ls, m=masked: prefetch_reference(ls, m),
                                lambda ls, m=masked: prefetch_fused(ls, m), num_slots, None,
                                gen))
    floor = floor_us()
    result = dict(ceilings.device_summary(), experts=NUM_EXPERTS, top_k=TOP_K,
                  calls_per_graph=LAYERS, floor_us=floor,
                  timing=f"median of {REPEAT} CUDA-graph replays of {LAYERS} calls, per call",
                  seconds=time.perf_counter() - started, rows=rows)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}, "
          f"E={NUM_EXPERTS}, top-{TOP_K}, {result['seconds']:.0f} s; {result['timing']}\n")
    print(table(rows, floor))


if __name__ == "__main__":
    main()
