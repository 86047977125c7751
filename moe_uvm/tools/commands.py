"""What each `moe-uvm` subcommand does with its parsed arguments (the parser is moe_uvm.cli):
check every input before any work or output, then call the library and print the result."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from moe_uvm import uvm
from moe_uvm.policies.warmup import AdaptiveSettings
from moe_uvm.presets import ModelShape
from moe_uvm.profile import Profile, load_profile
from moe_uvm.simulate import (
    POLICIES,
    PROFILE_POLICIES,
    SLOT_POLICIES,
    Bandwidths,
    format_table,
    plan,
    resident_sizes,
    simulate,
)
from moe_uvm.simulate_slots import SlotSettings
from moe_uvm.trace import LONG_NAME, RoutingTrace, load_trace, parse_range, trace_path

if TYPE_CHECKING:
    from moe_uvm.tools.bench_sweep import BenchConfig


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def info_command(args: argparse.Namespace) -> int:
    import torch

    print(f"moe-uvm {__import__('moe_uvm').__version__}, torch {torch.__version__}")
    if not uvm.available():
        print(f"CUDA: not available ({uvm.unavailable_reason()}).")
        print("moe-uvm runs its CPU path here: stores in CPU memory, advice recorded, no GPU.")
        return 0
    driver, runtime = uvm.driver_version(), uvm.runtime_version()
    print(
        f"CUDA driver {driver // 1000}.{driver % 1000 // 10}, runtime {runtime // 1000}."
        f"{runtime % 1000 // 10}, {uvm.device_count()} device(s)"
    )
    for dev in range(uvm.device_count()):
        free, total = uvm.mem_get_info(dev)
        yes = lambda name, dev=dev: "yes" if uvm.device_attribute(name, dev) else "no"
        print(
            f"cuda:{dev} {uvm.device_name(dev)}: {free / 2**30:.1f} GiB free of "
            f"{total / 2**30:.1f} GiB; managed memory {yes('ManagedMemory')}, concurrent "
            f"managed access {yes('ConcurrentManagedAccess')}, pageable memory access "
            f"{yes('PageableMemoryAccess')}"
        )
    return 0


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CLIError(f"{flag} must be comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _output_file(path: str, flag: str) -> None:
    """Refuse an output file that cannot be written, before the work that produces it."""
    if Path(path).is_dir():
        raise CLIError(f"{flag} {path} is a folder; give a file name")
    if not Path(path).parent.is_dir():
        raise CLIError(f"{flag} {path}: folder {Path(path).parent} does not exist")


def _results_folder(path: Path) -> Path:
    """Create the results folder and prove it writable before a run, so that a long GPU run
    cannot fail at its end."""
    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {path} is a file; give a folder for the results")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        reason = exc.strerror or exc
        raise CLIError(f"--out {path}: cannot write results there ({reason})") from None
    return path.resolve()


def _trace_slice(path: str, sequences: str | None) -> RoutingTrace:
    trace = load_trace(path)
    return trace if sequences is None else trace.sequences(*parse_range(sequences))


def calibrate_command(args: argparse.Namespace) -> int:
    _output_file(args.out, "--out")
    if args.model is not None:
        if args.prompts is None:
            raise CLIError("--model needs --prompts FILE (text lines or JSONL)")
        if args.sequences is not None:
            raise CLIError("--sequences selects sequences of a trace: it goes with --trace")
        if args.trace_out is not None:
            _output_file(args.trace_out, "--trace-out")
        try:
            from moe_uvm.integrations.hf import calibrate_model
        except ImportError as exc:
            raise CLIError(f"--model needs the hf extra (pip install moe-uvm[hf]): {exc}") from None
        profile = calibrate_model(args.model, args.prompts, max_tokens=args.max_tokens,
                                  trace_out=args.trace_out, progress=sys.stderr.isatty())
        if args.model_id is not None:
            profile = replace(profile, model_id=args.model_id)
        source = f"{profile.num_tokens} tokens of {args.prompts} through {args.model}"
    else:
        if (args.prompts, args.trace_out, args.max_tokens) != (None, None, None):
            raise CLIError("--prompts, --trace-out and --max-tokens go with --model")
        trace = _trace_slice(args.trace, args.sequences)
        profile = Profile.from_trace(trace, model_id=args.model_id,
                                     cooccurrence=args.cooccurrence)
        source = f"{profile.num_tokens} tokens of {trace.num_sequences} sequences"
    profile.save(args.out)
    print(f"wrote {args.out}: {source}, {profile.num_layers} layers x {profile.num_experts} "
          f"experts, top-{profile.top_k}")
    return 0


def _model_shape(
    args: argparse.Namespace, num_layers: int, num_experts: int, top_k: int
) -> ModelShape | None:
    """The --model-shape preset, or a shape of explicit sizes with the given layers, experts
    and top-k; None when neither is given."""
    sizes = {"--hidden-size": args.hidden_size, "--moe-intermediate-size":
             args.moe_intermediate_size, "--weight-bytes": args.weight_bytes,
             "--shared-experts": args.shared_experts}
    given = [flag for flag, value in sizes.items() if value is not None]
    if args.model_shape is not None:
        if given:
            raise CLIError(f"--model-shape sets the expert size, so {', '.join(given)} cannot "
                           "go with it: give a preset or explicit sizes")
        return ModelShape.from_name(args.model_shape)
    if not given:
        return None
    if args.hidden_size is None or args.moe_intermediate_size is None:
        raise CLIError("explicit sizes need both --hidden-size and --moe-intermediate-size")
    weight_bytes = args.weight_bytes or 2
    name = (f"custom (hidden {args.hidden_size}, expert width {args.moe_intermediate_size}, "
            f"{weight_bytes}-byte weights)")
    return ModelShape(
        name, num_layers, num_layers, num_experts, top_k, args.hidden_size,
        args.moe_intermediate_size, args.shared_experts or 0, weight_bytes,
    )


def simulate_command(args: argparse.Namespace) -> int:
    trace = _trace_slice(args.trace, args.sequences)
    profile = load_profile(args.profile) if args.profile else None
    slots = SlotSettings(
        slots=tuple(_ints(args.slots, "--slots")), prefetch=_names(args.prefetch),
        num_predicted=args.prefetch_experts, cooccurrence=args.cooccurrence_source,
    )
    if args.policies:
        policies = list(_names(args.policies))
    else:
        known = SLOT_POLICIES if max(slots.slots) > 0 else POLICIES
        policies = [p for p in known if profile is not None or p not in PROFILE_POLICIES]
    batches = _ints(args.batch, "--batch")
    adaptive = AdaptiveSettings(
        interval_tokens=args.interval_tokens, half_life_tokens=args.half_life_tokens,
        max_swaps=args.max_swaps,
    )
    resident = resident_sizes(args.resident, trace.num_experts)
    shape = _model_shape(args, trace.num_layers, trace.num_experts, trace.top_k)
    bandwidths = Bandwidths(args.hbm_gbps, args.pcie_gbps)
    records = []
    for batch in batches:
        records += simulate(
            trace, resident, batch=batch, policies=policies, profile=profile, shape=shape,
            bandwidths=bandwidths, adaptive=adaptive, warmup_tokens=args.warmup_tokens,
            slots=slots, progress=sys.stderr.isatty(),
        )
    if args.json:
        print(json.dumps(records, indent=1))
    else:
        print(
            f"{args.trace}: {trace.num_tokens} tokens in {trace.num_sequences} sequences, "
            f"{trace.num_layers} layers x {trace.num_experts} experts, top-{trace.top_k}"
        )
        print(format_table(records))
    return 0


def plan_command(args: argparse.Namespace) -> int:
    from moe_uvm.autosplit import (
        expert_nbytes,
        load_costs,
        plan_split,
        shape_for_trace,
        trace_from_profile,
    )

    if args.batch < 1 or args.context < 1:
        raise CLIError(f"--batch and --context must be >= 1, got {args.batch} and "
                       f"{args.context}")
    info = None
    if args.model is not None:
        if args.model_shape is not None or args.hidden_size is not None:
            raise CLIError("--model sets the expert size: it cannot go with --model-shape or "
                           "explicit sizes")
        try:
            from moe_uvm.integrations.hf_shape import describe
        except ImportError as exc:
            raise CLIError(f"--model needs the hf extra (pip install moe-uvm[hf]): {exc}") \
                from None
        info = describe(args.model)
        kv = info.kv_bytes_per_token * args.batch * args.context
        if args.fixed_gb is None:
            args.fixed_gb = info.fixed_bytes(args.batch * args.context) / 1e9
    args.fixed_gb = args.fixed_gb or 0.0
    if not 0 <= args.fixed_gb < args.gpu_budget_gb:
        raise CLIError(f"--fixed-gb must be >= 0 and below --gpu-budget-gb "
                       f"({args.gpu_budget_gb:g}), got {args.fixed_gb:g}")
    result, note, static = {}, None, None
    if args.profile is not None:
        profile = load_profile(args.profile)
        L, E, k = profile.num_layers, profile.num_experts, profile.top_k
        shape = info.shape if info is not None else _model_shape(args, L, E, k)
        if shape is None:
            raise CLIError("plan needs the expert size: --model-shape NAME, or --hidden-size "
                           "and --moe-intermediate-size")
        if shape.num_moe_layers != L and (shape.num_experts, shape.top_k) == (E, k):
            note = (f"the profile covers {L} MoE layers and {shape.name} has "
                    f"{shape.num_moe_layers}: planned for the profile's {L} layers with "
                    f"{shape.name}'s expert size")
            dense = shape.num_layers - shape.num_moe_layers
            shape = replace(shape, num_layers=L + dense, num_moe_layers=L)
        static = plan(profile, shape, (args.gpu_budget_gb - args.fixed_gb) * 1e9,
                      args.min_per_layer)
        routing, source, model_layers = trace_from_profile(profile), "draws from the profile", L
    else:
        name = args.trace or LONG_NAME
        routing = load_trace(name)
        shape = (info.shape if info is not None else
                 _model_shape(args, routing.num_layers, routing.num_experts, routing.top_k))
        shape = shape or ModelShape.from_name("qwen3-30b-a3b")
        model_layers = shape.num_moe_layers
        if (shape.num_experts, shape.top_k) != (routing.num_experts, routing.top_k):
            shape = shape_for_trace(routing, shape)
            model_layers = routing.num_layers
        source = f"trace {trace_path(name).name}"
        profile = None
    L = routing.num_layers
    resident_nb, slot_nb, packed_nb = expert_nbytes(shape)
    # The routing's L layers stand for the model's: plan their share of the budget.
    budget = (args.gpu_budget_gb - args.fixed_gb) * 1e9 * L / model_layers
    device = None
    if uvm.available():
        from moe_uvm import ceilings

        device = ceilings.device_summary()["device"]
    costs = load_costs(device)
    best, candidates = plan_split(routing, budget, resident_nbytes=resident_nb,
                                  slot_nbytes=slot_nb, packed_nbytes=packed_nb,
                                  batch=args.batch, costs=costs,
                                  profile=profile)
    scale = model_layers / L
    step_ms = best.predicted_step_ms * scale
    result = {**(static or {}), "note": note, "model_shape": shape.name,
              "routing": source, "budget_gb": args.gpu_budget_gb, "fixed_gb": args.fixed_gb,
              "moe_layers": model_layers, "planned_layers": L, "costs": costs.__dict__,
              "auto": {**best.to_dict(), "model_step_ms": step_ms,
                       "model_tokens_per_s": args.batch / step_ms * 1e3,
                       "model_device_gb": best.device_bytes * scale / 1e9,
                       "model_pcie_bytes_per_token": best.pcie_bytes_per_token * scale,
                       "model_floor_ms": best.floor_ms * scale},
              "candidates": [c.to_dict() for c in candidates]}
    if args.cpu_gbps is not None:
        result["hybrid"] = _plan_hybrid(args, candidates, shape, costs, L, scale, step_ms)
    if info is not None:
        kv = info.kv_bytes_per_token * args.batch * args.context
        dense_ms = costs.dense_step_ms(shape.num_layers, info.step_read_bytes, kv)
        whole = step_ms + dense_ms
        result["whole_model"] = {
            "dense_step_ms": dense_ms, "step_ms": whole, "tokens_per_s": args.batch / whole * 1e3,
            "non_expert_gb": info.non_expert_bytes / 1e9, "kv_cache_gb": kv / 1e9,
            "context": args.context, "layers": shape.num_layers}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    if note:
        print(note)
    if static is not None:
        _print_static_plan(args, shape, static)
    auto = result["auto"]
    resident = sum(best.resident) / L
    cache = ("no slots" if not best.slots else
             f"{best.slots} slots per layer ({best.eviction} eviction, prefetch "
             f"{best.prefetch})")
    print(f"auto split of {args.gpu_budget_gb:g} GB ({args.fixed_gb:g} GB fixed) for "
          f"{model_layers} MoE layers of {shape.name}, batch {args.batch}, planned on "
          f"{source}:")
    print(f"  {resident:.1f} resident experts per layer (split by routing counts: "
          f"{min(best.resident)}..{max(best.resident)}) + {cache}: "
          f"{auto['model_device_gb']:.2f} GB")
    print(f"  predicted {auto['model_tokens_per_s']:.1f} tokens/s ({step_ms:.2f} ms per step), "
          f"PCIe {auto['model_pcie_bytes_per_token'] / 1e6:.1f} MB per token, hit rate "
          f"{best.hit_rate:.3f}; floor {auto['model_floor_ms']:.2f} ms (resident bytes / HBM "
          "read + offloaded bytes / read-through)")
    if info is not None:
        w = result["whole_model"]
        print(f"  whole model ({shape.num_layers} layers, {args.context}-token context): "
              f"{w['tokens_per_s']:.1f} tokens/s predicted ({w['step_ms']:.2f} ms per step = "
              f"{step_ms:.2f} experts + {w['dense_step_ms']:.2f} attention, shared weights, KV "
              f"cache and output head); fixed parts {w['non_expert_gb']:.2f} GB weights + "
              f"{w['kv_cache_gb']:.2f} GB KV cache")
    if "hybrid" in result:
        h = result["hybrid"]
        verdict = "faster than" if h["model_step_ms"] < step_ms else "not faster than"
        print(f"  with the CPU/GPU hybrid (cpu_experts, CPU {h['cpu_gbps']:.1f} GB/s "
              f"{h['cpu_source']}): {h['resident_per_layer']:.1f} resident experts per layer, "
              f"no slots, the CPU takes {h['cpu_experts_per_layer']:.2f} of "
              f"{h['offloaded_per_layer']:.1f} offloaded experts a layer: predicted "
              f"{h['model_tokens_per_s']:.1f} tokens/s ({h['model_step_ms']:.2f} ms per step), "
              f"{verdict} the split above; each layer's hand-off to the CPU (tens of us, "
              "README) is not in this figure")
    print(f"  costs: {costs.source}: HBM {costs.hbm_gbps:.0f} GB/s, read-through "
          f"{costs.read_through_gbps:.1f} GB/s, kernel {costs.kernel_hbm_gbps:.0f} GB/s at "
          f"{costs.kernel_expert_nbytes / 2**20:.1f} MiB experts, "
          f"{costs.launch_us:.1f} us per layer"
          + (f"; attention etc. {costs.dense_us_per_layer:.0f} us per decoder layer (fitted on "
             "the H200's whole-model run)" if info is not None else ""))
    return 0


def _plan_hybrid(args, candidates, shape, costs, layers: int, scale: float,
                 step_ms: float) -> dict:
    """The hybrid on the best split without slots (the hybrid serves offloaded experts only
    without a slot cache): its step less what the CPU's share saves."""
    from moe_uvm.autosplit import expert_nbytes, hybrid_plan, quickest_without_slots
    from moe_uvm.hybrid import measure_cpu_gbps

    if args.cpu_gbps == "measure":
        from moe_uvm.kernels import cpu_experts as cpu_kernel

        built, why = cpu_kernel.available()
        if not built:
            raise CLIError(f"--cpu-gbps measure: the CPU expert kernel is unavailable: {why}")
        gbps, source = measure_cpu_gbps(shape.hidden_size, shape.moe_intermediate_size), \
            "measured here, alone"
    else:
        try:
            gbps, source = float(args.cpu_gbps), "given"
        except ValueError:
            gbps = float("nan")
        if not (gbps > 0 and gbps < float("inf")):
            raise CLIError(f"--cpu-gbps must be a number > 0 or 'measure', got "
                           f"{args.cpu_gbps!r}") from None
    base = quickest_without_slots(candidates)
    if base is None:
        raise CLIError("--cpu-gbps: the budget fits no split without slots")
    plan = hybrid_plan(base, cpu_gbps=gbps, read_through_gbps=costs.read_through_gbps,
                       expert_nbytes=expert_nbytes(shape)[1], layers=layers,
                       top_k=shape.top_k, batch=args.batch)
    model_ms = plan.predicted_step_ms * scale
    return dict(plan.prediction, cpu_gbps=gbps, cpu_source=source,
                resident_per_layer=sum(plan.split.resident) / layers, model_step_ms=model_ms,
                model_tokens_per_s=args.batch / model_ms * 1e3,
                faster_than_auto=model_ms < step_ms)


