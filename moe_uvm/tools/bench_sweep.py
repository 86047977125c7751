"""The resident-count sweep of `moe-uvm bench`: runs every method of moe_uvm.tools.bench at
every (batch, resident count), computes the roofline floor from bandwidths measured in the same run,
and writes the markdown table, JSON and plot. Without a GPU, `moe-uvm bench` runs `simulation`
instead: the same configuration replayed through moe_uvm.simulate on the CPU."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from moe_uvm import ceilings, uvm
from moe_uvm.presets import ModelShape
from moe_uvm.profile import Profile
from moe_uvm.simulate import Bandwidths, resident_sizes, simulate
from moe_uvm.simulate_slots import SlotSettings
from moe_uvm.slots import SlotCache
from moe_uvm.tools.bench import (
    MANAGED,
    METHODS,
    LayerWeights,
    LRUCache,
    Workload,
    build_workload,
    check_workload,
    host_copies,
    managed_layers,
    managed_residency,
    run_captured,
    run_lru,
)
from moe_uvm.trace import SAMPLE_NAME, RoutingTrace, load_trace, trace_path

CPU_NOTE = ("CPU path: no GPU, so weights stay in CPU memory, nothing is captured and the "
            "timings below mean nothing; this run only checks the harness.")


@dataclass(frozen=True)
class BenchConfig:
    """One decode-benchmark run. `trace` is a path or "sample" (the bundled trace); `resident`
    takes counts or percentages ("0,32" or "25%,50%") per layer; `layers=None` takes the
    trace's layers, capped to fit the GPU with room. `tiny` keeps the trace's experts and top-k
    but uses hidden 64 / intermediate 32 and at most 2 layers, whatever the model shape (for
    checking the harness). `device`: cuda, cpu (the harness on CPU tensors) or simulate (the
    policies replayed on the CPU by `simulation`, no weights)."""

    model_shape: str = "qwen3-30b-a3b"
    trace: str = SAMPLE_NAME
    layers: int | None = None
    resident: str = "0%,25%,50%,75%,100%"
    batches: tuple[int, ...] = (1, 16)
    steps: int = 24
    methods: tuple[str, ...] = METHODS
    slots: tuple[int, ...] = ()
    prefetch: tuple[str, ...] = ("none",)
    calibrate_sequences: int | None = None
    device: str = "cuda"
    tiny: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
        bad = [m for m in self.prefetch if m not in ("none", "frequency", "speculative")]
        if bad:
            raise ValueError(f"bench prefetch modes are none, frequency, speculative (lookahead "
                             f"needs a model's routers, not a trace); got {bad}")
        if any(s < 1 for s in self.slots):
            raise ValueError(f"slots must be >= 1, got {self.slots}")
        if self.prefetch != ("none",) and not self.slots:
            raise ValueError(f"prefetch {', '.join(self.prefetch)} needs slots: prefetched "
                             "experts are copied into GPU slots")
        if self.slots and not set(self.methods) & set(MANAGED):
            raise ValueError(f"slots run on moe-uvm's managed residency: methods need one of "
                             f"{', '.join(MANAGED)}")
        if self.device not in ("cuda", "cpu", "simulate"):
            raise ValueError(f"device must be cuda, cpu or simulate, got {self.device!r}")
        if not self.batches or min(self.batches) < 1 or self.steps < 1:
            raise ValueError(f"need batches >= 1 and steps >= 1, got {self.batches}, {self.steps}")


def _layer_budget(layer_bytes: int) -> int:
    """Layers whose three GPU-side copies (device, managed resident at 100%, uva/lru slots)
    fit in free memory with 8 GiB to spare."""
    free, _ = uvm.mem_get_info(torch.cuda.current_device())
    return max(1, int((free - (8 << 30)) // (3 * layer_bytes)))


def load_inputs(cfg: BenchConfig) -> tuple[RoutingTrace, ModelShape, int]:
    """The run's trace, model shape and calibration sequences, checked against each other and
    cfg; cheap, so `moe-uvm bench` calls it before measuring or printing anything."""
    trace = load_trace(cfg.trace)
    shape = ModelShape.from_name(cfg.model_shape)
    E = trace.num_experts
    if not cfg.tiny and (E, trace.top_k) != (shape.num_experts, shape.top_k):
        raise ValueError(
            f"trace {cfg.trace} routes {E} experts top-{trace.top_k}, the {shape.name} shape "
            f"has {shape.num_experts} top-{shape.top_k}"
        )
    cal = cfg.calibrate_sequences or trace.num_sequences // 2
    check_workload(trace, cfg.layers or trace.num_layers, cal)
    counts = resident_sizes(cfg.resident, E)
    if cfg.slots and max(cfg.slots) > E:
        raise ValueError(f"slots must be at most the trace's {E} experts per layer, got "
                         f"{max(cfg.slots)}")
    if cfg.slots and not any(0 < n < E for n in counts):
        raise ValueError(f"slots run at resident counts between 0 and all {E} experts "
                         f"(exclusive); resident {cfg.resident} has none")
    return trace, shape, cal


def make_workload(cfg: BenchConfig) -> Workload:
    trace, shape, cal = load_inputs(cfg)
    hidden, inter = (64, 32) if cfg.tiny else (shape.hidden_size, shape.moe_intermediate_size)
    dtype = torch.float32 if cfg.device == "cpu" else torch.bfloat16
    layers = cfg.layers or trace.num_layers
    if cfg.tiny:
        layers = min(layers, 2)
    elif cfg.device != "cpu":
        layers = min(layers, _layer_budget(shape.num_experts * shape.bytes_per_expert))
    return build_workload(trace, num_layers=layers, hidden=hidden, intermediate=inter,
                          calibrate_sequences=cal, dtype=dtype,
                          device=torch.device(cfg.device), seed=cfg.seed)


def _touched(ids: torch.Tensor, num_experts: int) -> np.ndarray:
    """[steps, L, E] bool: experts each step reads at each layer."""
    host = ids.cpu().numpy()
    steps, L = host.shape[:2]
    out = np.zeros((steps, L, num_experts + 1), bool)
    flat = np.where(host >= 0, host, num_experts).reshape(steps, L, -1)
    np.put_along_axis(out, flat, True, axis=2)
    return out[:, :, :num_experts]


def _floor(touched: np.ndarray, resident: np.ndarray, eb: int, hbm: float, pcie: float):
    """Median over steps of sum over layers (B_res/BW_hbm + B_off/BW_pcie) in ms, and the mean
    offloaded bytes per step (the floor with HBM and PCIe reads not overlapped)."""
    hits = (touched & resident[None]).sum(axis=2)
    misses = (touched & ~resident[None]).sum(axis=2)
    per_step = (hits * eb / (hbm * 1e9) + misses * eb / (pcie * 1e9)).sum(axis=1) * 1e3
    return float(np.median(per_step)), float((misses * eb).sum(axis=1).mean())


def _mask(sets: list[list[int]], num_experts: int) -> np.ndarray:
    mask = np.zeros((len(sets), num_experts), bool)
    for layer, ids in enumerate(sets):
        mask[layer, ids] = True
    return mask


def sweep(cfg: BenchConfig, progress=print) -> dict:
    """Run every method at every (batch, resident count); returns the JSON-ready result."""
    cuda = cfg.device == "cuda"
    h100 = Bandwidths()
    bw = {"hbm_read_gbps": h100.hbm_gbps, "read_through_gbps": h100.pcie_gbps,
          "pinned_read_gbps": h100.pcie_gbps, "h2d_gbps": h100.h2d_gbps}
    if cuda:
        bw = {"hbm_read_gbps": ceilings.hbm_read_gbps(), "read_through_gbps":
              ceilings.read_through_gbps(), "pinned_read_gbps": ceilings.pinned_read_gbps(),
              "h2d_gbps": ceilings.h2d_gbps()}
        progress(", ".join(f"{k} {v:.1f}" for k, v in bw.items()))
    work = make_workload(cfg)
    E, L, eb = work.num_experts, work.num_layers, work.expert_bytes
    counts = resident_sizes(cfg.resident, E)
    manager = managed = None
    if any(m in MANAGED for m in cfg.methods):
        manager, managed = managed_layers(work)
        manager.synchronize()
    host, mapped = host_copies(work)
    slots = [(torch.empty_like(w13), torch.empty_like(w2))
             for w13, w2 in zip(work.w13, work.w2, strict=True)]
    device_layers = [LayerWeights(w13, w2) for w13, w2 in zip(work.w13, work.w2, strict=True)]
    dev = work.device.index or 0
    # "GPU GB" of the managed methods is the advised resident bytes. The driver's own figure is
    # kept too: it includes pages of demoted experts the UVM driver keeps in its GPU pool (on
    # the H100 they were not returned after demotion), minus the caching allocator's growth.
    baseline = (uvm.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev)) if cuda else 0
    records = []

    def record(method, batch, resident, ms, floor_ms, off_bytes, device_bytes, exact):
        rec = dict(method=method, batch=batch, resident=resident,
                   resident_fraction=resident / E, step_ms=ms, tokens_per_s=batch / ms * 1e3,
                   offloaded_mb_per_step=off_bytes / 1e6, device_gb=device_bytes / 1e9,
                   floor_ms=floor_ms, floor_over_measured=floor_ms / ms, exact=exact)
        records.append(rec)
        progress(f"B={batch} resident={resident} {method}: {ms:.3f} ms, "
                 f"{rec['tokens_per_s']:.1f} tok/s, floor/measured "
                 f"{rec['floor_over_measured']:.2f}")

    for batch in cfg.batches:
        steps = min(cfg.steps, work.eval_trace.num_tokens // batch)
        ids, weights = work.routing(batch, steps)
        touched = _touched(ids, E)
        h0 = torch.randn(batch, work.hidden, generator=torch.Generator().manual_seed(batch))
        h0 = h0.to(work.dtype).to(work.device)
        ms, ref = run_captured(work, device_layers, ids, weights, h0)
        all_res = np.ones((L, E), bool)
        floor, _ = _floor(touched, all_res, eb, bw["hbm_read_gbps"], bw["read_through_gbps"])
        record("device", batch, E, ms, floor, 0.0, L * E * eb, True)
        for r in counts:
            first = _mask([list(range(r))] * L, E)
            if "uva" in cfg.methods:
                maps = torch.arange(E, dtype=torch.int32, device=work.device)
                maps = torch.where(maps < r, maps, -1)
                layers = [LayerWeights(m.w13, m.w2, maps, s13, s2)
                          for m, (s13, s2) in zip(mapped, slots, strict=True)]
                for (s13, s2), w13, w2 in zip(slots, work.w13, work.w2, strict=True):
                    s13[:r].copy_(w13[:r])
                    s2[:r].copy_(w2[:r])
                ms, out = run_captured(work, layers, ids, weights, h0)
                floor, off = _floor(touched, first, eb, bw["hbm_read_gbps"],
                                    bw["pinned_read_gbps"])
                record("uva", batch, r, ms, floor, off, L * r * eb, torch.equal(out, ref))
            if "lru" in cfg.methods:
                cache = LRUCache(work, host, mapped, slots, r)
                ms, out, copied, inplace = run_lru(cache, ids, weights, h0)
                cached = touched.sum(axis=(1, 2)).mean() * eb - inplace
                floor = (cached / bw["hbm_read_gbps"] + copied / bw["h2d_gbps"]
                         + inplace / bw["pinned_read_gbps"]) / 1e6
                record("lru", batch, r, ms, floor, copied + inplace, L * r * eb,
                       torch.equal(out, ref))
            for num_slots in (cfg.slots if 0 < r < E and managed else ()):
                sets = managed_residency(work, "profile", r)
                for layer, ids_l in enumerate(sets):
                    manager.readvise(layer, ids_l)
                manager.synchronize()
                for mode in cfg.prefetch:
                    cache = SlotCache(
                        [(w.w13, w.w2) for w in managed], sets, num_slots, mode=mode,
                        top_k=work.top_k, counts=torch.from_numpy(work.profile.counts),
                        cooccurrence=torch.from_numpy(work.profile.cooccurrence),
                    )
                    ms, out = run_captured(work, managed, ids, weights, h0, cache)
                    stats = cache.stats.summary()
                    copies = int(cache.copies.sum()) / steps
                    reads = (stats["needed_offloaded"] - stats["slot_hits"]) / steps
                    hbm = (touched.sum() / steps - reads) * eb / (bw["hbm_read_gbps"] * 1e6)
                    pcie = (reads + copies) * eb / (bw["read_through_gbps"] * 1e6)
                    name = f"{'cache' if mode == 'none' else mode}{num_slots}"
                    record(name, batch, r, ms, max(hbm, pcie), (reads + copies) * eb,
                           manager.resident_bytes() + cache.nbytes, torch.equal(out, ref))
                    records[-1].update(slots=num_slots, prefetch=mode,
                                       prefetch_precision=stats["precision"],
                                       prefetch_recall=stats["recall"],
                                       slot_hit_rate=stats["slot_hit_rate"],
                                       copies_per_step=copies)
                    del cache
            for policy in (m for m in cfg.methods if m in MANAGED):
                sets = managed_residency(work, policy, r)
                for layer, ids_l in enumerate(sets):
                    manager.readvise(layer, ids_l)
                manager.synchronize()
                ms, out = run_captured(work, managed, ids, weights, h0)
                floor, off = _floor(touched, _mask(sets, E), eb, bw["hbm_read_gbps"],
                                    bw["read_through_gbps"])
                record(policy, batch, r, ms, floor, off, manager.resident_bytes(),
                       torch.equal(out, ref))
                if cuda:  # what the driver reports, next to the advised bytes
                    records[-1]["driver_used_gb"] = (baseline - uvm.mem_get_info(dev)[0]
                                                     - torch.cuda.memory_reserved(dev)) / 1e9
    return dict(config=asdict(cfg), layers=L, num_experts=E, top_k=work.top_k,
                hidden=work.hidden, intermediate=work.intermediate, expert_bytes=eb,
                dtype=str(work.dtype), ceilings=bw,
                device=ceilings.device_summary() if cuda else {"device": "cpu"},
                note=None if cuda else CPU_NOTE, records=records)


def markdown_table(result: dict) -> str:
    rows = ["| batch | resident | method | tok/s | step ms | offloaded MB/step | GPU GB | "
            "floor ms | floor/measured | same output |",
            "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    E = result["num_experts"]
    for r in result["records"]:
        res = "all" if r["method"] == "device" else f"{r['resident']}/{E}"
        rows.append(
            f"| {r['batch']} | {res} | {r['method']} | {r['tokens_per_s']:.1f} | "
            f"{r['step_ms']:.2f} | {r['offloaded_mb_per_step']:.0f} | {r['device_gb']:.2f} | "
            f"{r['floor_ms']:.2f} | {r['floor_over_measured']:.2f} | "
            f"{'yes' if r['exact'] else 'NO'} |"
        )
    return "\n".join(rows)


STYLES = {
    "uva": dict(marker="s", ls=":"), "lru": dict(marker="v"), "first_n": dict(marker="o"),
    "profile": dict(marker="D"), "global": dict(marker="x", ls="--"),
}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in result["records"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        recs = [r for r in result["records"] if r["batch"] == batch]
        for method in dict.fromkeys(r["method"] for r in recs):
            pts = sorted((r["resident_fraction"], r["tokens_per_s"]) for r in recs
                         if r["method"] == method)
            if method == "device" and pts:
                ax.axhline(pts[0][1], color="black", ls="--", lw=1, label="device (all resident)")
            elif pts:  # distinct markers and dashes, since methods can coincide
                style = STYLES.get(method, {})
                ax.plot(*zip(*pts, strict=True), label=method, **style)
        ax.set(title=f"batch {batch}", xlabel="resident fraction of experts",
               ylabel="tokens/s", yscale="log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    shape = f"{result['layers']} layers x {result['num_experts']} experts"
    fig.suptitle(f"moe-uvm decode, {result['device']['device']}, {shape}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out_dir: Path, name: str = "decode") -> list[Path]:
    """The JSON, and the plot when matplotlib (the bench extra) is installed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / f"{name}.json", out_dir / f"{name}.png"
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"matplotlib not installed: skipped {png_path.name} (pip install matplotlib)")
        return [json_path]
    plot(result, png_path)
    return [json_path, png_path]


