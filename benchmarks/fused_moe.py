"""Fused-MoE kernel on the Mixtral-8x7B and Qwen3-30B-A3B layer shapes, T in 1..256, bf16 or
FP8 (--weight-dtype fp8: e4m3 with 128 x 128 block scales, bf16 activations):
time (CUDA-graph replay, L2 flushed before each), bytes of distinct experts read, bandwidth
against the HBM read and managed read-through ceilings measured in the same run, for weights in
device memory, in managed memory advised resident, and advised offloaded; plus the plain-torch
reference. The default (--no-tune) benchmarks this GPU model's tables in moe_uvm/kernels/configs/
(or the rules, for a GPU without a file).
`--tune` first sweeps grouped-path configs per (shape, T) with block_m >= min_block_m (for
T >= 64 keeping, among configs within 3% of the best device time, the fastest with offloaded
weights) and one-token configs at T=1 (or the grouped path where that is faster), writes them
into this GPU model's file in moe_uvm/kernels/configs/ (other shapes' entries kept), and benchmarks
with them. FP8 weights are tuned into entries of their own (grouped path only), and their
benchmark adds device rows widened by Triton's conversion (the A/B of moe_uvm/kernels/fp8_widen.py).

    python benchmarks/fused_moe.py [--tune | --no-tune] [--weight-dtype bf16|fp8]
        [--out benchmarks/results/fused_moe.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import pathlib
import statistics
import sys
import time

import torch
import triton
from triton.runtime.errors import OutOfResources

from moe_uvm import ceilings
from moe_uvm.kernels import fp8, fused_moe, fused_moe_reference
from moe_uvm.kernels.fp8_widen import set_alu_widen
from moe_uvm.kernels.fused_moe import fused_moe_triton
from moe_uvm.kernels.fused_moe_configs import (
    MoeBlockConfig,
    MoeDecodeConfig,
    TunedTables,
    config_file,
    config_key,
    default_decode_config,
    min_block_m,
    save_tables,
    select_config,
    select_decode_config,
    tuned_tables,
)
from moe_uvm.kernels.streaming_read import streaming_read
from moe_uvm.store import ManagedExpertStore

# The launcher's module (the package exports its function under the same name).
kernel_module = importlib.import_module("moe_uvm.kernels.fused_moe")

SHAPES = {
    "mixtral-8x7b": dict(num_experts=8, top_k=2, hidden=4096, intermediate=14336),
    "qwen3-30b-a3b": dict(num_experts=128, top_k=8, hidden=2048, intermediate=768),
}
TOKENS = (1, 4, 16, 64, 256)
# Resident-weight decode targets (fraction of the HBM read ceiling), per shape.
# Resident-weight targets (fraction of the HBM read ceiling) by shape and T (issue 16).
RESIDENT_TARGET = {
    "mixtral-8x7b": {1: 0.9, 4: 0.9, 16: 0.9, 64: 0.9},
    "qwen3-30b-a3b": {1: 0.65, 4: 0.75, 16: 0.8, 64: 0.8, 256: 0.7},
}
OFFLOADED_TARGET = 0.95
# FP8 experts (issue 17), over fp8 bytes + scales: Mixtral >= 70% for T <= 16, Qwen3 >= 70% for
# T >= 16 and at T = 1 and 4 what the bf16 kernels reached on the H200 (0.68, 0.84).
RESIDENT_TARGET_FP8 = {
    "mixtral-8x7b": {1: 0.7, 4: 0.7, 16: 0.7},
    "qwen3-30b-a3b": {1: 0.68, 4: 0.84, 16: 0.7, 64: 0.7, 256: 0.7},
}
FP8_BLOCK = (128, 128)
# Within this fraction of the best device time, --tune prefers the fastest offloaded config.
DEVICE_SLACK = 1.03
# (block_n, block_k, warps, stages) tried for the gate/up GEMM, by block_m: thin row tiles
# (16, 32) then wide ones; 8 warps at block_m=128 keep the two accumulators out of spills.
# More warps and fewer stages at the same tile keep more loads in flight per SM (the small-
# expert shapes are bound by that, not by the tensor cores).
GATE_UP = {
    16: [(16, 256, 4, 3), (16, 128, 4, 4), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4),
         (64, 64, 4, 5), (32, 128, 8, 4), (64, 128, 8, 3), (128, 64, 4, 3), (32, 256, 8, 2),
         (64, 64, 8, 4), (128, 128, 8, 2)],
    64: [(64, 64, 4, 4), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (64, 128, 8, 3)],
    128: [(64, 64, 8, 3), (64, 64, 8, 4), (64, 128, 8, 3), (32, 128, 4, 3)],
}
# (block_n, block_k, warps, stages) for the down GEMM; each is tried with several split-K.
DOWN = {
    16: [(32, 128, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 4), (128, 64, 4, 4),
         (64, 128, 8, 3), (128, 128, 8, 3), (256, 64, 8, 3)],
    64: [(128, 64, 4, 4), (64, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3)],
    128: [(128, 64, 8, 3), (64, 64, 8, 4), (128, 128, 8, 3), (64, 128, 8, 3)],
}
GATE_UP[32], DOWN[32] = GATE_UP[16], DOWN[16]
# FP8 weights: half the bytes per tile, so deeper pipelines keep as many bytes in flight per SM
# (at T=1 a Qwen3 layer has only ~1.5 gate/up programs per SM); tried after the lists above.
GATE_UP_FP8 = {
    16: [(16, 128, 4, 6), (32, 128, 4, 6), (32, 128, 4, 8), (64, 128, 4, 6), (64, 128, 8, 6),
         (32, 128, 8, 6), (128, 128, 8, 4)],
    64: [(64, 128, 8, 4), (128, 128, 8, 3)],
    128: [(64, 128, 8, 4), (128, 128, 8, 3)],
}
DOWN_FP8 = {
    16: [(64, 128, 4, 6), (128, 128, 4, 6), (64, 128, 8, 6), (128, 128, 8, 5), (32, 128, 4, 8)],
    64: [(128, 128, 8, 4), (64, 128, 8, 4)],
    128: [(128, 128, 8, 4), (64, 128, 8, 4)],
}
GATE_UP_FP8[32], DOWN_FP8[32] = GATE_UP_FP8[16], DOWN_FP8[16]
# One-token path: (block_n, block_k, warps) for gate/up and for down, tried around the rule.
DECODE_GATE_UP = [(16, 256, 4), (8, 512, 4), (32, 128, 4), (8, 256, 4), (16, 512, 8)]
DECODE_DOWN = [(2, 256, 4), (4, 256, 4), (8, 256, 4), (4, 512, 4), (8, 512, 4), (16, 256, 8)]

@functools.cache
def _l2_flush_buffer() -> torch.Tensor:
    return torch.empty(256 << 19, dtype=torch.bfloat16, device="cuda")  # 256 MB > any L2


def flush_l2(how: str = "read") -> None:
    """Evict the weights from L2 before a timed call. "read" streams a 256 MB buffer, leaving
    L2 full of clean lines, as a decode step finds it after the previous layer read its
    weights; "write" (zero_, what this script did up to issue 16) leaves up to the whole L2
    dirty, and writing it back during the timed call costs an H200 ~10 us (50 MB at HBM
    speed): a cost no decode step pays, and large against a 20-40 us small-expert layer."""
    if how == "read":
        streaming_read(_l2_flush_buffer())
    else:
        _l2_flush_buffer().zero_()


def median_ms(fn, budget_ms: float = 150.0, flush: str = "read") -> float:
    """Median of `fn()` between CUDA events, L2 flushed before each call (weights must come
    from memory, as they would after the previous layer), 5..200 repeats within the budget."""
    flush_l2(flush)
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    reps = int(min(200, max(5, budget_ms / 1e3 / max(time.perf_counter() - t0, 1e-6))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        flush_l2(flush)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def graph_ms(call, budget_ms: float = 150.0, flush: str = "read") -> float:
    """Capture `call` (a decode step would be replayed from a graph) and time the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    ms = median_ms(graph.replay, budget_ms, flush)
    del graph
    return ms


