"""Group-wise prefetch offloader for dense layers: in every group of `group_size` consecutive
layers, the selected parameters of `num_in_group` layers live in pinned host memory and are
copied, `prefetch_step` offloaded layers ahead, into a small pool of static device buffers."""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_uvm.dense_select import parse_param_patterns, select_param_names

ALIGN_BYTES = 256
"""Parameter views in a layer's buffer start at multiples of this, more than any kernel asks
of a weight pointer (cuBLAS and TMA want 16), so kernels that pick code paths by alignment run
the same code on the buffer as on the original weight (outputs stay bitwise equal)."""


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class DenseOffloadConfig:
    """Which dense-layer weights are offloaded and how far ahead they are copied back.

    group_size (G): layers per group. num_in_group (N): layers offloaded in each group, the first
        N of the group (so the copy of the next step's first offloaded layer overlaps the whole
        last group, and a step starts with the copy engine already busy).
    prefetch_step (P): how many offloaded layers ahead a copy is issued, on a side stream;
        0 = synchronous (copy right before the layer, on the compute stream).
    params: dotted-name patterns (whole segments, e.g. "self_attn.o_proj", "shared_experts");
        only matching parameters of the chosen layers are offloaded. Empty = all parameters.
    """

    group_size: int
    num_in_group: int
    prefetch_step: int
    params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        group = _as_int("offload_group_size", self.group_size)
        num = _as_int("offload_num_in_group", self.num_in_group)
        step = _as_int("offload_prefetch_step", self.prefetch_step)
        if group < 1:
            raise ValueError(f"offload_group_size must be >= 1 (layers per group), got {group}")
        if not 1 <= num <= group:
            raise ValueError(
                f"offload_num_in_group must be between 1 and offload_group_size={group}, got {num}"
            )
        if step < 0:
            raise ValueError(
                f"offload_prefetch_step must be >= 0 (0 = synchronous copy), got {step}"
            )
        set_("group_size", group)
        set_("num_in_group", num)
        set_("prefetch_step", step)
        set_("params", parse_param_patterns(self.params))

    def offloaded_layers(self, num_layers: int) -> list[int]:
        """Indices of the layers whose parameters are offloaded: the first N of each group (a
        last, partial group offloads its first min(N, size) layers)."""
        return [i for i in range(num_layers) if i % self.group_size < self.num_in_group]

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> DenseOffloadConfig:
        """Build from CLI-style names (`offload_group_size=4`, `offload_params="mlp.experts,
        self_attn.o_proj"`) or plain field names; unknown names are an error listing the known."""
        known = set(cls.__dataclass_fields__)
        fields: dict[str, Any] = {}
        unknown = []
        for key, value in kwargs.items():
            name = key.replace("-", "_").removeprefix("offload_")
            if name in known:
                fields[name] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(
                f"unknown dense offload fields {unknown}; known: "
                f"{sorted('offload_' + k for k in known)}"
            )
        required = ("group_size", "num_in_group", "prefetch_step")
        missing = ["offload_" + k for k in required if k not in fields]
        if missing:
            raise ValueError(f"dense offload config needs {missing}")
        return cls(**fields)


