"""The `moe-uvm` command line (also `python -m moe_uvm`): the argument parser and `main`; what
each subcommand does is in moe_uvm.tools.commands. Every error, a usage error included, prints one
line on stderr and exits 2, without a traceback."""

from __future__ import annotations

import argparse
import os
import sys

from moe_uvm import __version__, uvm
from moe_uvm.config import parse_budget_gb
from moe_uvm.policies.warmup import AdaptiveSettings
from moe_uvm.presets import PRESETS
from moe_uvm.simulate import POLICIES, SLOT_POLICIES, Bandwidths
from moe_uvm.simulate_slots import COOCCURRENCE_SOURCES, TRACE_PREFETCH_MODES
from moe_uvm.tools.commands import (
    CLIError,
    bench_command,
    calibrate_command,
    generate_command,
    info_command,
    plan_command,
    simulate_command,
)
from moe_uvm.trace import FLAT_NAME, LONG_NAME, SAMPLE_NAME

RESULTS = "moe-uvm-results"
"""Default folder of `moe-uvm bench` results, in the current directory."""
TRACE_HELP = (f"routing trace: an .npz file (format: the README's File formats section), or a "
              f"bundled one of 128 experts, top-8: '{SAMPLE_NAME}' (8 layers, 1,024 tokens), "
              f"'{LONG_NAME}' (8 layers, 16,384 tokens) or '{FLAT_NAME}' (24 layers, 4,096 "
              "tokens, near-uniform routing)")
BROKEN_PIPE = 141
"""Exit status when stdout's reader went away (`moe-uvm bench | head`): the shell's status for
a process ended by SIGPIPE (128 + 13)."""


class UsageError(Exception):
    """A command line argparse refused; the message is the whole line to print."""


class _Parser(argparse.ArgumentParser):
    """argparse, raising its usage errors for `main` to print as one line instead of printing
    the usage block and exiting."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def positive_gb(text: str) -> float:
    """argparse type for GPU budgets: ExpertOffloadConfig's rule (finite, > 0)."""
    try:
        return parse_budget_gb(text)
    except ValueError:
        message = f"must be a finite number of GB > 0, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _expert_size_args(parser: argparse.ArgumentParser, title: str) -> argparse._ArgumentGroup:
    sizes = parser.add_argument_group(title)
    sizes.add_argument("--model-shape", help=f"model-shape preset: {', '.join(PRESETS)}")
    sizes.add_argument("--hidden-size", type=int, help="explicit size: hidden size")
    sizes.add_argument("--moe-intermediate-size", type=int,
                       help="explicit size: expert MLP width")
    sizes.add_argument("--weight-bytes", type=int,
                       help="explicit size: bytes per weight (default 2: bf16; 1 for fp8)")
    return sizes


def _calibrate_parser(sub: argparse._SubParsersAction) -> None:
    calibrate = sub.add_parser(
        "calibrate", help="record routing frequencies into a profile (JSON)",
        description="Count how often each expert is routed to, per MoE layer, into a profile "
        "for resident_selection='profile', simulate --profile and plan.",
    )
    source = calibrate.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help=TRACE_HELP)
    source.add_argument("--model", help="Hugging Face checkpoint folder to run over --prompts")
    calibrate.add_argument("--prompts", help="with --model: text (one prompt per line) or JSONL "
                           "({\"text\": ...} or {\"input_ids\": [...]})")
    calibrate.add_argument("--trace-out", help="with --model: also write the routing trace")
    calibrate.add_argument("--max-tokens", type=int, help="with --model: stop after N tokens")
    calibrate.add_argument("--out", required=True, help="profile file to write")
    calibrate.add_argument("--sequences", help="with --trace: FIRST:STOP sequences of the trace "
                           "(default all)")
    calibrate.add_argument("--model-id", help="model name to store in the profile")
    calibrate.add_argument(
        "--cooccurrence", action="store_true",
        help="also store layer-to-next-layer co-occurrence counts (speculative prefetch); "
        "always stored with --model",
    )
    calibrate.set_defaults(run=calibrate_command)


