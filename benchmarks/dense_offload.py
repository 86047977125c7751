"""Dense-layer offload on a stack of decoder MLP blocks (random bf16 weights): step time of
CUDA-graph-captured decode steps with no offload, group-wise offload (G=4, N=1) at P = 0, 1, 2,
and a UVA zero-copy variant that reads the same offloaded layers in place from pinned host
memory; each against the floor max(compute without offload, offloaded bytes / pinned H2D
bandwidth), both measured in this run.

    python benchmarks/dense_offload.py [--layers 24] [--batches 1,64]
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

from moe_uvm import ceilings, uvm
from moe_uvm.dense import DenseOffloadConfig, DenseOffloader


class MLPBlock(nn.Module):
    """RMSNorm + gated MLP + residual: a dense decoder layer's MLP half."""

    def __init__(self, hidden: int, intermediate: int, generator: torch.Generator) -> None:
        super().__init__()

        def weight(rows: int, cols: int) -> nn.Parameter:
            w = torch.randn(rows, cols, generator=generator, device="cuda", dtype=torch.bfloat16)
            return nn.Parameter(w.mul_(cols**-0.5), requires_grad=False)

        self.norm = nn.Parameter(
            torch.ones(hidden, device="cuda", dtype=torch.bfloat16), requires_grad=False
        )
        self.gate_up = weight(2 * intermediate, hidden)
        self.down = weight(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(F.rms_norm(x, x.shape[-1:], self.norm), self.gate_up).chunk(2, -1)
        return x + F.linear(F.silu(gate) * up, self.down)


class Stack(nn.Module):
    def __init__(self, layers: int, hidden: int, intermediate: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator("cuda").manual_seed(seed)
        self.layers = nn.ModuleList(
            MLPBlock(hidden, intermediate, generator) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def map_in_place(layers: nn.ModuleList, indices: list[int]) -> tuple[list[torch.Tensor], int]:
    """The UVA variant: each chosen layer's weights move to one pinned host buffer and its
    parameters become zero-copy CUDA views of it (no pool, no copies, no hooks)."""
    hosts, total = [], 0
    for index in indices:
        params = list(layers[index].parameters())
        offsets, end = [], 0
        for param in params:
            end = -(-end // 256) * 256
            offsets.append(end)
            end += param.nbytes
        host = torch.empty(end, dtype=torch.uint8, pin_memory=True)
        mapped = uvm.mapped_host_view(host)
        for param, offset in zip(params, offsets, strict=True):
            host[offset : offset + param.nbytes].view(param.dtype).view(param.shape).copy_(param)
            param.data = mapped[offset : offset + param.nbytes].view(param.dtype).view(param.shape)
            total += param.nbytes
        hosts.append(host)
    return hosts, total


def build(name: str, args: argparse.Namespace) -> tuple[Stack, dict, object]:
    """The stack for one configuration, and what it offloads. The returned handle keeps the
    offloader or the pinned buffers alive as long as the model is used."""
    model = Stack(args.layers, args.hidden, args.intermediate, seed=0)
    if name == "none":
        return model, {"offloaded_bytes": 0, "pool_bytes": 0}, None
    if name == "uva":
        chosen = DenseOffloadConfig(args.group_size, 1, 0).offloaded_layers(args.layers)
        hosts, total = map_in_place(model.layers, chosen)
        return model, {"offloaded_bytes": total, "pool_bytes": 0, "layers": chosen}, hosts
    step = int(name.removeprefix("P"))
    offloader = DenseOffloader(model.layers, DenseOffloadConfig(args.group_size, 1, step))
    print(offloader.summary())
    info = {
        "offloaded_bytes": offloader.offloaded_bytes,
        "pool_bytes": offloader.pool_bytes,
        "layers": list(offloader.offloaded_layers),
    }
    return model, info, offloader


def graph_step_ms(model: Stack, x: torch.Tensor, args: argparse.Namespace):
    """Median ms of one captured decode step (graph replays timed with events), and its output."""
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(args.warmup):
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        static_out = model(static_x)
    for _ in range(args.warmup):
        graph.replay()
    marks = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(args.replays)
    ]
    for start, end in marks:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    ms = statistics.median(start.elapsed_time(end) for start, end in marks)
    out = static_out.float().cpu()
    del graph
    return ms, out


LABELS = {
    "none": "no offload",
    "P0": "G={g} N=1 P=0 (synchronous copy)",
    "P1": "G={g} N=1 P=1",
    "P2": "G={g} N=1 P=2",
    "uva": "G={g} N=1 UVA zero-copy read",
}


def run_config(name: str, args: argparse.Namespace, h2d_gbps: float, reference: dict) -> list:
    """Rows for one configuration at every batch size; the `none` run fills `reference` with
    its outputs and step times (the compute floor) for the runs after it."""
    rows = []
    model, info, keep = build(name, args)
    gc.collect()
    device_bytes = torch.cuda.memory_allocated()
    for batch in args.batches:
        generator = torch.Generator("cuda").manual_seed(batch)
        x = torch.randn(
            batch, args.hidden, generator=generator, device="cuda", dtype=torch.bfloat16
        )
        ms, out = graph_step_ms(model, x, args)
        if name == "none":
            reference[batch] = (out, ms)
        ref, compute_ms = reference[batch]
        copy_ms = info["offloaded_bytes"] / (h2d_gbps * 1e6)
        floor = max(compute_ms, copy_ms)
        rows.append(
            {
                "config": name,
                "batch": batch,
                "step_ms": ms,
                "floor_ms": floor,
                "ratio": ms / floor,
                "compute_ms": compute_ms,
                "copy_ms": copy_ms,
                "device_bytes": device_bytes,
                **info,
                "bitwise_equal": bool(torch.equal(out, ref)),
                "rel_err": ((out - ref).norm() / ref.norm()).item(),
            }
        )
        print(f"{name} batch {batch}: {ms:.2f} ms (floor {floor:.2f} ms)", flush=True)
    del model, keep
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=12288)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--configs", default="none,P0,P1,P2,uva")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "results" / "dense_offload.json")
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("dense_offload.py needs a CUDA GPU")
    args.batches = [int(b) for b in args.batches.split(",")]
    configs = args.configs.split(",")
    if configs[0] != "none" or not set(configs) <= set(LABELS):
        sys.exit(f"--configs must start with none and use {', '.join(LABELS)}; got {configs}")
    layer_bytes = 3 * args.hidden * args.intermediate * 2 + args.hidden * 2
    h2d_gbps = ceilings.h2d_gbps(layer_bytes)
    print(f"pinned H2D copy of one layer ({layer_bytes / 2**20:.0f} MiB): {h2d_gbps:.1f} GB/s")

    result = ceilings.device_summary()
    result.update(
        {
            "layers": args.layers,
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "group_size": args.group_size,
            "num_in_group": 1,
            "layer_bytes": layer_bytes,
            "h2d_pinned_gbps": h2d_gbps,
            "replays": args.replays,
            "results": [],
        }
    )
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    reference: dict = {}
    with torch.no_grad():
        for name in configs:
            result["results"] += run_config(name, args, h2d_gbps, reference)
            # Written after every configuration: a CUDA error in a later one (the UVA variant
            # depends on the GEMM kernels accepting host memory) keeps what was measured.
            path.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"\n{result['device']}, torch {result['torch']}: {args.layers} MLP blocks "
        f"{args.hidden}x{args.intermediate} bf16, pinned H2D {h2d_gbps:.1f} GB/s, CUDA-graph "
        f"steps, median of {args.replays}"
    )
    print("| config | batch | step ms | floor ms | step / floor | device GiB | same output |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in result["results"]:
        same = "bitwise" if r["bitwise_equal"] else f"rel err {r['rel_err']:.1e}"
        print(
            f"| {LABELS[r['config']].format(g=args.group_size)} | {r['batch']} "
            f"| {r['step_ms']:.2f} | {r['floor_ms']:.2f} | {r['ratio']:.2f}x "
            f"| {r['device_bytes'] / 2**30:.2f} | {same} |"
        )


if __name__ == "__main__":
    main()
