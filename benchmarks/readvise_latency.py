"""What re-advice on another thread costs the decode thread: the CPU time from call to return of
each eager batch-1 decode step (several offloaded layers of DeepSeek-V2-Lite's shape, slot cache
on), (A) with nothing else running and (B) while a background thread re-advises 16+ experts per
call in a loop (`manager.readvise`, alternating two resident sets). PASS when
p99(B) <= max(1.05 * p99(A), p99(A) + 50 us). GPU time per step (CUDA events) is reported apart:
promotion traffic shares PCIe and HBM with the step, the decode thread's CPU time must not.

    python benchmarks/readvise_latency.py [--layers 4] [--steps 2000] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import threading
import time

import numpy as np
import torch

from moe_uvm import ceilings
from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.layer import FusedMoE
from moe_uvm.offload import offload_experts
from moe_uvm.presets import ModelShape
from moe_uvm.store import Pace

SHAPE = ModelShape.from_name("deepseek-v2-lite")
RESULTS = pathlib.Path(__file__).parent / "results"


def device_folder(name: str) -> str:
    """The results folder of a GPU, named as the existing ones: "NVIDIA H200" -> "h200"."""
    words = name.removeprefix("NVIDIA ").split()
    return re.sub(r"[^a-z0-9]+", "-", (words[0] if words else "gpu").lower()).strip("-")


def at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def paces(text: str) -> list[tuple[float, float]]:
    out = []
    for item in text.split(","):
        try:
            chunk, pause = (float(v) for v in item.split(":"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"pace {item!r}: expected chunk_mb:pause_ms, e.g. 2:0.2") from None
        if chunk < 0 or pause < 0:
            raise argparse.ArgumentTypeError(f"pace {item!r}: values must be >= 0")
        out.append((chunk, pause))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=at_least(1), default=4)
    parser.add_argument("--resident", type=at_least(16), default=16,
                        help="resident experts per layer, and experts in each re-advise call")
    parser.add_argument("--slots", type=at_least(0), default=8, help="slot-cache slots per layer")
    parser.add_argument("--steps", type=at_least(1000), default=1000, help="timed steps per run")
    parser.add_argument("--paces", default="0:0,8:0,2:0.2", type=paces,
                        help="re-advise paces to run B with, as chunk_mb:pause_ms,... (the "
                        "first is the config default; chunk 0 = one migration call per run)")
    parser.add_argument("--warmup", type=at_least(1), default=200)
    parser.add_argument("--out", default=None, help="JSON path (default: "
                        "benchmarks/results/<gpu>/readvise_latency.json)")
    args = parser.parse_args(argv)
    if 2 * args.resident > SHAPE.num_experts:
        parser.error(f"--resident {args.resident}: two disjoint sets must fit in "
                     f"{SHAPE.num_experts} experts")
    if args.slots > SHAPE.num_experts - args.resident:
        parser.error(f"--slots {args.slots}: at most the {SHAPE.num_experts - args.resident} "
                     "experts a layer offloads")
    return args


def build(num_layers: int, *configs: ExpertOffloadConfig):
    """One offloaded model of the preset's shape per config, all with the same random weights:
    [(layers, manager), ...]. Layers are built on the meta device and their weights written one
    layer at a time, so no dense copy of a model ever sits on the GPU."""
    E, k, H, I = (SHAPE.num_experts, SHAPE.top_k, SHAPE.hidden_size,
                  SHAPE.moe_intermediate_size)
    models = []
    for config in configs:
        layers = [FusedMoE(E, k, H, I, dtype=torch.bfloat16, device="meta")
                  for _ in range(num_layers)]
        models.append((layers, offload_experts(layers, config, device="cuda")))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for index in range(num_layers):
        w13 = torch.randn((E, 2 * I, H), generator=gen, device="cuda", dtype=torch.bfloat16)
        w2 = torch.randn((E, H, I), generator=gen, device="cuda", dtype=torch.bfloat16)
        w13.mul_(H**-0.5)
        w2.mul_(I**-0.5)
        for layers, _ in models:
            layers[index].w13_weight.data.copy_(w13)
            layers[index].w2_weight.data.copy_(w2)
    for _, manager in models:
        manager.wait_idle()
    return models


def decode(layers: list[FusedMoE], x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    h = x
    for index, moe in enumerate(layers):
        h = h + moe(h, logits[index])
    return h


def timed_steps(layers, xs, logits) -> tuple[np.ndarray, np.ndarray]:
    """CPU microseconds from call to return of each step, and GPU milliseconds between events
    around it; the device is idle at every step's start (a sync outside the timed interval)."""
    n = xs.shape[0]
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
    cpu = np.empty(n)
    for i, (start, end) in enumerate(events):
        torch.cuda.synchronize()
        start.record()
        t0 = time.perf_counter()
        decode(layers, xs[i], logits[i])
        t1 = time.perf_counter()
        end.record()
        cpu[i] = (t1 - t0) * 1e6
    torch.cuda.synchronize()
    return cpu, np.array([s.elapsed_time(e) for s, e in events])


