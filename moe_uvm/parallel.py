"""Expert parallelism over torch.distributed (issue 19, first part): one process per GPU, each
rank holding a share of every MoE layer's experts.

`ExpertParallelMoE` wraps one FusedMoE: this rank keeps the experts it owns
(`moe_uvm.policies.placement.place_experts` balances a profile's routing counts over the
ranks) in a local FusedMoE, which `offload_experts` then puts in this rank's own managed store
under this rank's own budget, residency and slot cache, as for one GPU. Routing is replicated:
every rank runs the same tokens through the non-expert layers (decode with replicated
non-expert weights), computes its experts' part of each token's weighted sum (pairs routed to
other ranks are padding to its kernel), and one all-reduce in fp32 adds the parts on every
rank. With two ranks that sum is a single fp32 addition, the same on both ranks and from run to
run; against one process it differs by rounding (the per-token sum is split in two), so
outputs match one process within the activations' rounding, not bitwise.

Not yet: the all-to-all variant for larger batches, the Hugging Face integration and
`moe-uvm generate` / `bench --nproc`, and a measurement on two GPUs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from moe_uvm.layer import FusedMoE


class ExpertParallelMoE(nn.Module):
    """FusedMoE's interface (`forward(hidden_states, router_logits)`, `route`, `experts`) over
    the experts `owner[e] == rank` of `layer`, summed over the ranks of `group`. `owner` [E]:
    each expert's rank, every rank owning at least one. The layer's weights are copied; drop
    the original layer afterwards (`shard_moe_layers` replaces it in its model)."""

    def __init__(self, layer: FusedMoE, owner: Sequence[int] | torch.Tensor, *,
                 group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs torch.distributed initialised "
                               "(torchrun, or dist.init_process_group)")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        owner = torch.as_tensor(owner, dtype=torch.int64).cpu()
        E = layer.num_experts
        if owner.shape != (E,) or owner.min() < 0 or owner.max() >= world:
            raise ValueError(f"owner must be [{E}] ranks in [0, {world}); got shape "
                             f"{tuple(owner.shape)}, values {owner.min().item()}.."
                             f"{owner.max().item()}")
        missing = sorted(set(range(world)) - set(owner.tolist()))
        if missing:
            raise ValueError(f"ranks {missing} own no expert: every rank needs at least one")
        self.group, self.rank, self.world_size = group, rank, world
        self.num_experts, self.top_k = E, layer.top_k
        self.hidden_size, self.intermediate_size = layer.hidden_size, layer.intermediate_size
        self.renormalize, self.dtype = layer.renormalize, layer.dtype
        self.owned = (owner == rank).nonzero().flatten()
        device = layer.w13_weight.device
        local = FusedMoE(len(self.owned), min(layer.top_k, len(self.owned)), layer.hidden_size,
                         layer.intermediate_size, renormalize=layer.renormalize,
                         dtype=layer.dtype, device=device, weight_dtype=layer.w13_weight.dtype,
                         block_shape=layer.block_shape, check_ids=layer.check_ids)
        index = self.owned.to(device)
        with torch.no_grad():
            local.w13_weight.copy_(layer.w13_weight.index_select(0, index))
            local.w2_weight.copy_(layer.w2_weight.index_select(0, index))
            if layer.is_fp8:
                local.w13_weight_scale.copy_(layer.w13_weight_scale.index_select(0, index))
                local.w2_weight_scale.copy_(layer.w2_weight_scale.index_select(0, index))
        self.local = local
        to_local = torch.full((E,), -1, dtype=torch.int32)
        to_local[self.owned] = torch.arange(len(self.owned), dtype=torch.int32)
        self.register_buffer("to_local", to_local.to(device), persistent=False)

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unsharded layer's routing (softmax, top-k over all experts, renormalisation)."""
        probs = torch.softmax(router_logits.float(), dim=-1)
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return topk_weights, topk_ids.to(torch.int32)

    def experts(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        """This rank's experts' part of the weighted sum, all-reduced over the group (fp32)."""
        ids = topk_ids.long()
        routed = (ids >= 0) & (ids < self.num_experts)
        local_ids = torch.where(routed, self.to_local[ids.clamp(0, self.num_experts - 1)], -1)
        part = self.local.experts(hidden_states, topk_weights, local_ids).float()
        dist.all_reduce(part, group=self.group)
        return part.to(hidden_states.dtype)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.route(router_logits)
        return self.experts(hidden_states, topk_weights, topk_ids)

    def extra_repr(self) -> str:
        return (f"rank {self.rank} of {self.world_size}: {len(self.owned)} of "
                f"{self.num_experts} experts")


def shard_moe_layers(model: nn.Module, owner, *, group: dist.ProcessGroup | None = None
                     ) -> list[ExpertParallelMoE]:
    """Replace every FusedMoE in `model` (in order) by an ExpertParallelMoE holding this rank's
    experts; owner [layers, E] from `place_experts`. Returns the wrappers; `offload_experts`
    on the model then finds their local FusedMoE layers."""
    parents = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, FusedMoE)]
    owner = torch.as_tensor(owner)
    if owner.dim() != 2 or owner.shape[0] != len(parents):
        raise ValueError(f"owner must be [layers={len(parents)}, experts]; got shape "
                         f"{tuple(owner.shape)}")
    wrappers = []
    for (parent, name, layer), row in zip(parents, owner, strict=True):
        wrapper = ExpertParallelMoE(layer, row, group=group)
        setattr(parent, name, wrapper)
        wrappers.append(wrapper)
    return wrappers
