"""The transformers MoE blocks moe-uvm runs, and `FusedExperts`, the module that takes the place of
a block's routed experts. The block keeps its own router and shared experts, so each family's
routing (softmax or sigmoid, grouped, biased, renormalised, scaled) is unchanged by construction;
only the routed-expert GEMMs move to FusedMoE, with weights in managed memory."""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, replace

import torch
from torch import nn

from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.kernels.fp8 import FP8_DTYPE, quantize
from moe_uvm.layer import FusedMoE
from moe_uvm.manager import ExpertOffloadManager
from moe_uvm.memory import MemoryPlan
from moe_uvm.offload import finish_hybrid, offload_experts, plan_memory
from moe_uvm.parallel import ExpertParallel, ExpertShard

# Quantise-at-load (ExpertOffloadConfig.quantize_experts="fp8"): the FP8 checkpoints' layout.
QUANTIZE_BLOCK = (128, 128)


@dataclass(frozen=True)
class ExpertFormat:
    """How FusedExperts hold a model's routed experts: in the model's dtype (the default), or
    as e4m3 with fp32 scales per `block_shape` block, either read from an FP8 checkpoint
    (`weight_scale_inv` beside each weight) or quantised as 16/32-bit tensors load
    (`quantize_loads`)."""

    fp8: bool = False
    block_shape: tuple[int, int] | None = None
    quantize_loads: bool = False

    @classmethod
    def choose(cls, config: ExpertOffloadConfig | None,
               checkpoint_block: tuple[int, int] | None = None,
               quantize_loads: bool = False) -> ExpertFormat:
        """An FP8 checkpoint's own layout (`checkpoint_block`; `quantize_loads` when its
        tensors come from elsewhere, e.g. random weights), else what the config asks for."""
        if checkpoint_block is not None:
            return cls(True, checkpoint_block, quantize_loads)
        if config is not None and config.quantize_experts == "fp8":
            return cls(True, QUANTIZE_BLOCK, True)
        return cls()

    def layer_args(self) -> dict:
        """FusedMoE's keyword arguments for this format."""
        if not self.fp8:
            return {}
        return dict(weight_dtype=FP8_DTYPE, block_shape=self.block_shape,
                    quantize_loads=self.quantize_loads)


@dataclass(frozen=True)
class MoeFamily:
    """A transformers model family whose sparse-MoE block moe-uvm supports.

    block / experts: class names of the MoE block and of the routed-experts module it holds as
    `block.experts` (transformers 5 fused layout: `gate_up_proj` [E, 2I, H] with gate rows
    first, `down_proj` [E, H, I], SiLU-gated). checkpoint_renames: substrings of checkpoint
    names that transformers renames at load time (legacy module names), as (saved, module).
    """

    model_type: str
    block: str
    experts: str
    checkpoint_renames: tuple[tuple[str, str], ...] = ()


# Routing each family keeps (its router module stays in the block):
#   mixtral      softmax, top-k, renormalised
#   qwen2_moe    softmax, top-k, optional renormalisation; sigmoid-gated shared expert
#   qwen3_moe    softmax, top-k, optional renormalisation
#   olmoe        softmax, top-k, optional renormalisation
#   deepseek_v2  softmax, greedy or group-limited top-k, scaled; shared experts
#   deepseek_v3  sigmoid + correction bias, grouped top-k, renormalised, scaled; shared experts
FAMILIES = (
    MoeFamily(
        "mixtral", "MixtralSparseMoeBlock", "MixtralExperts", ((".block_sparse_moe.", ".mlp."),)
    ),
    MoeFamily("qwen2_moe", "Qwen2MoeSparseMoeBlock", "Qwen2MoeExperts"),
    MoeFamily("qwen3_moe", "Qwen3MoeSparseMoeBlock", "Qwen3MoeExperts"),
    MoeFamily("olmoe", "OlmoeSparseMoeBlock", "OlmoeExperts"),
    MoeFamily("deepseek_v2", "DeepseekV2Moe", "DeepseekV2Experts"),
    MoeFamily("deepseek_v3", "DeepseekV3MoE", "DeepseekV3Experts"),
)


def supported_families() -> str:
    return ", ".join(f.model_type for f in FAMILIES)


def family_of(model_type: str) -> MoeFamily:
    """The family of a transformers `config.model_type`; other types are refused."""
    for family in FAMILIES:
        if family.model_type == model_type:
            return family
    raise ValueError(
        f"model type {model_type!r} has no MoE block moe-uvm supports; supported families: "
        f"{supported_families()}"
    )