def _print_static_plan(args: argparse.Namespace, shape: ModelShape, result: dict) -> None:
    split, even = result["global"], result["even"]
    print(
        f"{shape.name}: {args.gpu_budget_gb - args.fixed_gb:g} GB holds "
        f"{result['resident_experts']} of {shape.num_moe_layers * shape.num_experts} experts "
        f"({shape.bytes_per_expert / 2**20:.1f} MiB each)"
    )
    print("resident experts per MoE layer (global split):")
    sizes = split["per_layer"]
    for first in range(0, len(sizes), 16):
        print(f"  layers {first:>3}-{min(first + 16, len(sizes)) - 1:>3}: "
              + " ".join(f"{n:>3}" for n in sizes[first : first + 16]))
    for name, row in (("global split", split), ("even split", even)):
        print(
            f"{name}: expected hit rate {row['hit_rate']:.3f}, PCIe "
            f"{row['pcie_bytes_per_token'] / 1e6:.1f} MB per token (on the profile's tokens)"
        )


def bench_command(args: argparse.Namespace) -> int:
    from moe_uvm.tools import bench_sweep

    device = args.device
    if device == "auto":
        device = "cuda" if uvm.available() else "simulate"
    if device == "cuda" and not uvm.available():
        raise CLIError(f"--device cuda, but CUDA is not available ({uvm.unavailable_reason()})")
    gpu_only = {"layers": args.layers, "steps": args.steps, "tiny": args.tiny or None,
                "warmup_tokens": args.warmup_tokens, "weight_dtype": args.weight_dtype,
                "methods": None if args.methods is None else _names(args.methods),
                "cpu_experts": args.cpu_experts, "cpu_threads": args.cpu_threads,
                "nproc": args.nproc}
    given = {name: value for name, value in gpu_only.items() if value is not None}
    reason = "no CUDA GPU here" if args.device == "auto" else "--device simulate"
    if device == "simulate" and given:
        raise CLIError(f"{', '.join('--' + name for name in given)}: GPU benchmark only; this "
                       f"runs the CPU policy simulation ({reason}), so drop them")
    nproc = given.pop("nproc", None)
    cfg = bench_sweep.BenchConfig(
        model_shape=args.model_shape, trace=args.trace, resident=args.resident,
        batches=tuple(_ints(args.batch, "--batch")), slots=tuple(_ints(args.slots, "--slots")),
        prefetch=_names(args.prefetch), calibrate_sequences=args.calibrate_sequences,
        device=device, **given,
    )
    bench_sweep.load_inputs(cfg)
    out = _results_folder(Path(args.out))
    if device == "simulate":
        return _bench_simulation(cfg, out, reason)
    from moe_uvm.parallel import world_from_env

    if nproc is not None or world_from_env() > 1:
        return _bench_parallel(cfg, 1 if nproc is None else nproc, out)
    result = bench_sweep.sweep(cfg, progress=lambda line: print(line, file=sys.stderr))
    paths = bench_sweep.write_outputs(result, out)
    dev = result["device"]
    print(f"\n{dev['device']}: {result['layers']} MoE layers of {cfg.model_shape} "
          f"({result['num_experts']} experts, top-{result['top_k']}, {result['dtype']}, "
          f"weights {result['weight_dtype']}), "
          f"trace {trace_path(cfg.trace).name}; medians over up to {cfg.steps} steps after "
          f"{cfg.warmup_tokens} warm-up tokens (per row: timed_steps, warmup_steps in the JSON)")
    if result["note"]:
        print(result["note"])
    print(", ".join(f"{k} {v:.1f}" for k, v in result["ceilings"].items()))
    print("\n".join(bench_sweep.summarize_goals(result)))
    print(f"results in {out}: {', '.join(p.name for p in paths)}\n")
    print(bench_sweep.markdown_table(result))
    return 0


