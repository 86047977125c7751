"""The only module that calls the CUDA runtime: managed allocations, advice, prefetch, range
queries and memory info, every call checked (failures raise `UVMError` naming the call and the
CUDA error). Imports without CUDA or cuda-bindings; calls then raise a clear `UVMError`.
(One driver call goes through ctypes: `launch_host_func`, which says why.)"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping
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


def relax_capture_mode() -> None:
    """Let the calling thread make CUDA calls while another thread captures a CUDA graph.

    In the default (global) capture mode, a call the driver considers unsafe during capture
    (cudaMemAdvise, cudaMemPrefetchAsync, ...) made by *any* thread fails with
    cudaErrorStreamCaptureUnsupported and invalidates every capture in progress. The re-advise
    worker calls this once: its advice and prefetches go to its own stream, never to a captured
    one, so they are safe to run next to a capture. Driver API, because the mode is a property
    of the thread in the driver, shared by every runtime in the process (torch's included)."""
    _runtime()
    from cuda.bindings import driver

    mode = driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_RELAXED
    err, _previous = driver.cuThreadExchangeStreamCaptureMode(mode)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        name = name.decode() if isinstance(name, bytes) else str(name)
        raise UVMError(f"cuThreadExchangeStreamCaptureMode(RELAXED) failed: {name}")


@functools.cache
def _driver_library() -> ctypes.CDLL:
    """libcuda (already loaded by the runtime): cuLaunchHostFunc through ctypes, because
    cuda.bindings wraps a host function in a trampoline that takes the GIL and frees its
    argument after the first call, which a graph's host node, called at every replay, cannot
    have."""
    _runtime()
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise UVMError(f"loading the CUDA driver library libcuda.so.1 failed: {exc}") from None
    lib.cuLaunchHostFunc.restype = ctypes.c_int
    lib.cuLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.cuGetErrorName.restype = ctypes.c_int
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    for name in ("cuStreamWriteValue32_v2", "cuStreamWaitValue32_v2"):
        if hasattr(lib, name):
            getattr(lib, name).restype = ctypes.c_int
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32,
                                           ctypes.c_uint]
    return lib


def _check_driver(err: int, call: str) -> None:
    if err != 0:
        lib = _driver_library()
        name = ctypes.c_char_p()
        known = lib.cuGetErrorName(err, ctypes.byref(name)) == 0 and name.value
        raise UVMError(f"{call} failed: {name.value.decode() if known else f'CUresult {err}'}")


def launch_host_func(stream: int, fn: int, data: int) -> None:
    """Enqueue the compiled host function at address `fn` (`void fn(void *)`), called with
    `data`, on `stream` (a cudaStream_t handle) in stream order; under stream capture it becomes
    a host node of the graph, called at every replay. The function runs on the driver's thread
    and must make no CUDA call; `data` must stay valid while any graph holding it can run."""
    _check_driver(_driver_library().cuLaunchHostFunc(stream, fn, data), "cuLaunchHostFunc")


_WAIT_EQ = 0x1  # CU_STREAM_WAIT_VALUE_EQ
_WRITE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT: fenced after the stream's earlier writes


def _memop(name: str):
    lib = _driver_library()
    if not hasattr(lib, name):
        raise UVMError(f"this CUDA driver has no {name} (stream memory operations need CUDA 11.7+)")
    return getattr(lib, name)


def stream_write_value32(stream: int, address: int, value: int) -> None:
    """Enqueue a 32-bit write of `value` to device-visible `address` (device memory, or pinned
    host memory through its device address) on `stream`, after a fence that makes the stream's
    earlier writes visible first (cuStreamWriteValue32; a memory-operation node under capture)."""
    _check_driver(_memop("cuStreamWriteValue32_v2")(stream, address, value, _WRITE_DEFAULT),
                  "cuStreamWriteValue32")


def stream_wait_value32(stream: int, address: int, value: int) -> None:
    """Enqueue a wait, on `stream`, until the 32-bit word at `address` equals `value`
    (cuStreamWaitValue32; a memory-operation node under capture). The stream waits as long as
    it takes: whoever writes the word must be sure to."""
    _check_driver(_memop("cuStreamWaitValue32_v2")(stream, address, value, _WAIT_EQ),
                  "cuStreamWaitValue32")


