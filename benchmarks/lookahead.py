"""Lookahead prefetch on a trained model: the tiny Qwen3-MoE checkpoint loaded through the Hugging
Face integration (`load_offloaded`), held-out text from this repository decoded token by token
(batch 1, teacher-forced), prefetch modes none / frequency / speculative / lookahead compared at
the same resident experts (from a profile calibrated on other repository text) and slots:
precision, recall, slot hit rate, and expert reads over PCIe per token and layer.

    python benchmarks/lookahead.py [--model DIR] [--resident-fractions 0.25 0.5] [--slots 8]
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import pathlib
import tempfile

import torch
import transformers
from transformers import DynamicCache

from moe_uvm.config import PREFETCH_MODES, ExpertOffloadConfig
from moe_uvm.integrations import hf

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_MODEL = ROOT.parent / "shared" / "models" / "tiny-qwen3moe-bytes"
CALIBRATION = ("LICENSE", "tests/test_slot_plan.py", "tests/test_prefetch.py")
"""Calibration text (prose, code): the profile behind residency, frequency and speculative."""
EVAL_CODE = ("moe_uvm/slots.py", "moe_uvm/manager.py", "moe_uvm/layer.py", "moe_uvm/store.py")
EVAL_PROSE = ("README.md",)
CHUNK = 512
"""Bytes per calibration prompt (the checkpoint was trained on 512-byte sequences)."""


def read(names: tuple[str, ...]) -> bytes:
    return b"\n".join((ROOT / name).read_bytes() for name in names)


def windows(data: bytes, count: int, size: int) -> list[bytes]:
    """`count` windows of `size` bytes spread evenly over `data`, each from a line start."""
    centres = [(j + 1) * len(data) // (count + 1) for j in range(count)]
    starts = [data.rfind(b"\n", 0, max(c - size // 2, 1)) + 1 for c in centres]
    return [data[s:s + size] for s in starts]


def calibrate(model_path: pathlib.Path, folder: pathlib.Path) -> tuple[str, int]:
    """A routing profile (counts and co-occurrence) of the calibration text: its path and the
    model's experts per layer."""
    data = read(CALIBRATION)
    prompts = folder / "calibration.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": list(data[i:i + CHUNK])}) + "\n"
                               for i in range(0, len(data), CHUNK)))
    model = hf.load_offloaded(model_path, ExpertOffloadConfig()).model
    profile = hf.calibrate_model(model, prompts, progress=False)
    profile.save(folder / "profile.json")
    return str(folder / "profile.json"), profile.num_experts