def _bench_parallel(cfg: BenchConfig, nproc: int, out: Path) -> int:
    """`moe-uvm bench --nproc N`: expert-parallel rows against one GPU (bench_parallel)."""
    from moe_uvm.tools import bench_parallel
    from moe_uvm.tools.bench import DEFAULT_METHODS

    if nproc < 1:
        raise CLIError(f"--nproc must be >= 1, got {nproc}")
    if cfg.slots or cfg.prefetch != ("none",) or set(cfg.methods) != set(DEFAULT_METHODS):
        raise CLIError("--nproc runs its own rows (one-gpu, ep, ep-full, ep-ag, ep-a2a at profile "
                       "residency): drop --slots, --prefetch and --methods")
    result = _in_ranks(bench_parallel.parallel_sweep, nproc, cfg, nproc,
                       cuda=cfg.device == "cuda")
    if not result:
        return 0  # a torchrun rank other than 0
    path = out / "parallel.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['device']} x {result['ranks']}: {result['layers']} MoE layers of "
          f"{cfg.model_shape} ({result['num_experts']} experts, top-{result['top_k']}), trace "
          f"{trace_path(cfg.trace).name}; medians over up to {cfg.steps} steps (the slowest "
          "rank's)")
    print("\n".join(bench_parallel.summarize(result)))
    print(f"results in {path}")
    return 0


