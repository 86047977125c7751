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
from moe_uvm.autosplit import Costs, fit_kernel_costs, plan_split, save_costs, shape_for_trace
from moe_uvm.hybrid import CPU_EXPERTS_MODES, choose_cpu_experts
from moe_uvm.kernels import cpu_experts as cpu_kernel
from moe_uvm.policies.residency import frequency
from moe_uvm.presets import ModelShape
from moe_uvm.profile import Profile
from moe_uvm.simulate import Bandwidths, resident_sizes, simulate
from moe_uvm.simulate_slots import SlotSettings
from moe_uvm.slots import SlotCache
from moe_uvm.tools.bench import (
    CACHES,
    DEFAULT_METHODS,
    MANAGED,
    METHODS,
    LayerWeights,
    Workload,
    build_workload,
    check_workload,
    host_copies,
    hybrid_layer_error,
    hybrid_shares,
    managed_layers,
    managed_residency,
    run_captured,
    run_hybrid,
)
from moe_uvm.trace import LONG_NAME, RoutingTrace, load_trace, trace_path

CPU_NOTE = ("CPU path: no GPU, so weights stay in CPU memory, nothing is captured and the "
            "timings below mean nothing; this run only checks the harness.")


@dataclass(frozen=True)
class BenchConfig:
    """One decode-benchmark run. `trace` is a path or a bundled trace name ("long", the
    default, or "sample"); `resident` takes GPU budgets as experts per layer or percentages of
    the experts' bytes ("0,32" or "25%,50%"): every method gets that many bytes (count x layers
    x expert size) for resident experts, slots and caches. A trace of another expert count or
    top-k than `model_shape` is timed with its own layers, experts and top-k at the preset's
    expert size. `layers=None` takes the trace's layers, capped to fit the GPU with room.
    Each configuration replays `warmup_tokens` untimed, then times up to `steps` steps on the
    following tokens. `tiny` keeps the trace's experts and top-k but uses hidden 64 /
    intermediate 32 and at most 2 layers, whatever the model shape (for checking the harness).
    `device`: cuda, cpu (the harness on CPU tensors) or simulate (the policies replayed on the
    CPU by `simulation`, no weights)."""

    model_shape: str = "qwen3-30b-a3b"
    trace: str = LONG_NAME
    layers: int | None = None
    resident: str = "0%,25%,50%,75%,100%"
    batches: tuple[int, ...] = (1, 16)
    steps: int = 256
    warmup_tokens: int = 512
    methods: tuple[str, ...] = DEFAULT_METHODS
    slots: tuple[int, ...] = ()
    prefetch: tuple[str, ...] = ("none",)
    calibrate_sequences: int | None = None
    device: str = "cuda"
    tiny: bool = False
    seed: int = 0
    weight_dtype: str = "bf16"
    cpu_experts: str = "auto"
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        if self.cpu_experts not in CPU_EXPERTS_MODES:
            raise ValueError(f"cpu_experts must be one of {', '.join(CPU_EXPERTS_MODES)}; got "
                             f"{self.cpu_experts!r}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be >= 1, got {self.cpu_threads}")
        if self.weight_dtype not in ("bf16", "fp8"):
            raise ValueError(f"weight dtype must be bf16 or fp8, got {self.weight_dtype!r}")
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
        if self.warmup_tokens < 0:
            raise ValueError(f"warm-up tokens must be >= 0, got {self.warmup_tokens}")


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
    if (E, trace.top_k) != (shape.num_experts, shape.top_k):
        # A trace of another model (e.g. a learned one): its layers, experts and top-k with the
        # preset's expert size.
        shape = shape_for_trace(trace, shape)
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


def workload_layers(cfg: BenchConfig, trace: RoutingTrace, shape: ModelShape) -> int:
    """The layers `make_workload` builds: cfg's (default the trace's), at most 2 with `tiny`,
    capped on a GPU so three copies of the experts fit in its free memory."""
    layers = cfg.layers or trace.num_layers
    if cfg.tiny:
        return min(layers, 2)
    if cfg.device != "cpu":
        return min(layers, _layer_budget(shape.num_experts * shape.bytes_per_expert))
    return layers