def decode(model: torch.nn.Module, ids: bytes) -> torch.Tensor:
    """Teacher-forced decode of `ids`, one token per step (batch 1): float32 logits [T, V]."""
    params = inspect.signature(model.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
    kv = DynamicCache(config=model.config)
    device = model.get_input_embeddings().weight.device
    out = []
    with torch.no_grad():
        for token in ids:
            step = model(input_ids=torch.tensor([[token]], device=device), use_cache=True,
                         **{key: kv})
            out.append(step.logits[0, -1].float())
    return torch.stack(out)


def run(args, profile: str, resident: int, slots: int, mode: str, prompts: list[bytes]) -> dict:
    """One configuration over every prompt (slots kept across prompts, KV cache per prompt)."""
    config = ExpertOffloadConfig(
        num_resident=resident, resident_selection="profile", profile_path=profile,
        prefetch=mode, prefetch_slots=slots, prefetch_experts=args.prefetch_experts)
    loaded = hf.load_offloaded(args.model, config)
    cache = loaded.manager.slot_cache
    for text in prompts:
        decode(loaded.model, text)
    c = dict(zip(("predicted", "correct", "needed", "hits"), cache.stats.counters.cpu().T,
                 strict=True))
    copies = cache.copies.cpu()
    L, tokens = len(copies), sum(map(len, prompts))
    offloaded = cache.num_experts - resident
    ratio = lambda num, den: num / den if den else None  # noqa: E731
    predicted_layers = slice(1, None)  # layer 0 has no earlier layer to predict it from
    pred, good, need = (int(c[k][predicted_layers].sum()) for k in ("predicted", "correct",
                                                                      "needed"))
    misses, copied = int((c["needed"] - c["hits"]).sum()), int(copies.sum())
    per = tokens * L
    row = {
        "resident": resident, "offloaded": offloaded, "slots": slots, "prefetch": mode,
        "predicted_per_step": cache.num_predicted if mode != "none" else 0,
        "tokens": tokens, "layers": L,
        "precision": ratio(good, pred), "recall": ratio(good, need),
        "recall_per_layer_from_1": [ratio(int(g), int(n)) for g, n in
                                    zip(c["correct"][1:], c["needed"][1:], strict=True)],
        "random_precision": need / (tokens * (L - 1) * offloaded),
        "random_recall": cache.num_predicted / offloaded,
        "slot_hit_rate": ratio(int(c["hits"].sum()), int(c["needed"].sum())),
        "needed_offloaded_per_token_layer": int(c["needed"].sum()) / per,
        "demand_reads_per_token_layer": misses / per,
        "prefetch_copies_per_token_layer": copied / per,
        "pcie_reads_per_token_layer": (misses + copied) / per,
        "pcie_mb_per_token": (misses + copied) * loaded.manager.stores[0].expert_nbytes
        / tokens / 1e6,
        "counters_per_layer": cache.stats.counters.cpu().tolist(),
        "copies_per_layer": copies.tolist(),
    }
    loaded.manager.close()
    return row


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=pathlib.Path,
                        default=SHARED_MODEL if SHARED_MODEL.is_dir() else None,
                        help="tiny-qwen3moe-bytes checkpoint folder")
    parser.add_argument("--resident-fractions", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--slots", type=int, nargs="+", default=[8], help="slots per layer")
    parser.add_argument("--prefetch-experts", type=int, default=None,
                        help="experts prefetched per layer and step (default: top_k)")
    parser.add_argument("--prompts", type=int, default=8, help="half code, half prose")
    parser.add_argument("--tokens", type=int, default=256, help="bytes (= tokens) per prompt")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("--model is required (the tiny-qwen3moe-bytes checkpoint folder)")
    if not (args.model / "config.json").is_file():
        parser.error(f"--model: {args.model} is not a Hugging Face checkpoint folder")
    if args.prompts < 2 or args.tokens < 2:
        parser.error(f"need --prompts >= 2 and --tokens >= 2, got {args.prompts}, {args.tokens}")
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    out = args.out or ROOT / "benchmarks" / "results" / f"lookahead{'' if cuda else '_cpu'}.json"
    code, prose = args.prompts // 2, args.prompts - args.prompts // 2
    prompts = (windows(read(EVAL_CODE), code, args.tokens)
               + windows(read(EVAL_PROSE), prose, args.tokens))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        profile, num_experts = calibrate(args.model, pathlib.Path(folder))
        for fraction in args.resident_fractions:
            resident = round(fraction * num_experts)
            for slots in args.slots:
                for mode in PREFETCH_MODES:
                    rows.append(run(args, profile, resident, slots, mode, prompts))
                    print(f"resident {resident}, slots {slots}, {mode}: done", flush=True)
    note = ("CPU: expert weights and slots both stay in CPU memory, so nothing crosses PCIe "
            "here; the counts are what the same run moves on a GPU (no timing)") if not cuda else (
            "CUDA: offloaded experts in host-resident managed memory, slots in GPU memory")
    result = {
        "device": device, "note": note, "torch": torch.__version__,
        "transformers": transformers.__version__, "model": str(args.model),
        "settings": {k: str(v) if isinstance(v, pathlib.Path) else v
                     for k, v in vars(args).items()},
        "resident_selection": "profile (counts of the calibration text)",
        "calibration_text": list(CALIBRATION), "eval_code": list(EVAL_CODE),
        "eval_prose": list(EVAL_PROSE),
        "eval_sha256": hashlib.sha256(b"".join(prompts)).hexdigest(), "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{device}; {note}. {len(prompts)} prompts x {args.tokens} tokens of held-out "
          f"repository text ({code} code, {prose} prose), decoded one token per step. Precision "
          "and recall over layers 1+ (random: the same number of offloaded experts drawn at "
          "random); reads per token and layer over all layers; PCIe reads = slot misses "
          f"(read-through, fills a slot) + prefetch copies. JSON: {out}\n")
    print("| resident | slots | prefetch | precision (random) | recall (random) | slot hit rate |"
          " needed offloaded | slot misses | prefetch copies | PCIe reads | vs none |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        base = next(r for r in rows if r["prefetch"] == "none" and r["resident"] == row["resident"]
                    and r["slots"] == row["slots"])
        change = row["pcie_reads_per_token_layer"] / base["pcie_reads_per_token_layer"] - 1
        guess = row["prefetch"] != "none"
        print(f"| {row['resident']}/{num_experts} | {row['slots']} | {row['prefetch']} | "
              f"{fmt(row['precision'])} ({fmt(row['random_precision'] if guess else None)}) | "
              f"{fmt(row['recall'])} ({fmt(row['random_recall'] if guess else None)}) | "
              f"{fmt(row['slot_hit_rate'])} | {row['needed_offloaded_per_token_layer']:.3f} | "
              f"{row['demand_reads_per_token_layer']:.3f} | "
              f"{row['prefetch_copies_per_token_layer']:.3f} | "
              f"{row['pcie_reads_per_token_layer']:.3f} | {change:+.0%} |")


if __name__ == "__main__":
    main()