def _bench_simulation(cfg: BenchConfig, out: Path, reason: str) -> int:
    from moe_uvm.tools import bench_sweep

    print(f"{reason[0].upper()}{reason[1:]}: running the CPU policy simulation instead of the "
          "GPU decode benchmark (hit rates and predicted floors, no timings).")
    result = bench_sweep.simulation(cfg)
    path = out / "simulation.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    shape, bw = ModelShape.from_name(cfg.model_shape), Bandwidths()
    n, cal = result["sequences"], result["calibrate_sequences"]
    if (shape.num_experts, shape.top_k) == (result["num_experts"], result["top_k"]):
        model = (f"the whole {shape.name} ({shape.num_moe_layers} MoE layers, the trace's "
                 "traffic per layer scaled up)")
    else:
        model = (f"the trace's {result['layers']} layers at {shape.name}'s expert size (its "
                 f"{shape.num_experts} experts, top-{shape.top_k} differ from the trace's)")
    print(f"{result['trace']}: {result['layers']} layers x {result['num_experts']} experts, "
          f"calibrated on sequences 0:{cal}, evaluated on {cal}:{n}; PCIe and floors for "
          f"{model} at {bw.pcie_gbps:.0f} GB/s PCIe read-through and {bw.hbm_gbps:.0f} GB/s "
          "HBM")
    print(format_table(result["records"]))
    print(f"results in {out}: {path.name}")
    return 0