def simulation(cfg: BenchConfig) -> dict:
    """`moe-uvm bench` without a GPU: every residency policy of moe_uvm.simulate and, with
    cfg.slots, profile residency plus slot caches (at resident counts strictly between none and
    all, as on the GPU), replayed per batch over the sequences after cfg's calibration split,
    with a profile counted on the ones before; hit rates and predicted floors, no timings."""
    trace, shape, cal = load_inputs(cfg)
    E = trace.num_experts
    profile = Profile.from_trace(trace.sequences(0, cal), cooccurrence=True)
    evaluated = trace.sequences(cal, None)
    counts = resident_sizes(cfg.resident, E)
    records = []
    for batch in cfg.batches:
        records += simulate(evaluated, counts, batch=batch, profile=profile, shape=shape)
        if cfg.slots:
            records += simulate(evaluated, [n for n in counts if 0 < n < E], batch=batch,
                                policies=("frequency",), profile=profile, shape=shape,
                                slots=SlotSettings(cfg.slots, cfg.prefetch))
    return dict(config=asdict(cfg), trace=trace_path(cfg.trace).name, layers=trace.num_layers,
                num_experts=E, top_k=trace.top_k, sequences=trace.num_sequences,
                calibrate_sequences=cal, bandwidths=asdict(Bandwidths()), records=records)