def _simulate_parser(sub: argparse._SubParsersAction) -> None:
    simulate = sub.add_parser(
        "simulate", help="replay a trace against residency policies (CPU)",
        description="Replay a routing trace in steps of B tokens and report, per policy and "
        "resident count, the GPU hit rate of expert reads and offloaded reads per step and layer; "
        "with --slots, also a GPU slot cache per layer (fill-on-read and prefetch) run through "
        "the same planning functions as the GPU executor.",
    )
    simulate.add_argument("--trace", required=True, help=TRACE_HELP)
    simulate.add_argument("--sequences", help="FIRST:STOP sequences to replay (default all); "
                          "keep them apart from the profile's")
    simulate.add_argument("--profile", help="profile for frequency, global and adaptive")
    simulate.add_argument("--resident", required=True,
                          help="resident experts per layer: 16,32,64 or 25%%,50%%,75%%")
    simulate.add_argument("--batch", default="1",
                          help="consecutive tokens per step, e.g. 1 or 1,16 (default 1)")
    simulate.add_argument("--policies", help=f"comma list of {', '.join(POLICIES)} "
                          "(default all that apply)")
    simulate.add_argument("--json", action="store_true", help="print JSON records")
    shape = _expert_size_args(simulate, "step-time floor (needs an expert size: a preset, or "
                              "explicit sizes with the trace's layers, experts and top-k)")
    shape.add_argument("--shared-experts", type=int,
                       help="explicit size: shared experts per layer (default 0)")
    shape.add_argument("--hbm-gbps", type=float, default=Bandwidths.hbm_gbps,
                       help="HBM read GB/s (default: measured on an H100, %(default)s)")
    shape.add_argument("--pcie-gbps", type=float, default=Bandwidths.pcie_gbps,
                       help="managed read-through GB/s (default: measured on an H100, "
                       "%(default)s)")
    cache = simulate.add_argument_group(
        "slot cache (with --slots > 0; over the static policies "
        f"{', '.join(SLOT_POLICIES)})")
    cache.add_argument("--slots", default="0", help="GPU slots per layer, at most the trace's "
                       "experts, e.g. 0,16,32 (default 0: no slot cache)")
    cache.add_argument("--prefetch", default="none",
                       help=f"comma list of {', '.join(TRACE_PREFETCH_MODES)} (default none: "
                       "fill-on-read only; frequency needs --profile). lookahead (the next "
                       "router on the hidden state) needs hidden states, which a trace does not "
                       "hold: measure it on the GPU")
    cache.add_argument("--prefetch-experts", type=int,
                       help="experts prefetched per layer and step (default: top-k, at most "
                       "the slots)")
    cache.add_argument("--cooccurrence-source", choices=COOCCURRENCE_SOURCES, default="auto",
                       help="speculative co-occurrence: the profile's (calibrate "
                       "--cooccurrence), learned online from the replayed steps, or both; auto: "
                       "the profile's when it has them, else online")
    adapt = simulate.add_argument_group("adaptive policy")
    adapt.add_argument("--warmup-tokens", type=int, default=256,
                       help="tokens counted before the first decision when no --profile")
    adapt.add_argument("--interval-tokens", type=int, default=AdaptiveSettings.interval_tokens,
                       help="tokens between decisions (default %(default)s)")
    adapt.add_argument("--half-life-tokens", type=float,
                       default=AdaptiveSettings.half_life_tokens,
                       help="recent counts lose half their weight after this many tokens "
                       "(default %(default)s)")
    adapt.add_argument("--max-swaps", type=int, default=AdaptiveSettings.max_swaps,
                       help="swaps per decision over all layers (default %(default)s)")
    simulate.set_defaults(run=simulate_command)


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser(
        "plan", help="split a GPU budget into resident experts, slots and prefetch",
        description="The auto split of a GPU budget: resident experts per layer (split by "
        "routing counts), GPU slots per layer, their eviction and prefetch, chosen by replaying "
        "calibration routing and minimising the predicted decode step time (costs measured by "
        "`moe-uvm bench` on this machine, else H200 defaults), with the predicted tokens/s, "
        "PCIe bytes per token and the floor. Routing comes from --trace (default: the bundled "
        f"'{LONG_NAME}' trace, whose layers stand for the model's) or a --profile (the split "
        "is replayed on tokens drawn from its counts, which have no order: caches come out "
        "pessimistic). With a profile the static global split is printed too.",
    )
    source = plan.add_mutually_exclusive_group()
    source.add_argument("--trace", help=f"{TRACE_HELP}; default {LONG_NAME}")
    source.add_argument("--profile", help="profile (JSON) from calibrate")
    plan.add_argument("--gpu-budget-gb", required=True, type=positive_gb,
                      help="GPU memory moe-uvm may allocate for the model, GB (1e9 bytes), a "
                      "number > 0")
    plan.add_argument("--fixed-gb", type=float, default=None,
                      help="of the budget, GB taken by non-expert weights and workspaces "
                      "(default: with --model, its non-expert weights, buffers, routing "
                      "counters and KV cache; else 0, experts only, as in `moe-uvm bench`)")
    plan.add_argument("--model", help="a Hugging Face checkpoint folder (config.json is "
                      "enough): expert size, fixed parts and whole-model decode time from it")
    plan.add_argument("--context", type=int, default=512,
                      help="with --model: tokens in the KV cache per sequence (default 512)")
    plan.add_argument("--batch", type=int, default=1, help="decode batch (default 1)")
    plan.add_argument("--min-per-layer", type=int, default=0,
                      help="with --profile: experts every layer keeps resident in the static "
                      "split")
    plan.add_argument("--cpu-gbps", help="also predict the CPU/GPU hybrid (cpu_experts): the "
                      "CPU expert kernel's GB/s, or 'measure' to time it on this host (only "
                      "meaningful on the machine that will serve)")
    plan.add_argument("--json", action="store_true", help="print JSON")
    _expert_size_args(plan, "expert size (one of: a preset, or explicit sizes; default "
                      "qwen3-30b-a3b with the bundled trace)")
    plan.set_defaults(run=plan_command, shared_experts=None)


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    from moe_uvm.tools.bench import METHODS

    bench = sub.add_parser(
        "bench", help="decode benchmark over resident counts (GPU; simulation without one)",
        description="Decode steps of MoE layers with real shapes and random weights, routing "
        "from a trace, captured in CUDA graphs; tokens/s per method and resident count against "
        "the roofline floor measured in the same run. Without a GPU: the CPU policy simulation "
        "of the same trace, shape, resident counts, batches, slots and prefetch modes (options "
        "marked 'GPU only' are refused there).",
    )
    bench.add_argument("--model-shape", default="qwen3-30b-a3b",
                       help=f"layer shape preset: {', '.join(PRESETS)} (default %(default)s)")
    bench.add_argument("--trace", default=LONG_NAME, help=f"{TRACE_HELP}; default {LONG_NAME}")
    bench.add_argument("--resident", default="0%,25%,50%,75%,100%",
                       help="GPU budgets, as experts per layer or percentages of the experts' "
                       "bytes; every method gets the same bytes (default %(default)s)")
    bench.add_argument("--batch", default="1,16", help="decode batch sizes (default 1,16)")
    bench.add_argument("--calibrate-sequences", type=int,
                       help="trace sequences used to calibrate profiles (default: first half); "
                       "the rest are replayed")
    bench.add_argument("--slots", default="",
                       help="also run profile residency plus S GPU slots per layer, e.g. 16,32")
    bench.add_argument("--prefetch", default="none",
                       help="with --slots: none (fill-on-read cache), frequency, speculative; "
                       "comma list")
    bench.add_argument("--device", choices=("auto", "cuda", "cpu", "simulate"), default="auto",
                       help="auto: cuda when available, else the policy simulation; cpu runs "
                       "the GPU harness on CPU tensors (checks logic, timings meaningless)")
    bench.add_argument("--out", default=RESULTS,
                       help="folder for the results (decode.json and decode.png; the "
                       "simulation writes simulation.json), created if missing and checked "
                       "writable before the run (default: ./%(default)s)")
    gpu = bench.add_argument_group("GPU only")
    gpu.add_argument("--layers", type=int, help="MoE layers (default: the trace's, capped "
                     "so three copies of the experts fit in free GPU memory)")
    gpu.add_argument("--steps", type=int, help="timed steps per configuration, after the "
                     "warm-up (default 256, fewer when the trace runs out)")
    gpu.add_argument("--warmup-tokens", type=int, help="tokens replayed untimed before each "
                     "configuration's timed steps, so caches and policies settle (default 512)")
    gpu.add_argument("--methods", help=f"comma list of {', '.join(METHODS)} (default all but "
                     "global)")
    gpu.add_argument("--tiny", action="store_true", help="tiny layer sizes (harness checks)")
    gpu.add_argument("--weight-dtype", choices=("bf16", "fp8"),
                     help="expert weights: bf16 (default) or fp8 (e4m3 with 128 x 128 block "
                     "scales, half the bytes over PCIe and from HBM; activations stay bf16)")
    gpu.add_argument("--cpu-experts", choices=("auto", "on", "off"),
                     help="the CPU/GPU hybrid: the CPU computes a share of each layer's "
                     "offloaded experts from host memory while the GPU reads the rest; adds a "
                     "'hybrid' row per budget with offloaded experts, against profile "
                     "residency on the GPU alone. auto (default) and on run it, auto marks "
                     "where it measured faster; off skips it")
    gpu.add_argument("--cpu-threads", type=int, help="CPU threads of the hybrid (default: "
                     "every core but one)")
    gpu.add_argument("--nproc", type=int, metavar="N",
                     help="expert parallelism over N processes, one GPU each (gloo with "
                     "--device cpu; under torchrun its WORLD_SIZE): rows one-gpu (rank 0 "
                     "alone), ep (the same resident fraction in total), ep-full (each GPU "
                     "the one-GPU budget), ep-ag and ep-a2a (as ep with the tokens sharded too: "
                     "all-gather + reduce-scatter, or all-to-all; batches divisible by N), "
                     "profile residency, with read-through from one GPU "
                     "and from all at once; writes parallel.json")
    bench.set_defaults(run=bench_command)


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser(
        "generate", help="greedy generation with a whole Hugging Face MoE model",
        description="Stream a local Hugging Face MoE checkpoint into managed memory (or build "
        "random weights in place from its config.json), split --gpu-budget-gb with the "
        "planner, and decode greedily; prints the tokens as they come and a report: tokens/s, "
        "time to first token, peak device memory, hit rate, distinct experts per layer, PCIe "
        "bytes per token, the split used.",
    )
    gen.add_argument("--model", required=True, help="checkpoint folder (safetensors + "
                     "config.json; with --random-weights, config.json alone)")
    gen.add_argument("--random-weights", type=int, metavar="SEED",
                     help="build seeded random weights in place instead of reading them")
    gen.add_argument("--gpu-budget-gb", type=positive_gb,
                     help="all device memory for the model, non-expert weights included "
                     "(default: everything on the GPU)")
    gen.add_argument("--profile", help="routing profile (moe-uvm calibrate) for residency and "
                     "the planner")
    prompt = gen.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer)")
    prompt.add_argument("--prompts", help="prompts file: text lines or JSONL ({\"text\": ...} "
                        "or {\"input_ids\": [...]})")
    prompt.add_argument("--prompt-tokens", type=int, default=None, metavar="N",
                        help="N seeded random token ids per sequence (default when no prompt "
                        "is given: 32)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--batch", type=int, default=1, help="sequences decoded together; "
                     "with --prompt or random ids, the prompt is repeated this many times")
    gen.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                     help="weights' dtype (auto: the checkpoint's; fp32 on CPU)")
    gen.add_argument("--quantize-experts", choices=("fp8",),
                     help="quantise a 16/32-bit checkpoint's experts to e4m3 (128 x 128 block "
                     "scales) as they load: half the bytes over PCIe and in HBM (FP8 "
                     "checkpoints are read as FP8 without it)")
    gen.add_argument("--cpu-experts", choices=("off", "on", "auto"), default="off",
                     help="the CPU/GPU hybrid: the CPU computes a share of each layer's "
                     "offloaded experts from host memory while the GPU reads the rest (in "
                     "the compiled decode graphs). auto: on where the cost model, "
                     "measured at load, predicts a faster step (default off)")
    gen.add_argument("--cpu-threads", type=int, help="CPU threads of the hybrid (default: "
                     "every core but one)")
    gen.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    gen.add_argument("--nproc", type=int, default=1, metavar="N",
                     help="expert parallelism over N processes, one GPU each (gloo on the CPU): "
                     "each holds its share of every layer's experts under its own "
                     "--gpu-budget-gb, the rest of the model whole; under torchrun, its "
                     "WORLD_SIZE instead (default 1)")
    gen.add_argument("--ignore-eos", action="store_true",
                     help="decode all --max-new-tokens (default with --random-weights)")
    gen.add_argument("--decode", choices=("static", "hf"), default="static",
                     help="static: static KV cache, chunked prefill, the decode step in a CUDA "
                     "graph on a GPU (default); hf: transformers' own generate loop (eager)")
    gen.add_argument("--no-graphs", action="store_true",
                     help="with --decode static: run the decode steps eagerly")
    gen.add_argument("--no-compile", action="store_true",
                     help="with --decode static: no torch.compile of the decode step (on a GPU "
                     "it fuses attention, norms and routers; the first compile of a model "
                     "shape takes minutes at full depth, later runs hit inductor's cache)")
    gen.add_argument("--prefill-chunk", type=int, default=512,
                     help="prompt tokens per prefill forward (default 512)")
    gen.add_argument("--routing-trace", metavar="T.npz",
                     help="benchmarks: replace the routers' expert choices with this trace's "
                     "(same experts and top-k; its layers repeat over the model's), to measure "
                     "speed and expert reads with realistic routing on random weights; the "
                     "tokens are then meaningless")
    gen.add_argument("--warmup", action="store_true",
                     help="first an untimed two-token pass (compiles the kernels, so the report "
                     "times steady state; the graph is captured before timing either way)")
    gen.add_argument("--json", help="also write the report and the tokens to this file")
    gen.set_defaults(run=generate_command)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moe-uvm",
                     description="MoE expert offloading through CUDA managed memory.")
    parser.add_argument("--version", action="version", version=f"moe-uvm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="GPU, driver, managed-memory support, free memory")
    info.set_defaults(run=info_command)
    _calibrate_parser(sub)
    _simulate_parser(sub)
    _plan_parser(sub)
    _bench_parser(sub)
    _generate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
        except UsageError as exc:
            print(exc, file=sys.stderr)
            return 2
        try:
            code = args.run(args)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            raise
        except (CLIError, ValueError, OSError, uvm.UVMError) as exc:
            print(f"moe-uvm {args.command}: error: {exc}", file=sys.stderr)
            return 2
    except BrokenPipeError:
        # Python's recipe: point stdout at devnull so the interpreter's final flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