def buffer_slots(num_offloaded: int, prefetch_step: int) -> tuple[int, ...]:
    """The pool buffer of each offloaded layer, in run order; fixed for the model's life so that
    parameters keep static addresses (a captured CUDA graph replays them).

    While offloaded layer i computes, the copies for layers i+1..i+P (cyclically: the last
    layers of a step prefetch the first ones of the next) are in flight, so any P+1 cyclically
    consecutive layers need distinct buffers. Cutting the cycle into q = M // (P+1) runs of
    near-equal length (each >= P+1) and numbering layers within each run does it: a window
    crossing from one run into the next sees the tail of the first and a head of the next that
    is shorter than that run. It uses ceil(M/q) buffers, P+1 when P+1 divides M, the fewest any
    assignment can (the chromatic number of the P-th power of an M-cycle).

    Raises when the pool would need as many buffers as there are offloaded layers: every
    layer would then stay on the device and nothing would be saved."""
    runs = num_offloaded // (prefetch_step + 1)
    if runs < 2:
        most = num_offloaded // 2 - 1
        allowed = (
            f"use offload_prefetch_step <= {most}"
            if most >= 0
            else "offload at least 2 layers (smaller offload_group_size or larger "
            "offload_num_in_group, or more layers)"
        )
        raise ValueError(
            f"offload_prefetch_step={prefetch_step} with {num_offloaded} offloaded layer(s) "
            f"needs a buffer per offloaded layer, so no device memory would be saved; {allowed}"
        )
    slots: list[int] = []
    for run in range(runs):
        slots.extend(range(num_offloaded // runs + (run < num_offloaded % runs)))
    return tuple(slots)


def _round_up(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


def _packed(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of tensors of these sizes packed in order, each at an ALIGN_BYTES boundary, and
    the packed size."""
    offsets, end = [], 0
    for nbytes in sizes:
        offsets.append(_round_up(end))
        end = offsets[-1] + nbytes
    return offsets, end


def _pool_shape(slots: Sequence[int], layer_nbytes: Sequence[int]) -> tuple[int, int]:
    """(buffers, bytes per buffer) of the pool: one row per buffer, as large as the largest
    offloaded layer."""
    return max(slots) + 1, _round_up(max(layer_nbytes))


def pool_nbytes(layer_param_nbytes: Sequence[Sequence[int]], prefetch_step: int) -> int:
    """Device bytes of the buffer pool for offloaded layers whose selected parameters have these
    sizes (in the order they are packed), known before anything is allocated."""
    slots = buffer_slots(len(layer_param_nbytes), prefetch_step)
    buffers, row = _pool_shape(slots, [_packed(sizes)[1] for sizes in layer_param_nbytes])
    return buffers * row


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if abs(nbytes) >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def _carve(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """A view shaped and typed like `like` over `flat` (uint8) from byte `offset` on."""
    return flat[offset : offset + like.nbytes].view(like.dtype).view(like.shape)


def _first_tensor(values: Iterable[Any]) -> torch.Tensor | None:
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, (tuple, list)):
            found = _first_tensor(value)
            if found is not None:
                return found
    return None


# Custom ops take tensors and scalars only, so an op reaches its offloader's streams and events
# through this table, keyed by a handle baked into the hook. Weak, so that an offloader lives
# exactly as long as the layers whose hooks hold it.
_LIVE: weakref.WeakValueDictionary[int, DenseOffloader] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


# Both ops declare the activation mutated though they never write it: that is the data
# dependency torch.compile orders by (after everything that produced the activation, before
# everything that reads it), and it keeps the ops from being dropped as having no outputs.
@torch.library.custom_op("moe_uvm::dense_onload", mutates_args=("activation",))
def _onload_op(activation: torch.Tensor, offloader: int, position: int) -> None:
    _LIVE[offloader]._onload(position)


@_onload_op.register_fake
def _(activation: torch.Tensor, offloader: int, position: int) -> None:
    return None


@torch.library.custom_op("moe_uvm::dense_join", mutates_args=("activation",))
def _join_op(activation: torch.Tensor, offloader: int) -> None:
    _LIVE[offloader]._join()


@_join_op.register_fake
def _(activation: torch.Tensor, offloader: int) -> None:
    return None


class DenseOffloader:
    """Offloads the selected parameters of N layers in every group of G (see
    `DenseOffloadConfig`) of an ordered list of layers, and streams them back as they run.

    The pinned host copy is the source of truth; each offloaded parameter is re-pointed
    (`param.data`) at a view into its layer's pool buffer. Forward pre-hooks on the offloaded
    layers wait for that layer's copy and issue the copy P offloaded layers ahead; a forward
    hook on the last layer joins the side stream back, so a step (eager, captured in a CUDA graph
    or compiled) is self-contained and leaves the buffers of the next step's first P offloaded
    layers loaded. A step must run every layer in order; after one that was cut short, call
    `prime()`. Inference only: autograd through the pool views is not supported.

    On a machine without CUDA (device "cpu") the same schedule runs with plain CPU tensors and
    synchronous copies, which is what CPU tests check.

    torch.compile: the ops order by each layer's input, so a layer must not compute from its
    weights alone (e.g. cast them in forward; Inductor could hoist that above the wait), and
    Inductor freezing (weights folded as constants) must stay off. Dynamo does not guard on
    module hooks by default (`torch._dynamo.config.skip_nnmodule_hook_guards`): a graph compiled
    for an instance of the same classes *without* this offloader can be reused for one with it.
    Compile offloaded models in their own process, or `torch._dynamo.reset()` in between.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        config: DenseOffloadConfig,
        device: torch.device | str | None = None,
    ) -> None:
        layers = list(layers)
        self.config = config
        selected = self._select(layers, config)
        on_meta = [i for i, params in selected.items() if any(p.is_meta for p in params)]
        if on_meta:
            raise ValueError(
                f"layers {on_meta} have selected parameters on the meta device; load weights first"
            )
        self.offloaded_layers = tuple(selected)
        self.slots = buffer_slots(len(selected), config.prefetch_step)
        first = next(iter(selected.values()))[0]
        self.device = torch.device(device) if device is not None else first.device
        if self.device.type not in ("cuda", "cpu"):
            raise ValueError(f"device must be cuda or cpu, got {self.device}")
        self._pinned = self.device.type == "cuda"

        layouts = [self._layout(params) for params in selected.values()]
        self._host = [self._pack_host(layout) for layout in layouts]
        self.offloaded_bytes = sum(p.nbytes for params in selected.values() for p in params)
        self.host_bytes = sum(h.numel() for h in self._host)
        self.pool = torch.empty(
            _pool_shape(self.slots, [h.numel() for h in self._host]),
            dtype=torch.uint8,
            device=self.device,
        )
        self._dst = [self.pool[s, : h.numel()] for s, h in zip(self.slots, self._host, strict=True)]
        for slot, layout in zip(self.slots, layouts, strict=True):
            for param, offset in layout:
                param.data = _carve(self.pool[slot], offset, param)

        # A side stream only where copies can overlap compute: CUDA and P > 0.
        self._side: torch.cuda.Stream | None = None
        if self._pinned and config.prefetch_step > 0:
            self._side = torch.cuda.Stream(self.device)
            self._loaded = [torch.cuda.Event() for _ in self._host]
            self._released = [torch.cuda.Event() for _ in self._host]
            # Record each event once here so that none is first created inside a graph capture.
            compute = torch.cuda.current_stream(self.device)
            for event in (*self._loaded, *self._released):
                event.record(compute)

        self._handle = next(_HANDLES)
        _LIVE[self._handle] = self
        for position, index in enumerate(self.offloaded_layers):
            hook = functools.partial(self._pre_hook, position)
            layers[index].register_forward_pre_hook(hook, with_kwargs=True)
        if self._side is not None:
            layers[-1].register_forward_hook(self._post_hook)
        self.prime()

    @staticmethod
    def _layout(params: list[nn.Parameter]) -> list[tuple[nn.Parameter, int]]:
        """Byte offset of each parameter in its layer's flat buffer: one contiguous copy moves a
        whole layer (a single large transfer runs at full PCIe bandwidth)."""
        offsets, _ = _packed([p.nbytes for p in params])
        return list(zip(params, offsets, strict=True))

    def _pack_host(self, layout: list[tuple[nn.Parameter, int]]) -> torch.Tensor:
        """The layer's host copy; each parameter points at it until the pool exists, so the
        device copies are freed before the pool is allocated (peak: the weights, not weights
        plus pool)."""
        last, end = layout[-1]
        host = torch.empty(end + last.nbytes, dtype=torch.uint8, pin_memory=self._pinned)
        for param, offset in layout:
            view = _carve(host, offset, param)
            view.copy_(param.detach())
            param.data = view
        return host

    @staticmethod
    def _select(layers: list[nn.Module], config: DenseOffloadConfig) -> dict[int, list]:
        """Selected parameters of each chosen layer that has any, by layer index. Names are
        qualified by the index in `layers` (`3.mlp.experts.w13_weight`, as a ModuleList names
        them); a parameter shared with another layer is an error (its buffer view would be
        overwritten while the other layer uses it)."""
        if not layers:
            raise ValueError("no layers to offload: the layer list is empty")
        owners: dict[int, list[int]] = {}
        for i, layer in enumerate(layers):
            for param in layer.parameters():
                owners.setdefault(id(param), []).append(i)
        named: dict[str, tuple[int, nn.Parameter]] = {}
        for i in config.offloaded_layers(len(layers)):
            for name, param in layers[i].named_parameters():
                named[f"{i}.{name}"] = (i, param)
        selected: dict[int, list[nn.Parameter]] = {}
        for name in select_param_names(list(named), config.params):
            i, param = named[name]
            if len(owners[id(param)]) > 1:
                raise ValueError(
                    f"parameter {name} is shared by layers {owners[id(param)]}; shared "
                    "parameters cannot be offloaded (exclude it with offload_params)"
                )
            selected.setdefault(i, []).append(param)
        if not selected:
            raise ValueError(
                f"layers {config.offloaded_layers(len(layers))} (of {len(layers)}) have no "
                "parameters to offload"
            )
        return selected

    @classmethod
    def planned_pool_bytes(
        cls,
        layers: Sequence[nn.Module],
        config: DenseOffloadConfig,
        nbytes: Callable[[nn.Parameter], int] | None = None,
    ) -> int:
        """`pool_bytes` of an offloader of these layers, computed without allocating (layers may
        be on the meta device); `nbytes(param)` gives each parameter's size where it will differ
        from its size now (e.g. a load that changes its dtype)."""
        selected = cls._select(list(layers), config)
        size = nbytes or (lambda param: param.nbytes)
        sizes = [[size(p) for p in params] for params in selected.values()]
        return pool_nbytes(sizes, config.prefetch_step)

    @property
    def num_buffers(self) -> int:
        return self.pool.shape[0]

    @property
    def pool_bytes(self) -> int:
        return self.pool.numel()

    @property
    def device_bytes_saved(self) -> int:
        """Device bytes the offload frees: offloaded weights less the buffer pool."""
        return self.offloaded_bytes - self.pool_bytes

    def prime(self) -> None:
        """Load the buffers a step starts from (the first P offloaded layers), on the current
        stream, after any copy still in flight. The constructor calls it; call it again after a
        step that did not run every layer."""
        if self._side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        for k in range(self.config.prefetch_step):
            self._dst[k].copy_(self._host[k], non_blocking=self._pinned)

    def _pre_hook(self, position: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        activation = _first_tensor((*args, *kwargs.values()))
        if activation is None:
            raise TypeError(
                f"offloaded layer {self.offloaded_layers[position]} ({type(module).__name__}) "
                "got no tensor argument to order its weight copy by"
            )
        torch.ops.moe_uvm.dense_onload(activation, self._handle, position)

    def _post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        activation = _first_tensor((output,))
        if activation is None:
            raise TypeError(
                f"the last layer ({type(module).__name__}) returned no tensor to order the "
                "end of the step by"
            )
        torch.ops.moe_uvm.dense_join(activation, self._handle)

    # Hot path (every offloaded layer of every step, also replayed from CUDA graphs): one copy
    # per layer, no allocation, no host sync, no loop over parameters.
    def _onload(self, position: int) -> None:
        """Before offloaded layer `position` runs: make its weights ready on the current
        stream, then start the copy of the layer P offloaded layers ahead."""
        step, count = self.config.prefetch_step, len(self._host)
        target = (position + step) % count
        if self._side is None:
            # Synchronous: the target's buffer was last used by an earlier layer, already run.
            self._dst[target].copy_(self._host[target], non_blocking=self._pinned)
            return
        compute = torch.cuda.current_stream(self.device)
        if position >= step:
            # The first P layers were copied during the previous step, which joined them.
            compute.wait_event(self._loaded[position])
        # Everything queued so far includes the last use of the target's buffer: copy after it.
        released = self._released[position]
        released.record(compute)
        self._side.wait_event(released)
        with torch.cuda.stream(self._side):
            self._dst[target].copy_(self._host[target], non_blocking=True)
        self._loaded[target].record(self._side)

    def _join(self) -> None:
        """After the last layer: the compute stream waits for the last copy issued (copies are
        in order on the side stream), which brings the side stream back into a CUDA graph
        capture before it ends and leaves the next step's first buffers loaded."""
        last = (len(self._host) - 1 + self.config.prefetch_step) % len(self._host)
        torch.cuda.current_stream(self.device).wait_event(self._loaded[last])

    def summary(self) -> str:
        return (
            f"dense offload: layers {list(self.offloaded_layers)} offloaded "
            f"({_size(self.offloaded_bytes)}), pool of {self.num_buffers} x "
            f"{_size(self.pool.shape[1])} on {self.device}, {_size(self.device_bytes_saved)} of "
            f"device memory saved, prefetch_step={self.config.prefetch_step}"
        )

    def __repr__(self) -> str:
        return f"DenseOffloader({self.config}, {self.summary()})"
