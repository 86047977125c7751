"""Whole-model decode through the entry point users call (`moe_uvm.generate`, what `moe-uvm
generate` runs), against what Hugging Face users do today, on models whose sizes are real and
whose weights are random, built in place from a config (nothing to download).

Methods, each at GPU budgets of the non-expert weights + KV cache + X% of the expert bytes:
  moe-uvm      the planner's split of the budget (auto), static cache, CUDA-graph decode
  moe-uvm-hybrid
               the same budget filled with resident experts (profile residency when traced, no
               slots) and the CPU computing a share of the offloaded experts (cpu_experts="on",
               moe_uvm.hybrid); the same compiled CUDA-graph decode, the CPU handed its share
               in stream order inside each layer's op
  uva          the budget's first experts resident, the rest read in place over PCIe, no slots
               (vLLM --cpu-offload-gb style), same decoder
  hf-eager     transformers alone, everything on the GPU (100% only), eager generate
  hf-static    the same with transformers' static cache, whose generate compiles the forward
  accelerate   transformers + accelerate dispatch_model with max_memory at the budget (50% only,
               8 new tokens: it is slow)
Every run is its own process (memory-hungry baselines must not share one), appends one record to
the JSON and is skipped when the JSON already has it, so a sweep can span sessions.

    python benchmarks/generate.py --model-shape qwen3-30b-a3b [--layers 48] [--budgets 25,50,75,100]
        [--batches 1,16] [--methods moe-uvm,uva,hf-eager,hf-static,accelerate] [--new-tokens 64]
        [--prompt-tokens 32] [--trace T.npz] [--out benchmarks/results/h200/generate.json]
    python benchmarks/generate.py --tiny      # CPU smoke run of the harness on a tiny config
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

SHAPES = {
    # Public architecture figures of the two models; weights random.
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=2048,
        intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[], dtype="bfloat16"),
    "mixtral-8x7b": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
        tie_word_embeddings=False, dtype="bfloat16"),
    "tiny": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=64,
        intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, vocab_size=128,
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
        decoder_sparse_step=1, mlp_only_layers=[], dtype="float32"),
}
SEED = 0
UNIFORM = "uniform"
"""--trace uniform: routing drawn uniformly (k distinct experts per token and layer, seeded),
made in the run for the model's shape: the near-uniform case, without greedy decoding's loops
on random weights."""


def write_config(shape: str, layers: int | None, folder: pathlib.Path) -> pathlib.Path:
    fields = dict(SHAPES[shape])
    if layers is not None:
        fields["num_hidden_layers"] = layers
    (folder / "config.json").write_text(json.dumps(fields, indent=1))
    return folder


def run_one(spec: dict) -> dict:
    """One (method, budget, batch) in this process: load, generate, report."""
    import torch

    from moe_uvm.config import ExpertOffloadConfig
    from moe_uvm.generate import generate, load_model, prompt_ids
    from moe_uvm.integrations.hf_shape import describe

    model_dir, method = pathlib.Path(spec["model_dir"]), spec["method"]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    info = describe(model_dir)
    shape = info.shape
    expert_bytes = shape.num_moe_layers * shape.num_experts * shape.bytes_per_expert
    context = spec["prompt_tokens"] + spec["new_tokens"]
    fixed = info.fixed_bytes(spec["batch"] * context)  # as the loader counts them
    # 0%: the fixed parts and 1 MB (the loader refuses a budget that leaves the experts nothing)
    budget_gb = (fixed + max(spec["budget"] / 100 * expert_bytes, 1e6)) / 1e9
    ids = prompt_ids(model_dir, prompt_tokens=spec["prompt_tokens"], batch=spec["batch"],
                     vocab_size=json.loads((model_dir / "config.json").read_text())["vocab_size"],
                     seed=SEED)
    record = dict(spec, budget_gb=budget_gb, fixed_gb=fixed / 1e9, expert_gb=expert_bytes / 1e9)
    if cuda:  # the ceilings, in this process, before anything is loaded
        from moe_uvm.ceilings import hbm_read_gbps, read_through_gbps

        record.update(hbm_read_gbps=hbm_read_gbps(), read_through_gbps=read_through_gbps())
        torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info(device)[0] if cuda else None
    if method in ("moe-uvm", "moe-uvm-hybrid", "uva"):
        trace, profile = None, {}
        if spec.get("trace"):
            # The trace's first half is the calibration (a profile, as `moe-uvm calibrate`
            # would write: moe-uvm plans on it); the run is routed by the second half.
            calibration, trace = _trace_halves(spec, shape)
            path = model_dir / "trace_profile.json"
            if method != "uva":
                calibration.save(path)
                profile = dict(resident_selection="profile", profile_path=str(path))
        if method == "moe-uvm":
            config = ExpertOffloadConfig(gpu_budget_gb=budget_gb, **profile)
        elif method == "moe-uvm-hybrid":
            config = ExpertOffloadConfig(gpu_budget_gb=budget_gb, prefetch_slots=0,
                                         cpu_experts="on", **profile)
        else:  # a static first-N split of the same bytes, no slots
            config = ExpertOffloadConfig(gpu_budget_gb=budget_gb, prefetch_slots=0)
        loaded = load_model(model_dir, config, random_weights=SEED,
                            dtype=None if cuda else torch.float32, device=device,
                            kv_tokens=spec["batch"] * context)
        tokens, report = generate(loaded, ids, max_new_tokens=spec["new_tokens"],
                                  batch=spec["batch"], ignore_eos=True, warmup=True,
                                  compile=None if spec.get("compile", True) else False,
                                  free_before=free_before, routing_trace=trace)
        record.update(report.to_dict(), tokens=tokens)
        record.update(_predictions(loaded.manager.split, info, spec, record, context))
        shares = [m.cpu_share for m in loaded.manager.layers if m.cpu_share is not None]
        if shares:  # the hybrid's split over the run (warm-up, prefill and decode)
            import numpy as np

            stats = [share.stats.summary() for share in shares]
            cpu = sum(st["cpu_experts"] for st in stats)
            total = cpu + sum(st["gpu_offloaded_experts"] for st in stats)
            record.update(hybrid_cpu_share=cpu / max(total, 1e-9),
                          hybrid_gpu_first=float(np.mean(
                              [st["gpu_first"] for st in stats if st["gpu_first"] is not None]
                              or [float("nan")])),
                          hybrid_cpu_layer_ms_median=float(np.median(
                              [st["cpu_ms_median"] for st in stats if st["cpu_experts"]]
                              or [0.0])),
                          hybrid_start_costs=dict(vars(shares[0].costs)),
                          hybrid_costs=dict(vars(shares[0].current_costs())))
        loaded.manager.close()
        return record
    from transformers import AutoConfig, AutoModelForCausalLM

    from moe_uvm.integrations.hf_load import _RandomWeights, parameters_on_meta

    config = AutoConfig.from_pretrained(model_dir)
    dtype = torch.bfloat16 if cuda else torch.float32
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # The weights moe-uvm's random load builds (same names, seed and device), so tokens compare;
    # for accelerate they start in host memory, as its offload expects.
    source = _RandomWeights(model, SEED, device, float(getattr(config, "initializer_range", 0.02)))
    home = torch.device("cpu") if method == "accelerate" else device
    model.load_state_dict({key: source.tensor(key).to(home, dtype) for key in source.shapes},
                          assign=True)
    model.to(home).eval()
    if method == "accelerate":
        from accelerate import dispatch_model, infer_auto_device_map

        memory = {0: int(budget_gb * 1e9), "cpu": 120 * 2**30} if cuda else {"cpu": 120 * 2**30}
        device_map = infer_auto_device_map(model, max_memory=memory,
                                           no_split_module_classes=model._no_split_modules)
        model = dispatch_model(model, device_map=device_map)
    from moe_uvm.generate import _Clock

    inputs = torch.tensor(ids, device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # hf-static: transformers' static cache, with which its generate compiles the forward
    # (torch.compile) by itself.
    extra = {"cache_implementation": "static"} if method == "hf-static" else {}
    with torch.no_grad():  # warm-up (compiles, for hf-static): two passes of two tokens
        for _ in range(2 if method == "hf-static" else 1):
            model.generate(input_ids=inputs, max_new_tokens=2, do_sample=False,
                           eos_token_id=None, pad_token_id=0, **extra)
        clock = _Clock(None)
        clock.start = time.perf_counter()
        out = model.generate(input_ids=inputs, max_new_tokens=spec["new_tokens"],
                             do_sample=False, eos_token_id=None, pad_token_id=0, streamer=clock,
                             **extra)
    decode_s = clock.last - clock.first
    record.update(
        time_to_first_token_s=clock.first - clock.start,
        decode_tokens_per_s=(clock.steps - 1) * spec["batch"] / decode_s if decode_s > 0
        else None,
        peak_device_gb=torch.cuda.max_memory_allocated(device) / 1e9 if cuda else 0.0,
        tokens=out[:, inputs.shape[1]:].tolist(),
        device=torch.cuda.get_device_name(device) if cuda else "cpu")
    return record


def _trace_halves(spec: dict, shape):
    """(profile counted on the first half, second half) of the run's trace: the file, or for
    --trace uniform seeded uniform routing made for the shape."""
    from moe_uvm.profile import Profile
    from moe_uvm.trace import load_trace, synthetic_trace

    if spec["trace"] == UNIFORM:
        whole = synthetic_trace(shape.num_moe_layers, shape.num_experts, shape.top_k,
                                num_sequences=8, tokens_per_sequence=256, zipf_exponent=0.0,
                                topic_strength=0.0, layer_coupling=0.0, seed=SEED)
    else:
        whole = load_trace(spec["trace"])
    half = whole.num_sequences // 2
    return (Profile.from_trace(whole.sequences(0, half), cooccurrence=True),
            whole.sequences(half, None))


def _predictions(split, info, spec: dict, record: dict, context: int,
                 retime: bool = False) -> dict:
    """What the plan predicted for this run and the floor of what it read. plan: the planner's
    split prediction (its own routing assumption: the profile's, flat without one) + the
    whole-model part (`moe-uvm plan --model`); cost_model: the same cost model on the expert
    reads this run measured; floor: those reads at the ceilings measured in this process
    (offloaded bytes / read-through + resident expert and non-expert bytes / HBM read)."""
    from moe_uvm.autosplit import load_costs, planning_routing, split_at_batch

    device = record.get("device")
    costs = load_costs(device if device not in (None, "cpu") else None)
    batch, layers, shape = spec["batch"], info.shape.num_layers, info.shape
    expert = shape.bytes_per_expert
    kv = info.kv_bytes_per_token * batch * context
    dense_ms = costs.dense_step_ms(layers, info.step_read_bytes, kv)
    hbm = record["hbm_gb_per_token"] * 1e9 * batch
    pcie = record["pcie_gb_per_token"] * 1e9 * batch
    out = {"dense_step_ms": dense_ms, "costs": costs.source}
    measured = costs.step_ms(shape.num_moe_layers, hbm, pcie, batch, expert) + dense_ms
    out["cost_model_tokens_per_s"] = batch / measured * 1e3
    if split is not None:
        if retime or split.batch != batch:  # planned at batch 1 (or with older costs)
            profile = _trace_halves(spec, shape)[0] if spec.get("trace") and \
                spec["method"] == "moe-uvm" else None
            routing = planning_routing(profile, shape.num_moe_layers, shape.num_experts,
                                       shape.top_k)
            split = split_at_batch(split, routing, batch, slot_nbytes=expert, costs=costs)
        out["plan_tokens_per_s"] = batch / (split.predicted_step_ms + dense_ms) * 1e3
    if record.get("read_through_gbps"):
        floor_ms = (pcie / (record["read_through_gbps"] * 1e6)
                    + (hbm + info.step_read_bytes + kv) / (record["hbm_read_gbps"] * 1e6))
        out["floor_tokens_per_s"] = batch / floor_ms * 1e3
    return out


def repredict(results: dict) -> None:
    """Recompute the predictions of every moe-uvm and uva record in place."""
    from moe_uvm.autosplit import Split
    from moe_uvm.integrations.hf_shape import describe

    infos = {}
    for r in results["records"]:
        if r["method"] not in ("moe-uvm", "uva") or "hbm_gb_per_token" not in r:
            continue
        if (r["shape"], r["layers"]) not in infos:
            folder = pathlib.Path(tempfile.mkdtemp(prefix="moe-uvm-generate-"))
            infos[r["shape"], r["layers"]] = describe(write_config(r["shape"], r["layers"],
                                                                   folder))
        split = r.get("split")
        if split is not None:  # the stored Split.to_dict(), less its derived fields
            split = Split(**{k: tuple(v) if k == "resident" else v for k, v in split.items()
                             if k in Split.__dataclass_fields__})
        r.update(_predictions(split, infos[r["shape"], r["layers"]], r, r,
                              r["prompt_tokens"] + r["new_tokens"], retime=True))


def _agree(tokens: list, reference: list) -> float:
    """Share of positions (over all sequences) whose token equals the reference's."""
    pairs = [(a, b) for row, ref in zip(tokens, reference, strict=False)
             for a, b in zip(row, ref, strict=False)]
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


def table(results: dict) -> list[str]:
    """The JSON's records as a table, one block per (shape, routing, prompt, batch), with the
    ratios the README quotes (measured / plan, measured / floor)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results["records"]:
        routing = r.get("trace") or "model's routing"
        if r.get("trace") and not r.get("trace_use"):
            routing += " (earlier harness: no profile, routed from its first token)"
        groups.setdefault((r["shape"], routing, r["prompt_tokens"], r["batch"]), []).append(r)
    out = []
    for (shape, routing, prompt, batch), rows in groups.items():
        device = next((r["device"] for r in rows if r.get("device")), "?")
        out.append(f"\n{shape}, {routing}, {prompt}-token prompt, batch {batch} ({device})")
        out.append("method      budget  decode tok/s  TTFT ms  peak GB  hit    PCIe MB/tok  "
                   "plan tok/s  meas/plan  floor tok/s  meas/floor  tokens")
        # Greedy tokens against moe-uvm with every expert in the budget (same prompts, routing)
        full = next((r.get("tokens") for r in rows
                     if r["method"] == "moe-uvm" and r["budget"] == 100 and "error" not in r),
                    None)
        for r in sorted(rows, key=lambda r: (r["budget"], r["method"])):
            if "error" in r:
                out.append(f"{r['method']:10s} {r['budget']:5d}%  error: {r['error'][:70]}")
                continue
            rate = r.get("decode_tokens_per_s") or float("nan")
            ratio = lambda key, r=r, rate=rate: (  # noqa: E731
                rate / r[key] if r.get(key) else float("nan"))
            out.append(
                f"{r['method']:10s} {r['budget']:5d}%  {rate:12.2f}  "
                f"{r['time_to_first_token_s'] * 1e3:7.1f}  {r['peak_device_gb']:7.2f}  "
                f"{r.get('hit_rate', float('nan')):.3f}  "
                f"{r.get('pcie_gb_per_token', float('nan')) * 1e3:11.1f}  "
                f"{r.get('plan_tokens_per_s', float('nan')):10.1f}  "
                f"{ratio('plan_tokens_per_s'):9.2f}"
                f"  {r.get('floor_tokens_per_s', float('nan')):11.1f}  "
                f"{ratio('floor_tokens_per_s'):10.2f}  "
                + ("-" if full is None or r.get("tokens") is None else
                   "= 100%" if r["tokens"] == full else
                   f"{_agree(r['tokens'], full):.0%} of 100%'s"))
            if "hybrid_cpu_share" in r:
                out.append(f"{'':10s}   CPU's share of the offloaded experts "
                           f"{r['hybrid_cpu_share']:.0%}, CPU side "
                           f"{r['hybrid_cpu_layer_ms_median'] * 1e3:.0f} us a layer (median), "
                           f"CPU us an expert {r['hybrid_start_costs']['cpu_expert_us']:.0f} "
                           f"calibrated -> {r['hybrid_costs']['cpu_expert_us']:.0f} adapted")
    return out


ROUTING = "plan on the trace's first half, route by its second"
"""How trace runs use the trace (records without it come from an earlier harness that planned
without a profile and routed from the trace's first token)."""


def key(record: dict) -> tuple:
    return (record["shape"], record["layers"], record["method"], record["budget"],
            record["batch"], record["new_tokens"], record["prompt_tokens"], record.get("trace"),
            record.get("trace_use"), record.get("compile", True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default all)")
    parser.add_argument("--budgets", default="25,50,75,100",
                        help="percent of expert bytes on top of the fixed parts")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--methods", default="moe-uvm,uva,hf-eager,hf-static,accelerate")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path("benchmarks/results/generate.json"))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--trace", help="routing trace (.npz) replacing the routers' choices "
                        "(moe-uvm and uva only; speed and expert reads, not quality); "
                        f"'{UNIFORM}': uniform routing made for the model's shape")
    parser.add_argument("--no-compile", action="store_true",
                        help="moe-uvm methods: CUDA-graph decode without torch.compile (no "
                        "minutes of compile; attention, norms and routers then run as many "
                        "small kernels)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shape")
    parser.add_argument("--table", action="store_true",
                        help="print the JSON's table, run nothing")
    parser.add_argument("--repredict", action="store_true",
                        help="recompute the JSON's plan, cost-model and floor figures with "
                        "this version's cost model (from each record's split, measured reads "
                        "and ceilings), then print the table; runs nothing on the GPU")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a run's spec, in a child process
    args = parser.parse_args(argv)
    if args.table:
        print("\n".join(table(json.loads(args.out.read_text()))))
        return 0
    if args.repredict:
        results = json.loads(args.out.read_text())
        repredict(results)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print("\n".join(table(results)))
        return 0
    if args.one is not None:
        print("RECORD " + json.dumps(run_one(json.loads(args.one))))
        return 0
    if args.tiny:
        args.model_shape, args.budgets, args.batches = "tiny", "25,100", "1,2"
        args.new_tokens, args.prompt_tokens = min(args.new_tokens, 6), min(args.prompt_tokens, 8)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"records": []}
    done = {key(r) for r in results["records"]}
    folder = pathlib.Path(tempfile.mkdtemp(prefix="moe-uvm-generate-"))
    model_dir = write_config(args.model_shape, args.layers, folder)
    for budget in (int(b) for b in args.budgets.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            for method in args.methods.split(","):
                if args.trace and method not in ("moe-uvm", "moe-uvm-hybrid", "uva"):
                    continue  # only moe-uvm's expert modules can take trace routing
                if method in ("hf-eager", "hf-static") and budget != 100:
                    continue  # all on the GPU: the 100% row only
                if method == "accelerate" and (budget != 50 and not args.tiny):
                    continue
                new = 8 if method == "accelerate" and not args.tiny else args.new_tokens
                spec = dict(shape=args.model_shape, layers=args.layers, method=method,
                            budget=budget, batch=batch, new_tokens=new,
                            prompt_tokens=args.prompt_tokens, model_dir=str(model_dir),
                            trace=args.trace, trace_use=ROUTING if args.trace else None)
                if args.no_compile and method.startswith("moe-uvm"):
                    spec["compile"] = False
                if key(spec) in done:
                    print(f"have {method} {budget}% batch {batch}")
                    continue
                try:
                    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                                          capture_output=True, text=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    record = dict(spec, error=f"timed out after {args.timeout} s")
                else:
                    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RECORD ")]
                    if proc.returncode != 0 or not lines:
                        record = dict(spec,
                                      error=(proc.stderr.strip().splitlines() or ["?"])[-1])
                    else:
                        record = json.loads(lines[-1][len("RECORD "):])
                results["records"].append(record)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1) + "\n")
                rate = record.get("decode_tokens_per_s")
                print(f"{method:10s} {budget:3d}% batch {batch:2d}: "
                      + (f"{rate:.2f} tok/s" if rate else record.get("error", "?")))
    print("\n".join(table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
