"""The builder: finds the FusedMoE layers of a model, plans their residency, allocates their
managed expert stores, and wires layers, manager and slot cache together."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import partial

import torch
from torch import nn

from moe_uvm.autosplit import Split, auto_config
from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.hybrid import PENDING, attach_cpu_shares, measure_cpu_gbps
from moe_uvm.layer import FusedMoE
from moe_uvm.manager import ExpertOffloadManager
from moe_uvm.memory import (
    EXPERT_SCALES,
    EXPERT_STORES,
    ROUTING_COUNTERS,
    SLOT_CACHES,
    MemoryPlan,
    routing_counters_nbytes,
    slot_cache_nbytes,
    target_device,
)
from moe_uvm.policies.plan import ResidencyPlan, plan_residency
from moe_uvm.profile import Profile, load_profile
from moe_uvm.store import EXPERT_ALIGNMENT, PACKED_ALIGNMENT, ManagedExpertStore

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


def store_alignment(
    config: ExpertOffloadConfig, num_layers: int, num_experts: int, spec: ExpertSpecs
) -> int:
    """The experts' slot alignment in each layer's store. Packed (experts back to back) when a
    budget keeps every expert of every layer resident and there are no slots: nothing is then
    advised one expert at a time, so the 2 MiB alignment that keeps advice off a neighbour's
    pages buys nothing, and its padding (11% of Qwen3-30B-A3B's experts) would keep a budget of
    exactly the experts' bytes from holding them all. Otherwise 2 MiB (store.EXPERT_ALIGNMENT).
    A later `readvise` of a packed store still works; advice then splits pages with neighbours."""
    if config.gpu_budget_gb is None or config.num_slots or config.wants_auto_split:
        return EXPERT_ALIGNMENT
    L, E = num_layers, num_experts
    if config.resident_selection == "manual":
        counts = [len(config.manual_ids(layer, L, E)) for layer in range(L)]
    elif config.num_resident is not None:
        counts = config.resident_counts(L, E)
    else:  # a budget alone: packed when it holds every expert at packed size
        packed = ManagedExpertStore.planned_nbytes(1, spec, PACKED_ALIGNMENT)
        return PACKED_ALIGNMENT if config.gpu_budget_gb * 1e9 >= L * E * packed \
            else EXPERT_ALIGNMENT
    return PACKED_ALIGNMENT if all(c == E for c in counts) else EXPERT_ALIGNMENT


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
    alignment = store_alignment(config, len(layers), num_experts, specs[0])
    plan = plan_residency(
        config,
        len(layers),
        num_experts,
        ManagedExpertStore.planned_nbytes(1, specs[0], alignment),
        sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs[0].values()),
        counts=None if profile is None else profile.counts,
        counts_tokens=0 if profile is None else profile.num_tokens,
    )
    return plan, profile


def resolve_config(
    layers: Sequence[FusedMoE], config: ExpertOffloadConfig,
    device: torch.device | str | None = None,
) -> tuple[ExpertOffloadConfig, Split | None]:
    """`config` with the planner's split filled in when it asks for one (a budget and nothing
    the split decides set: `ExpertOffloadConfig.wants_auto_split`), and that split; else
    (config, None). Nothing is allocated. offload_experts and plan_memory call it; a config it
    returned is not planned again. With `cpu_experts='auto'` on a GPU, where the best split has
    slots, the CPU expert kernel's rate is measured here (a second or two, on random experts of
    the layers' shape) to weigh the hybrid's split without slots against it."""
    if not config.wants_auto_split:
        return config, None
    specs = _expert_specs(layers[0])
    profile = None
    if config.profile_path:
        profile = load_profile(config.profile_path)
        profile.check_matches(len(layers), layers[0].num_experts, layers[0].top_k)
    target = target_device(device)
    return auto_config(
        config, len(layers), layers[0].num_experts, layers[0].top_k,
        resident_nbytes=ManagedExpertStore.planned_nbytes(1, specs),
        packed_nbytes=ManagedExpertStore.planned_nbytes(1, specs, PACKED_ALIGNMENT),
        slot_nbytes=sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values()),
        profile=profile, device=target,
        cpu_gbps=partial(_cpu_gbps, layers[0], config, target),
    )


def _cpu_gbps(layer: FusedMoE, config: ExpertOffloadConfig, device: torch.device) -> float | None:
    """The CPU expert kernel's rate for the layers' shape (moe_uvm.hybrid.measure_cpu_gbps, bf16
    experts, at most 0.5 GB of them); None off CUDA or where the kernel cannot be built, where
    the hybrid cannot run."""
    from moe_uvm.kernels import cpu_experts as cpu_kernel

    if device.type != "cuda" or not cpu_kernel.available()[0]:
        return None
    return measure_cpu_gbps(layer.hidden_size, layer.intermediate_size,
                            threads=config.cpu_threads, pool_bytes=5e8)


def _check_prefetch(
    config: ExpertOffloadConfig, profile: Profile | None,
    next_gates: Sequence[torch.Tensor] | None, num_layers: int,
) -> None:
    """The slot cache's inputs, checked before anything is allocated."""
    if config.num_slots == 0:
        return
    if config.prefetch == "frequency" and profile is None:
        raise ValueError("prefetch='frequency' needs routing counts: set profile_path")
    if config.prefetch == "lookahead" and (
        next_gates is None or len(next_gates) != num_layers - 1
    ):
        got = "none" if next_gates is None else len(next_gates)
        raise ValueError(
            f"prefetch='lookahead' needs next_gates: layer l+1's router weight for each of the "
            f"first {num_layers - 1} of {num_layers} layers, got {got}"
        )