def generate_command(args: argparse.Namespace) -> int:
    """`moe-uvm generate`: every input checked before the load, then load, decode, report."""
    import torch

    if args.max_new_tokens < 1 or args.batch < 1:
        raise CLIError(f"--max-new-tokens and --batch must be >= 1, got {args.max_new_tokens} "
                       f"and {args.batch}")
    if args.prefill_chunk < 1:
        raise CLIError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    for flag, given in (("--no-graphs", args.no_graphs), ("--no-compile", args.no_compile)):
        if given and args.decode != "static":
            raise CLIError(f"{flag} goes with --decode static")
    if args.prompt_tokens is not None and args.prompt_tokens < 1:
        raise CLIError(f"--prompt-tokens must be >= 1, got {args.prompt_tokens}")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise CLIError(f"--model {model_dir}: no config.json there (give a local checkpoint "
                       "folder; with --random-weights, a folder holding its config.json)")
    if args.json is not None:
        _output_file(args.json, "--json")
    if args.profile is not None:
        load_profile(args.profile)  # a bad profile is refused before anything is allocated
    trace = None if args.routing_trace is None else load_trace(args.routing_trace)
    try:
        from transformers import AutoConfig

        from moe_uvm.config import ExpertOffloadConfig
        from moe_uvm.generate import DTYPES, prompt_ids
    except ImportError as exc:
        raise CLIError(f"generate needs the hf extra (pip install moe-uvm[hf]): {exc}") from None
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA GPU is usable here")
    if args.nproc < 1:
        raise CLIError(f"--nproc must be >= 1, got {args.nproc}")
    device = torch.device("cuda" if cuda else "cpu")
    hf_config = AutoConfig.from_pretrained(model_dir)
    if trace is not None:
        from moe_uvm.integrations.hf_shape import describe

        shape = describe(model_dir, quantize_experts=args.quantize_experts).shape
        if (trace.num_experts, trace.top_k) != (shape.num_experts, shape.top_k):
            raise CLIError(f"--routing-trace has {trace.num_experts} experts, top-{trace.top_k}; "
                           f"the model {shape.num_experts}, top-{shape.top_k}")
    dtype = DTYPES.get(args.dtype) or (None if cuda else torch.float32)
    ids = prompt_ids(model_dir, prompt=args.prompt, prompts_file=args.prompts,
                     prompt_tokens=args.prompt_tokens or 32, batch=args.batch,
                     vocab_size=hf_config.vocab_size, seed=args.random_weights or 0)
    config = ExpertOffloadConfig(
        gpu_budget_gb=args.gpu_budget_gb,
        resident_selection="profile" if args.profile else "first_n",
        profile_path=args.profile,
        quantize_experts=args.quantize_experts,
        cpu_experts=args.cpu_experts,
        cpu_threads=args.cpu_threads,
    )
    inputs = (model_dir, ids, config, dtype, trace)
    from moe_uvm.parallel import run_ranks, world_from_env

    if args.nproc == 1 and world_from_env() == 1:
        return _generate(device, args, *inputs)
    if args.cpu_experts != "off":
        raise CLIError("--cpu-experts goes with one process (the CPU/GPU hybrid runs on one "
                       "GPU); drop it or --nproc")
    _in_ranks(run_ranks, args.nproc, _generate_rank, args.nproc, args, *inputs, cuda=cuda)
    return 0


