"""FusedMoE, the MoE layer users put in their models (vLLM/sglang parameter convention): routing
and the fused Triton kernel. `moe_uvm.offload` moves the experts of such layers into managed
memory."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from moe_uvm.kernels import fused_moe
from moe_uvm.kernels.expert_ids import screen_expert_ids
from moe_uvm.kernels.fp8 import FP8_DTYPE, check_block_shape, quantize, scale_shape

SHARDS = ("w1", "w3", "w2")
CHECK_IDS_ENV = "MOE_UVM_CHECK_IDS"
_ID_DTYPES = (torch.int32, torch.int64)


class RoutingError(ValueError):
    """A router gave a layer an expert id outside [0, num_experts) other than -1 (padding)."""


class LayerSlots(Protocol):
    """What a layer asks of a GPU slot cache (moe_uvm.slots.SlotCache): where this step's
    offloaded experts are, and, after the kernel, which slots it filled."""

    def before_layer(self, layer: int, topk_ids: torch.Tensor, hidden: torch.Tensor) -> dict: ...

    def after_layer(self, layer: int, fill_slot: torch.Tensor) -> None: ...


def _check_ids_from_env() -> bool:
    value = os.environ.get(CHECK_IDS_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(
            f"{CHECK_IDS_ENV} must be 1 (check expert ids in every forward) or 0/unset, "
            f"got {value!r}"
        )
    return value == "1"


def _capturing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class FusedMoE(nn.Module):
    """Routed experts of one MoE layer: softmax/top-k routing and the fused Triton kernel.

    Parameters follow the vLLM/sglang convention: `w13_weight` [E, 2I, H] (gate rows 0..I-1,
    up rows I..2I-1) and `w2_weight` [E, H, I]; both carry a `weight_loader` attribute.
    `forward(hidden_states, router_logits)` routes and runs the experts; `experts(...)` runs
    them for routing computed elsewhere (grouped or biased routers).

    FP8 experts: `weight_dtype=torch.float8_e4m3fn` makes both weights e4m3 with fp32 scales
    `w13_weight_scale` / `w2_weight_scale` (block scales with `block_shape=(bn, bk)`, the FP8
    checkpoints' 128 x 128 layout, else one per output channel; moe_uvm.kernels.fp8 has the
    shapes); activations stay in `dtype`. The scales are small and never offloaded: they stay
    on the compute device, indexed by expert wherever the weights are read from. With
    `quantize_loads=True`, `weight_loader` takes 16/32-bit checkpoint tensors and quantises
    each one (amax / 448 per block or row) as it is written.

    Expert ids must be in [0, num_experts) or -1 (padding). Any other id is a router bug: it is
    computed as padding, noted on the device (no host sync, so decode stays capturable) and
    raised as RoutingError by `check_routing()` (the manager calls it where it syncs anyway).
    `check_ids=True` (default: environment variable MOE_UVM_CHECK_IDS=1) checks in every
    forward instead, at the price of a host sync per layer (skipped in CUDA graph capture and
    torch.compile tracing).
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
        check_ids: bool | None = None,
        weight_dtype: torch.dtype | None = None,
        block_shape: tuple[int, int] | None = None,
        quantize_loads: bool = False,
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
        self.dtype = dtype or torch.get_default_dtype()
        weight_dtype = weight_dtype or self.dtype
        if weight_dtype not in (self.dtype, FP8_DTYPE):
            raise ValueError(f"weight_dtype={weight_dtype}: allowed the activations' dtype "
                             f"({self.dtype}) or {FP8_DTYPE}")
        if weight_dtype != FP8_DTYPE and block_shape is not None:
            raise ValueError(f"block_shape is for FP8 weights (weight_dtype={FP8_DTYPE})")
        self.block_shape = check_block_shape(block_shape)
        if quantize_loads and weight_dtype != FP8_DTYPE:
            raise ValueError("quantize_loads quantises 16/32-bit checkpoint tensors to FP8: it "
                             f"needs weight_dtype={FP8_DTYPE}")
        self.quantize_loads = quantize_loads
        kw = dict(dtype=weight_dtype, device=device)
        self.w13_weight = nn.Parameter(torch.empty(E, 2 * I, H, **kw), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(E, H, I, **kw), requires_grad=False)
        self.w13_weight_scale: nn.Parameter | None = None
        self.w2_weight_scale: nn.Parameter | None = None
        if weight_dtype == FP8_DTYPE:
            scale = dict(dtype=torch.float32, device=device)
            self.w13_weight_scale = nn.Parameter(torch.ones(
                scale_shape(E, 2 * I, H, self.block_shape, halves=2), **scale),
                requires_grad=False)
            self.w2_weight_scale = nn.Parameter(torch.ones(
                scale_shape(E, H, I, self.block_shape), **scale), requires_grad=False)
        self._attach_loaders()
        self.record_routing: Callable[[torch.Tensor], None] | None = None
        self.slot_cache: LayerSlots | None = None  # set by offload_experts with prefetch_slots
        self.cpu_share: Callable | None = None  # set by offload_experts with cpu_experts on
        self.layer_index: int | None = None  # set by offload_experts
        self.check_ids = _check_ids_from_env() if check_ids is None else check_ids
        # int64 [2]: the lowest and highest expert id since the last check, on the ids' device.
        self._id_range: torch.Tensor | None = None

    def release_experts(self, reason: str) -> None:
        """Drop the expert weights (e.g. when the memory behind them is freed): both become
        meta tensors of the same shape, the routing hook and slot cache are detached, and a
        forward raises saying `reason` until weights are attached again."""
        for name in ("w13_weight", "w2_weight"):
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(torch.empty(old.shape, dtype=old.dtype,
                                                         device="meta"), requires_grad=False))
        self._attach_loaders()
        self.record_routing, self.slot_cache, self._released = None, None, reason
        self.cpu_share = None  # it reads the freed pages through its host aliases

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
        if param.dtype == FP8_DTYPE and loaded_weight.dtype != FP8_DTYPE:
            if not self.quantize_loads:
                raise ValueError(
                    f"expert {expert_id} shard {shard}: a {loaded_weight.dtype} tensor cannot "
                    f"load into {param.dtype} weights without its scales (build the layer with "
                    f"quantize_loads=True to quantise at load)"
                )
            q, scale = quantize(loaded_weight[None], self.block_shape)
            dst.copy_(q[0])
            self._shard_scale(expert_id, shard).copy_(scale[0])
            return
        if param.dtype != loaded_weight.dtype and loaded_weight.dtype == FP8_DTYPE:
            raise ValueError(f"expert {expert_id} shard {shard}: FP8 tensors load into a layer "
                             f"built with weight_dtype={FP8_DTYPE}, not {param.dtype}")
        dst.copy_(loaded_weight)

    def scale_loader(self, scale: torch.Tensor, expert_id: int, shard: str) -> None:
        """Load one checkpoint shard's FP8 scales (an FP8 checkpoint's `weight_scale_inv`:
        weight = fp8 * scale) for expert `expert_id`, shard "w1", "w3" or "w2"."""
        if not self.is_fp8:
            raise ValueError(f"expert {expert_id} shard {shard}: scales load into a layer built "
                             f"with weight_dtype={FP8_DTYPE}; this one holds {self.dtype}")
        if shard not in SHARDS:
            raise ValueError(f"shard must be one of {SHARDS}, got {shard!r}")
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"expert id {expert_id} out of range [0, {self.num_experts})")
        dst = self._shard_scale(expert_id, shard)
        if tuple(scale.shape) != tuple(dst.shape) or not scale.dtype.is_floating_point:
            raise ValueError(
                f"expert {expert_id} shard {shard}: expected {list(dst.shape)} float scales "
                f"for block_shape={self.block_shape}, got {scale.dtype} {list(scale.shape)}")
        dst.copy_(scale)

    def _shard_scale(self, expert_id: int, shard: str) -> torch.Tensor:
        """The part of the scale tensors that holds one checkpoint shard's scales."""
        if shard == "w2":
            return self.w2_weight_scale.data[expert_id]
        rows = self.intermediate_size
        if self.block_shape is not None:
            rows = -(-rows // self.block_shape[0])  # block rows of w1 (then w3's)
        first = 0 if shard == "w1" else rows
        return self.w13_weight_scale.data[expert_id, first:first + rows]

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
        """The routed experts' weighted sum for routing decided by the caller: hidden_states
        [T, hidden_size], topk_weights and topk_ids [T, k] (ids int32/int64 in [0, num_experts),
        -1 = padding; other ids are reported by `check_routing`)."""
        self._check_hidden(hidden_states)
        num_tokens = hidden_states.shape[0]
        ids_shape = tuple(topk_ids.shape)
        if len(ids_shape) != 2 or ids_shape[0] != num_tokens or topk_ids.dtype not in _ID_DTYPES:
            raise ValueError(
                f"topk_ids is {topk_ids.dtype} of shape {ids_shape}: expected int32 "
                f"or int64 [{num_tokens}, k], one row per token of hidden_states"
            )
        if topk_weights.shape != topk_ids.shape:
            raise ValueError(
                f"topk_weights has shape {tuple(topk_weights.shape)}: must equal topk_ids' "
                f"{ids_shape}"
            )
        topk_ids = self._screen_ids(topk_ids)
        if self.check_ids and not _capturing():
            self.check_routing()
        return self._routed(hidden_states, topk_weights, topk_ids)

    def _routed(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
        """HOT PATH: counts, slot plan, kernel, for ids already in [0, num_experts) or -1."""
        if self.w13_weight.is_meta:
            why = getattr(self, "_released", None) or "it is on the meta device"
            raise RuntimeError(f"FusedMoE has no expert weights to run: {why}")
        if self.record_routing is not None:
            self.record_routing(topk_ids)
        weights = topk_weights.float()
        quant = self.quantization()
        if self.cpu_share is not None:  # the hybrid (no slot cache with it)
            return self.cpu_share(hidden_states, weights, topk_ids)
        if self.slot_cache is None:
            return fused_moe(hidden_states, self.w13_weight, self.w2_weight, weights, topk_ids,
                             **quant)
        slots = self.slot_cache.before_layer(self.layer_index, topk_ids, hidden_states)
        out = fused_moe(hidden_states, self.w13_weight, self.w2_weight, weights, topk_ids, **slots,
                        **quant)
        self.slot_cache.after_layer(self.layer_index, slots["fill_slot"])
        return out

    @property
    def is_fp8(self) -> bool:
        return self.w13_weight_scale is not None

    def quantization(self) -> dict:
        """fused_moe's FP8 arguments for this layer (none for 16/32-bit weights)."""
        if not self.is_fp8:
            return {}
        return dict(w13_scale=self.w13_weight_scale, w2_scale=self.w2_weight_scale,
                    block_shape=self.block_shape)

    def expert_scale_nbytes(self) -> int:
        """Bytes of this layer's FP8 scales (0 otherwise): always on the compute device."""
        if not self.is_fp8:
            return 0
        return 4 * (self.w13_weight_scale.numel() + self.w2_weight_scale.numel())

    def _check_hidden(self, hidden_states: torch.Tensor) -> None:
        if hidden_states.dim() != 2 or hidden_states.shape[1] != self.hidden_size:
            shape = tuple(hidden_states.shape)
            found = f", H={shape[-1]}" if shape else ""
            raise ValueError(
                f"hidden_states has shape {shape}{found}: this layer takes [T, H] with H = its "
                f"hidden_size, {self.hidden_size}"
            )

    def _screen_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """HOT PATH (every layer of every step): one launch, no host sync, capturable. The ids
        with every one outside [0, num_experts) as -1, so nothing downstream (kernels, routing
        counts, slot-cache gathers) indexes out of bounds; `_id_range` notes the extremes."""
        if self._id_range is None or self._id_range.device != topk_ids.device:
            self._id_range = torch.full((2,), -1, dtype=torch.int64, device=topk_ids.device)
        return screen_expert_ids(topk_ids, self.num_experts, self._id_range)

    def check_routing(self) -> None:
        """Raise RoutingError if an expert id outside [0, num_experts) other than -1 reached this
        layer since the last check (which forgets it). A host sync: call it where one is fine."""
        if self._id_range is None:
            return
        low, high = self._id_range.tolist()
        if low >= -1 and high < self.num_experts:
            return
        self._id_range.fill_(-1)
        bad = high if high >= self.num_experts else low
        where = "FusedMoE" if self.layer_index is None else f"FusedMoE layer {self.layer_index}"
        raise RoutingError(
            f"{where}: the router gave expert id {bad}; ids must be in [0, {self.num_experts}) "
            "or -1 (padding). Forwards since the last check computed it as padding."
        )

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        self._check_hidden(hidden_states)
        expected = (hidden_states.shape[0], self.num_experts)
        if tuple(router_logits.shape) != expected:
            raise ValueError(
                f"router_logits has shape {tuple(router_logits.shape)}: expected {list(expected)},"
                f" one row per token of hidden_states and one column per expert "
                f"(num_experts={self.num_experts})"
            )
        topk_weights, topk_ids = self.route(router_logits)
        # top-k over num_experts columns gives ids in [0, num_experts): nothing to screen.
        return self._routed(hidden_states, topk_weights, topk_ids)

    def extra_repr(self) -> str:
        fp8 = ""
        if self.is_fp8:
            scales = f"block {self.block_shape}" if self.block_shape else "per-channel"
            fp8 = f", weights=fp8 e4m3 ({scales} scales)"
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
            f"intermediate={self.intermediate_size}, renormalize={self.renormalize}{fp8}"
        )
