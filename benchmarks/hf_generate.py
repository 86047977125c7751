"""Transformers integration on the GPU: a random-weight model with Qwen3-30B-A3B's layer shape
(hidden 2048, 128 experts of intermediate 768, top-8; fewer layers) saved as safetensors, then
greedy generation from fixed token ids by (a) transformers itself with the whole model on the GPU,
(b) `load_offloaded` with every expert resident, (c) `load_offloaded` with 25% resident: peak
device memory, tokens/s, decode floor from the measured bandwidths, output equality.

    python benchmarks/hf_generate.py [--layers 4] [--new-tokens 64] [--resident-fraction 0.25]
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import statistics
import sys
import tempfile
import time

import torch
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, Qwen3MoeConfig  # noqa: E402

from moe_uvm import ceilings
from moe_uvm.config import ExpertOffloadConfig  # noqa: E402
from moe_uvm.integrations import hf  # noqa: E402

GIB = 2**30


def qwen3_30b_a3b_layers(num_layers: int) -> Qwen3MoeConfig:
    """Qwen3-30B-A3B's shapes (attention, experts, vocabulary) with `num_layers` layers."""
    return Qwen3MoeConfig(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=num_layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936,
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )


def device_used(free_at_start: int) -> int:
    """Device bytes in use beyond the start of a run, as the driver reports them (caching
    allocator segments and managed pages that live on the GPU)."""
    return free_at_start - torch.cuda.mem_get_info()[0]


def generate(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
    )


def timed_generation(model, ids: torch.Tensor, new_tokens: int, repeat: int) -> tuple:
    """Median prefill (one new token) and full generation times, after a warm-up generation that
    compiles the kernels for the prefill and decode shapes."""
    generate(model, ids, 4)

    def run(n: int) -> tuple[float, torch.Tensor]:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(model, ids, n)
        torch.cuda.synchronize()
        return time.perf_counter() - start, out

    prefill = statistics.median(run(1)[0] for _ in range(repeat))
    runs = [run(new_tokens) for _ in range(repeat)]
    full = statistics.median(t for t, _ in runs)
    batch = ids.shape[0]
    return runs[0][1], {
        "prefill_ms": prefill * 1e3,
        "generate_s": full,
        "generate_tok_s": batch * new_tokens / full,
        "decode_tok_s": batch * (new_tokens - 1) / (full - prefill),
    }


