"""The `moe-uvm` command: one small function per subcommand, each parsing into library calls.
Errors print one line on stderr and exit non-zero, without a traceback."""

from __future__ import annotations

import argparse
import json
import sys

from moe_uvm import uvm
from moe_uvm.policies.warmup import AdaptiveSettings
from moe_uvm.presets import PRESETS, ModelShape
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
from moe_uvm.simulate_slots import COOCCURRENCE_SOURCES, PREFETCH_MODES, SlotSettings
from moe_uvm.trace import RoutingTrace, load_trace, parse_range


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _info(args: argparse.Namespace) -> int:
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

def _trace_slice(path: str, sequences: str | None) -> RoutingTrace:
    trace = load_trace(path)
    return trace if sequences is None else trace.sequences(*parse_range(sequences))


def _calibrate(args: argparse.Namespace) -> int:
    if args.model is not None:
        if args.prompts is None:
            raise CLIError("--model needs --prompts FILE (text lines or JSONL)")
        try:
            from moe_uvm.integrations.hf import calibrate_model
        except ImportError as exc:
            raise CLIError(f"--model needs the hf extra (pip install moe-uvm[hf]): {exc}") from None
        profile = calibrate_model(args.model, args.prompts, max_tokens=args.max_tokens,
                                  trace_out=args.trace_out, progress=sys.stderr.isatty())
        source = f"{profile.num_tokens} tokens of {args.prompts} through {args.model}"
    else:
        if args.prompts or args.trace_out or args.max_tokens:
            raise CLIError("--prompts, --trace-out and --max-tokens go with --model")
        trace = _trace_slice(args.trace, args.sequences)
        profile = Profile.from_trace(trace, model_id=args.model_id,
                                     cooccurrence=args.cooccurrence)
        source = f"{profile.num_tokens} tokens of {trace.num_sequences} sequences"
    profile.save(args.out)
    print(f"wrote {args.out}: {source}, {profile.num_layers} layers x {profile.num_experts} "
          f"experts, top-{profile.top_k}")
    return 0


def _model_shape(args: argparse.Namespace, trace: RoutingTrace) -> ModelShape | None:
    if args.model_shape is not None:
        return ModelShape.from_name(args.model_shape)
    if args.hidden_size is None and args.moe_intermediate_size is None:
        return None
    if args.hidden_size is None or args.moe_intermediate_size is None:
        raise CLIError("explicit sizes need both --hidden-size and --moe-intermediate-size")
    return ModelShape(
        "custom", trace.num_layers, trace.num_layers, trace.num_experts, trace.top_k,
        args.hidden_size, args.moe_intermediate_size, args.shared_experts, args.weight_bytes,
    )


def _simulate(args: argparse.Namespace) -> int:
    trace = _trace_slice(args.trace, args.sequences)
    profile = load_profile(args.profile) if args.profile else None
    slots = SlotSettings(
        slots=tuple(_ints(args.slots, "--slots")),
        prefetch=tuple(m.strip() for m in args.prefetch.split(",") if m.strip()),
        num_predicted=args.prefetch_experts, cooccurrence=args.cooccurrence_source,
    )
    if args.policies:
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    else:
        known = SLOT_POLICIES if max(slots.slots) > 0 else POLICIES
        policies = [p for p in known if profile is not None or p not in PROFILE_POLICIES]
    try:
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        raise CLIError(f"--batch must be ints like 1 or 1,16, got {args.batch!r}") from None
    adaptive = AdaptiveSettings(
        interval_tokens=args.interval_tokens, half_life_tokens=args.half_life_tokens,
        max_swaps=args.max_swaps,
    )
    resident = resident_sizes(args.resident, trace.num_experts)
    shape = _model_shape(args, trace)
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


