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

`ExpertParallel` is the same split for a whole model: which rank owns which expert of every
layer, and this rank's slice of a routing profile. The Hugging Face integration takes one
(`load_offloaded(..., expert_parallel=...)`, `offload_model_experts`): each block's experts
become a FusedExperts over this rank's experts, summed over the ranks the same way, and
`moe-uvm generate --nproc N` runs a checkpoint so (`run_ranks`).

`TokenExchange` is the other way to lay out a step: the tokens sharded over the ranks as well
(data-parallel non-expert layers, each rank its own rows and routing), with each rank's pairs
brought to the experts' ranks and their sums back either by an all-gather of the rows and one
reduce-scatter, or by all-to-all (each pair to its expert's rank and back). `moe-uvm bench
--nproc N` times both beside the replicated all-reduce (rows `ep-ag` and `ep-a2a`); the model
integrations use the replicated layout, whose decode batches (1-16 tokens) make the non-expert
layers' replication cheap and need one collective a layer.

Not yet: a measurement on two GPUs (the 2-GPU machine was not lent)."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.layer import FusedMoE
from moe_uvm.policies.placement import place_experts
from moe_uvm.profile import Profile, load_profile


def _require_group(what: str, group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_initialized():
        raise RuntimeError(f"{what} needs torch.distributed initialised (torchrun, "
                           "dist.init_process_group, or moe-uvm generate --nproc)")
    return dist.get_rank(group), dist.get_world_size(group)


@dataclass(frozen=True)
class ExpertParallel:
    """Expert parallelism over a whole model: `owner[l, e]` is the rank holding expert e of MoE
    layer l, every rank holding the same number of experts in every layer (each rank's stores,
    budget and residency are then alike). Build it with `place` on every rank alike (same
    counts give the same placement)."""

    owner: np.ndarray
    group: dist.ProcessGroup | None = None
    rank: int = field(init=False)
    world_size: int = field(init=False)

    def __post_init__(self) -> None:
        rank, world = _require_group("ExpertParallel", self.group)
        owner = np.asarray(self.owner)
        if owner.ndim != 2 or not np.issubdtype(owner.dtype, np.integer):
            raise ValueError(f"owner must be an integer array [layers, experts]; got "
                             f"{owner.dtype} of shape {owner.shape}")
        if owner.min() < 0 or owner.max() >= world:
            raise ValueError(f"owner values must be ranks in [0, {world}); got "
                             f"{owner.min()}..{owner.max()}")
        held = np.stack([np.bincount(row, minlength=world) for row in owner])
        if (held == 0).any():
            layer, idle = (int(i) for i in np.argwhere(held == 0)[0])
            raise ValueError(f"rank {idle} owns no expert of layer {layer}: every rank needs at "
                             "least one in every layer")
        if (held != held[0]).any():
            raise ValueError("every rank must own the same number of experts in every layer; "
                             f"got per-layer shares {held.tolist()}")
        object.__setattr__(self, "owner", owner.astype(np.int64))
        object.__setattr__(self, "rank", rank)
        object.__setattr__(self, "world_size", world)

    @classmethod
    def place(cls, num_layers: int, num_experts: int, profile: Profile | str | None = None,
              group: dist.ProcessGroup | None = None) -> ExpertParallel:
        """Placement over the group's ranks balancing a profile's routing counts (a Profile or
        its path), round-robin without one."""
        _, world = _require_group("ExpertParallel.place", group)
        if isinstance(profile, (str, os.PathLike)):
            profile = load_profile(profile)
        if profile is not None:
            if (profile.num_layers, profile.num_experts) != (num_layers, num_experts):
                raise ValueError(f"profile is for {profile.num_layers} MoE layers x "
                                 f"{profile.num_experts} experts; the model has {num_layers} x "
                                 f"{num_experts}")
            return cls(place_experts(num_experts, world, profile.counts), group)
        return cls(place_experts(num_experts, world, num_layers=num_layers), group)

    @property
    def num_layers(self) -> int:
        return self.owner.shape[0]

    @property
    def num_experts(self) -> int:
        return self.owner.shape[1]

    def owned(self, layer: int) -> np.ndarray:
        """The experts of MoE layer `layer` this rank holds, ascending."""
        return np.flatnonzero(self.owner[layer] == self.rank)

    def local_profile(self, profile: Profile) -> Profile:
        """This rank's slice of a whole-model profile: layer l's counts of the experts it owns
        (co-occurrence between its experts of layers l and l+1), in local expert order."""
        profile.check_matches(self.num_layers, self.num_experts, profile.top_k)
        owned = [self.owned(layer) for layer in range(self.num_layers)]
        counts = np.stack([profile.counts[layer, ids] for layer, ids in enumerate(owned)])
        co = None
        if profile.cooccurrence is not None:
            co = np.stack([profile.cooccurrence[layer][np.ix_(owned[layer], owned[layer + 1])]
                           for layer in range(self.num_layers - 1)])
        return Profile(self.num_layers, counts.shape[1], min(profile.top_k, counts.shape[1]),
                       profile.num_tokens, counts, co, profile.model_id)

    def local_config(self, config: ExpertOffloadConfig) -> ExpertOffloadConfig:
        """`config` for this rank's experts: the same budget (each GPU its own), its profile
        sliced to this rank's experts and written to a temporary file (removed when the
        process exits)."""
        if not config.profile_path:
            return config
        local = self.local_profile(load_profile(config.profile_path))
        folder = tempfile.mkdtemp(prefix=f"moe-uvm-rank{self.rank}-")
        atexit.register(shutil.rmtree, folder, True)  # read at load; gone with the process
        path = os.path.join(folder, "profile.json")
        local.save(path)
        return replace(config, profile_path=path)

    def shard(self, layer: int, device: torch.device | str) -> ExpertShard:
        """What a FusedExperts of MoE layer `layer` needs to run this rank's experts."""
        return ExpertShard(torch.as_tensor(self.owned(layer)), self.num_experts, self.group,
                           device)


class ExpertShard:
    """One MoE layer's experts held by this rank: `owned` global ids (ascending) and the map
    from global ids to local ones (-1: another rank's) on `device`."""

    def __init__(self, owned: torch.Tensor, num_experts: int,
                 group: dist.ProcessGroup | None, device: torch.device | str) -> None:
        self.owned, self.num_experts, self.group = owned.long(), num_experts, group
        to_local = torch.full((num_experts,), -1, dtype=torch.int32)
        to_local[self.owned] = torch.arange(len(self.owned), dtype=torch.int32)
        self.to_local = to_local.to(device)
        self.local_of = {int(e): i for i, e in enumerate(self.owned.tolist())}

    def local_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Global ids [T, k] to this rank's (-1 for padding and for other ranks' experts);
        device ops only (CUDA-graph safe)."""
        ids = topk_ids.long()
        routed = (ids >= 0) & (ids < self.num_experts)
        return torch.where(routed, self.to_local[ids.clamp(0, self.num_experts - 1)], -1)

    def reduce(self, part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """This rank's part of each token's weighted sum, added over the ranks in fp32."""
        part = part.float()
        dist.all_reduce(part, group=self.group)
        return part.to(dtype)


EXCHANGES = ("all-gather", "all-to-all")


def reduce_scatter_rows(out: torch.Tensor, full: torch.Tensor, group=None) -> None:
    """dist.reduce_scatter_single (torch >= 2.13; reduce_scatter_tensor before)."""
    single = getattr(dist, "reduce_scatter_single", None)
    (single or dist.reduce_scatter_tensor)(out, full, group=group)


def all_gather_rows(out: torch.Tensor, part: torch.Tensor, group=None) -> None:
    """dist.all_gather_single (torch >= 2.13; all_gather_into_tensor before)."""
    single = getattr(dist, "all_gather_single", None)
    (single or dist.all_gather_into_tensor)(out, part, group=group)


class TokenExchange:
    """One MoE layer's step with the tokens sharded over the ranks too: rank r holds `tokens`
    rows of the batch (its slice) and their routing [tokens, top_k] in global expert ids, and
    gets back, in fp32, the weighted sum of every rank's experts for its rows. `owner` [E]: the
    rank of each expert (a row of ExpertParallel.owner); `kernel(rows, weights, local_ids)`:
    this rank's experts over `rows` (fused_moe over its local weights; ids < 0 are padding).
    Shapes are fixed (no host sync), so a step captures in a CUDA graph with NCCL.

    `mode`:
      all-gather   every rank's rows and routing gathered, this rank's experts' part computed
                   for the whole batch, one fp32 reduce-scatter hands each rank its rows' sum
                   over the ranks (with two ranks the same additions as the replicated
                   all-reduce). Moves the batch's rows twice a layer, plus the routing.
      all-to-all   each (token, expert) pair's row sent to its expert's rank, computed there as
                   a one-expert pair, its weighted output sent back in the activations' dtype,
                   and each token's top_k outputs added in fp32 in routing order. Moves top_k
                   rows per token each way; every rank pair gets a fixed capacity of tokens x
                   top_k rows (the worst case), padding included. Rounding differs from the
                   other layouts by the rounding of each pair's output (one bf16 rounding per
                   pair with bf16 activations)."""

    def __init__(self, owner: Sequence[int] | np.ndarray | torch.Tensor, tokens: int,
                 top_k: int, hidden: int, *, mode: str, dtype: torch.dtype,
                 device: torch.device | str, group: dist.ProcessGroup | None = None) -> None:
        if mode not in EXCHANGES:
            raise ValueError(f"mode must be one of {EXCHANGES}; got {mode!r}")
        rank, world = _require_group("TokenExchange", group)
        owner = torch.as_tensor(np.asarray(owner), dtype=torch.int64).cpu()
        if owner.dim() != 1 or owner.numel() == 0 or owner.min() < 0 or owner.max() >= world:
            raise ValueError(f"owner must be [experts] ranks in [0, {world}); got shape "
                             f"{tuple(owner.shape)}")
        if tokens < 1 or top_k < 1:
            raise ValueError(f"tokens and top_k must be >= 1; got {tokens}, {top_k}")
        local = torch.empty_like(owner)
        for r in range(world):  # each expert's index among its owner's experts (ascending ids)
            mine = owner == r
            local[mine] = torch.arange(int(mine.sum()))
        self.mode, self.group, self.rank, self.world = mode, group, rank, world
        self.tokens, self.top_k, self.hidden, self.dtype = tokens, top_k, hidden, dtype
        self.num_experts = owner.numel()
        self.owner = owner.to(device)
        self.local_index = local.to(device)
        self.ranks = torch.arange(world, device=device)
        self.capacity = tokens * top_k
        self.token_of_pair = torch.arange(tokens * top_k, device=device) // top_k

    def _local(self, ids: torch.Tensor, on: torch.Tensor | int) -> tuple[torch.Tensor, ...]:
        """(owner rank, index on that rank, routed) of global ids; padding ids stay -1."""
        ids = ids.long()
        routed = (ids >= 0) & (ids < self.num_experts)
        e = ids.clamp(0, self.num_experts - 1)
        owner = torch.where(routed, self.owner[e], on)
        return owner, torch.where(routed, self.local_index[e], -1), routed

    def __call__(self, rows: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 kernel: Callable) -> torch.Tensor:
        if rows.shape != (self.tokens, self.hidden) or topk_ids.shape != (self.tokens,
                                                                          self.top_k):
            raise ValueError(f"rows [{self.tokens}, {self.hidden}] and ids [{self.tokens}, "
                             f"{self.top_k}] expected; got {tuple(rows.shape)}, "
                             f"{tuple(topk_ids.shape)}")
        if self.mode == "all-gather":
            return self._all_gather(rows, topk_weights, topk_ids, kernel)
        return self._all_to_all(rows, topk_weights, topk_ids, kernel)

    def _all_gather(self, rows, topk_weights, topk_ids, kernel) -> torch.Tensor:
        T, k, N = self.tokens, self.top_k, self.world
        everyone = rows.new_empty(N * T, self.hidden)
        all_gather_rows(everyone, rows.contiguous(), self.group)
        # the routing in one message: ids as fp32 (exact below 2^24) beside the weights
        routing = torch.cat([topk_ids.float(), topk_weights.float()], dim=1)
        routings = routing.new_empty(N * T, 2 * k)
        all_gather_rows(routings, routing, self.group)
        owner, local, _ = self._local(routings[:, :k], -1)
        local = torch.where(owner == self.rank, local, -1).to(torch.int32)
        part = kernel(everyone, routings[:, k:].contiguous(), local).float()
        mine = part.new_empty(T, self.hidden)
        reduce_scatter_rows(mine, part, self.group)
        return mine

    def _all_to_all(self, rows, topk_weights, topk_ids, kernel) -> torch.Tensor:
        T, k, N, C = self.tokens, self.top_k, self.world, self.capacity
        owner, local, _ = self._local(topk_ids.reshape(-1), self.rank)  # padding: kept here
        # each pair's place in its destination's block: its rank among the pairs bound there
        bound = (owner[:, None] == self.ranks[None, :]).long()
        place = (bound.cumsum(0) - 1).gather(1, owner[:, None]).squeeze(1)
        slot = owner * C + place
        send = rows.new_zeros(N * C, self.hidden)
        send.index_copy_(0, slot, rows.index_select(0, self.token_of_pair))
        meta = torch.zeros(N * C, 2, dtype=torch.float32, device=rows.device)
        meta[:, 0] = -1.0
        meta.index_copy_(0, slot, torch.stack([local.float(),
                                               topk_weights.reshape(-1).float()], dim=1))
        got, got_meta = torch.empty_like(send), torch.empty_like(meta)
        dist.all_to_all_single(got, send, group=self.group)
        dist.all_to_all_single(got_meta, meta, group=self.group)
        out = kernel(got, got_meta[:, 1:].contiguous(), got_meta[:, :1].to(torch.int32))
        back = torch.empty_like(out)
        dist.all_to_all_single(back, out.contiguous(), group=self.group)
        return back.index_select(0, slot).view(T, k, self.hidden).float().sum(dim=1)


class ExpertParallelMoE(nn.Module):
    """FusedMoE's interface (`forward(hidden_states, router_logits)`, `route`, `experts`) over
    the experts `owner[e] == rank` of `layer`, summed over the ranks of `group`. `owner` [E]:
    each expert's rank, every rank owning at least one. The layer's weights are copied; drop
    the original layer afterwards (`shard_moe_layers` replaces it in its model)."""

    def __init__(self, layer: FusedMoE, owner: Sequence[int] | torch.Tensor, *,
                 group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        rank, world = _require_group("ExpertParallelMoE", group)
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
        self.shard = ExpertShard(self.owned, E, group, device)

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
        part = self.local.experts(hidden_states, topk_weights, self.shard.local_ids(topk_ids))
        return self.shard.reduce(part, hidden_states.dtype)

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


def world_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not under torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, init_method: str, cuda: bool, fn: Callable,
               args: tuple) -> None:
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if init_method == "env://":
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    else:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank,
                                world_size=world, device_id=device if cuda else None)
    try:
        fn(dist.get_rank(), world, device, *args)
        dist.barrier()  # no rank tears down while another may still be communicating
    finally:
        dist.destroy_process_group()
    if init_method != "env://":
        exit_spawned_rank()


def exit_spawned_rank() -> None:
    """End a spawned rank's process now that its work is done and its group destroyed: the
    atexit handlers run (this module's temporary folders go), output is flushed, then
    os._exit(0) skips the rest of the interpreter's teardown, in which a rank of the CPU tests
    (gloo) was seen to abort ("terminate called without an active exception", a C++ thread of a
    static object) after finishing, failing the launch."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def run_ranks(fn: Callable, nproc: int, *args, cuda: bool) -> None:
    """`fn(rank, world_size, device, *args)` once per rank, each with the process group
    initialised (NCCL with one GPU per rank when `cuda`, else gloo on the CPU): under torchrun
    (WORLD_SIZE set) in this process as its rank (device LOCAL_RANK); otherwise in `nproc` new
    processes (torch.multiprocessing spawn, rendezvous on a free local port). `fn` must be a
    module-level function and `args` picklable. An error in a rank raises here."""
    if world_from_env() > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        _rank_main(local, world_from_env(), "env://", cuda, fn, args)
        return
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if cuda and nproc > torch.cuda.device_count():
        raise ValueError(f"{nproc} processes need {nproc} GPUs; {torch.cuda.device_count()} "
                         "are visible")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    init = f"tcp://127.0.0.1:{_free_port()}"
    mp.spawn(_rank_main, args=(nproc, init, cuda, fn, args), nprocs=nproc, join=True)