_LIVE: weakref.WeakValueDictionary[int, FusedExperts] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


# What torch.compile sees of a FusedExperts: one opaque op (its slot cache, routing counts and
# hooks are Python state the compiler must neither trace nor reorder; its output is fresh).
@torch.library.custom_op("moe_uvm::hf_experts", mutates_args=())
def _experts_op(hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, handle: int) -> torch.Tensor:
    return _LIVE[handle]._run(hidden_states, top_k_index, top_k_weights)


@_experts_op.register_fake
def _(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
      handle: int) -> torch.Tensor:
    return torch.empty_like(hidden_states)


class FusedExperts(nn.Module):
    """Takes the place of a transformers routed-experts module: same call,
    `forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`, computed
    by `self.moe` (a FusedMoE whose weights live in the offload manager's stores).

    With a `shard` (expert parallelism, moe_uvm.parallel) `self.moe` holds only this rank's
    experts of the layer's `num_experts`: the ids are mapped to local ones (other ranks' are
    padding), and the ranks' parts are added by one fp32 all-reduce."""

    def __init__(
        self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
        dtype: torch.dtype, fmt: ExpertFormat | None = None, shard: ExpertShard | None = None,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.shard = num_experts, top_k, shard
        local = num_experts if shard is None else len(shard.owned)
        # Built on meta: offload_experts gives it store-backed weights before anything is written.
        # Routing is the block's own, so FusedMoE.route (and its renormalize flag) is never used.
        self.moe = FusedMoE(
            local, min(top_k, local), hidden_size, intermediate_size, renormalize=False,
            dtype=dtype, device="meta", **(fmt or ExpertFormat()).layer_args(),
        )
        self.routing_override = None  # TraceRouting's, for benchmarks: ids -> ids
        self._handle = next(_HANDLES)
        _LIVE[self._handle] = self

    @classmethod
    def replacing(cls, block: MoeBlock, fmt: ExpertFormat | None = None) -> FusedExperts:
        """An adapter of the shape and dtype of `block`'s experts (checked against the layout
        FusedMoE runs), held in `fmt` (default: the experts' own dtype)."""
        experts = block.module.experts
        where = f"{block.name}.experts ({type(experts).__name__})"
        act = getattr(getattr(experts, "config", None), "hidden_act", None)
        if act not in ("silu", "swish"):
            raise ValueError(f"{where}: activation {act!r}; FusedMoE runs SiLU-gated experts only")
        layout = {name: getattr(experts, name, default) for name, default in (
            ("has_gate", True), ("has_bias", False), ("is_transposed", False),
            ("is_concatenated", True),
        )}
        if layout != {"has_gate": True, "has_bias": False, "is_transposed": False,
                      "is_concatenated": True}:
            raise ValueError(
                f"{where}: expert layout {layout}; FusedMoE runs gated, bias-free experts with "
                "[gate; up] concatenated, not transposed"
            )
        gate_up, down = experts.gate_up_proj, experts.down_proj
        E, two_I, H = gate_up.shape
        if two_I % 2 or tuple(down.shape) != (E, H, two_I // 2):
            raise ValueError(
                f"{where}: gate_up_proj {tuple(gate_up.shape)} and down_proj "
                f"{tuple(down.shape)} are not [E, 2I, H] and [E, H, I]"
            )
        return cls(E, block.module.gate.top_k, H, two_I // 2, gate_up.dtype, fmt, block.shard)

    def load_fused(self, name: str, tensor: torch.Tensor) -> None:
        """Copy a transformers 3-D expert tensor (`gate_up_proj` [E, 2I, H] or `down_proj`
        [E, H, I], same row layout as w13/w2) into the store (this rank's experts of it under
        expert parallelism)."""
        param = {"gate_up_proj": self.moe.w13_weight, "down_proj": self.moe.w2_weight}[name]
        if self.shard is not None and tensor.shape[0] == self.num_experts:
            tensor = tensor.index_select(0, self.shard.owned.to(tensor.device))
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}"
            )
        if self.moe.quantize_loads and tensor.dtype != FP8_DTYPE:
            halves = 2 if name == "gate_up_proj" else 1
            q, scale = quantize(tensor, self.moe.block_shape, halves)
            param.data.copy_(q)
            scales = self.moe.w13_weight_scale if halves == 2 else self.moe.w2_weight_scale
            scales.data.copy_(scale)
            return
        param.data.copy_(tensor)

    def local_expert(self, expert: int) -> int | None:
        """Where global expert `expert` sits in `self.moe`; None when another rank holds it."""
        return expert if self.shard is None else self.shard.local_of.get(expert)

    def load_expert(self, tensor: torch.Tensor, expert: int, shard: str) -> None:
        """One expert's w1, w3 or w2 (`shard`) of a per-expert checkpoint; another rank's
        expert is skipped."""
        local = self.local_expert(expert)
        if local is not None:
            param = self.moe.w2_weight if shard == "w2" else self.moe.w13_weight
            self.moe.weight_loader(param, tensor, local, shard)

    def load_expert_scale(self, tensor: torch.Tensor, expert: int, shard: str) -> None:
        """One expert's FP8 block scales, as `load_expert`."""
        local = self.local_expert(expert)
        if local is not None:
            self.moe.scale_loader(tensor, local, shard)

    # Hot path (every MoE layer of every step): the fused kernel, nothing else.
    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced: one opaque op (moe_uvm::hf_experts)
            return _experts_op(hidden_states, top_k_index, top_k_weights, self._handle)
        return self._run(hidden_states, top_k_index, top_k_weights)

    def _run(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self.routing_override is not None:
            top_k_index = self.routing_override(top_k_index)
        if self.shard is None:
            return self.moe.experts(hidden_states, top_k_weights, top_k_index)
        part = self.moe.experts(hidden_states, top_k_weights, self.shard.local_ids(top_k_index))
        return self.shard.reduce(part, hidden_states.dtype)


class TraceRouting:
    """Replaces the routers' expert choices with a routing trace's, for benchmarks of random-
    weight models whose routers route almost uniformly: MoE layer l of a model takes its ids
    from trace layer l % L, token after token through the trace (wrapping around), each row of
    a batch at its own offset, all on the device (CUDA-graph safe). The router's weights stay,
    so outputs are meaningless: measure speed and expert reads with it, never quality."""

    STRIDE = 7919
    """Trace tokens between the rows of one forward (a prime, so rows spread over the trace)."""

    def __init__(self, trace, device: torch.device | str) -> None:
        self.num_experts, self.top_k = trace.num_experts, trace.top_k
        self.ids = torch.as_tensor(trace.topk_ids, dtype=torch.long).to(device)
        self.position = torch.zeros(self.ids.shape[0], dtype=torch.long, device=device)

    def attach(self, blocks: list[MoeBlock]) -> None:
        """Route every wrapped block of `blocks` from the trace (detach with `detach`)."""
        for index, block in enumerate(blocks):
            experts = block.module.experts
            if not isinstance(experts, FusedExperts):
                raise ValueError(f"{block.name}: experts not offloaded by moe-uvm")
            if (experts.num_experts, experts.top_k) != (self.num_experts, self.top_k):
                raise ValueError(
                    f"{block.name}: {experts.num_experts} experts, top-{experts.top_k}; "
                    f"the trace has {self.num_experts} experts, top-{self.top_k}")
            experts.routing_override = self._layer(index % self.ids.shape[0])

    @staticmethod
    def detach(blocks: list[MoeBlock]) -> None:
        for block in blocks:
            block.module.experts.routing_override = None

    def _layer(self, layer: int):
        """Row i of a forward reads trace token (position + i x STRIDE) mod T; position moves
        one token per forward, so each sequence of a decode batch walks the trace in order."""
        table, T = self.ids[layer], self.ids.shape[1]
        position = self.position[layer:layer + 1]

        def route(top_k_index: torch.Tensor) -> torch.Tensor:
            n = top_k_index.shape[0]
            rows = (position + torch.arange(n, device=position.device) * self.STRIDE) % T
            position.add_(1)
            return table.index_select(0, rows).to(top_k_index.dtype)

        return route


@dataclass(frozen=True)
class MoeBlock:
    """A supported sparse-MoE block found in a model: its module path, module and family, and
    under expert parallelism this rank's share of its experts (`ExpertParallel.shard`)."""

    name: str
    module: nn.Module
    family: MoeFamily
    shard: ExpertShard | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(experts, hidden, intermediate) of the routed experts, wrapped or not."""
        experts = self.module.experts
        if isinstance(experts, FusedExperts):
            return experts.num_experts, experts.moe.hidden_size, experts.moe.intermediate_size
        E, two_I, H = experts.gate_up_proj.shape
        return E, H, two_I // 2

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def top_k(self) -> int:
        return self.module.gate.top_k


def find_moe_blocks(model: nn.Module) -> list[MoeBlock]:
    """The supported sparse-MoE blocks of `model` in module order (= MoE layer order); a model
    with none is refused with the list of supported families."""
    by_class = {f.block: f for f in FAMILIES}
    blocks = []
    for name, module in model.named_modules():
        family = by_class.get(type(module).__name__)
        if family is None:
            continue
        experts = getattr(module, "experts", None)
        if not isinstance(experts, FusedExperts) and type(experts).__name__ != family.experts:
            raise ValueError(
                f"{name} ({family.block}) holds experts of type {type(experts).__name__}, "
                f"expected {family.experts}"
            )
        blocks.append(MoeBlock(name, module, family))
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no sparse-MoE block of a supported family "
            f"({supported_families()})"
        )
    return blocks


def shard_blocks(blocks: list[MoeBlock], expert_parallel: ExpertParallel | None,
                 config: ExpertOffloadConfig, device: torch.device | str
                 ) -> tuple[list[MoeBlock], ExpertOffloadConfig]:
    """The blocks with this rank's share of their experts (`expert_parallel`; unchanged
    without), and the config for that share (its profile sliced to this rank's experts)."""
    if expert_parallel is None:
        return blocks, config
    shape = (len(blocks), blocks[0].num_experts)
    if expert_parallel.owner.shape != shape:
        raise ValueError(f"expert_parallel places {expert_parallel.owner.shape[0]} layers x "
                         f"{expert_parallel.owner.shape[1]} experts; the model has {shape[0]} "
                         f"MoE layers x {shape[1]} experts")
    if config.prefetch == "lookahead":
        raise ValueError("prefetch='lookahead' is not available with expert parallelism (the "
                         "next router scores all experts, the slots hold this rank's); use "
                         "'speculative', 'frequency' or 'none'")
    if config.cpu_experts != "off":
        raise ValueError("cpu_experts must be 'off' with expert parallelism (the CPU/GPU hybrid "
                         f"runs on one GPU); got {config.cpu_experts!r}")
    sharded = [replace(b, shard=expert_parallel.shard(i, device)) for i, b in enumerate(blocks)]
    return sharded, expert_parallel.local_config(config)


def plan_expert_memory(
    blocks: list[MoeBlock], config: ExpertOffloadConfig | None, device: torch.device | str | None,
    fmt: ExpertFormat | None = None,
) -> MemoryPlan:
    """The device memory `attach_experts` allocates for these blocks, by part (nothing is
    allocated). fmt: default ExpertFormat.choose(config)."""
    fmt = fmt or ExpertFormat.choose(config)
    return plan_memory([FusedExperts.replacing(b, fmt).moe for b in blocks], config, device)


def next_gate_weights(blocks: list[MoeBlock]) -> list[torch.Tensor]:
    """Layer l+1's router weight [E, H] for each MoE layer l but the last: what lookahead
    prefetch applies to layer l's input. Read again after a load replaces the parameters."""
    return [b.module.gate.weight for b in blocks[1:]]


def attach_experts(
    blocks: list[MoeBlock], config: ExpertOffloadConfig | None,
    device: torch.device | str | None, fmt: ExpertFormat | None = None,
) -> ExpertOffloadManager:
    """Put a FusedExperts in place of each block's experts, its weights in a managed store
    (allocated and advised first); experts that hold weights (not meta) are copied in. All or
    nothing: the blocks get their new experts only once every store is allocated and filled; on
    an error they keep their own and what was allocated is freed. fmt: default
    ExpertFormat.choose(config). Where every block's experts held weights, the CPU/GPU hybrid
    (`config.cpu_experts`) is measured and attached here; else once the caller has loaded them
    (`moe_uvm.offload.finish_hybrid`)."""
    fmt = fmt or ExpertFormat.choose(config)
    adapters = [FusedExperts.replacing(b, fmt) for b in blocks]
    manager = offload_experts(adapters, config, device=device,
                              next_gates=next_gate_weights(blocks))
    filled = True
    try:
        for block, adapter in zip(blocks, adapters, strict=True):
            old = block.module.experts
            if old.gate_up_proj.device.type != "meta":
                adapter.load_fused("gate_up_proj", old.gate_up_proj.detach())
                adapter.load_fused("down_proj", old.down_proj.detach())
            else:
                filled = False
        if filled:  # every weight is in: the CPU/GPU hybrid measures now (else its loader's)
            finish_hybrid(manager)
    except BaseException:
        manager.close()
        raise
    for block, adapter in zip(blocks, adapters, strict=True):
        block.module.experts = adapter
    return manager
