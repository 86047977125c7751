"""Filling GPU expert slots on the Qwen3-30B-A3B layer shape (128 experts, H=2048, I=768, top-8,
bf16, 9.4 MB per expert), weights in managed memory advised offloaded (host-resident): the
prefetch copy of 8 experts into device slots (copy_experts_to_slots, CUDA-graph replay) against
the managed read-through ceiling measured in the same run, and the extra time fused_moe takes
when it also fills 8 slots with the experts it reads (fill_slot) at T=1 and T=16; with the
weights in device memory, what the fill variant of the kernels costs when it fills nothing.

    python benchmarks/slot_copy.py [--out benchmarks/results/slot_copy.json]
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
from moe_uvm.kernels import copy_experts_to_slots, fused_moe
from moe_uvm.store import ManagedExpertStore

NUM_EXPERTS, HIDDEN, INTERMEDIATE, TOP_K = 128, 2048, 768, 8
NUM_SLOTS = 8
EXPERT_BYTES = 3 * HIDDEN * INTERMEDIATE * 2
TOKENS = (1, 16)


def capture(fn):
    """A CUDA graph of `fn` (run once outside the capture so the kernels compile first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def replay_us(graph: torch.cuda.CUDAGraph, flush: torch.Tensor, repeat: int = 20) -> float:
    """Median replay time between CUDA events, L2 flushed before each (weights come from
    memory, as they would after the previous layer)."""
    graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(repeat)]
    for start, end in events:
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) * 1e3


def layer_weights() -> tuple[tuple[torch.Tensor, torch.Tensor], ManagedExpertStore]:
    """Random weights (scaled so activations stay O(1)) in device memory, and the same weights in
    a managed store advised offloaded."""
    dev13 = torch.randn(NUM_EXPERTS, 2 * INTERMEDIATE, HIDDEN, device="cuda",
                        dtype=torch.bfloat16).mul_(HIDDEN**-0.5)
    dev2 = torch.randn(NUM_EXPERTS, HIDDEN, INTERMEDIATE, device="cuda",
                       dtype=torch.bfloat16).mul_(INTERMEDIATE**-0.5)
    specs = {"w13": ((2 * INTERMEDIATE, HIDDEN), torch.bfloat16),
             "w2": ((HIDDEN, INTERMEDIATE), torch.bfloat16)}
    store = ManagedExpertStore(NUM_EXPERTS, specs, device="cuda:0")
    store["w13"].copy_(dev13)
    store["w2"].copy_(dev2)
    store.advise_offloaded(range(NUM_EXPERTS))
    torch.cuda.synchronize()
    return (dev13, dev2), store


def slots_hold(pool13, pool2, w13, w2, experts) -> bool:
    return all(torch.equal(pool13[s], w13[e]) and torch.equal(pool2[s], w2[e])
               for s, e in enumerate(experts))


def bench_copy(w13, w2, experts: list[int], pool13, pool2, flush, source: str,
               read_through: float) -> dict:
    copy_experts = torch.tensor(experts, dtype=torch.int32, device="cuda")
    copy_slots = torch.arange(NUM_SLOTS, dtype=torch.int32, device="cuda")
    graph, _ = capture(lambda: copy_experts_to_slots(w13, w2, copy_experts, copy_slots, pool13,
                                                     pool2))
    pool13.zero_()  # what the slots hold at the end comes from the replays
    pool2.zero_()
    us = replay_us(graph, flush)
    mbytes = len(experts) * EXPERT_BYTES / 1e6
    gbps = mbytes / us * 1e3
    return dict(measurement=f"copy {len(experts)} experts, {source} -> slots", tokens=None,
                mbytes=mbytes, us=us, gbps=gbps,
                of_read_through=None if source == "device" else gbps / read_through,
                bitwise=slots_hold(pool13, pool2, w13, w2, experts))