def summarize_goals(result: dict) -> list[str]:
    """Lines saying where the issue's goals hold: profile ahead of uva/lru/first_n below 100%,
    within 1.15x of the floor at 25/50/75%, and within 5% of device at 100%."""
    lines, E = [], result["num_experts"]
    by = {(r["method"], r["batch"], r["resident"]): r for r in result["records"]}
    for batch in sorted({r["batch"] for r in result["records"]}):
        for (method, b, res), rec in sorted(by.items(), key=lambda kv: kv[0][2]):
            if method != "profile" or b != batch:
                continue
            others = [by.get((m, batch, res)) for m in ("uva", "lru", "first_n")]
            beaten = all(o is None or rec["tokens_per_s"] > o["tokens_per_s"] for o in others)
            if res == 0:
                lines.append(f"batch {batch}, 0/{E}: nothing resident, every method reads all "
                             "experts in place")
            elif res < E:
                lines.append(f"batch {batch}, {res}/{E}: profile ahead of uva/lru/first_n: "
                             f"{'yes' if beaten else 'no'}; floor/measured "
                             f"{rec['floor_over_measured']:.2f} (goal >= {1 / 1.15:.2f})")
            else:
                dev = by[("device", batch, E)]
                ratio = rec["step_ms"] / dev["step_ms"]
                lines.append(f"batch {batch}, all resident: {ratio:.3f}x device step time "
                             f"(goal <= 1.05)")
    return lines

