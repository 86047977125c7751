"""Calibration from a model: run a transformers MoE model over prompts, record the experts each
block's own router picks for every token (and, through the profile, which experts of the next MoE
layer the same token picks) into a routing profile for resident_selection="profile", and
optionally the routing trace (format: the README's File formats section)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoTokenizer

from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.integrations.hf_blocks import find_moe_blocks
from moe_uvm.integrations.hf_load import load_offloaded
from moe_uvm.profile import Profile
from moe_uvm.trace import RoutingTrace

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

Prompt = tuple[int, str | list[int]]
"""(line number in the prompts file, text or token ids)."""


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a text file (one per non-empty line) or, for `.jsonl`, JSON objects with
    `"text"` or `"input_ids"`; a malformed line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        problem = "not a file" if path.exists() else "no such file"
        raise ValueError(f"prompts file {path}: {problem}")
    jsonl = path.suffix in (".jsonl", ".ndjson")
    prompts: list[Prompt] = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append((number, line))
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            prompts.append((number, item["text"]))
        elif isinstance(item, dict) and "input_ids" in item:
            ids = item["input_ids"]
            if not isinstance(ids, list) or not ids or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids
            ):
                raise ValueError(
                    f"{path}:{number}: input_ids must be a non-empty list of token ids "
                    f"(non-negative integers), got {str(ids)[:60]}"
                )
            prompts.append((number, ids))
        else:
            raise ValueError(
                f'{path}:{number}: expected an object with "text" (a string) or "input_ids" '
                f"(a list of token ids), got {line[:60]}"
            )
    if not prompts:
        raise ValueError(f"{path}: no prompts (empty file)")
    return prompts


def _check_checkpoint(path: Path) -> None:
    """Refuse a path that is not a checkpoint folder before prompts or tokenizer are looked at,
    so the error names the real problem."""
    if not path.is_dir():
        raise ValueError(f"checkpoint {path}: no such folder (a local Hugging Face checkpoint "
                         "folder is needed)")
    if not (path / "config.json").is_file():
        raise ValueError(f"checkpoint {path}: no config.json, so not a Hugging Face checkpoint "
                         "folder")


def _tokenizer(path: Path | None, prompts_path: Path, line: int):
    """The checkpoint's tokenizer, for text prompts; without one, token ids are required."""
    where = f"{prompts_path}:{line} is text"
    if path is None:
        raise ValueError(f"{where}; pass a tokenizer or give token ids (JSONL input_ids)")
    # transformers 5 builds an empty tokenizer from the config alone, so look for its files.
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{where} but the checkpoint {path} has no tokenizer (none of "
            f"{', '.join(TOKENIZER_FILES)}); give token ids instead: a .jsonl file with lines "
            'like {"input_ids": [1, 2, 3]}'
        )
    return AutoTokenizer.from_pretrained(path)


def _record(routed: list[list[torch.Tensor]], layer: int, module: nn.Module, args: tuple,
            kwargs: dict) -> None:
    """Forward pre-hook on a block's experts module: the call carries the router's choice,
    `(hidden_states, top_k_index, top_k_weights)`, in every supported family."""
    index = kwargs["top_k_index"] if "top_k_index" in kwargs else args[1]
    weights = kwargs["top_k_weights"] if "top_k_weights" in kwargs else args[2]
    routed[layer].append((index.detach(), weights.detach()))


def _joined(traces: Sequence[RoutingTrace]) -> RoutingTrace:
    lengths = [t.num_tokens for t in traces]
    return RoutingTrace(
        np.concatenate([t.topk_ids for t in traces], axis=1),
        traces[0].num_experts,
        traces[0].top_k,
        np.cumsum([0, *lengths[:-1]]).astype(np.int32),
        np.concatenate([t.topk_weights for t in traces], axis=1),
    )


# Long (~80 lines): checks, model load, the hooked forward loop and the profile/trace writes
# read best in the order they happen; each part is a few lines.
def calibrate_model(
    model_or_path: nn.Module | str | Path,
    prompts_path: str | Path,
    *,
    tokenizer=None,
    config: ExpertOffloadConfig | None = None,
    max_tokens: int | None = None,
    trace_out: str | Path | None = None,
    progress: bool = True,
) -> Profile:
    """Run the model over the prompts (one forward per prompt, no padding, stopping at
    `max_tokens` tokens) and count each MoE layer's routed experts and the layer-to-next-layer
    co-occurrence. A path is loaded with `load_offloaded(path, config)`; text prompts use its
    tokenizer (or `tokenizer`). `trace_out` also writes the routing trace (.npz)."""
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    path = Path(model_or_path) if isinstance(model_or_path, (str, Path)) else None
    if path is not None:
        _check_checkpoint(path)
    prompts_path = Path(prompts_path)
    prompts = read_prompts(prompts_path)
    text_line = next((n for n, p in prompts if isinstance(p, str)), None)
    if text_line is not None and tokenizer is None:
        tokenizer = _tokenizer(path, prompts_path, text_line)
    if path is not None:
        model = load_offloaded(path, config).model
    else:
        model = model_or_path
    model_id = str(path) if path is not None else getattr(model.config, "_name_or_path", None)
    blocks = find_moe_blocks(model)
    E, k = blocks[0].num_experts, blocks[0].top_k
    embed = model.get_input_embeddings()
    vocab, device = embed.num_embeddings, embed.weight.device
    routed: list[list] = [[] for _ in blocks]
    hooks = [
        b.module.experts.register_forward_pre_hook(partial(_record, routed, i), with_kwargs=True)
        for i, b in enumerate(blocks)
    ]
    profile, traces, total = None, [], 0
    try:
        bar = tqdm(prompts, desc="calibrate", unit="prompt", disable=not progress)
        for number, prompt in bar:
            ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
            if max_tokens is not None:
                ids = ids[: max_tokens - total]
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise ValueError(
                    f"{prompts_path}:{number}: token ids {bad[:5]} outside the vocabulary "
                    f"[0, {vocab})"
                )
            if not ids:
                continue
            for layer in routed:
                layer.clear()
            with torch.no_grad():
                model(input_ids=torch.tensor([ids], device=device), use_cache=False)
            index = torch.stack([torch.cat([i for i, _ in r]) for r in routed]).cpu()
            weights = torch.stack([torch.cat([w for _, w in r]) for r in routed]).float().cpu()
            trace = RoutingTrace(
                index.numpy().astype(np.int16 if E < 2**15 else np.int32), E, k,
                np.zeros(1, np.int32), weights.numpy(),
            )
            step = Profile.from_trace(trace, model_id=model_id, cooccurrence=True)
            profile = step if profile is None else profile.merge(step)
            if trace_out is not None:
                traces.append(trace)
            total += len(ids)
            bar.set_postfix(tokens=total)
            if max_tokens is not None and total >= max_tokens:
                break
    finally:
        for hook in hooks:
            hook.remove()
    if profile is None:
        raise ValueError(f"{prompts_path}: the prompts gave no tokens")
    if trace_out is not None:
        _joined(traces).save(trace_out)
    return profile