def device_weights(shape: dict, weight_dtype: str = "bf16"):
    """Random weights in the store's layout (2 MiB-aligned expert slots) in device memory:
    (w13, w2, quantisation kwargs of fused_moe). fp8: e4m3 with 128 x 128 block scales
    (the FP8 checkpoints' layout), quantised from the same bf16 draws one expert at a time."""
    e, h, i = shape["num_experts"], shape["hidden"], shape["intermediate"]
    dtype = fp8.FP8_DTYPE if weight_dtype == "fp8" else torch.bfloat16
    per_slot = (1 << 21) // torch.empty((), dtype=dtype).element_size()  # elements in 2 MiB
    slot = (3 * i * h + per_slot - 1) // per_slot * per_slot
    flat = torch.empty(e * slot, dtype=dtype, device="cuda")
    w13 = flat.as_strided((e, 2 * i, h), (slot, h, 1))
    w2 = flat.as_strided((e, h, i), (slot, i, 1), 2 * i * h)
    quant, scales = {}, None
    if weight_dtype == "fp8":
        scales = (torch.empty(fp8.scale_shape(e, 2 * i, h, FP8_BLOCK, 2), device="cuda"),
                  torch.empty(fp8.scale_shape(e, h, i, FP8_BLOCK), device="cuda"))
        quant = dict(w13_scale=scales[0], w2_scale=scales[1], block_shape=FP8_BLOCK)
    for expert in range(e):
        g13 = torch.randn(1, 2 * i, h, device="cuda") * h**-0.5
        g2 = torch.randn(1, h, i, device="cuda") * i**-0.5
        if scales is None:
            w13[expert].copy_(g13[0])
            w2[expert].copy_(g2[0])
            continue
        for w, g, s, halves in ((w13, g13, scales[0], 2), (w2, g2, scales[1], 1)):
            q, scale = fp8.quantize(g, FP8_BLOCK, halves)
            w[expert].copy_(q[0])
            s[expert].copy_(scale[0])
    return w13, w2, quant


