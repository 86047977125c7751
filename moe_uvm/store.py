"""ManagedExpertStore: one MoE layer's expert parameters in one managed range, exposed as torch
views, with each expert's bytes in its own aligned slot so advice on one expert never touches
its neighbours. On a machine without CUDA the same layout lives in an ordinary CPU tensor."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from moe_uvm import uvm

EXPERT_ALIGNMENT = 2 << 20
"""Each expert's slot starts on a 2 MiB boundary. 2 MiB is the GPU's large page and the unit the
UVM driver migrates in (a "VA block"); with slots aligned to it, advising or prefetching one
expert never splits a page shared with the next one, which the range-attribute GPU test checks.
It costs under 2 MiB of padding per expert (1 MiB, 11%, for Qwen3-30B-A3B's 9 MiB experts; none
for Mixtral's 352 MiB). A store whose experts are all resident and never advised one by one is
packed instead (PACKED_ALIGNMENT: see `moe_uvm.offload.store_alignment`)."""

TENSOR_ALIGNMENT = 256
"""Start of each tensor inside a slot: keeps every row start 16-byte aligned for vector loads."""

PACKED_ALIGNMENT = TENSOR_ALIGNMENT
"""The slot alignment of a packed store: experts back to back, no padding beyond the tensors'."""


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class ExpertTensorSpec:
    """Where one per-expert tensor (e.g. `w13` of shape [2I, H]) sits inside an expert slot."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Pace:
    """How a re-advise migrates pages: `chunk_bytes` per prefetch call, each waited for, then
    `pause_s` of rest. The driver holds kernel launches from every thread of the process while
    a migration call runs (measured on an H200: a launch waits up to the whole call, 10-17 ms
    for 128 MiB), so migrating in small paced chunks bounds what a decode step can wait to
    about one chunk, at the price of a slower re-advise."""

    chunk_bytes: int
    pause_s: float = 0.0

    def __post_init__(self) -> None:
        if self.chunk_bytes <= 0 or self.pause_s < 0:
            raise ValueError(f"need chunk_bytes > 0 and pause_s >= 0, got {self.chunk_bytes} "
                             f"and {self.pause_s}")


def coalesce(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Runs of consecutive expert ids as (first, count), so one advice call covers each run."""
    runs: list[tuple[int, int]] = []
    for e in sorted(set(int(i) for i in ids)):
        if runs and runs[-1][0] + runs[-1][1] == e:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((e, 1))
    return runs


class ManagedExpertStore:
    """Expert parameters of one layer, `num_experts` slots of identical layout.

    `specs` maps a tensor name to its per-expert (shape, dtype); `store[name]` is a view of shape
    [num_experts, *shape] whose expert stride is the slot size (not the dense size: kernels must
    use `stride(0)`). On CUDA devices the bytes are one managed allocation, refused beyond the
    GPU's free memory unless `allow_oversubscription`; on the CPU they are a plain tensor.
    """

    def __init__(
        self,
        num_experts: int,
        specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        device: torch.device | str | int = "cuda",
        *,
        alignment: int = EXPERT_ALIGNMENT,
        allow_oversubscription: bool = False,
    ) -> None:
        if num_experts <= 0:
            raise ValueError(f"num_experts must be positive, got {num_experts}")
        if not specs:
            raise ValueError("a store needs at least one per-expert tensor spec")
        if alignment <= 0 or alignment % TENSOR_ALIGNMENT:
            raise ValueError(f"alignment must be a positive multiple of {TENSOR_ALIGNMENT}")
        self.device = (
            torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        )
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.num_experts = num_experts
        self.specs = self._layout(specs)
        self.slot_nbytes = self._slot_nbytes(self.specs, alignment)
        self.nbytes = self.slot_nbytes * num_experts
        self.is_managed = self.device.type == "cuda"
        if self.is_managed:
            self._buffer = uvm.ManagedBuffer(
                self.nbytes, self.device.index, allow_oversubscription=allow_oversubscription
            )
            base = self._buffer.bytes_tensor()
        elif self.device.type == "cpu":
            self._buffer = None
            base = torch.empty(self.nbytes, dtype=torch.uint8)
        else:
            raise ValueError(f"device must be cuda or cpu, got {self.device}")
        self._base = base
        self._views = {name: self._view(base, spec) for name, spec in self.specs.items()}

    @staticmethod
    def _layout(specs) -> dict[str, ExpertTensorSpec]:
        out: dict[str, ExpertTensorSpec] = {}
        offset = 0
        for name, (shape, dtype) in specs.items():
            shape = tuple(int(d) for d in shape)
            if not shape or any(d <= 0 for d in shape):
                raise ValueError(f"tensor {name!r} needs a non-empty positive shape, got {shape}")
            itemsize = torch.empty((), dtype=dtype).element_size()
            nbytes = itemsize
            for d in shape:
                nbytes *= d
            out[name] = ExpertTensorSpec(name, shape, dtype, offset, nbytes)
            offset = _round_up(offset + nbytes, TENSOR_ALIGNMENT)
        return out

    @staticmethod
    def _slot_nbytes(specs: Mapping[str, ExpertTensorSpec], alignment: int) -> int:
        return _round_up(max(s.offset + s.nbytes for s in specs.values()), alignment)

    @classmethod
    def planned_nbytes(
        cls,
        num_experts: int,
        specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        alignment: int = EXPERT_ALIGNMENT,
    ) -> int:
        """Bytes a store of this layout would allocate (to check a whole model up front)."""
        return cls._slot_nbytes(cls._layout(specs), alignment) * num_experts

    def _view(self, base: torch.Tensor, spec: ExpertTensorSpec) -> torch.Tensor:
        itemsize = torch.empty((), dtype=spec.dtype).element_size()
        inner = torch.empty(spec.shape, device="meta").stride()
        strides = (self.slot_nbytes // itemsize, *inner)
        return uvm.typed_view(
            base, spec.dtype, (self.num_experts, *spec.shape), strides, spec.offset
        )

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._views[name]
        except KeyError:
            raise KeyError(
                f"store has no tensor {name!r}; it holds {sorted(self._views)}"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._views

    @property
    def names(self) -> list[str]:
        return list(self._views)

    @property
    def expert_nbytes(self) -> int:
        """Bytes of one expert's tensors, without the slot padding."""
        return sum(s.nbytes for s in self.specs.values())

    @property
    def base_ptr(self) -> int:
        return self._base.data_ptr()

    def expert_range(self, expert: int) -> tuple[int, int]:
        """(pointer, bytes) of one expert's slot."""
        self._check_ids([expert])
        return self.base_ptr + expert * self.slot_nbytes, self.slot_nbytes

    def run_ranges(self, ids: Iterable[int]) -> list[tuple[int, int]]:
        """(pointer, bytes) per run of consecutive experts: the fewest advice calls for `ids`."""
        ids = list(ids)
        self._check_ids(ids)
        return [
            (self.base_ptr + first * self.slot_nbytes, count * self.slot_nbytes)
            for first, count in coalesce(ids)
        ]

    def _check_ids(self, ids: Iterable[int]) -> None:
        bad = [i for i in ids if not 0 <= int(i) < self.num_experts]
        if bad:
            raise ValueError(f"expert ids {bad} out of range [0, {self.num_experts})")

    # Advice executors. Which experts get which advice is the manager's decision; these only
    # carry it out, one call per run of consecutive experts. Not capturable in a CUDA graph.

    def advise_resident(
        self, ids: Iterable[int], stream: int | None = None, pace: Pace | None = None
    ) -> None:
        """PreferredLocation=GPU + AccessedBy=GPU and migrate the pages there (async on
        `stream`, or paced: see `Pace`). AccessedBy is set in both states, so applying either
        one fully is the undo of a half-applied other (a failed re-advise leaves advice
        exactly as before)."""
        if not self.is_managed:
            return
        for ptr, nbytes in self.run_ranges(ids):
            uvm.set_preferred_location(ptr, nbytes, self.device.index)
            uvm.set_accessed_by(ptr, nbytes, self.device.index)
            self._migrate(ptr, nbytes, self.device.index, stream, pace)

    def advise_offloaded(
        self, ids: Iterable[int], stream: int | None = None, pace: Pace | None = None
    ) -> None:
        """PreferredLocation=CPU + AccessedBy=GPU and migrate the pages to host memory, so the
        GPU reads them in place over PCIe with no page faults."""
        if not self.is_managed:
            return
        for ptr, nbytes in self.run_ranges(ids):
            uvm.set_preferred_location(ptr, nbytes, uvm.CPU)
            uvm.set_accessed_by(ptr, nbytes, self.device.index)
            self._migrate(ptr, nbytes, uvm.CPU, stream, pace)

    @staticmethod
    def _migrate(ptr: int, nbytes: int, location: int, stream: int | None,
                 pace: Pace | None) -> None:
        if pace is None or stream is None:
            uvm.prefetch(ptr, nbytes, location, stream)
            return
        for offset in range(0, nbytes, pace.chunk_bytes):
            uvm.prefetch(ptr + offset, min(pace.chunk_bytes, nbytes - offset), location, stream)
            uvm.stream_synchronize(stream)
            if pace.pause_s:
                time.sleep(pace.pause_s)

    def preferred_location(self, expert: int) -> int:
        """What the driver reports for one expert's slot: device id, uvm.CPU or uvm.INVALID."""
        if not self.is_managed:
            return uvm.CPU
        return uvm.preferred_location(*self.expert_range(expert))

    def free(self) -> None:
        """Release the managed range now; the store's views must not be used afterwards."""
        if self._buffer is not None:
            self._buffer.free()

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{s.name}{list(s.shape)}:{str(s.dtype)[6:]}" for s in self.specs.values()
        )
        return (
            f"ManagedExpertStore({self.num_experts} experts x {self.slot_nbytes / 2**20:.1f} MiB "
            f"on {self.device}{' managed' if self.is_managed else ''}; {shapes})"
        )
