"""Hugging Face transformers integration: run the routed experts of a transformers MoE model
through FusedMoE with weights in managed memory (`offload_model_experts`), stream a safetensors
checkpoint straight into that layout (`load_offloaded`), and calibrate a routing profile from a
model (`calibrate_model`). Needs the `hf` extra (transformers, safetensors).

Where the parts live: hf_blocks.py (supported families, the FusedExperts adapter), hf_load.py
(streaming load), hf_calibrate.py (calibration)."""

from __future__ import annotations

import torch
from torch import nn

from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.integrations.hf_blocks import (
    FAMILIES,
    FusedExperts,
    MoeBlock,
    attach_experts,
    find_moe_blocks,
    plan_expert_memory,
    shard_blocks,
    supported_families,
)
from moe_uvm.integrations.hf_calibrate import calibrate_model, read_prompts
from moe_uvm.integrations.hf_load import CheckpointError, LoadedModel, load_offloaded
from moe_uvm.manager import ExpertOffloadManager
from moe_uvm.memory import NON_EXPERT_WEIGHTS, target_device
from moe_uvm.parallel import ExpertParallel

__all__ = [
    "FAMILIES",
    "CheckpointError",
    "FusedExperts",
    "LoadedModel",
    "calibrate_model",
    "find_moe_blocks",
    "load_offloaded",
    "offload_model_experts",
    "read_prompts",
    "supported_families",
]


def _bytes_to_move(model: nn.Module, blocks: list[MoeBlock], device: torch.device) -> int:
    """Bytes of the parameters and buffers `model.to(device)` copies there, routed experts
    aside (they go into the stores); a tensor shared by several modules counts once."""
    experts = {id(t) for b in blocks for t in (*b.module.experts.parameters(),
                                                 *b.module.experts.buffers())}
    seen, total = set(experts), 0
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen and tensor.device != device:
            total += tensor.nbytes
        seen.add(id(tensor))
    return total


def offload_model_experts(
    model: nn.Module,
    config: ExpertOffloadConfig | None = None,
    *,
    device: torch.device | str | None = None,
    expert_parallel: ExpertParallel | None = None,
) -> ExpertOffloadManager:
    """Move the routed experts of a loaded transformers MoE model into managed expert stores and
    run them through FusedMoE; routers, shared experts and everything else stay the model's own,
    so `model(...)` and `model.generate(...)` work unchanged.

    The stores go on `device` (default: where the experts are now), and the rest of the model is
    moved there too; all of it (stores, slot caches, counters, the rest of the model) is checked
    against the GPU's free memory and reserved before the first allocation, unless the config
    opts in to oversubscription. All stores are allocated first and the original experts are
    freed once every one is copied in, so for a while both exist: for models larger than the
    GPU use `load_offloaded`, which never materialises them. A model with no supported MoE block
    is refused, naming the supported families; on any error in the experts' conversion the model
    keeps its own experts.

    `expert_parallel` (moe_uvm.parallel.ExpertParallel, one process per GPU): this rank's
    stores hold only the experts it owns, under its own budget; every rank keeps the rest of
    the model and runs the same tokens, and the blocks add the ranks' parts.
    """
    config = config or ExpertOffloadConfig()
    blocks = find_moe_blocks(model)
    experts = blocks[0].module.experts
    if isinstance(experts, FusedExperts):
        raise ValueError(f"{type(model).__name__}: experts are already offloaded")
    if experts.gate_up_proj.device.type == "meta":
        raise ValueError(
            f"{type(model).__name__} has its expert weights on the meta device; use "
            "load_offloaded to stream a checkpoint into managed memory"
        )
    device = target_device(device or experts.gate_up_proj.device)
    blocks, config = shard_blocks(blocks, expert_parallel, config, device)
    memory = plan_expert_memory(blocks, config, device)
    memory.add(NON_EXPERT_WEIGHTS, _bytes_to_move(model, blocks, device))
    with memory.reserve(allow_oversubscription=config.allow_oversubscription):
        manager = attach_experts(blocks, config, device)
        model.to(manager.device)
    return manager