def routing(shape: dict, num_tokens: int, generator: torch.Generator):
    x = torch.randn(num_tokens, shape["hidden"], device="cuda", generator=generator)
    logits = torch.randn(num_tokens, shape["num_experts"], device="cuda", generator=generator)
    topk_weights, topk_ids = torch.softmax(logits, -1).topk(shape["top_k"], dim=-1)
    return x.bfloat16(), topk_weights, topk_ids.to(torch.int32)


def timed_ms(weights, inputs, config, budget_ms: float = 40.0, quant: dict | None = None) -> float:
    (w13, w2), (x, topk_weights, topk_ids) = weights, inputs
    call = functools.partial(fused_moe_triton, x, w13, w2, topk_weights, topk_ids, config=config,
                             **(quant or {}))
    try:
        return graph_ms(call, budget_ms=budget_ms)
    except OutOfResources:  # a tile that needs more shared memory than the SM has
        return float("inf")


def tune_one(shape: dict, weights, offloaded, inputs, num_tokens: int,
             quant: dict | None = None) -> dict:
    """Coordinate search from the current table entry (which it can only beat, or trade for at
    most DEVICE_SLACK of device time): row tile (>= min_block_m), then gate/up tiles, then down
    tiles and split-K. For T >= 64, the configs within DEVICE_SLACK of the best device time are
    timed with offloaded weights and the fastest there wins. FP8 weights (`quant`, block
    scales) take K steps of at most one scale block: longer ones are tried as that."""
    e, k, h, i = (shape[n] for n in ("num_experts", "top_k", "hidden", "intermediate"))
    measured: dict[MoeBlockConfig, float] = {}
    block_k_cap = quant["block_shape"][1] if quant and quant.get("block_shape") else None

    def consider(config: MoeBlockConfig) -> MoeBlockConfig:
        if block_k_cap is not None:
            config = dataclasses.replace(
                config, gate_up_block_k=min(config.gate_up_block_k, block_k_cap),
                down_block_k=min(config.down_block_k, block_k_cap))
        if config not in measured:
            measured[config] = timed_ms(weights, inputs, config, quant=quant)
        return min(measured, key=measured.get)

    dtype = weights[0].dtype if quant else torch.bfloat16
    start = select_config(e, h, i, k, dtype, num_tokens, device_tables())
    best = start = consider(start)  # (as run: FP8 K steps capped)
    floor = min_block_m(e, k, num_tokens)
    rows_per_expert = num_tokens * k / min(e, num_tokens * k)
    for m in (16, 32, 64, 128):
        if floor <= m <= max(floor, 4 * rows_per_expert):
            best = consider(dataclasses.replace(start, block_m=m))
    extra_gate_up, extra_down = (GATE_UP_FP8, DOWN_FP8) if quant else ({}, {})
    for n, kk, warps, stages in GATE_UP[best.block_m] + extra_gate_up.get(best.block_m, []):
        best = consider(dataclasses.replace(best, gate_up_block_n=n, gate_up_block_k=kk,
                                            gate_up_warps=warps, gate_up_stages=stages))
    active = min(e, num_tokens * k)
    for n, kk, warps, stages in DOWN[best.block_m] + extra_down.get(best.block_m, []):
        for split in (1, 2, 4, 8):
            too_many = active * (h // n) * split > 8 * 132 and split > 1
            if too_many or i < 2 * kk * split:
                continue
            best = consider(dataclasses.replace(best, down_block_n=n, down_block_k=kk,
                                                down_warps=warps, down_stages=stages,
                                                down_split_k=split))
    device_ms = measured[best]
    result = dict(config=best, us=device_ms * 1e3, table_us=measured[start] * 1e3)
    if num_tokens >= 64:
        near = sorted((c for c, ms in measured.items() if ms <= DEVICE_SLACK * device_ms),
                      key=measured.get)[:4]
        offloaded_ms = {c: timed_ms(offloaded, inputs, c, budget_ms=300, quant=quant)
                        for c in near}
        best = min(offloaded_ms, key=offloaded_ms.get)
        result.update(config=best, us=measured[best] * 1e3,
                      offloaded_us=offloaded_ms[best] * 1e3)
    return result


def tune_decode(shape: dict, weights, inputs) -> tuple[MoeDecodeConfig, float]:
    """One-token GEMV path, from the table entry (or the rule): gate/up tiles, then down
    tiles."""
    e, k, h, i = (shape[n] for n in ("num_experts", "top_k", "hidden", "intermediate"))
    measured: dict[MoeDecodeConfig, float] = {}

    def consider(config: MoeDecodeConfig) -> MoeDecodeConfig:
        if config not in measured:
            measured[config] = timed_ms(weights, inputs, config)
        return min(measured, key=measured.get)

    start = select_decode_config(e, h, i, k, torch.bfloat16, device_tables())
    best = consider(default_decode_config(e, h, i, k) if start is None else start)
    for n, kk, warps in DECODE_GATE_UP:
        if kk <= max(16, triton.next_power_of_2(h)):
            best = consider(dataclasses.replace(best, gate_up_block_n=n, gate_up_block_k=kk,
                                                gate_up_warps=warps))
    for n, kk, warps in DECODE_DOWN:
        if kk <= max(16, triton.next_power_of_2(i)):
            best = consider(dataclasses.replace(best, down_block_n=n, down_block_k=kk,
                                                down_warps=warps))
    return best, measured[best]


def device_tables() -> TunedTables:
    return tuned_tables(torch.cuda.get_device_name(), torch.cuda.get_device_capability())


def write_tables(tuned: dict, decode: dict) -> None:
    """Merge into this GPU model's tables file; the kernels (and this process) use it from now."""
    name = torch.cuda.get_device_name()
    old = device_tables()
    source = (f"python benchmarks/fused_moe.py --tune on {name}, {time.strftime('%Y-%m-%d')}, "
              f"torch {torch.__version__}, triton {triton.__version__} (for T >= 64 the "
              f"fastest with offloaded weights among configs within {DEVICE_SLACK - 1:.0%} of "
              f"the best device time)")
    if old.device_name != name and (old.grouped or old.decode):
        # Another model's tables, borrowed: this model's file starts from them, and says so.
        kept = sorted({*old.grouped, *old.decode} - {*tuned, *decode})
        if kept:
            source += f"; entries for {kept} copied from the {old.device_name} tables"
    tables = TunedTables(name, torch.cuda.get_device_capability(), {**old.grouped, **tuned},
                         {**old.decode, **decode})
    save_tables(tables, config_file(name), source)
    tuned_tables.cache_clear()
    kernel_module._tables.cache_clear()  # the launcher's per-device copy, read before tuning
    print(f"wrote {config_file(name)}")


def offloaded_store(shape: dict, dev13: torch.Tensor, dev2: torch.Tensor) -> ManagedExpertStore:
    """The weights copied into a managed expert store (2 MiB-aligned slots), as the runtime
    holds them; callers advise it resident or offloaded."""
    e, h, i = shape["num_experts"], shape["hidden"], shape["intermediate"]
    store = ManagedExpertStore(e, {"w13": ((2 * i, h), dev13.dtype),
                                   "w2": ((h, i), dev2.dtype)}, device="cuda:0")
    store["w13"].copy_(dev13)
    store["w2"].copy_(dev2)
    return store


def tune(out_dir: pathlib.Path, shapes: list[str], weight_dtype: str = "bf16") -> None:
    """Tune grouped configs (and, for bf16, the one-token path) per shape and T; FP8 weights
    get entries of their own (keyed float8_e4m3fn)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    tuned, decode, report = {}, {}, []
    for name in shapes:
        shape = SHAPES[name]
        *weights, quant = device_weights(shape, weight_dtype)
        store = offloaded_store(shape, *weights)
        store.advise_offloaded(range(shape["num_experts"]))
        torch.cuda.synchronize()
        offloaded = (store["w13"], store["w2"])
        key = config_key(shape["num_experts"], shape["hidden"], shape["intermediate"],
                         shape["top_k"], weights[0].dtype)
        entries = []
        for num_tokens in TOKENS:
            inputs = routing(shape, num_tokens, generator)
            result = tune_one(shape, weights, offloaded, inputs, num_tokens, quant)
            entries.append((num_tokens, result["config"]))
            line = (f"tuned {name} T={num_tokens}: {result['us']:.1f} us (table "
                    f"{result['table_us']:.1f} us)")
            if "offloaded_us" in result:
                line += f", offloaded {result['offloaded_us']:.0f} us"
            if num_tokens == 1 and not quant:  # FP8 weights always take the grouped path
                config, ms = tune_decode(shape, weights, inputs)
                decode[key] = config if ms * 1e3 <= result["us"] else None
                result.update(decode_config=config, decode_us=ms * 1e3)
                line += f"; one-token path {ms * 1e3:.1f} us {config}"
            print(f"{line} {result['config']}", flush=True)
            report.append(dict(shape=name, tokens=num_tokens, weight_dtype=weight_dtype, **{
                f: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                for f, v in result.items()}))
        tuned[key] = tuple(entries)
        store.free()
        del weights, offloaded
        torch.cuda.empty_cache()
    suffix = ('' if len(shapes) == len(SHAPES) else '_' + '_'.join(shapes)) + (
        '' if weight_dtype == 'bf16' else '_' + weight_dtype)
    (out_dir / f"fused_moe_tune{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    write_tables(tuned, decode)


def bench_shape(name: str, shape: dict, hbm: float, read_through: float,
                weight_dtype: str = "bf16") -> list[dict]:
    e, h, i = shape["num_experts"], shape["hidden"], shape["intermediate"]
    generator = torch.Generator(device="cuda").manual_seed(1)
    inputs = {t: routing(shape, t, generator) for t in TOKENS}
    dev13, dev2, quant = device_weights(shape, weight_dtype)
    # Bytes the kernel reads per expert: weights, plus the scales (which stay on the GPU).
    expert_bytes = 3 * i * h * dev13.element_size() + sum(
        quant[k][0].numel() * 4 for k in ("w13_scale", "w2_scale") if k in quant)
    store = offloaded_store(shape, dev13, dev2)
    targets = RESIDENT_TARGET_FP8 if weight_dtype == "fp8" else RESIDENT_TARGET
    rows, expected = [], {}
    for t, (x, topk_weights, topk_ids) in inputs.items():
        ref = fused_moe_reference(x, dev13, dev2, topk_weights, topk_ids, **quant)
        expected[t] = fused_moe(x, dev13, dev2, topk_weights, topk_ids, **quant)
        call = functools.partial(fused_moe_reference, x, dev13, dev2, topk_weights, topk_ids,
                                 **quant)
        ref_ms = ceilings.time_ms(call, warmup=1, repeat=5)
        err = ((expected[t].float() - ref.float()).norm() / ref.float().norm()).item()
        tables = device_tables()
        decode = (select_decode_config(e, h, i, shape["top_k"], torch.bfloat16, tables)
                  if t == 1 and not quant else None)
        config = decode if decode is not None else select_config(
            e, h, i, shape["top_k"], dev13.dtype if quant else torch.bfloat16, t, tables)
        rows.append(dict(shape=name, tokens=t, weights="reference", rel_err=err,
                         us=ref_ms * 1e3, experts=int(topk_ids.unique().numel()),
                         weight_dtype=weight_dtype,
                         path="grouped" if decode is None else "one-token",
                         config=dict(kind=type(config).__name__, **dataclasses.asdict(config))))
    for placement in ("device", "resident", "offloaded"):
        if placement == "resident":
            store.advise_resident(range(e))
        elif placement == "offloaded":
            store.advise_offloaded(range(e))
        torch.cuda.synchronize()
        w13, w2 = (dev13, dev2) if placement == "device" else (store["w13"], store["w2"])
        for t, (x, topk_weights, topk_ids) in inputs.items():
            experts = int(topk_ids.unique().numel())
            call = functools.partial(fused_moe, x, w13, w2, topk_weights, topk_ids, **quant)
            ms = graph_ms(call)
            gbps = experts * expert_bytes / ms / 1e6
            # The flush this script used before (a 256 MB write): its cost, shown alongside.
            write_flush_us = graph_ms(call, flush="write") * 1e3 if placement == "device" else None
            ceiling = read_through if placement == "offloaded" else hbm
            target = OFFLOADED_TARGET if placement == "offloaded" else targets[name].get(t)
            same = torch.equal(call(), expected[t])
            rows.append(dict(shape=name, tokens=t, weights=placement, experts=experts,
                             weight_dtype=weight_dtype,
                             mbytes=experts * expert_bytes / 1e6, us=ms * 1e3, gbps=gbps,
                             of_ceiling=gbps / ceiling, target=target,
                             meets_target=None if target is None else gbps / ceiling >= target,
                             us_after_write_flush=write_flush_us,
                             bitwise_equal_to_device=same))
            print(f"{name} T={t} {placement}: {ms * 1e3:.1f} us, {gbps:.0f} GB/s", flush=True)
    if quant:
        rows += widen_rows(name, dev13, dev2, quant, inputs, expected, expert_bytes, hbm)
    store.free()
    return rows


def widen_rows(name, w13, w2, quant, inputs, expected, expert_bytes, hbm) -> list[dict]:
    """FP8 weights in device memory widened by Triton's conversion instead of widen_bf16 (the
    A/B of moe_uvm/kernels/fp8_widen.py): same config, same bits expected."""
    rows = []
    set_alu_widen(False)
    try:
        for t, (x, topk_weights, topk_ids) in inputs.items():
            experts = int(topk_ids.unique().numel())
            call = functools.partial(fused_moe, x, w13, w2, topk_weights, topk_ids, **quant)
            ms = graph_ms(call)
            gbps = experts * expert_bytes / ms / 1e6
            rows.append(dict(shape=name, tokens=t, weights="device, triton cvt widening",
                             experts=experts, weight_dtype="fp8",
                             mbytes=experts * expert_bytes / 1e6, us=ms * 1e3, gbps=gbps,
                             of_ceiling=gbps / hbm, target=None, meets_target=None,
                             us_after_write_flush=None,
                             bitwise_equal_to_device=torch.equal(call(), expected[t])))
            print(f"{name} T={t} device, triton cvt widening: {ms * 1e3:.1f} us", flush=True)
    finally:
        set_alu_widen(True)
    return rows


def table(rows: list[dict]) -> str:
    ref = {(r["shape"], r["tokens"]): r for r in rows if r["weights"] == "reference"}
    lines = ["| shape | T | weights | experts | MB read | fused us | GB/s | of ceiling | target "
             "| reference us |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- "
             "| ---: |"]
    for r in rows:
        if r["weights"] == "reference":
            continue
        mark = "-" if r["target"] is None else (
            f"{r['target']:.0%} {'met' if r['meets_target'] else 'MISSED'}")
        reference_us = ref[(r["shape"], r["tokens"])]["us"] if r["weights"] == "device" else None
        lines.append(
            f"| {r['shape']} | {r['tokens']} | {r['weights']} | {r['experts']} | "
            f"{r['mbytes']:.0f} | {r['us']:.1f} | {r['gbps']:.0f} | {r['of_ceiling']:.0%} | "
            f"{mark} | {'' if reference_us is None else f'{reference_us:.0f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune", action=argparse.BooleanOptionalAction, default=False,
                        help="sweep configs first; default: benchmark the tables as they are")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"
                                             / "fused_moe.json"))
    parser.add_argument("--weight-dtype", choices=("bf16", "fp8"), default="bf16",
                        help="expert weights: bf16, or fp8 (e4m3, 128 x 128 block scales; "
                             "--tune writes entries of their own)")
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma-separated, of {', '.join(SHAPES)} (default: all)")
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    if unknown := sorted(set(shapes) - set(SHAPES)):
        parser.error(f"--shapes: unknown {unknown}; known: {', '.join(SHAPES)}")
    if not torch.cuda.is_available():
        sys.exit("fused_moe.py needs a CUDA GPU")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if args.tune:
        tune(out.parent, shapes, args.weight_dtype)
    hbm, read_through = ceilings.hbm_read_gbps(), ceilings.read_through_gbps()
    torch.cuda.empty_cache()
    rows = []
    for name in shapes:
        rows += bench_shape(name, SHAPES[name], hbm, read_through, args.weight_dtype)
        torch.cuda.empty_cache()  # hand this shape's weights back before the next one
    result = dict(ceilings.device_summary(), hbm_read_gbps=hbm, read_through_gbps=read_through,
                  tuned_in_this_run=args.tune,
                  timing="median, CUDA-graph replay, L2 flushed by a 256 MB read",
                  seconds=time.perf_counter() - started, rows=rows)
    out.write_text(json.dumps(result, indent=2) + "\n")
    errors = {f"{r['shape']} T={r['tokens']}": f"{r['rel_err']:.1e}" for r in rows
              if r["weights"] == "reference"}
    paths = {f"{r['shape']} T={r['tokens']}": f"{r['path']} {r['config']}" for r in rows
             if r["weights"] == "reference"}
    print("\nconfigs: " + "\n  ".join(f"{k}: {v}" for k, v in paths.items()))
    print(f"relative error vs reference: {errors}")
    print(f"{result['device']}, torch {result['torch']}, HBM read {hbm:.0f} GB/s, managed "
          f"read-through {read_through:.1f} GB/s, {result['seconds']:.0f} s; "
          f"{result['timing']}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