def plan_memory(
    layers: Sequence[FusedMoE], config: ExpertOffloadConfig | None = None,
    device: torch.device | str | None = None,
) -> MemoryPlan:
    """The device memory `offload_experts(layers, config, device=device)` allocates, by part
    (nothing is allocated). Layers share one shape, as the residency plan assumes."""
    config, _ = resolve_config(layers, config or ExpertOffloadConfig(), device)
    specs = [_expert_specs(m) for m in layers]
    memory = MemoryPlan(target_device(device))
    num_layers, num_experts = len(layers), layers[0].num_experts
    alignment = store_alignment(config, num_layers, num_experts, specs[0])
    memory.add(EXPERT_STORES, sum(
        ManagedExpertStore.planned_nbytes(m.num_experts, spec, alignment)
        for m, spec in zip(layers, specs, strict=True)
    ))
    if config.num_slots:
        (w13_shape, dtype), (w2_shape, _) = specs[0]["w13"], specs[0]["w2"]
        memory.add(SLOT_CACHES, slot_cache_nbytes(
            num_layers, num_experts, config.num_slots, w13_shape, w2_shape, dtype,
            with_counts=bool(config.profile_path), eviction=config.slot_eviction,
        ))
    memory.add(ROUTING_COUNTERS, routing_counters_nbytes(num_layers, num_experts))
    if scales := sum(m.expert_scale_nbytes() for m in layers):
        memory.add(EXPERT_SCALES, scales)  # FP8 scales: moved to the device, never offloaded
    return memory


_STATE = ("w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale", "record_routing",
          "slot_cache", "layer_index", "cpu_share")
"""What offload_experts changes on a layer (the original parameters keep their weight_loader)."""


def _attach(
    layers: list[FusedMoE], stores: list[ManagedExpertStore], manager: ExpertOffloadManager,
    device: torch.device,
) -> None:
    """Each layer's weights become views over its store (copied in unless the layer is on the
    meta device, whose weights arrive later through `weight_loader`), its routing feeds the
    manager; FP8 scales move to the compute device (they are never offloaded)."""
    for index, (module, store) in enumerate(zip(layers, stores, strict=True)):
        if module.is_fp8:
            for name in ("w13_weight_scale", "w2_weight_scale"):
                scale = getattr(module, name)
                moved = torch.empty(scale.shape, dtype=scale.dtype, device=device)
                if scale.device.type != "meta":
                    moved.copy_(scale.data)
                setattr(module, name, nn.Parameter(moved, requires_grad=False))
        if module.w13_weight.device.type != "meta":
            store["w13"].copy_(module.w13_weight.data)
            store["w2"].copy_(module.w2_weight.data)
        module.w13_weight = nn.Parameter(store["w13"], requires_grad=False)
        module.w2_weight = nn.Parameter(store["w2"], requires_grad=False)
        module._attach_loaders()
        module.record_routing = partial(manager.record, index)