def make_workload(cfg: BenchConfig) -> Workload:
    trace, shape, cal = load_inputs(cfg)
    hidden, inter = (64, 32) if cfg.tiny else (shape.hidden_size, shape.moe_intermediate_size)
    dtype = torch.float32 if cfg.device == "cpu" else torch.bfloat16
    layers = workload_layers(cfg, trace, shape)
    return build_workload(trace, num_layers=layers, hidden=hidden, intermediate=inter,
                          calibrate_sequences=cal, dtype=dtype,
                          device=torch.device(cfg.device), seed=cfg.seed,
                          weight_dtype=cfg.weight_dtype)


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


def _steps(cfg: BenchConfig, work: Workload, batch: int) -> tuple[int, int]:
    """(warm-up steps, timed steps) at `batch`: the warm-up covers cfg.warmup_tokens, the timed
    steps follow on tokens never replayed, at most cfg.steps of them."""
    warm = -(-cfg.warmup_tokens // batch)
    timed = min(cfg.steps, work.eval_trace.num_tokens // batch - warm)
    if timed < 1:
        raise ValueError(
            f"batch {batch}: the evaluated sequences hold {work.eval_trace.num_tokens} tokens, "
            f"{warm} warm-up steps of {batch} take {warm * batch}: no tokens left to time; use "
            "a longer trace, fewer warm-up tokens or fewer calibration sequences")
    return warm, timed


def _advise(manager, sets: list[list[int]]) -> None:
    for layer, ids in enumerate(sets):
        manager.readvise(layer, ids)
    manager.synchronize()


def _ceilings(cuda: bool, progress) -> dict[str, float]:
    if not cuda:
        c = Costs()
        return {"hbm_read_gbps": c.hbm_gbps, "read_through_gbps": c.read_through_gbps,
                "pinned_read_gbps": c.read_through_gbps, "h2d_gbps": Bandwidths().h2d_gbps}
    bw = {"hbm_read_gbps": ceilings.hbm_read_gbps(), "read_through_gbps":
          ceilings.read_through_gbps(), "pinned_read_gbps": ceilings.pinned_read_gbps(),
          "h2d_gbps": ceilings.h2d_gbps()}
    progress(", ".join(f"{k} {v:.1f}" for k, v in bw.items()))
    return bw


# Long (~130 lines): one loop over batches x budgets x methods whose records share the routing,
# the floor's bandwidths and the equality reference; split, they would travel through every
# signature.
def sweep(cfg: BenchConfig, progress=print) -> dict:
    """Run every method at every (batch, budget); returns the JSON-ready result. Budgets are
    cfg.resident counts (or shares) of experts per layer, as bytes: count x layers x expert."""
    cuda = cfg.device == "cuda"
    bw = _ceilings(cuda, progress)
    work = make_workload(cfg)
    E, L, eb, k = work.num_experts, work.num_layers, work.expert_bytes, work.top_k
    counts = resident_sizes(cfg.resident, E)
    manager, managed = managed_layers(work)
    manager.synchronize()
    resident_nb = manager.stores[0].slot_nbytes
    hybrid, hybrid_note = None, None
    if cfg.cpu_experts != "off":
        built, why = cpu_kernel.available() if cuda else (False, "no GPU (CPU harness)")
        if built:
            hybrid = hybrid_shares(work, manager, managed, cfg.cpu_threads)
            progress(f"hybrid: CPU {hybrid[0].costs.cpu_expert_us:.0f} us an expert "
                     f"(+{hybrid[0].costs.cpu_pair_us:.1f} a pair) on "
                     f"{hybrid[0].threads} threads, GPU read-through "
                     f"{hybrid[0].costs.gpu_expert_us:.0f} us an expert")
        else:
            hybrid_note = f"cpu_experts={cfg.cpu_experts!r} but no hybrid rows: {why}"
            progress(hybrid_note)
    if "uva" in cfg.methods:
        host, mapped = host_copies(work)
        uva_slots = [(torch.empty_like(w13), torch.empty_like(w2))
                     for w13, w2 in zip(work.w13, work.w2, strict=True)]
    device_layers = [LayerWeights(w13, w2, quant=work.layer_quant(i))
                     for i, (w13, w2) in enumerate(zip(work.w13, work.w2, strict=True))]
    dev = work.device.index or 0
    # "GPU GB" of the managed methods is the advised resident bytes. The driver's own figure is
    # kept too: it includes pages of demoted experts the UVM driver keeps in its GPU pool.
    baseline = (uvm.mem_get_info(dev)[0] + torch.cuda.memory_reserved(dev)) if cuda else 0
    cal_counts = torch.from_numpy(work.profile.counts)
    cooc = torch.from_numpy(work.profile.cooccurrence)
    records, runs = [], {}

    def record(method, batch, n, ms, floor_ms, off_bytes, device_bytes, exact, **extra):
        warm, timed = runs[batch]["steps"]
        rec = dict(method=method, batch=batch, resident=n, budget_fraction=n / E,
                   budget_gb=n * L * eb / 1e9, step_ms=ms, tokens_per_s=batch / ms * 1e3,
                   offloaded_mb_per_step=off_bytes / 1e6, device_gb=device_bytes / 1e9,
                   floor_ms=floor_ms, floor_over_measured=floor_ms / ms, exact=exact,
                   warmup_steps=warm, timed_steps=timed, **extra)
        records.append(rec)
        progress(f"B={batch} budget={n}/{E} {method}: {ms:.3f} ms, {rec['tokens_per_s']:.1f} "
                 f"tok/s, {rec['device_gb']:.2f} GB, floor/measured "
                 f"{rec['floor_over_measured']:.2f}")

    def cached(method, batch, n, sets, slots, **kw):
        run = runs[batch]
        warm, timed = run["steps"]
        cache = SlotCache([(w.w13, w.w2) for w in managed], sets, slots, top_k=k,
                          counts=cal_counts, cooccurrence=cooc, **kw)
        ms, out = run_captured(work, managed, run["ids"], run["weights"], run["h0"], cache, warm)
        stats = cache.stats.summary()
        copies = int(cache.copies.sum()) / timed
        reads = (stats["needed_offloaded"] - stats["slot_hits"]) / timed
        hbm = (run["touched"].sum() / timed - reads) * eb / (bw["hbm_read_gbps"] * 1e6)
        pcie = (reads + copies) * eb / (bw["read_through_gbps"] * 1e6)
        record(method, batch, n, ms, hbm + pcie, (reads + copies) * eb,
               manager.resident_bytes() + cache.nbytes, torch.equal(out, run["ref"]),
               slots=slots, eviction=cache.eviction, prefetch=cache.mode,
               floor_overlapped_ms=max(hbm, pcie), slot_hit_rate=stats["slot_hit_rate"],
               prefetch_precision=stats["precision"], prefetch_recall=stats["recall"],
               copies_per_step=copies, pcie_experts_per_step=reads + copies)

    def static(method, batch, n, layers, mask, device_bytes, pcie_gbps):
        run = runs[batch]
        ms, out = run_captured(work, layers, run["ids"], run["weights"], run["h0"],
                               warmup=run["steps"][0])
        floor, off = _floor(run["touched"], mask, eb, bw["hbm_read_gbps"], pcie_gbps)
        record(method, batch, n, ms, floor, off, device_bytes, torch.equal(out, run["ref"]),
               pcie_experts_per_step=off / eb)

    def hybrid_row(batch, n, sets):
        """The hybrid at profile residency, against the GPU-only graph of the same residency
        (the `profile` row's when measured, else measured now); `chosen`: what auto picks."""
        run = runs[batch]
        warm, timed = run["steps"]
        _advise(manager, sets)
        gpu = [r for r in records if (r["method"], r["batch"], r["resident"])
               == ("profile", batch, n)]
        gpu_ms = gpu[0]["step_ms"] if gpu else run_captured(
            work, managed, run["ids"], run["weights"], run["h0"], warmup=warm)[0]
        err = hybrid_layer_error(hybrid, managed, run["h0"], run["ids"][warm],
                                 run["weights"][warm])
        ms, _ = run_hybrid(hybrid, run["ids"], run["weights"], run["h0"], warm)
        mask = _mask(sets, E)
        costs = hybrid[0].current_costs()
        cpu_gbps = eb / costs.cpu_expert_us / 1e3
        floor, off = _floor(run["touched"], mask, eb, bw["hbm_read_gbps"],
                            bw["read_through_gbps"] + cpu_gbps)
        offloaded = (run["touched"] & ~mask).sum() / (timed * L)
        pairs = batch * k * (1 - n / E)  # roughly: routed pairs landing on offloaded experts
        on, why = choose_cpu_experts(cfg.cpu_experts, offloaded_per_layer=offloaded,
                                     tokens_per_expert=max(1.0, pairs / max(offloaded, 1.0)),
                                     costs=costs, measured_ms=(gpu_ms, ms))
        stats = [s.stats.summary() for s in hybrid]
        cpu_n = sum(st["cpu_experts"] for st in stats)
        total = cpu_n + sum(st["gpu_offloaded_experts"] for st in stats)
        record("hybrid", batch, n, ms, floor, off, manager.resident_bytes(), False,
               max_layer_rel_err=err, gpu_only_ms=gpu_ms, hybrid_over_gpu_only=gpu_ms / ms,
               chosen=on, choice=why, cpu_share_of_offloaded=cpu_n / max(total, 1),
               cpu_expert_us=costs.cpu_expert_us, gpu_expert_us=costs.gpu_expert_us,
               cpu_threads=hybrid[0].threads, resident_experts=len(sets[0]),
               pcie_experts_per_step=off / eb)

    _advise(manager, [[]] * L)
    for batch in cfg.batches:  # all-resident first: its times fit the cost model
        warm, timed = _steps(cfg, work, batch)
        ids, weights = work.routing(batch, warm + timed)
        h0 = torch.randn(batch, work.hidden, generator=torch.Generator().manual_seed(batch))
        h0 = h0.to(work.dtype).to(work.device)
        runs[batch] = dict(steps=(warm, timed), ids=ids, weights=weights, h0=h0,
                           touched=_touched(ids[warm:], E))
        ms, ref = run_captured(work, device_layers, ids, weights, h0, warmup=warm)
        runs[batch]["ref"] = ref
        floor, _ = _floor(runs[batch]["touched"], np.ones((L, E), bool), eb,
                          bw["hbm_read_gbps"], bw["read_through_gbps"])
        runs[batch]["device"] = (ms, floor)
    points = [(runs[b]["touched"].sum() / runs[b]["steps"][1] * eb, runs[b]["device"][0])
              for b in cfg.batches]
    launch_us, kernel_gbps = fit_kernel_costs(L, points)
    source = ("measured by moe-uvm bench" if cuda else "CPU harness: H200 defaults")
    costs = Costs(bw["hbm_read_gbps"], bw["read_through_gbps"], kernel_gbps, launch_us, source,
                  kernel_expert_nbytes=float(eb))
    if cuda:
        save_costs(ceilings.device_summary()["device"], costs)
    progress(f"cost model: launch {launch_us:.1f} us per layer, kernel HBM {kernel_gbps:.0f} "
             "GB/s")
    for batch in cfg.batches:
        ms, floor = runs[batch]["device"]
        record("device", batch, E, ms, floor, 0.0, L * E * eb, True)
        touched = runs[batch]["touched"]
        for n in counts:
            budget = n * L * eb
            if "uva" in cfg.methods:
                maps = torch.arange(E, dtype=torch.int32, device=work.device)
                maps = torch.where(maps < n, maps, -1)
                for (s13, s2), w13, w2 in zip(uva_slots, work.w13, work.w2, strict=True):
                    s13[:n].copy_(w13[:n])
                    s2[:n].copy_(w2[:n])
                layers = [LayerWeights(m.w13, m.w2, maps, s13, s2, quant=m.quant)
                          for m, (s13, s2) in zip(mapped, uva_slots, strict=True)]
                static("uva", batch, n, layers, _mask([list(range(n))] * L, E), budget,
                       bw["pinned_read_gbps"])
            if "layer_split" in cfg.methods:  # llama.cpp offloads the first layers' experts
                full = (n * L) // E
                layers = [device_layers[i] if i >= L - full else managed[i] for i in range(L)]
                mask = np.zeros((L, E), bool)
                mask[L - full:] = True
                static("layer_split", batch, n, layers, mask, full * E * eb,
                       bw["read_through_gbps"])
                records[-1].update(resident_layers=full)
            for method in (m for m in CACHES if m in cfg.methods):
                if n == 0:  # no cache: every expert read in place
                    static(method, batch, 0, managed, np.zeros((L, E), bool), 0,
                           bw["read_through_gbps"])
                else:
                    cached(method, batch, n, [[]] * L, n, mode="none", eviction=method)
            fitted = int(budget // (L * resident_nb))
            for num_slots in (cfg.slots if 0 < fitted < E else ()):
                left = int((budget - num_slots * L * eb) // (L * resident_nb))
                if left < 0:
                    continue
                _advise(manager, managed_residency(work, "profile", left))
                for mode in cfg.prefetch:
                    name = f"{'cache' if mode == 'none' else mode}{num_slots}"
                    cached(name, batch, n, managed_residency(work, "profile", left), num_slots,
                           mode=mode)
            for policy in (m for m in cfg.methods if m in MANAGED):
                sets = managed_residency(work, policy, min(fitted, E))
                _advise(manager, sets)
                static(policy, batch, n, managed, _mask(sets, E), manager.resident_bytes(),
                       bw["read_through_gbps"])
                # Experts a layer holds: the budget over 2 MiB-aligned slots (fewer than n).
                records[-1]["resident_experts"] = min(fitted, E)
                if cuda:  # what the driver reports, next to the advised bytes
                    records[-1]["driver_used_gb"] = (baseline - uvm.mem_get_info(dev)[0]
                                                     - torch.cuda.memory_reserved(dev)) / 1e9
            if hybrid is not None and n < E:
                hybrid_row(batch, n, managed_residency(work, "profile", min(fitted, E)))
            if "auto" in cfg.methods:
                split, _ = plan_split(work.calibration, budget, resident_nbytes=resident_nb,
                                      slot_nbytes=eb, batch=batch, costs=costs)
                sets = [np.flatnonzero(row).tolist() for row in
                        frequency(work.profile.counts, np.array(split.resident))]
                _advise(manager, sets)
                if split.slots:
                    cached("auto", batch, n, sets, split.slots, mode=split.prefetch,
                           eviction=split.eviction)
                else:
                    static("auto", batch, n, managed, _mask(sets, E), manager.resident_bytes(),
                           bw["read_through_gbps"])
                rec = records[-1]
                rec.update(split=split.to_dict(), predicted_ms=split.predicted_step_ms,
                           predicted_over_measured=split.predicted_step_ms / rec["step_ms"])
            _advise(manager, [[]] * L)
        del touched
    return dict(config=asdict(cfg), layers=L, num_experts=E, top_k=k,
                hidden=work.hidden, intermediate=work.intermediate, expert_bytes=eb,
                resident_expert_bytes=resident_nb, dtype=str(work.dtype),
                weight_dtype=str(work.w13[0].dtype), ceilings=bw,
                costs=asdict(costs),
                device=ceilings.device_summary() if cuda else {"device": "cpu"},
                note=None if cuda else CPU_NOTE, hybrid_note=hybrid_note, records=records)


def _method_label(r: dict) -> str:
    if r["method"] == "auto" and r.get("split"):
        split = r["split"]
        resident = sum(split["resident"]) / len(split["resident"])
        if not split["slots"]:
            return f"auto ({resident:.0f} resident/layer)"
        kind = split["eviction"] + ("" if split["prefetch"] == "none" else f"+{split['prefetch']}")
        return f"auto ({resident:.0f} resident + {split['slots']} {kind} slots /layer)"
    if r["method"] == "layer_split":
        return f"layer_split ({r['resident_layers']} layers)"
    if r["method"] == "hybrid":
        picked = "auto: on" if r["chosen"] else "auto: off"
        return f"hybrid (CPU {r['cpu_share_of_offloaded']:.0%} of offloaded; {picked})"
    return r["method"]


def markdown_table(result: dict) -> str:
    rows = ["| batch | budget | method | tok/s | step ms | GPU GB | PCIe experts/step | "
            "floor ms | floor/measured | plan/measured | same output |",
            "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in result["records"]:
        budget = "all" if r["method"] == "device" else f"{r['budget_fraction']:.0%}"
        plan = f"{r['predicted_over_measured']:.2f}" if "predicted_over_measured" in r else "-"
        pcie = r.get("pcie_experts_per_step")
        same = "yes" if r["exact"] else "NO"
        if "max_layer_rel_err" in r:  # the hybrid: within bf16 rounding, not bitwise
            same = f"within {r['max_layer_rel_err']:.0e}"
        rows.append(
            f"| {r['batch']} | {budget} | {_method_label(r)} | {r['tokens_per_s']:.1f} | "
            f"{r['step_ms']:.2f} | {r['device_gb']:.2f} | "
            f"{'-' if pcie is None else f'{pcie:.1f}'} | {r['floor_ms']:.2f} | "
            f"{r['floor_over_measured']:.2f} | {plan} | {same} |"
        )
    return "\n".join(rows)


STYLES = {
    "uva": dict(marker="s", ls=":"), "lru": dict(marker="v"), "freq_lru": dict(marker="^"),
    "layer_split": dict(marker="P", ls="-."), "first_n": dict(marker="o"),
    "profile": dict(marker="D"), "global": dict(marker="x", ls="--"),
    "auto": dict(marker="*", lw=2.5, ms=10), "hybrid": dict(marker="h", ls="--", lw=2),
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
            pts = sorted((r["budget_fraction"], r["tokens_per_s"]) for r in recs
                         if r["method"] == method)
            if method == "device" and pts:
                ax.axhline(pts[0][1], color="black", ls="--", lw=1, label="device (all resident)")
            elif pts:  # distinct markers and dashes, since methods can coincide
                style = STYLES.get(method, {})
                ax.plot(*zip(*pts, strict=True), label=method, **style)
        ax.set(title=f"batch {batch}", xlabel="GPU budget (share of expert bytes)",
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
    """Lines saying where the one-knob goals hold at each budget below 100%: auto against every
    other method at equal GPU bytes, its floor/measured (goal >= 1/1.15) and plan/measured
    (goal within 15%)."""
    lines = []
    by = {(r["method"], r["batch"], r["resident"]): r for r in result["records"]}
    E = result["num_experts"]
    for (method, batch, n), auto in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if method != "auto" or not 0 < n < E:
            continue
        others = {m: r for (m, b, k), r in by.items() if b == batch and k == n and m != "auto"}
        best = max(others.items(), key=lambda kv: kv[1]["tokens_per_s"], default=None)
        ahead = ("-" if best is None else
                 f"{auto['tokens_per_s'] / best[1]['tokens_per_s']:.2f}x the best other "
                 f"({best[0]})")
        lines.append(
            f"batch {batch}, budget {n / E:.0%}: auto {auto['tokens_per_s']:.1f} tok/s, {ahead}; "
            f"floor/measured {auto['floor_over_measured']:.2f} (goal >= {1 / 1.15:.2f}); "
            f"plan/measured {auto['predicted_over_measured']:.2f} (goal 0.85-1.15)")
    return lines
