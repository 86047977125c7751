"""Whole-model decode through the entry point users call (`moe_uvm.generate`, what `moe-uvm
generate` runs), against what Hugging Face users do today, on models whose sizes are real and
whose weights are random, built in place from a config (nothing to download).

Methods, each at GPU budgets of the non-expert weights + KV cache + X% of the expert bytes:
  moe-uvm      the planner's split of the budget (auto), static cache, CUDA-graph decode
  uva          the budget's first experts resident, the rest read in place over PCIe, no slots
               (vLLM --cpu-offload-gb style), same decoder
  hf-eager     transformers alone, everything on the GPU (100% only), eager generate
  accelerate   transformers + accelerate dispatch_model with max_memory at the budget (50% only,
               8 new tokens: it is slow)
Every run is its own process (memory-hungry baselines must not share one), appends one record to
the JSON and is skipped when the JSON already has it, so a sweep can span sessions.

    python benchmarks/generate.py --model-shape qwen3-30b-a3b [--layers 48] [--budgets 25,50,75,100]
        [--batches 1,16] [--methods moe-uvm,uva,hf-eager,accelerate] [--new-tokens 64]
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
    fixed = info.non_expert_bytes + info.kv_bytes_per_token * spec["batch"] * context
    budget_gb = (fixed + spec["budget"] / 100 * expert_bytes) / 1e9
    ids = prompt_ids(model_dir, prompt_tokens=spec["prompt_tokens"], batch=spec["batch"],
                     vocab_size=json.loads((model_dir / "config.json").read_text())["vocab_size"],
                     seed=SEED)
    record = dict(spec, budget_gb=budget_gb, fixed_gb=fixed / 1e9, expert_gb=expert_bytes / 1e9)
    free_before = torch.cuda.mem_get_info(device)[0] if cuda else None
    if method in ("moe-uvm", "uva"):
        if method == "moe-uvm":
            config = ExpertOffloadConfig(gpu_budget_gb=budget_gb)
        else:  # a static first-N split of the same bytes, no slots
            config = ExpertOffloadConfig(gpu_budget_gb=budget_gb, prefetch_slots=0)
        loaded = load_model(model_dir, config, random_weights=SEED,
                            dtype=None if cuda else torch.float32, device=device,
                            kv_tokens=spec["batch"] * context)
        trace = None
        if spec.get("trace"):
            from moe_uvm.trace import load_trace

            trace = load_trace(spec["trace"])
        tokens, report = generate(loaded, ids, max_new_tokens=spec["new_tokens"],
                                  batch=spec["batch"], ignore_eos=True,
                                  free_before=free_before, routing_trace=trace)
        loaded.manager.close()
        record.update(report.to_dict(), tokens=tokens)
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
    home = device if method == "hf-eager" else torch.device("cpu")
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
    with torch.no_grad():  # warm-up: one token
        model.generate(input_ids=inputs, max_new_tokens=1, do_sample=False, eos_token_id=None,
                       pad_token_id=0)
        clock = _Clock(None)
        clock.start = time.perf_counter()
        out = model.generate(input_ids=inputs, max_new_tokens=spec["new_tokens"],
                             do_sample=False, eos_token_id=None, pad_token_id=0, streamer=clock)
    decode_s = clock.last - clock.first
    record.update(
        time_to_first_token_s=clock.first - clock.start,
        decode_tokens_per_s=(clock.steps - 1) * spec["batch"] / decode_s if decode_s > 0
        else None,
        peak_device_gb=torch.cuda.max_memory_allocated(device) / 1e9 if cuda else 0.0,
        tokens=out[:, inputs.shape[1]:].tolist(),
        device=torch.cuda.get_device_name(device) if cuda else "cpu")
    return record


def key(record: dict) -> tuple:
    return (record["shape"], record["layers"], record["method"], record["budget"],
            record["batch"], record["new_tokens"], record["prompt_tokens"], record.get("trace"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default all)")
    parser.add_argument("--budgets", default="25,50,75,100",
                        help="percent of expert bytes on top of the fixed parts")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--methods", default="moe-uvm,uva,hf-eager,accelerate")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path("benchmarks/results/generate.json"))
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    parser.add_argument("--trace", help="routing trace (.npz) replacing the routers' choices "
                        "(moe-uvm and uva only; speed and expert reads, not quality)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shape")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a run's spec, in a child process
    args = parser.parse_args(argv)
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
                if args.trace and method not in ("moe-uvm", "uva"):
                    continue  # only moe-uvm's expert modules can take trace routing
                if method == "hf-eager" and budget != 100:
                    continue  # all on the GPU: the 100% row only
                if method == "accelerate" and (budget != 50 and not args.tiny):
                    continue
                new = 8 if method == "accelerate" and not args.tiny else args.new_tokens
                spec = dict(shape=args.model_shape, layers=args.layers, method=method,
                            budget=budget, batch=batch, new_tokens=new,
                            prompt_tokens=args.prompt_tokens, model_dir=str(model_dir),
                            trace=args.trace)
                if key(spec) in done:
                    print(f"have {method} {budget}% batch {batch}")
                    continue
                proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)],
                                      capture_output=True, text=True, timeout=args.timeout)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RECORD ")]
                if proc.returncode != 0 or not lines:
                    record = dict(spec, error=(proc.stderr.strip().splitlines() or ["?"])[-1])
                else:
                    record = json.loads(lines[-1][len("RECORD "):])
                results["records"].append(record)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1) + "\n")
                rate = record.get("decode_tokens_per_s")
                print(f"{method:10s} {budget:3d}% batch {batch:2d}: "
                      + (f"{rate:.2f} tok/s" if rate else record.get("error", "?")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