def _in_ranks(launch, nproc: int, *args, cuda: bool):
    """`launch(*args, cuda=cuda)`, which runs ranks (moe_uvm.parallel.run_ranks): refused
    up front when `nproc` GPUs are not there (unless under torchrun); a rank's error becomes a
    CLIError naming it."""
    import torch
    import torch.multiprocessing as mp

    from moe_uvm.parallel import world_from_env

    if cuda and world_from_env() == 1 and nproc > torch.cuda.device_count():
        raise CLIError(f"--nproc {nproc}: {torch.cuda.device_count()} GPUs are visible")
    try:
        return launch(*args, cuda=cuda)
    except mp.ProcessRaisedException as exc:  # its traceback is in the message
        raise CLIError(f"a rank failed: {str(exc).strip().splitlines()[-1]}") from None


def _generate_rank(rank: int, world: int, device, args: argparse.Namespace, model_dir: Path,
                   ids: list[list[int]], config, dtype, trace) -> None:
    """One rank of `moe-uvm generate --nproc N` (or under torchrun): its share of the experts,
    the rest of the model whole; rank 0 prints."""
    from moe_uvm.integrations.hf_shape import describe
    from moe_uvm.parallel import ExpertParallel

    shape = describe(model_dir, quantize_experts=args.quantize_experts).shape
    ep = ExpertParallel.place(shape.num_moe_layers, shape.num_experts, config.profile_path)
    if rank != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (the rank's life)
    else:
        print(f"expert parallel: {world} ranks, {len(ep.owned(0))} of {shape.num_experts} "
              "experts per layer on each", file=sys.stderr, flush=True)
    _generate(device, args, model_dir, ids, config, dtype, trace, expert_parallel=ep)


def _generate(device, args: argparse.Namespace, model_dir: Path, ids: list[list[int]], config,
              dtype, trace, expert_parallel=None) -> int:
    """Load, decode and report, on `device` (this rank's share with `expert_parallel`)."""
    import torch

    from moe_uvm.generate import generate, load_model

    cuda = device.type == "cuda"
    free_before = torch.cuda.mem_get_info(device)[0] if cuda else None
    what = "random weights" if args.random_weights is not None else "checkpoint"
    print(f"loading {model_dir} ({what}) onto {device}...", file=sys.stderr, flush=True)
    kv_tokens = args.batch * (max(len(p) for p in ids) + args.max_new_tokens)
    loaded = load_model(model_dir, config, random_weights=args.random_weights, dtype=dtype,
                        device=device, kv_tokens=kv_tokens, expert_parallel=expert_parallel)
    hybrid_on, why = loaded.manager.hybrid
    if args.cpu_experts != "off":
        print(f"cpu experts: {'on' if hybrid_on else 'off'} ({why})", file=sys.stderr,
              flush=True)
    try:
        text = args.batch == 1 and args.prompt is not None
        tokenizer = None
        if text:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        shown, new = [0], []

        def on_token(step: torch.Tensor) -> None:
            new.append(step[0].item())
            if tokenizer is not None:
                so_far = tokenizer.decode(new)
                sys.stdout.write(so_far[shown[0]:])
                sys.stdout.flush()
                shown[0] = len(so_far)
            elif len(new) % 16 == 0 or len(new) == args.max_new_tokens:
                print(f"\r{len(new)}/{args.max_new_tokens} tokens", end="", file=sys.stderr,
                      flush=True)

        if cuda and args.decode == "static" and not args.no_graphs:
            print("capturing the decode step in a CUDA graph"
                  + ("" if args.no_compile else ", through torch.compile (minutes the first "
                     "time for a model shape, cached after; --no-compile skips it)") + "...",
                  file=sys.stderr, flush=True)
        if tokenizer is not None:
            sys.stdout.write(args.prompt)
        outputs, report = generate(
            loaded, ids, max_new_tokens=args.max_new_tokens, batch=args.batch,
            ignore_eos=args.ignore_eos or args.random_weights is not None, on_token=on_token,
            free_before=free_before, decode=args.decode,
            graphs=False if args.no_graphs else None, prefill_chunk=args.prefill_chunk,
            routing_trace=trace, warmup=args.warmup,
            compile=False if args.no_compile else None)
        if expert_parallel is not None:
            ep = expert_parallel
            report.notes.append(
                f"expert parallel over {ep.world_size} ranks: memory, hit rate and expert reads "
                f"are this rank's ({len(ep.owned(0))} of {ep.num_experts} experts per layer)")
        print(file=sys.stderr if tokenizer is None else sys.stdout)
        for line in report.lines():
            print(line)
        if args.json is not None and (expert_parallel is None or expert_parallel.rank == 0):
            # one rank writes (several writing one path could leave a longer report's tail)
            Path(args.json).write_text(json.dumps(
                {"report": report.to_dict(), "prompts": ids, "new_tokens": outputs}) + "\n")
            print(f"wrote {args.json}")
    finally:
        loaded.manager.close()
    return 0
