"""FusedMoE, the MoE layer users put in their models (vLLM/sglang parameter convention), and
`offload_experts`, which moves the experts of such layers into managed memory."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import nn

from moe_uvm import uvm
from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.kernels import fused_moe
from moe_uvm.manager import ExpertOffloadManager
from moe_uvm.profile import load_profile

if TYPE_CHECKING:
    from moe_uvm.slots import SlotCache
from moe_uvm.store import ManagedExpertStore

SHARDS = ("w1", "w3", "w2")


class FusedMoE(nn.Module):
    """Routed experts of one MoE layer: softmax/top-k routing and the fused Triton kernel.

    Parameters follow the vLLM/sglang convention: `w13_weight` [E, 2I, H] (gate rows 0..I-1,
    up rows I..2I-1) and `w2_weight` [E, H, I]; both carry a `weight_loader` attribute.
    `forward(hidden_states, router_logits)` routes and runs the experts; `experts(...)` runs
    them for routing computed elsewhere (grouped or biased routers).
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        renormalize: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_experts", num_experts),
            ("top_k", top_k),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) cannot exceed num_experts ({num_experts})")
        self.num_experts, self.top_k = num_experts, top_k
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.renormalize = renormalize
        E, H, I = num_experts, hidden_size, intermediate_size
        kw = dict(dtype=dtype or torch.get_default_dtype(), device=device)
        self.w13_weight = nn.Parameter(torch.empty(E, 2 * I, H, **kw), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(E, H, I, **kw), requires_grad=False)
        self._attach_loaders()
        self.record_routing: Callable[[torch.Tensor], None] | None = None
        self.slot_cache: SlotCache | None = None  # set by offload_experts with prefetch_slots
        self.layer_index = 0

    def _attach_loaders(self) -> None:
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, expert_id: int, shard: str
    ) -> None:
        """Copy one expert's checkpoint tensor into its place: w1 [I, H] and w3 [I, H] into
        `w13_weight`, w2 [H, I] into `w2_weight`."""
        if shard not in SHARDS:
            raise ValueError(f"shard must be one of {SHARDS}, got {shard!r}")
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"expert_id {expert_id} out of range [0, {self.num_experts})")
        I = self.intermediate_size
        if shard == "w2":
            if param is not self.w2_weight:
                raise ValueError("shard 'w2' loads into w2_weight")
            dst = param.data[expert_id]
        else:
            if param is not self.w13_weight:
                raise ValueError(f"shard {shard!r} loads into w13_weight")
            rows = slice(0, I) if shard == "w1" else slice(I, 2 * I)
            dst = param.data[expert_id, rows]
        if tuple(loaded_weight.shape) != tuple(dst.shape):
            raise ValueError(
                f"expert {expert_id} shard {shard}: expected shape {tuple(dst.shape)}, "
                f"got {tuple(loaded_weight.shape)}"
            )
        dst.copy_(loaded_weight)

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax over experts in fp32, top-k, optional renormalisation of the k weights."""
        probs = torch.softmax(router_logits.float(), dim=-1)
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return topk_weights, topk_ids.to(torch.int32)

    def experts(
        self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """The routed experts' weighted sum for routing decided by the caller."""
        if self.record_routing is not None:
            self.record_routing(topk_ids)
        weights = topk_weights.float()
        if self.slot_cache is None:
            return fused_moe(hidden_states, self.w13_weight, self.w2_weight, weights, topk_ids)
        slots = self.slot_cache.before_layer(self.layer_index, topk_ids, hidden_states)
        out = fused_moe(hidden_states, self.w13_weight, self.w2_weight, weights, topk_ids, **slots)
        self.slot_cache.after_layer(self.layer_index, slots["fill_slot"])
        return out



    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.route(router_logits)
        return self.experts(hidden_states, topk_weights, topk_ids)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}, renormalize={self.renormalize}"
        )


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
    shapes = {
        (m.num_experts, m.hidden_size, m.intermediate_size, m.w13_weight.dtype) for m in layers
    }
    if len({s[0] for s in shapes}) != 1:
        raise ValueError(f"all layers must have the same number of experts, got {shapes}")
    top_k = layers[0].top_k
    profile = None
    if config.profile_path:  # refuse a mismatching profile before allocating
        profile = load_profile(config.profile_path)
        profile.check_matches(len(layers), layers[0].num_experts, top_k)
    if device is None:
        device = "cuda" if uvm.available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    specs = [
        {
            "w13": ((2 * m.intermediate_size, m.hidden_size), m.w13_weight.dtype),
            "w2": ((m.hidden_size, m.intermediate_size), m.w2_weight.dtype),
        }
        for m in layers
    ]
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
    manager = ExpertOffloadManager(stores, config, top_k=top_k, profile=profile)
    for index, (module, store) in enumerate(zip(layers, stores, strict=True)):
        if module.w13_weight.device.type != "meta":  # meta: weights arrive via weight_loader
            store["w13"].copy_(module.w13_weight.data)
            store["w2"].copy_(module.w2_weight.data)
        module.w13_weight = nn.Parameter(store["w13"], requires_grad=False)
        module.w2_weight = nn.Parameter(store["w2"], requires_grad=False)
        module._attach_loaders()
        module.record_routing = partial(manager.record, index)
    manager.layers = layers
    cache = manager.enable_slot_cache(next_gates)
    for index, module in enumerate(layers):
        module.slot_cache, module.layer_index = cache, index
    return manager