def _build(
    layers: list[FusedMoE], specs: list[ExpertSpecs], config: ExpertOffloadConfig,
    plan: ResidencyPlan, profile: Profile | None, device: torch.device,
    next_gates: Sequence[torch.Tensor] | None,
) -> ExpertOffloadManager:
    """Stores, manager, slot cache and wiring, all or nothing: if a step raises, every layer
    gets its original state back and what was allocated is freed before the error goes on."""
    saved = [{name: getattr(m, name) for name in _STATE} for m in layers]
    stores: list[ManagedExpertStore] = []
    manager = None
    alignment = store_alignment(config, len(layers), layers[0].num_experts, specs[0])
    try:
        for m, spec in zip(layers, specs, strict=True):
            stores.append(ManagedExpertStore(
                m.num_experts, spec, device, alignment=alignment,
                allow_oversubscription=config.allow_oversubscription,
            ))
        # Advice before the weights are written: pages then land where their advice says, so
        # offloaded experts never pass through GPU memory on the way in.
        manager = ExpertOffloadManager(
            stores, config, top_k=layers[0].top_k, profile=profile, plan=plan
        )
        weights_later = any(m.w13_weight.device.type == "meta" for m in layers)
        _attach(layers, stores, manager, device)
        cache = manager.enable_slot_cache(next_gates)
        # Layers built on meta get their weights after this (weight_loader): the hybrid's
        # calibrations must read the pages decode will read, so only its checks run now.
        manager.hybrid = attach_cpu_shares(manager, layers, config, has_slots=cache is not None,
                                           defer=weights_later)
        if manager.hybrid[1] == PENDING:
            manager.pending_hybrid = partial(attach_cpu_shares, manager, layers, config,
                                             has_slots=cache is not None)
    except BaseException:
        # The manager does not own the layers yet, so closing it frees its stores and slot
        # caches without touching them.
        for module, state in zip(layers, saved, strict=True):
            for name, value in state.items():
                setattr(module, name, value)
        if manager is not None:
            manager.close()
        for store in stores:
            store.free()
        raise
    manager.layers = layers
    for index, module in enumerate(layers):
        module.slot_cache, module.layer_index = cache, index
    return manager


def finish_hybrid(manager: ExpertOffloadManager) -> tuple[bool, str]:
    """Measure and attach the CPU/GPU hybrid of a manager whose layers were built on the meta
    device, once their weights are written (offload_experts leaves it pending for them:
    calibrating on empty stores would time pages decode never reads); returns and sets
    `manager.hybrid`. A no-op returning `manager.hybrid` when nothing is pending. The
    Hugging Face loader (`moe_uvm.generate.load_model`, `attach_experts`) calls it."""
    pending, manager.pending_hybrid = manager.pending_hybrid, None
    if pending is not None:
        manager.hybrid = pending()
    return manager.hybrid


def offload_experts(
    module_or_modules: nn.Module | Iterable[nn.Module],
    config: ExpertOffloadConfig | None = None,
    *,
    device: torch.device | str | None = None,
    next_gates: Sequence[torch.Tensor] | None = None,
) -> ExpertOffloadManager:
    """Move the experts of FusedMoE layers into managed memory and apply the config's residency.

    Each layer's `w13_weight`/`w2_weight` become views over a ManagedExpertStore; forward is
    unchanged and feeds each layer's `topk_ids` to the manager's recording hook. Everything is
    validated, and the device memory of every part (`plan_memory`: stores, slot caches, routing
    counters) checked against the GPU's free memory and reserved, before anything is allocated
    (unless the config opts in to oversubscription). All or nothing: on an error the layers are
    left as they were. Without CUDA the stores are CPU memory. Layers built on the meta device
    get empty stores, filled afterwards through `weight_loader` (streaming checkpoint loads).
    With `prefetch_slots` in the config each layer also gets a GPU slot cache (moe_uvm.slots);
    `next_gates[l]`, layer l+1's router weight, enables lookahead. A budget with nothing the
    split decides set goes through the planner first (`resolve_config`): `manager.config` is
    then the config it filled in and `manager.split` its `moe_uvm.autosplit.Split` (else None).
    `manager.hybrid` is (on, why) of the CPU/GPU hybrid (`config.cpu_experts`); for layers
    built on meta it stays pending (`hybrid.PENDING`) until `finish_hybrid(manager)` once the
    weights are written.
    """
    layers = find_moe_layers(module_or_modules)
    device = target_device(device)
    config, split = resolve_config(layers, config or ExpertOffloadConfig(), device)
    specs = [_expert_specs(m) for m in layers]
    plan, profile = _plan(layers, specs, config)
    _check_prefetch(config, profile, next_gates, len(layers))
    memory = plan_memory(layers, config, device)
    with memory.reserve(allow_oversubscription=config.allow_oversubscription):
        manager = _build(layers, specs, config, plan, profile, device, next_gates)
    manager.split = split
    return manager