def decode_expert_bytes(model, manager, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """Mean expert bytes one decode step reads from resident and from offloaded experts, counted
    from the routing of a repeat of the same greedy generation (each expert once per step)."""
    blocks = hf.find_moe_blocks(model)
    calls: list[list[torch.Tensor]] = [[] for _ in blocks]
    hooks = [
        b.module.experts.register_forward_pre_hook(
            lambda module, args, i=i: calls[i].append(args[1].detach())
        )
        for i, b in enumerate(blocks)
    ]
    generate(model, ids, new_tokens)
    for hook in hooks:
        hook.remove()
    expert_bytes = manager.stores[0].expert_nbytes
    resident_bytes = offloaded_bytes = 0
    for layer, layer_calls in enumerate(calls):
        resident = set(manager.resident_ids(layer))
        for index in layer_calls[1:]:  # the first call is the prefill
            used = set(index.unique().tolist())
            resident_bytes += len(used & resident) * expert_bytes
            offloaded_bytes += len(used - resident) * expert_bytes
    steps = len(calls[0]) - 1
    return resident_bytes / steps, offloaded_bytes / steps


def transformers_run(config, ids, args, path: pathlib.Path) -> tuple[dict, torch.Tensor, dict]:
    """Build the random model on the GPU, generate with transformers' own experts, save it."""
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    params = sum(p.nbytes for p in model.parameters())
    experts = sum(p.nbytes for n, p in model.named_parameters() if ".experts." in n)
    used = [device_used(free0)]
    out, timing = timed_generation(model, ids, args.new_tokens, args.repeat)
    used.append(device_used(free0))
    with torch.no_grad():
        logits = model(out).logits.float().cpu()
    start = time.perf_counter()
    model.save_pretrained(path, max_shard_size="2GB")
    save_s = time.perf_counter() - start
    row = {
        "run": "transformers (whole model on GPU)", "resident": "all (plain device memory)",
        "load_s": None, "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
        "managed_resident_gib": 0.0, "device_used_peak_gib": max(used) / GIB, **timing,
        "decode_floor_tok_s": None,
    }
    model_info = {
        "shape": "Qwen3-30B-A3B layers", "layers": config.num_hidden_layers,
        "experts": config.num_experts, "top_k": config.num_experts_per_tok,
        "param_gib": params / GIB, "routed_expert_gib": experts / GIB,
        "checkpoint_gib": sum(f.stat().st_size for f in path.glob("*.safetensors")) / GIB,
        "save_s": save_s,
    }
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return row, out, {"logits": logits, **model_info}


def offloaded_run(path, resident: int, label: str, ids, reference_ids, args, bw) -> tuple:
    """load_offloaded with `resident` experts per layer (-1 = all), then generate."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    free0 = torch.cuda.mem_get_info()[0]
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loaded = hf.load_offloaded(
        path, ExpertOffloadConfig(num_resident=resident), dtype=torch.bfloat16, device="cuda"
    )
    model, manager = loaded.model, loaded.manager
    manager.synchronize()
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    load_peak = torch.cuda.max_memory_allocated()
    used = [device_used(free0)]
    out, timing = timed_generation(model, ids, args.new_tokens, args.repeat)
    used.append(device_used(free0))
    with torch.no_grad():
        logits = model(reference_ids).logits.float().cpu()
    used.append(device_used(free0))
    resident_bytes, offloaded_bytes = decode_expert_bytes(model, manager, ids, args.new_tokens)
    floor_s = resident_bytes / (bw["hbm_read_gbps"] * 1e9) + offloaded_bytes / (
        bw["read_through_gbps"] * 1e9
    )
    row = {
        "run": f"moe-uvm load_offloaded, {label}", "resident": label, "load_s": load_s,
        "load_peak_allocated_gib": load_peak / GIB,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
        "managed_resident_gib": manager.resident_bytes() / GIB,
        "managed_total_gib": sum(s.nbytes for s in manager.stores) / GIB,
        "device_used_peak_gib": max(used) / GIB, **timing,
        "decode_resident_mb_per_step": resident_bytes / 1e6,
        "decode_offloaded_mb_per_step": offloaded_bytes / 1e6,
        "decode_floor_tok_s": ids.shape[0] / floor_s,
    }
    print(manager.summary(), flush=True)
    del loaded, model
    gc.collect()
    for store in manager.stores:
        store.free()
    torch.cuda.empty_cache()
    return row, out, logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layers", type=int, default=4, help="decoder layers (1.2 GB of experts each)"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resident-fraction", type=float, default=0.25)
    parser.add_argument("--repeat", type=int, default=3, help="timed generations (median)")
    parser.add_argument("--tmp", default=None, help="folder for the temporary checkpoint")
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "results" / "hf_generate.json")
    )
    args = parser.parse_args()
    if args.new_tokens < 2:
        sys.exit(f"--new-tokens must be >= 2 (prefill makes the first), got {args.new_tokens}")
    if not torch.cuda.is_available():
        sys.exit("hf_generate.py needs a CUDA GPU")
    result = ceilings.device_summary()
    result["transformers"] = transformers.__version__
    result["read_through_gbps"] = ceilings.read_through_gbps(1 << 30)
    result["hbm_read_gbps"] = ceilings.hbm_read_gbps(2 << 30)
    torch.cuda.empty_cache()
    config = qwen3_30b_a3b_layers(args.layers)
    ids = torch.randint(
        0, config.vocab_size, (args.batch, args.prompt_len),
        generator=torch.Generator().manual_seed(0),
    ).cuda()
    resident = round(args.resident_fraction * config.num_experts)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        path = pathlib.Path(tmp)
        hf_row, hf_ids, info = transformers_run(config, ids, args, path)
        hf_logits = info.pop("logits")
        result["model"] = info
        all_row, all_ids, all_logits = offloaded_run(
            path, -1, "all experts resident", ids, hf_ids, args, result)
        part_row, part_ids, part_logits = offloaded_run(
            path, resident, f"{resident}/{config.num_experts} experts resident", ids, hf_ids,
            args, result)
    new = slice(args.prompt_len, None)
    for row, out, logits in ((hf_row, hf_ids, hf_logits), (all_row, all_ids, all_logits),
                             (part_row, part_ids, part_logits)):
        row["new_ids_equal_all_resident"] = bool(torch.equal(out, all_ids))
        agree = (out[:, new] == all_ids[:, new]).float().mean().item()
        row["new_ids_agreement_all_resident"] = agree
        row["max_abs_logit_diff_all_resident"] = (logits - all_logits).abs().max().item()
    result["runs"] = [hf_row, all_row, part_row]
    result["settings"] = vars(args)
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")

    m = result["model"]
    print(
        f"\n{result['device']}, torch {result['torch']}, transformers {result['transformers']}; "
        f"{m['shape']} x {m['layers']}: {m['param_gib']:.2f} GiB of weights "
        f"({m['routed_expert_gib']:.2f} GiB routed experts), bf16; batch {args.batch}, prompt "
        f"{args.prompt_len}, {args.new_tokens} new tokens, greedy, medians of {args.repeat}. "
        f"Measured: read-through {result['read_through_gbps']:.1f} GB/s, HBM read "
        f"{result['hbm_read_gbps']:.0f} GB/s. Logits compared on the transformers run's ids."
    )
    print(
        "| run | peak allocated GiB | managed resident GiB | device peak GiB (allocated + "
        "resident) | device used GiB (driver) | load s | prefill ms | decode tok/s | decode floor "
        "tok/s | new ids = all-resident | max abs logit diff vs all-resident |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in result["runs"]:
        load = f"{row['load_s']:.1f}" if row["load_s"] is not None else "-"
        floor = f"{row['decode_floor_tok_s']:.0f}" if row["decode_floor_tok_s"] else "-"
        if row is all_row:
            same = "(reference)"
        elif row["new_ids_equal_all_resident"]:
            same = "yes"
        else:
            same = f"no ({row['new_ids_agreement_all_resident']:.0%} of new tokens)"
        peak = row["peak_allocated_gib"] + row["managed_resident_gib"]
        print(
            f"| {row['run']} | {row['peak_allocated_gib']:.2f} | {row['managed_resident_gib']:.2f}"
            f" | {peak:.2f} | {row['device_used_peak_gib']:.2f} | {load} | "
            f"{row['prefill_ms']:.1f} | {row['decode_tok_s']:.1f} | {floor} | {same} | "
            f"{row['max_abs_logit_diff_all_resident']:.3g} |"
        )


if __name__ == "__main__":
    main()