@functools.cache
def stream_memops_work(device: int) -> tuple[bool, str]:
    """(whether 32-bit stream writes and waits on pinned host memory work on `device`, eagerly
    and captured in a CUDA graph; why not). Checked once per device on a private stream, with a
    wait that the same stream's write satisfies (nothing can be left waiting)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        flag = torch.zeros(2, dtype=torch.int32, pin_memory=True)
        view = mapped_host_view(flag, device)
        address = view.data_ptr()
        stream = torch.cuda.Stream(device=device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            stream_write_value32(stream.cuda_stream, address, 1)
            stream_wait_value32(stream.cuda_stream, address, 1)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                stream_write_value32(stream.cuda_stream, address + 4, 7)
                stream_wait_value32(stream.cuda_stream, address + 4, 7)
            graph.replay()
            stream.synchronize()
        if flag.tolist() != [1, 7]:
            return False, f"the writes left {flag.tolist()}, not [1, 7]"
    except (UVMError, RuntimeError) as exc:
        return False, str(exc).splitlines()[0]
    return True, ""


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
_reserved_bytes: dict[int, int] = defaultdict(int)
_thread = threading.local()
_concurrent_access_ok: set[int] = set()


def live_managed_bytes(device: int = 0) -> int:
    """Bytes of managed memory this process holds for `device` through `ManagedBuffer`."""
    with _ledger_lock:
        return _live_managed_bytes[device]


def reserved_bytes(device: int = 0) -> int:
    """Bytes of `device` reserved by loads in progress (`reserve`) and not yet allocated as
    managed memory."""
    with _ledger_lock:
        return _reserved_bytes[device]


def format_bytes(nbytes: int) -> str:
    """A size for messages: GiB, MiB or KiB with two decimals, or bytes."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _budget_locked(device: int, headroom_bytes: int | None) -> tuple[int, int, int, int, int]:
    """(free, headroom, live, reserved, budget) of `device`; the caller holds `_ledger_lock`, so
    that a check and the bookkeeping that follows it are one atomic step."""
    free, total = mem_get_info(device)
    headroom = (
        headroom_bytes if headroom_bytes is not None else max(DEFAULT_HEADROOM_BYTES, total // 20)
    )
    live, reserved = _live_managed_bytes[device], _reserved_bytes[device]
    return free, headroom, live, reserved, free - headroom - live - reserved


def _refusal(request: str, device: int, free: int, headroom: int, live: int, reserved: int,
             budget: int) -> OversubscriptionError:
    return OversubscriptionError(
        f"refusing to allocate {request} on cuda:{device}: the GPU has {format_bytes(free)} "
        f"free, {format_bytes(headroom)} are kept as headroom and this process already holds "
        f"{format_bytes(live)} of managed memory and {format_bytes(reserved)} reserved by loads "
        f"in progress, leaving {format_bytes(max(budget, 0))}. Use fewer/smaller layers or "
        "fewer prefetch slots, or pass allow_oversubscription=True if you really mean to "
        "oversubscribe GPU memory."
    )


def check_fits(
    nbytes: int, device: int = 0, *, headroom_bytes: int | None = None
) -> tuple[int, int]:
    """Raise `OversubscriptionError` unless `nbytes` more managed memory fits on the GPU.

    Counts every live managed byte of this process as if it could end up on the GPU (pages of a
    range can migrate there whatever its advice), and every byte reserved by a load in progress,
    so the sum of all allocations stays under free memory minus the headroom. This may refuse a
    request that would just fit when resident pages of earlier allocations are already counted
    as used: erring that way is the point, since oversubscribing managed memory can hang the GPU
    for every process on it. Only checks: `reserve` checks and sets the bytes aside atomically.
    Returns (free, budget) for messages.
    """
    with _ledger_lock:
        free, headroom, live, reserved, budget = _budget_locked(device, headroom_bytes)
    if nbytes > budget:
        raise _refusal(f"{format_bytes(nbytes)} of managed memory", device, free, headroom, live,
                       reserved, budget)
    return free, budget


class Reservation:
    """GPU memory of one device set aside for a load in progress, by named part.

    `remaining` bytes are held back from every other check until the reservation ends; managed
    allocations this thread makes meanwhile draw from them instead of being checked again.
    Memory of the other parts (torch allocations) is counted both as reserved and, once
    allocated, by the driver's free memory until the reservation ends: on the safe side."""

    def __init__(self, device: int, headroom_bytes: int | None) -> None:
        self.device = device
        self.headroom_bytes = headroom_bytes
        self.parts: dict[str, int] = {}
        self.remaining = 0

    def _grow(self, parts: Mapping[str, int]) -> None:
        """Reserve `parts` more, atomically checked against the device's free memory."""
        bad = {name: n for name, n in parts.items() if not isinstance(n, int) or n < 0}
        if bad:
            raise ValueError(f"reserved sizes must be integers >= 0 bytes, got {bad}")
        need = sum(parts.values())
        if need == 0:
            return
        with _ledger_lock:
            free, headroom, live, reserved, budget = _budget_locked(
                self.device, self.headroom_bytes
            )
            if need > budget:
                listed = ", ".join(f"{name} {format_bytes(n)}" for name, n in parts.items())
                raise _refusal(f"{format_bytes(need)} ({listed})", self.device, free, headroom,
                               live, reserved, budget)
            _reserved_bytes[self.device] += need
            self.remaining += need
        for name, n in parts.items():
            self.parts[name] = self.parts.get(name, 0) + n

    def _release(self) -> None:
        with _ledger_lock:
            _reserved_bytes[self.device] -= self.remaining
            self.remaining = 0

    def __repr__(self) -> str:
        listed = ", ".join(f"{name} {format_bytes(n)}" for name, n in self.parts.items())
        return (f"Reservation(cuda:{self.device}: {listed}; {format_bytes(self.remaining)} "
                "not yet allocated)")


def _reservations() -> dict[int, Reservation]:
    """This thread's active reservation per device."""
    if not hasattr(_thread, "reservations"):
        _thread.reservations = {}
    return _thread.reservations


@contextmanager
def reserve(
    parts: Mapping[str, int], device: int = 0, *, headroom_bytes: int | None = None
) -> Iterator[Reservation]:
    """Check that all `parts` (name -> bytes) fit on `device` together and hold them until the
    block ends, so two loads cannot both pass a check that only one of them fits. Refusals
    (`OversubscriptionError`) name each part. Managed allocations made by this thread inside the
    block draw from the reservation. Nested use on the same thread and device (a loader that
    reserves everything, then calls a builder that reserves its share) does not count twice: the
    inner call reserves only bytes of a part beyond what the outer one holds for that name."""
    held = _reservations()
    outer = held.get(device)
    if outer is not None:
        outer._grow({
            name: n - outer.parts.get(name, 0)
            for name, n in parts.items() if n > outer.parts.get(name, 0)
        })
        yield outer
        return
    reservation = Reservation(device, headroom_bytes)
    reservation._grow(dict(parts))
    held[device] = reservation
    try:
        yield reservation
    finally:
        del held[device]
        reservation._release()


def _admit(nbytes: int, device: int, allow_oversubscription: bool,
           headroom_bytes: int | None) -> tuple[Reservation | None, int]:
    """Count `nbytes` as live managed memory of `device` before it is allocated: drawn from this
    thread's reservation where there is one, the rest checked under the same lock (unless the
    caller opted in to oversubscription). Returns the reservation and the bytes drawn from it."""
    reservation = None if allow_oversubscription else _reservations().get(device)
    with _ledger_lock:
        drawn = 0
        if reservation is not None:
            drawn = min(reservation.remaining, nbytes)
            reservation.remaining -= drawn
            _reserved_bytes[device] -= drawn
        excess = nbytes - drawn
        if excess and not allow_oversubscription:
            headroom = reservation.headroom_bytes if reservation is not None else headroom_bytes
            free, headroom, live, reserved, budget = _budget_locked(device, headroom)
            if excess > budget:
                if reservation is not None:
                    reservation.remaining += drawn
                    _reserved_bytes[device] += drawn
                request = f"{format_bytes(excess)} of managed memory"
                if drawn:
                    request += f" beyond the {format_bytes(drawn)} left in its reservation"
                raise _refusal(request, device, free, headroom, live, reserved, budget)
        _live_managed_bytes[device] += nbytes
    return reservation, drawn


def _retract(nbytes: int, device: int, reservation: Reservation | None, drawn: int) -> None:
    """Undo `_admit` for an allocation that did not happen."""
    with _ledger_lock:
        _live_managed_bytes[device] -= nbytes
        if reservation is not None and _reservations().get(device) is reservation:
            reservation.remaining += drawn
            _reserved_bytes[device] += drawn


def require_concurrent_managed_access(device: int) -> None:
    """Raise `UVMError` unless `device` reports ConcurrentManagedAccess (checked once per
    device). Without it (WSL2, Windows, some Jetsons) managed memory is not coherent while the
    GPU runs: the GPU cannot read host-preferred pages in place and the CPU must not touch
    managed memory while kernels run, which is how offloaded experts are read and written."""
    if device in _concurrent_access_ok:
        return
    if device_attribute("ConcurrentManagedAccess", device) == 0:
        raise UVMError(
            f"cuda:{device} reports cudaDevAttrConcurrentManagedAccess = 0 (as on WSL2, "
            "Windows and some Jetsons): the GPU cannot read host-preferred managed pages in "
            "place while the CPU runs, which offloaded experts rely on; moe-uvm needs a GPU "
            "with concurrent managed access (a discrete GPU under native Linux)"
        )
    _concurrent_access_ok.add(device)


class ManagedBuffer:
    """An owning handle on one `cudaMallocManaged` range; frees it exactly once.

    Tensor views made by `view()` keep the buffer alive (torch holds a reference through
    `__cuda_array_interface__`), so the memory is freed when the buffer and all its views are
    gone, or earlier by an explicit `free()` (after which the views must not be used). Inside
    `reserve` on this thread the size is drawn from the reservation, else it is checked
    (`check_fits` rules) unless `allow_oversubscription`.
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
        reservation, drawn = _admit(
            self.nbytes, self.device, allow_oversubscription, headroom_bytes
        )
        try:
            require_concurrent_managed_access(self.device)
            rt = _runtime()
            with _on_device(self.device):
                self.ptr = int(
                    _check(
                        rt.cudaMallocManaged(self.nbytes, rt.cudaMemAttachGlobal),
                        f"cudaMallocManaged({self.nbytes})",
                    )
                )
        except BaseException:
            _retract(self.nbytes, self.device, reservation, drawn)
            raise

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
            except Exception:
                # Never raise from __del__ (at interpreter shutdown anything can fail); the
                # driver reclaims the range with the context.
                pass

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


def prefetch(
    ptr: int, nbytes: int, location: int, stream: int | None = None, device: int | None = None
) -> None:
    """Enqueue a migration of the range to a device or `CPU` on `stream` (a raw handle; None =
    torch's current stream of `device`, by default the device the range was allocated on, not
    whichever device is current). Not capturable: a prefetch inside a CUDA graph capture
    invalidates the capture."""
    rt = _runtime()
    if stream is None:
        if device is None:
            device = range_device(ptr)
        stream = torch.cuda.current_stream(device).cuda_stream
    handle = rt.cudaStream_t(stream)
    if hasattr(rt, "cudaMemPrefetchAsync_v2"):
        result = rt.cudaMemPrefetchAsync_v2(ptr, nbytes, _location(location), 0, handle)
    elif _bindings_major() >= 13:
        result = rt.cudaMemPrefetchAsync(ptr, nbytes, _location(location), 0, handle)
    else:
        result = rt.cudaMemPrefetchAsync(ptr, nbytes, int(location), handle)
    _check(result, f"cudaMemPrefetchAsync(ptr=0x{ptr:x}, bytes={nbytes}, location={location})")


def stream_synchronize(stream: int) -> None:
    """Wait until the work queued on `stream` (a raw handle) has finished."""
    rt = _runtime()
    _check(rt.cudaStreamSynchronize(rt.cudaStream_t(stream)), "cudaStreamSynchronize")


def range_device(ptr: int) -> int:
    """The device a managed range was allocated for (cudaPointerGetAttributes)."""
    attributes = _check(_runtime().cudaPointerGetAttributes(ptr), "cudaPointerGetAttributes")
    return int(attributes.device)


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