def bench_fill(w13, w2, placement: str, pool13, pool2, flush, num_tokens: int, num_filled: int,
               read_through: float | None) -> list[dict]:
    """fused_moe without fill_slot, and with fill_slot naming `num_filled` routed experts (all
    read from w13/w2)."""
    generator = torch.Generator(device="cuda").manual_seed(num_tokens)
    x = torch.randn(num_tokens, HIDDEN, device="cuda", generator=generator).bfloat16()
    logits = torch.randn(num_tokens, NUM_EXPERTS, device="cuda", generator=generator)
    topk_weights, topk_ids = torch.softmax(logits, -1).topk(TOP_K, dim=-1)
    topk_ids = topk_ids.to(torch.int32)
    routed = topk_ids.unique().tolist()
    filled = routed[:num_filled]
    expert_slot = torch.full((NUM_EXPERTS,), -1, dtype=torch.int32, device="cuda")
    fill_slot = expert_slot.clone()
    fill_slot[filled] = torch.arange(len(filled), dtype=torch.int32, device="cuda")
    plain_graph, plain = capture(lambda: fused_moe(x, w13, w2, topk_weights, topk_ids))
    fill_graph, filling = capture(lambda: fused_moe(
        x, w13, w2, topk_weights, topk_ids, expert_slot=expert_slot, w13_slots=pool13,
        w2_slots=pool2, fill_slot=fill_slot))
    pool13.zero_()  # what the slots hold at the end comes from the replays
    pool2.zero_()
    plain_us, fill_us = replay_us(plain_graph, flush), replay_us(fill_graph, flush)
    bitwise = torch.equal(plain, filling) and slots_hold(pool13, pool2, w13, w2, filled)
    mbytes = len(routed) * EXPERT_BYTES / 1e6
    rows = []
    for name, us in (("", plain_us), (f", fill_slot ({len(filled)} filled)", fill_us)):
        gbps = mbytes / us * 1e3
        rows.append(dict(measurement=f"fused_moe, {placement}{name}", tokens=num_tokens,
                         experts=len(routed), filled=len(filled) if name else 0, mbytes=mbytes,
                         us=us, gbps=gbps, bitwise=bitwise,
                         of_read_through=None if read_through is None else gbps / read_through))
    rows[1].update(extra_us=fill_us - plain_us, extra=(fill_us - plain_us) / plain_us)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| measurement | T | MB read | us | GB/s | of read-through | extra for fill | "
             "bitwise |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        ceiling = "-" if r["of_read_through"] is None else f"{r['of_read_through']:.0%}"
        extra = (f"{r['extra_us']:+.1f} us ({r['extra']:+.1%})" if "extra_us" in r else "-")
        lines.append(f"| {r['measurement']} | {r['tokens'] or '-'} | {r['mbytes']:.1f} | "
                     f"{r['us']:.1f} | {r['gbps']:.1f} | {ceiling} | {extra} | "
                     f"{'yes' if r['bitwise'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"
                                             / "slot_copy.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("slot_copy.py needs a CUDA GPU")
    started = time.perf_counter()
    read_through = ceilings.read_through_gbps()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # > H100's 50 MB L2
    (dev13, dev2), store = layer_weights()
    w13, w2 = store["w13"], store["w2"]
    pool13 = torch.empty((NUM_SLOTS, *w13.shape[1:]), dtype=w13.dtype, device="cuda")
    pool2 = torch.empty((NUM_SLOTS, *w2.shape[1:]), dtype=w2.dtype, device="cuda")
    spread = list(range(0, NUM_EXPERTS, NUM_EXPERTS // NUM_SLOTS))  # 8 experts, 16 apart
    rows = [bench_copy(w13, w2, spread, pool13, pool2, flush, "managed (host)", read_through),
            bench_copy(dev13, dev2, spread, pool13, pool2, flush, "device", read_through)]
    for num_tokens in TOKENS:
        rows += bench_fill(w13, w2, "offloaded", pool13, pool2, flush, num_tokens, NUM_SLOTS,
                           read_through)
    # With fill_slot given the kernels compile a variant that holds more registers: device
    # weights with nothing to fill show what it costs where HBM, not PCIe, bounds the kernel
    # (the resident experts of a layer whose offloaded experts fill slots).
    for num_tokens in TOKENS:
        rows += bench_fill(dev13, dev2, "device", pool13, pool2, flush, num_tokens, 0, None)
    store.free()
    result = dict(ceilings.device_summary(), read_through_gbps=read_through,
                  timing="median of 20 CUDA-graph replays, L2 flushed before each",
                  seconds=time.perf_counter() - started, rows=rows)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['device']}, torch {result['torch']}, managed read-through "
          f"{read_through:.1f} GB/s, {result['seconds']:.0f} s; {result['timing']}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