class Readviser(threading.Thread):
    """Re-advises one layer per call, round robin, each layer alternating between two disjoint
    resident sets of `resident` experts (every call promotes and demotes `resident` experts)."""

    def __init__(self, manager, num_layers: int, resident: int) -> None:
        super().__init__(name="bench-readvise", daemon=True)
        self.manager, self.num_layers, self.resident = manager, num_layers, resident
        self.stop = threading.Event()
        self.calls, self.bytes_moved, self.error = 0, 0, None

    def run(self) -> None:
        flip = [True] * self.num_layers
        try:
            while not self.stop.is_set():
                layer = self.calls % self.num_layers
                first = self.resident if flip[layer] else 0
                result = self.manager.readvise(layer, range(first, first + self.resident))
                flip[layer] = not flip[layer]
                self.calls += 1
                self.bytes_moved += result.bytes_moved
        except Exception as exc:  # reported in the results, and the run marked failed
            self.error = f"{type(exc).__name__}: {exc}"


def summary(cpu: np.ndarray, gpu: np.ndarray) -> dict:
    return dict(cpu_p50_us=float(np.percentile(cpu, 50)), cpu_p99_us=float(np.percentile(cpu, 99)),
                cpu_max_us=float(cpu.max()), gpu_p50_ms=float(np.percentile(gpu, 50)),
                gpu_p99_ms=float(np.percentile(gpu, 99)), gpu_mean_ms=float(gpu.mean()))


def table(rows: dict[str, dict]) -> str:
    lines = ["| run | CPU p50 us | CPU p99 us | CPU max us | GPU p50 ms | GPU p99 ms | "
             "re-advises | GB/s re-advised | p99 verdict |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['cpu_p50_us']:.1f} | {r['cpu_p99_us']:.1f} | "
                     f"{r['cpu_max_us']:.1f} | {r['gpu_p50_ms']:.3f} | {r['gpu_p99_ms']:.3f} | "
                     f"{r['readvises']} | {r['readvise_gbps']:.2f} | {r.get('verdict', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("readvise_latency.py needs a CUDA GPU", file=sys.stderr)
        raise SystemExit(2)
    started = time.perf_counter()
    chunk0, pause0 = args.paces[0]
    config = ExpertOffloadConfig(num_resident=args.resident, prefetch_slots=args.slots,
                                 readvise_chunk_mb=chunk0, readvise_pause_ms=pause0)
    [(layers, manager)] = build(args.layers, config)
    E, L, n = SHAPE.num_experts, args.layers, args.steps
    gen = torch.Generator(device="cuda").manual_seed(1)
    xs = torch.randn((n, 1, SHAPE.hidden_size), generator=gen, device="cuda",
                     dtype=torch.bfloat16)
    logits = torch.randn((n, L, 1, E), generator=gen, device="cuda")
    rows, errors = {}, []
    with manager:
        timed_steps(layers, xs[: args.warmup], logits[: args.warmup])  # compiles, fills slots
        rows["A: no re-advise"] = dict(summary(*timed_steps(layers, xs, logits)), readvises=0,
                                       readvise_gbps=0.0)
        for chunk, pause in args.paces:
            manager.pace = Pace(int(chunk * 2**20), pause / 1e3) if chunk else None
            readviser = Readviser(manager, L, args.resident)
            begin = time.perf_counter()
            readviser.start()
            busy = timed_steps(layers, xs, logits)
            readviser.stop.set()
            readviser.join()
            seconds = time.perf_counter() - begin
            name = (f"B: re-advise, {chunk:g} MiB chunks + {pause:g} ms pause" if chunk
                    else "B: re-advise, unpaced")
            rows[name] = dict(summary(*busy), readvises=readviser.calls,
                              readvise_gbps=readviser.bytes_moved / seconds / 1e9)
            if readviser.error:
                errors.append(readviser.error)
        manager.wait_idle()
        failures = [str(f) for f in manager.failures]
    a = rows["A: no re-advise"]["cpu_p99_us"]
    limit = max(1.05 * a, a + 50.0)
    for row in rows.values():
        row["verdict"] = "PASS" if row["cpu_p99_us"] <= limit else "FAIL"
    default = list(rows.values())[1]
    passed = default["verdict"] == "PASS" and not errors and not failures
    result = dict(
        ceilings.device_summary(), shape=SHAPE.name, layers=L, experts=E, top_k=SHAPE.top_k,
        resident=args.resident, slots=args.slots, steps=n, warmup=args.warmup,
        experts_per_readvise=args.resident, readvise_errors=errors, manager_failures=failures,
        python_switch_interval_s=sys.getswitchinterval(),
        criterion="p99(B) <= max(1.05 * p99(A), p99(A) + 50 us), B at the default pace",
        limit_us=limit, verdict="PASS" if passed else "FAIL",
        seconds=time.perf_counter() - started, runs=rows,
    )
    out = pathlib.Path(args.out or RESULTS / device_folder(result["device"])
                       / "readvise_latency.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}; {L} layers "
          f"of {SHAPE.name}, {args.resident} resident + {args.slots} slots per layer, batch 1, "
          f"{n} eager steps per run, {result['seconds']:.0f} s\n")
    print(table(rows))
    print(f"\n{result['criterion']}: limit {limit:.1f} us -> {result['verdict']}"
          + (f"; thread errors: {errors}" if errors else "")
          + (f"; {len(failures)} manager failures" if failures else ""))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