def _plan(args: argparse.Namespace) -> int:
    shape = ModelShape.from_name(args.model_shape)
    result = plan(load_profile(args.profile), shape, args.gpu_budget_gb * 1e9, args.min_per_layer)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    split, even = result["global"], result["even"]
    print(
        f"{shape.name}: {args.gpu_budget_gb:g} GB holds {result['resident_experts']} of "
        f"{shape.num_moe_layers * shape.num_experts} experts "
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
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moe_uvm import bench_sweep
    from moe_uvm.trace import SAMPLE_TRACE

    device = args.device
    if device == "auto":
        device = "cuda" if uvm.available() else "simulate"
    if device == "simulate":
        return _bench_simulation(args)
    if device == "cuda" and not uvm.available():
        raise CLIError(f"--device cuda, but CUDA is not available ({uvm.unavailable_reason()})")
    cfg = bench_sweep.BenchConfig(
        model_shape=args.model_shape, trace=args.trace, layers=args.layers,
        resident=args.resident, batches=tuple(_ints(args.batch, "--batch")), steps=args.steps,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        calibrate_sequences=args.calibrate_sequences, device=device, tiny=args.tiny,
        slots=tuple(_ints(args.slots, "--slots")) if args.slots else (),
        prefetch=tuple(m.strip() for m in args.prefetch.split(",") if m.strip()),
    )
    result = bench_sweep.sweep(cfg, progress=lambda line: print(line, file=sys.stderr))
    paths = bench_sweep.write_outputs(result, Path(args.out))
    dev = result["device"]
    print(f"\n{dev['device']}: {result['layers']} MoE layers of {cfg.model_shape} "
          f"({result['num_experts']} experts, top-{result['top_k']}, {result['dtype']}), "
          f"trace {Path(cfg.trace or SAMPLE_TRACE).name}; medians over {cfg.steps} steps")
    if result["note"]:
        print(result["note"])
    print(", ".join(f"{k} {v:.1f}" for k, v in result["ceilings"].items()))
    print("\n".join(bench_sweep.summarize_goals(result)))
    print(f"wrote {', '.join(str(p) for p in paths)}\n")
    print(bench_sweep.markdown_table(result))
    return 0


def _bench_simulation(args: argparse.Namespace) -> int:
    from moe_uvm.trace import SAMPLE_TRACE

    print("No CUDA GPU here: running the CPU policy simulation on the bundled sample trace "
          "instead of the GPU decode benchmark (hit rates and predicted floors, no timings).")
    trace = load_trace(SAMPLE_TRACE)
    half = trace.num_sequences // 2
    profile = Profile.from_trace(trace.sequences(0, half))
    test = trace.sequences(half, None)
    shape = ModelShape.from_name(args.model_shape)
    records = simulate(test, resident_sizes("25%,50%,75%", trace.num_experts), batch=1,
                       profile=profile, shape=shape)
    print(f"{SAMPLE_TRACE.name}: {trace.num_layers} layers x {trace.num_experts} experts, "
          f"calibrated on sequences 0:{half}, evaluated on {half}:{trace.num_sequences}, "
          f"batch 1; PCIe and floors for the whole {shape.name} ({shape.num_moe_layers} MoE "
          f"layers, the trace's traffic per layer scaled up) at {Bandwidths().pcie_gbps:.0f} "
          f"GB/s PCIe read-through and {Bandwidths().hbm_gbps:.0f} GB/s HBM")
    print(format_table(records))
    return 0


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CLIError(f"{flag} must be comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-uvm",
        description="MoE expert offloading through CUDA managed memory.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="GPU, driver, managed-memory support, free memory")
    info.set_defaults(run=_info)

    calibrate = sub.add_parser(
        "calibrate", help="record routing frequencies into a profile (JSON)",
        description="Count how often each expert is routed to, per MoE layer, into a profile "
        "for resident_selection='profile', simulate --profile and plan.",
    )
    source = calibrate.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help="routing trace (.npz, see TRACES.md)")
    source.add_argument("--model", help="Hugging Face checkpoint folder to run over --prompts")
    calibrate.add_argument("--prompts", help="with --model: text (one prompt per line) or JSONL "
                           "({\"text\": ...} or {\"input_ids\": [...]})")
    calibrate.add_argument("--trace-out", help="with --model: also write the routing trace")
    calibrate.add_argument("--max-tokens", type=int, help="with --model: stop after N tokens")
    calibrate.add_argument("--out", required=True, help="profile file to write")
    calibrate.add_argument("--sequences", help="FIRST:STOP sequences of the trace (default all)")
    calibrate.add_argument("--model-id", help="model name to store in the profile")
    calibrate.add_argument(
        "--cooccurrence", action="store_true",
        help="also store layer-to-next-layer co-occurrence counts (speculative prefetch)",
    )
    calibrate.set_defaults(run=_calibrate)

    simulate_ = sub.add_parser(
        "simulate", help="replay a trace against residency policies (CPU)",
        description="Replay a routing trace in steps of B tokens and report, per policy and "
        "resident count, the GPU hit rate of expert reads and offloaded reads per step and layer; "
        "with --slots, also a GPU slot cache per layer (fill-on-read and prefetch) run through "
        "the same planning functions as the GPU executor.",
    )
    simulate_.add_argument("--trace", required=True, help="routing trace (.npz)")
    simulate_.add_argument("--sequences", help="FIRST:STOP sequences to replay (default all); "
                           "keep them apart from the profile's")
    simulate_.add_argument("--profile", help="profile for frequency, global and adaptive")
    simulate_.add_argument("--resident", required=True,
                           help="resident experts per layer: 16,32,64 or 25%%,50%%,75%%")
    simulate_.add_argument("--batch", default="1",
                           help="consecutive tokens per step, e.g. 1 or 1,16 (default 1)")
    simulate_.add_argument("--policies", help=f"comma list of {', '.join(POLICIES)} "
                           "(default all that apply)")
    simulate_.add_argument("--json", action="store_true", help="print JSON records")
    shape = simulate_.add_argument_group("step-time floor (needs an expert size)")
    shape.add_argument("--model-shape", help=f"model-shape preset: {', '.join(PRESETS)}")
    shape.add_argument("--hidden-size", type=int, help="explicit size: hidden size")
    shape.add_argument("--moe-intermediate-size", type=int, help="explicit size: expert MLP width")
    shape.add_argument("--weight-bytes", type=int, default=2, help="bytes per weight (default 2)")
    shape.add_argument("--shared-experts", type=int, default=0, help="shared experts per layer")
    shape.add_argument("--hbm-gbps", type=float, default=Bandwidths.hbm_gbps,
                       help="HBM read GB/s (default: H100 measured, %(default)s)")
    shape.add_argument("--pcie-gbps", type=float, default=Bandwidths.pcie_gbps,
                       help="managed read-through GB/s (default: H100 measured, %(default)s)")
    cache = simulate_.add_argument_group(
        "slot cache (with --slots > 0; over the static policies "
        f"{', '.join(SLOT_POLICIES)})")
    cache.add_argument("--slots", default="0",
                       help="GPU slots per layer, e.g. 0,16,32 (default 0: no slot cache)")
    cache.add_argument("--prefetch", default="none",
                       help=f"comma list of {', '.join(PREFETCH_MODES)} (default none: "
                       "fill-on-read only; frequency needs --profile). lookahead (the next "
                       "router on the hidden state) needs hidden states, which a trace does not "
                       "hold: measure it on the GPU")
    cache.add_argument("--prefetch-experts", type=int,
                       help="experts prefetched per layer and step (default: half the slots)")
    cache.add_argument("--cooccurrence-source", choices=COOCCURRENCE_SOURCES, default="auto",
                       help="speculative co-occurrence: the profile's (calibrate "
                       "--cooccurrence), learned online from the replayed steps, or both; auto: "
                       "the profile's when it has them, else online")
    adapt = simulate_.add_argument_group("adaptive policy")
    adapt.add_argument("--warmup-tokens", type=int, default=256,
                       help="tokens counted before the first decision when no --profile")
    adapt.add_argument("--interval-tokens", type=int, default=AdaptiveSettings.interval_tokens)
    adapt.add_argument("--half-life-tokens", type=float,
                       default=AdaptiveSettings.half_life_tokens)
    adapt.add_argument("--max-swaps", type=int, default=AdaptiveSettings.max_swaps,
                       help="swaps per decision over all layers")
    simulate_.set_defaults(run=_simulate)

    plan_ = sub.add_parser(
        "plan", help="split a GPU budget across layers from a profile",
        description="Per-layer resident counts of the global budget split (most-used "
        "(layer, expert) pairs first), with the expected hit rate and PCIe bytes per token.",
    )
    plan_.add_argument("--profile", required=True, help="profile (JSON) from calibrate")
    plan_.add_argument("--model-shape", required=True, help=f"one of {', '.join(PRESETS)}")
    plan_.add_argument("--gpu-budget-gb", required=True, type=float,
                       help="GPU memory for resident experts, GB (1e9 bytes)")
    plan_.add_argument("--min-per-layer", type=int, default=0,
                       help="experts every layer keeps resident")
    plan_.add_argument("--json", action="store_true", help="print JSON")
    plan_.set_defaults(run=_plan)

    from moe_uvm.bench import METHODS

    bench = sub.add_parser(
        "bench", help="decode benchmark over resident counts (GPU; simulation without one)",
        description="Decode steps of MoE layers with real shapes and random weights, routing "
        "from a trace, captured in CUDA graphs; tokens/s per method and resident count against "
        "the roofline floor measured in the same run. Without a GPU: the CPU policy simulation "
        "on the bundled trace.",
    )
    bench.add_argument("--model-shape", default="qwen3-30b-a3b",
                       help=f"layer shape preset: {', '.join(PRESETS)}")
    bench.add_argument("--trace", default=None,
                       help="routing trace (.npz; default: the bundled sample trace)")
    bench.add_argument("--layers", type=int, help="MoE layers (default: the trace's, capped "
                       "so three copies of the experts fit in free GPU memory)")
    bench.add_argument("--resident", default="0%,25%,50%,75%,100%",
                       help="resident experts per layer: counts or percentages")
    bench.add_argument("--batch", default="1,16", help="decode batch sizes, e.g. 1,16")
    bench.add_argument("--steps", type=int, default=24, help="timed steps per configuration")
    bench.add_argument("--methods", default=",".join(METHODS), help="comma list of methods")
    bench.add_argument("--calibrate-sequences", type=int,
                       help="trace sequences used to calibrate profiles (default: first half)")
    bench.add_argument("--device", choices=("auto", "cuda", "cpu", "simulate"), default="auto",
                       help="auto: cuda when available, else the policy simulation; cpu runs "
                       "the harness on CPU tensors (checks logic, timings meaningless)")
    bench.add_argument("--slots", default="",
                       help="also run profile residency plus S GPU slots per layer, e.g. 16,32")
    bench.add_argument("--prefetch", default="none",
                       help="with --slots: none (fill-on-read cache), frequency, speculative; "
                       "comma list")
    bench.add_argument("--tiny", action="store_true", help="tiny layer sizes (harness checks)")
    bench.add_argument("--out", default="benchmarks/results",
                       help="folder for decode.json and decode.png")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (CLIError, ValueError, OSError, uvm.UVMError) as exc:
        print(f"moe-uvm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
