"""The only module that calls the CUDA runtime: managed allocations, advice, prefetch, range
queries and memory info, every call checked (failures raise `UVMError` naming the call and the
CUDA error). Imports without CUDA or cuda-bindings; calls then raise a clear `UVMError`."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

try:
    from cuda.bindings import runtime as _rt
except ImportError as exc:  # cuda-bindings missing: the CPU path still works
    _rt = None
    _IMPORT_ERROR: Exception | None = exc
else:
    _IMPORT_ERROR = None

CPU = -1
"""Location id of host memory (the runtime's cudaCpuDeviceId)."""

INVALID = -2
"""What range queries answer when the pages of a range disagree (cudaInvalidDeviceId)."""

DEFAULT_HEADROOM_BYTES = 2 << 30
"""GPU memory the oversubscription guard keeps free for kernels, the caching allocator and the
driver (2 GiB, or 5% of the GPU if that is more)."""


class UVMError(RuntimeError):
    """A CUDA runtime call failed, or CUDA is not usable here."""


class OversubscriptionError(UVMError):
    """A managed allocation would exceed the GPU's free memory and the caller did not opt in."""


def _runtime():
    if _rt is None:
        raise UVMError(f"cuda.bindings is not importable ({_IMPORT_ERROR}); "
                       "pip install 'cuda-bindings>=12.9.1'")
    return _rt


def _error_name(err) -> str:
    rt = _runtime()
    status, name = rt.cudaGetErrorName(err)
    if status != rt.cudaError_t.cudaSuccess:
        return f"cudaError {int(err)}"
    return name.decode() if isinstance(name, bytes) else str(name)


def _check(result, call: str):
    """Unpack a cuda.bindings result tuple, raising `UVMError` unless the status is success."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != _runtime().cudaError_t.cudaSuccess:
        raise UVMError(f"{call} failed: {_error_name(err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_count() -> int:
    """Number of CUDA devices; 0 when there is no driver, no device or no cuda-bindings."""
    if _rt is None:
        return 0
    err, count = _rt.cudaGetDeviceCount()
    return count if err == _rt.cudaError_t.cudaSuccess else 0


def available() -> bool:
    """True when a CUDA device can be used. Raises `UVMError` when torch sees a GPU but
    cuda-bindings is missing: falling back to CPU stores there would be silent and slow."""
    if _rt is None and torch.cuda.is_available():
        raise UVMError(f"torch sees a CUDA GPU but cuda.bindings is not importable "
                       f"({_IMPORT_ERROR}): pip install 'cuda-bindings>=12.9.1' (with a CUDA 12 "
                       "driver: 'cuda-bindings>=12.9.1,<13')")
    return device_count() > 0


def unavailable_reason() -> str:
    """One line saying why CUDA cannot be used (for messages on CPU machines)."""
    if _rt is None:
        return f"cuda.bindings is not importable ({_IMPORT_ERROR})"
    err, count = _rt.cudaGetDeviceCount()
    if err != _rt.cudaError_t.cudaSuccess:
        return f"cudaGetDeviceCount failed: {_error_name(err)}"
    return "no CUDA device" if count == 0 else "CUDA is available"


@contextmanager
def _on_device(device: int) -> Iterator[None]:
    """Make `device` current for the runtime calls inside, restoring the caller's device."""
    rt = _runtime()
    previous = _check(rt.cudaGetDevice(), "cudaGetDevice")
    if previous != device:
        _check(rt.cudaSetDevice(device), f"cudaSetDevice({device})")
    try:
        yield
    finally:
        if previous != device:
            _check(rt.cudaSetDevice(previous), f"cudaSetDevice({previous})")


def mem_get_info(device: int = 0) -> tuple[int, int]:
    """(free, total) bytes of `device` as the driver reports them."""
    with _on_device(device):
        return _check(_runtime().cudaMemGetInfo(), "cudaMemGetInfo")


def driver_version() -> int:
    return _check(_runtime().cudaDriverGetVersion(), "cudaDriverGetVersion")


def runtime_version() -> int:
    return _check(_runtime().cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")


def device_attribute(name: str, device: int = 0) -> int:
    """An integer device attribute by its short name, e.g. "ConcurrentManagedAccess"."""
    rt = _runtime()
    attr = getattr(rt.cudaDeviceAttr, f"cudaDevAttr{name}")
    return _check(rt.cudaDeviceGetAttribute(attr, device), f"cudaDeviceGetAttribute({name})")


def device_name(device: int = 0) -> str:
    props = _check(_runtime().cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")


# --- managed allocations and the oversubscription guard ---------------------------------------

_ledger_lock = threading.Lock()
_live_managed_bytes: dict[int, int] = defaultdict(int)


def live_managed_bytes(device: int = 0) -> int:
    """Bytes of managed memory this process holds for `device` through `ManagedBuffer`."""
    with _ledger_lock:
        return _live_managed_bytes[device]


def check_fits(
    nbytes: int, device: int = 0, *, headroom_bytes: int | None = None
) -> tuple[int, int]:
    """Raise `OversubscriptionError` unless `nbytes` more managed memory fits on the GPU.

    Counts every live managed byte of this process as if it could end up on the GPU (pages of a
    range can migrate there whatever its advice), so the sum of all managed allocations stays
    under free memory minus the headroom. This may refuse a request that would just fit when
    resident pages of earlier allocations are already counted as used: erring that way is the
    point, since oversubscribing managed memory can hang the GPU for every process on it.
    Returns (free, budget) for messages.
    """
    free, total = mem_get_info(device)
    headroom = (
        headroom_bytes if headroom_bytes is not None else max(DEFAULT_HEADROOM_BYTES, total // 20)
    )
    live = live_managed_bytes(device)
    budget = free - headroom - live
    if nbytes > budget:
        raise OversubscriptionError(
            f"refusing to allocate {nbytes / 2**30:.2f} GiB of managed memory on cuda:{device}: "
            f"the GPU has {free / 2**30:.2f} GiB free, {headroom / 2**30:.2f} GiB are kept as "
            f"headroom and this process already holds {live / 2**30:.2f} GiB of managed memory, "
            f"leaving {max(budget, 0) / 2**30:.2f} GiB. Use fewer/smaller layers, or pass "
            "allow_oversubscription=True if you really mean to oversubscribe GPU memory."
        )
    return free, budget


class ManagedBuffer:
    """An owning handle on one `cudaMallocManaged` range; frees it exactly once.

    Tensor views made by `view()` keep the buffer alive (torch holds a reference through
    `__cuda_array_interface__`), so the memory is freed when the buffer and all its views are
    gone, or earlier by an explicit `free()` (after which the views must not be used).
    """

    def __init__(
        self,
        nbytes: int,
        device: int = 0,
        *,
        allow_oversubscription: bool = False,
        headroom_bytes: int | None = None,
    ) -> None:
        if nbytes <= 0:
            raise ValueError(f"managed allocation size must be positive, got {nbytes}")
        self.nbytes = int(nbytes)
        self.device = int(device)
        self.ptr = 0
        if not allow_oversubscription:
            check_fits(self.nbytes, self.device, headroom_bytes=headroom_bytes)
        rt = _runtime()
        with _on_device(self.device):
            self.ptr = int(
                _check(
                    rt.cudaMallocManaged(self.nbytes, rt.cudaMemAttachGlobal),
                    f"cudaMallocManaged({self.nbytes})",
                )
            )
        with _ledger_lock:
            _live_managed_bytes[self.device] += self.nbytes

    @property
    def freed(self) -> bool:
        return self.ptr == 0

    def free(self) -> None:
        """Release the range (idempotent: only the first call frees)."""
        with _ledger_lock:
            ptr, self.ptr = self.ptr, 0
            if ptr:
                _live_managed_bytes[self.device] -= self.nbytes
        if ptr:
            _check(_runtime().cudaFree(ptr), "cudaFree")

    def __del__(self) -> None:
        if getattr(self, "ptr", 0) and _rt is not None:
            try:
                self.free()
            except UVMError:
                pass  # interpreter shutdown: the driver reclaims the range with the context

    @property
    def __cuda_array_interface__(self) -> dict:
        if self.freed:
            raise UVMError("managed buffer was freed")
        return {
            "shape": (self.nbytes,),
            "typestr": "|u1",
            "data": (self.ptr, False),
            "version": 3,
            "strides": None,
            "stream": None,
        }

    def bytes_tensor(self) -> torch.Tensor:
        """The whole range as a uint8 CUDA tensor (holds a reference to this buffer)."""
        return torch.as_tensor(self, device=torch.device("cuda", self.device))


class _MappedHost:
    """`__cuda_array_interface__` over pinned host memory: with unified virtual addressing the
    host address is also the device address, so kernels read it in place over PCIe."""

    def __init__(self, host: torch.Tensor) -> None:
        self.host = host  # keeps the pinned allocation alive as long as any view of it
        self.__cuda_array_interface__ = {
            "shape": (host.numel() * host.element_size(),),
            "typestr": "|u1",
            "data": (host.data_ptr(), False),
            "version": 3,
            "strides": None,
            "stream": None,
        }


def mapped_host_view(host: torch.Tensor, device: int = 0) -> torch.Tensor:
    """A CUDA tensor (same dtype and shape) over a contiguous pinned host tensor: zero-copy
    reads over PCIe, the way `--cpu-offload-gb`-style offloaders read weights."""
    if host.device.type != "cpu" or not host.is_pinned() or not host.is_contiguous():
        raise ValueError("mapped_host_view needs a contiguous pinned CPU tensor")
    raw = torch.as_tensor(_MappedHost(host), device=torch.device("cuda", device))
    return raw.view(host.dtype).view(host.shape)


def typed_view(
    base: torch.Tensor,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    strides: tuple[int, ...] | None = None,
    offset_bytes: int = 0,
) -> torch.Tensor:
    """A tensor of any dtype (bf16 and fp8 included) over the bytes of a uint8 tensor."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if offset_bytes % itemsize or base.numel() % itemsize:
        raise ValueError(
            f"byte offset {offset_bytes} and size {base.numel()} must be multiples of the "
            f"{dtype} item size {itemsize}"
        )
    elements = base.view(dtype)
    if strides is None:
        strides = torch.empty(shape, device="meta").stride()
    return elements.as_strided(shape, strides, offset_bytes // itemsize)


# --- advice, prefetch and range queries --------------------------------------------------------


def _location(location: int):
    rt = _runtime()
    loc = rt.cudaMemLocation()
    if location == CPU:
        loc.type = rt.cudaMemLocationType.cudaMemLocationTypeHost
        loc.id = 0
    else:
        loc.type = rt.cudaMemLocationType.cudaMemLocationTypeDevice
        loc.id = int(location)
    return loc


def _advise(ptr: int, nbytes: int, advice, location: int, call: str) -> None:
    rt = _runtime()
    # CUDA 13 bindings take a cudaMemLocation; CUDA 12 bindings take an int device in
    # cudaMemAdvise and the location in cudaMemAdvise_v2 (12.2+).
    if hasattr(rt, "cudaMemAdvise_v2"):
        result = rt.cudaMemAdvise_v2(ptr, nbytes, advice, _location(location))
    elif _bindings_major() >= 13:
        result = rt.cudaMemAdvise(ptr, nbytes, advice, _location(location))
    else:
        result = rt.cudaMemAdvise(ptr, nbytes, advice, int(location))
    _check(result, f"{call}(ptr=0x{ptr:x}, bytes={nbytes}, location={location})")


def _bindings_major() -> int:
    from cuda import bindings

    return int(str(getattr(bindings, "__version__", "13")).split(".")[0])


def set_preferred_location(ptr: int, nbytes: int, location: int) -> None:
    """cudaMemAdviseSetPreferredLocation to a device id or `CPU`."""
    advice = _runtime().cudaMemoryAdvise.cudaMemAdviseSetPreferredLocation
    _advise(ptr, nbytes, advice, location, "cudaMemAdvise(SetPreferredLocation)")


def set_accessed_by(ptr: int, nbytes: int, device: int) -> None:
    """Keep `device`'s page tables mapped to the range wherever it lives (no faults on access)."""
    advice = _runtime().cudaMemoryAdvise.cudaMemAdviseSetAccessedBy
    _advise(ptr, nbytes, advice, device, "cudaMemAdvise(SetAccessedBy)")


def prefetch(ptr: int, nbytes: int, location: int, stream: int | None = None) -> None:
    """Enqueue a migration of the range to a device or `CPU` on `stream` (a raw handle; None =
    the current torch stream). Not capturable: a prefetch inside a CUDA graph capture
    invalidates the capture."""
    rt = _runtime()
    if stream is None:
        stream = torch.cuda.current_stream().cuda_stream
    handle = rt.cudaStream_t(stream)
    if hasattr(rt, "cudaMemPrefetchAsync_v2"):
        result = rt.cudaMemPrefetchAsync_v2(ptr, nbytes, _location(location), 0, handle)
    elif _bindings_major() >= 13:
        result = rt.cudaMemPrefetchAsync(ptr, nbytes, _location(location), 0, handle)
    else:
        result = rt.cudaMemPrefetchAsync(ptr, nbytes, int(location), handle)
    _check(result, f"cudaMemPrefetchAsync(ptr=0x{ptr:x}, bytes={nbytes}, location={location})")


def _range_attribute(ptr: int, nbytes: int, attribute: str, data_size: int = 4):
    rt = _runtime()
    attr = getattr(rt.cudaMemRangeAttribute, f"cudaMemRangeAttribute{attribute}")
    return _check(
        rt.cudaMemRangeGetAttribute(data_size, attr, ptr, nbytes),
        f"cudaMemRangeGetAttribute({attribute}, ptr=0x{ptr:x}, bytes={nbytes})",
    )


def preferred_location(ptr: int, nbytes: int) -> int:
    """Device id, `CPU`, or `INVALID` when the pages disagree or have no preferred location."""
    return int(_range_attribute(ptr, nbytes, "PreferredLocation"))


def last_prefetch_location(ptr: int, nbytes: int) -> int:
    return int(_range_attribute(ptr, nbytes, "LastPrefetchLocation"))


def accessed_by(ptr: int, nbytes: int) -> list[int]:
    """Devices with AccessedBy set over the whole range."""
    slots = max(device_count(), 1) + 1  # one more than devices, so the list ends with INVALID
    data = _range_attribute(ptr, nbytes, "AccessedBy", data_size=4 * slots)
    values = data if isinstance(data, (list, tuple)) else [data]
    return [int(v) for v in values if int(v) >= 0]

