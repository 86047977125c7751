"""The builder: finds the FusedMoE layers of a model, plans their residency, allocates their
managed expert stores, and wires layers, manager and slot cache together."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import partial

import torch
from torch import nn

from moe_uvm import uvm
from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.layer import FusedMoE
from moe_uvm.manager import ExpertOffloadManager
from moe_uvm.policies.plan import ResidencyPlan, plan_residency
from moe_uvm.profile import Profile, load_profile
from moe_uvm.store import ManagedExpertStore

ExpertSpecs = dict[str, tuple[tuple[int, int], torch.dtype]]


def find_moe_layers(module_or_modules: nn.Module | Iterable[nn.Module]) -> list[FusedMoE]:
    """FusedMoE layers in order: the modules given, or every FusedMoE inside a model."""
    if isinstance(module_or_modules, nn.Module):
        module_or_modules = [module_or_modules]
    layers: list[FusedMoE] = []
    for module in module_or_modules:
        if isinstance(module, FusedMoE):
            layers.append(module)
        else:
            layers.extend(m for m in module.modules() if isinstance(m, FusedMoE))
    if not layers:
        raise ValueError("no FusedMoE layer found in what was passed to offload_experts")
    return layers


def _expert_specs(layer: FusedMoE) -> ExpertSpecs:
    return {
        "w13": ((2 * layer.intermediate_size, layer.hidden_size), layer.w13_weight.dtype),
        "w2": ((layer.hidden_size, layer.intermediate_size), layer.w2_weight.dtype),
    }


def _target_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        device = "cuda" if uvm.available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _plan(
    layers: list[FusedMoE], specs: list[ExpertSpecs], config: ExpertOffloadConfig
) -> tuple[ResidencyPlan, Profile | None]:
    """The residency plan and the profile it came from; every rule that needs the model's shape
    (a matching profile, counts, budget) is checked here, before anything is allocated."""
    shapes = {
        (m.num_experts, m.hidden_size, m.intermediate_size, m.w13_weight.dtype) for m in layers
    }
    if len({s[0] for s in shapes}) != 1:
        raise ValueError(f"all layers must have the same number of experts, got {shapes}")
    num_experts = layers[0].num_experts
    profile = None
    if config.profile_path:
        profile = load_profile(config.profile_path)
        profile.check_matches(len(layers), num_experts, layers[0].top_k)
    plan = plan_residency(
        config,
        len(layers),
        num_experts,
        ManagedExpertStore.planned_nbytes(1, specs[0]),
        sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs[0].values()),
        counts=None if profile is None else profile.counts,
        counts_tokens=0 if profile is None else profile.num_tokens,
    )
    return plan, profile


def _attach(
    layers: list[FusedMoE], stores: list[ManagedExpertStore], manager: ExpertOffloadManager
) -> None:
    """Each layer's weights become views over its store (copied in unless the layer is on the
    meta device, whose weights arrive later through `weight_loader`), its routing feeds the
    manager."""
    for index, (module, store) in enumerate(zip(layers, stores, strict=True)):
        if module.w13_weight.device.type != "meta":
            store["w13"].copy_(module.w13_weight.data)
            store["w2"].copy_(module.w2_weight.data)
        module.w13_weight = nn.Parameter(store["w13"], requires_grad=False)
        module.w2_weight = nn.Parameter(store["w2"], requires_grad=False)
        module._attach_loaders()
        module.record_routing = partial(manager.record, index)


def offload_experts(
    module_or_modules: nn.Module | Iterable[nn.Module],
    config: ExpertOffloadConfig | None = None,
    *,
    device: torch.device | str | None = None,
    next_gates: Sequence[torch.Tensor] | None = None,
) -> ExpertOffloadManager:
    """Move the experts of FusedMoE layers into managed memory and apply the config's residency.

    Each layer's `w13_weight`/`w2_weight` become views over a ManagedExpertStore; forward is
    unchanged and feeds each layer's `topk_ids` to the manager's recording hook. The total
    size is checked against the GPU's free memory before anything is allocated (unless the
    config opts in to oversubscription). Without CUDA the stores are CPU memory. Layers built
    on the meta device get empty stores, filled afterwards through `weight_loader` (streaming
    checkpoint loads). With `prefetch_slots` in the config each layer also gets a GPU slot
    cache (moe_uvm.slots); `next_gates[l]`, layer l+1's router weight, enables lookahead.
    """
    config = config or ExpertOffloadConfig()
    layers = find_moe_layers(module_or_modules)
    specs = [_expert_specs(m) for m in layers]
    plan, profile = _plan(layers, specs, config)
    device = _target_device(device)
    if device.type == "cuda" and not config.allow_oversubscription:
        total = sum(
            ManagedExpertStore.planned_nbytes(m.num_experts, spec)
            for m, spec in zip(layers, specs, strict=True)
        )
        uvm.check_fits(total, device.index)
    stores = [
        ManagedExpertStore(
            m.num_experts, spec, device, allow_oversubscription=config.allow_oversubscription
        )
        for m, spec in zip(layers, specs, strict=True)
    ]
    # Advice before the weights are written: pages then land where their advice says, so
    # offloaded experts never pass through GPU memory on the way in.
    manager = ExpertOffloadManager(
        stores, config, top_k=layers[0].top_k, profile=profile, plan=plan
    )
    _attach(layers, stores, manager)
    manager.layers = layers
    cache = manager.enable_slot_cache(next_gates)
    for index, module in enumerate(layers):
        module.slot_cache, module.layer_index = cache, index
    return manager
