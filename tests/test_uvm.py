"""The managed-memory layer: guard logic and error reporting on CPU; advice, range queries,
memory accounting and read-through on the GPU."""

import ctypes
import types

import numpy as np
import pytest
import torch

from moe_uvm import uvm
from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.manager import ExpertOffloadManager
from moe_uvm.store import PACKED_ALIGNMENT, ManagedExpertStore

GiB = 2**30


def fake_gpu(monkeypatch, free, total):
    """Pretend a GPU with this much memory exists; any real allocation attempt fails the test."""
    monkeypatch.setattr(uvm, "mem_get_info", lambda device=0: (free, total))
    monkeypatch.setattr(uvm, "device_attribute", lambda name, device=0: 1)

    def no_runtime():
        raise AssertionError("the guard must refuse before calling the CUDA runtime")

    monkeypatch.setattr(uvm, "_runtime", no_runtime)


def test_guard_refuses_beyond_free_memory_minus_headroom_without_allocating(monkeypatch):
    fake_gpu(monkeypatch, free=10 * GiB, total=80 * GiB)
    # default headroom: max(2 GiB, 5% of 80 GiB = 4 GiB) -> 6 GiB usable
    with pytest.raises(
        uvm.OversubscriptionError,
        match=r"refusing to allocate 7\.00 GiB.*10\.00 GiB free.*4\.00 GiB are kept as "
        r"headroom.*allow_oversubscription=True",
    ):
        uvm.ManagedBuffer(7 * GiB)
    assert uvm.live_managed_bytes(0) == 0


def test_guard_counts_managed_memory_already_held(monkeypatch):
    fake_gpu(monkeypatch, free=10 * GiB, total=20 * GiB)
    monkeypatch.setitem(uvm._live_managed_bytes, 0, 5 * GiB)
    assert uvm.check_fits(3 * GiB, 0)[1] == 3 * GiB  # 10 - 2 headroom - 5 held
    with pytest.raises(uvm.OversubscriptionError, match="already holds 5.00 GiB"):
        uvm.check_fits(3 * GiB + 1, 0)


def test_guard_headroom_can_be_set(monkeypatch):
    fake_gpu(monkeypatch, free=10 * GiB, total=20 * GiB)
    uvm.check_fits(9 * GiB, 0, headroom_bytes=GiB)
    with pytest.raises(uvm.OversubscriptionError):
        uvm.check_fits(9 * GiB + 1, 0, headroom_bytes=GiB)


def test_opt_in_skips_the_guard(monkeypatch):
    monkeypatch.setattr(uvm, "mem_get_info", lambda device=0: pytest.fail("the guard ran"))
    monkeypatch.setattr(uvm, "device_attribute", lambda name, device=0: 1)

    def runtime():
        raise uvm.UVMError("stop here")

    monkeypatch.setattr(uvm, "_runtime", runtime)
    with pytest.raises(uvm.UVMError, match="stop here"):
        uvm.ManagedBuffer(GiB, allow_oversubscription=True)
    assert uvm.live_managed_bytes(0) == 0  # counted before the allocation, given back after


def test_gpu_without_concurrent_managed_access_is_refused(monkeypatch):
    queried = []

    def attribute(name, device=0):
        queried.append((name, device))
        return 0 if device == 1 else 1

    monkeypatch.setattr(uvm, "mem_get_info", lambda device=0: (10 * GiB, 20 * GiB))
    monkeypatch.setattr(uvm, "device_attribute", attribute)
    monkeypatch.setattr(uvm, "_concurrent_access_ok", set())
    with pytest.raises(
        uvm.UVMError,
        match=r"cuda:1 reports cudaDevAttrConcurrentManagedAccess = 0 .*WSL2.*cannot read "
        r"host-preferred managed pages in place",
    ):
        uvm.ManagedBuffer(GiB, 1)
    assert uvm.live_managed_bytes(1) == 0
    uvm.require_concurrent_managed_access(0)
    uvm.require_concurrent_managed_access(0)
    assert queried == [("ConcurrentManagedAccess", 1), ("ConcurrentManagedAccess", 0)]


def test_buffer_finalizer_never_raises(monkeypatch):
    monkeypatch.setattr(uvm, "_rt", object())
    buffer = uvm.ManagedBuffer.__new__(uvm.ManagedBuffer)
    buffer.ptr, buffer.nbytes, buffer.device = 0x1000, 1, 0

    def free():
        raise KeyError("module globals already torn down")

    buffer.free = free
    buffer.__del__()
    buffer.ptr = 0  # keeps the real finalizer away from the fake pointer


def test_prefetch_uses_the_current_stream_of_the_ranges_device(monkeypatch):
    calls = []

    class Runtime:
        class cudaError_t:
            cudaSuccess = 0

        def cudaPointerGetAttributes(self, ptr):
            return 0, types.SimpleNamespace(device=1)

        def cudaStream_t(self, handle):
            return handle

        def cudaMemPrefetchAsync_v2(self, ptr, nbytes, location, flags, stream):
            calls.append(("prefetch", location, stream))
            return (0,)

    monkeypatch.setattr(uvm, "_runtime", Runtime)
    monkeypatch.setattr(uvm, "_location", lambda location: location)
    monkeypatch.setattr(
        uvm.torch.cuda, "current_stream",
        lambda device=None: calls.append(("stream", device)) or types.SimpleNamespace(
            cuda_stream=100 + device),
    )
    uvm.prefetch(0x1000, 4096, uvm.CPU)  # the current device may be another one
    uvm.prefetch(0x1000, 4096, 1, device=2)
    uvm.prefetch(0x1000, 4096, 1, stream=7)
    assert calls == [
        ("stream", 1), ("prefetch", uvm.CPU, 101),
        ("stream", 2), ("prefetch", 1, 102),
        ("prefetch", 1, 7),
    ]


def test_nonpositive_size_is_refused():
    with pytest.raises(ValueError, match="must be positive, got 0"):
        uvm.ManagedBuffer(0)


@pytest.mark.skipif(uvm.available(), reason="checks the no-CUDA behaviour")
def test_without_cuda_calls_raise_a_clear_error():
    assert uvm.device_count() == 0 and not uvm.available()
    assert uvm.unavailable_reason()
    with pytest.raises(
        uvm.UVMError, match="cudaMemGetInfo failed|cudaGetDevice failed|not importable"
    ):
        uvm.mem_get_info(0)


def test_typed_view_reinterprets_bytes_any_dtype():
    base = torch.arange(64, dtype=torch.uint8)
    view = uvm.typed_view(base, torch.bfloat16, (2, 4), (8, 1), offset_bytes=16)
    assert view.dtype == torch.bfloat16 and view.data_ptr() == base.data_ptr() + 16
    if hasattr(torch, "float8_e4m3fn"):
        fp8 = uvm.typed_view(base, torch.float8_e4m3fn, (4, 8))
        assert fp8.view(torch.uint8).flatten()[5] == 5
    with pytest.raises(ValueError, match="multiples of the torch.float32 item size 4"):
        uvm.typed_view(base, torch.float32, (2,), offset_bytes=2)


# --- GPU ---------------------------------------------------------------------------------------

EXPERTS = 64
SPECS = {"w13": ((2 * 1024, 4096), torch.bfloat16), "w2": ((4096, 1024), torch.bfloat16)}
# 64 experts x 24 MiB (+ padding to 2 MiB slots) = about 1.6 GiB of managed memory


def host_array(store):
    """The store's bytes as a numpy array written and read by the CPU directly (not a copy)."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * store.nbytes).from_address(store.base_ptr))


@pytest.fixture
def gpu_store():
    store = ManagedExpertStore(EXPERTS, SPECS, "cuda:0")
    yield store
    torch.cuda.synchronize()
    store.free()


@pytest.mark.gpu
def test_managed_view_is_a_cuda_tensor_over_the_range(gpu_store):
    w13 = gpu_store["w13"]
    assert w13.device == torch.device("cuda", 0) and w13.dtype == torch.bfloat16
    assert w13.data_ptr() == gpu_store.base_ptr
    assert w13.stride(0) == gpu_store.slot_nbytes // 2


@pytest.mark.gpu
def test_residency_advice_shows_in_range_queries_and_neighbours_stay(gpu_store):
    rng = np.random.default_rng()
    resident = sorted(rng.choice(EXPERTS, size=20, replace=False).tolist())
    m = ExpertOffloadManager(
        [gpu_store], ExpertOffloadConfig(resident_selection="manual", resident_ids=resident)
    )
    m.synchronize()

    def check(resident_set):
        for e in range(EXPERTS):
            ptr, nbytes = gpu_store.expert_range(e)
            want = 0 if e in resident_set else uvm.CPU
            assert uvm.preferred_location(ptr, nbytes) == want, e
            if e not in resident_set:
                assert 0 in uvm.accessed_by(ptr, nbytes), e
            assert uvm.last_prefetch_location(ptr, nbytes) == want, e

    check(set(resident))
    # flip one expert each way, next to experts that keep their advice
    offloaded = [e for e in range(EXPERTS) if e not in resident]
    new = sorted(set(resident) - {resident[0]} | {offloaded[0]})
    result = m.readvise(0, new)
    m.synchronize()
    assert result.promoted == (offloaded[0],) and result.demoted == (resident[0],)
    check(set(new))


@pytest.mark.gpu
def test_device_memory_grows_by_about_the_resident_bytes_only():
    torch.cuda.synchronize()
    free_before, _ = uvm.mem_get_info(0)
    store = ManagedExpertStore(EXPERTS, SPECS, "cuda:0")
    m = ExpertOffloadManager([store], ExpertOffloadConfig(num_resident=16))
    m.synchronize()
    free_after, _ = uvm.mem_get_info(0)
    used = free_before - free_after
    resident = m.resident_bytes()
    assert resident == 16 * store.slot_nbytes
    # a little slack for driver bookkeeping; offloaded bytes (48 slots, ~1.2 GiB) must not show
    assert abs(used - resident) < 0.1 * resident + 64 * 2**20, (used, resident)
    store.free()


@pytest.mark.gpu
def test_a_packed_all_resident_store_is_advised_to_the_gpu_and_costs_its_dense_bytes():
    """Qwen3-30B-A3B-sized experts (9 MiB, 10 MiB in 2 MiB slots) packed back to back, all
    resident: advice covers every byte, the device pays about the dense bytes, and GPU reads
    see what was written."""
    specs = {"w13": ((2 * 768, 2048), torch.bfloat16), "w2": ((2048, 768), torch.bfloat16)}
    torch.cuda.synchronize()
    free_before, reserved_before = uvm.mem_get_info(0)[0], torch.cuda.memory_reserved(0)
    store = ManagedExpertStore(EXPERTS, specs, "cuda:0", alignment=PACKED_ALIGNMENT)
    try:
        assert store.slot_nbytes == 9 * 2**20
        m = ExpertOffloadManager([store], ExpertOffloadConfig(num_resident=EXPERTS))
        m.synchronize()
        for e in range(EXPERTS):
            assert uvm.preferred_location(*store.expert_range(e)) == 0, e
        w = torch.randn(EXPERTS, 2048, 768, device="cuda").bfloat16()
        store["w2"].copy_(w)
        assert torch.equal(store["w2"], w)
        del w
        torch.cuda.synchronize()
        used = (free_before - uvm.mem_get_info(0)[0]
                - (torch.cuda.memory_reserved(0) - reserved_before))
        assert m.resident_bytes() == store.nbytes == EXPERTS * 9 * 2**20
        # driver bookkeeping and the random generator's state, as in the test below; the 2 MiB
        # slots' padding (64 MiB here) would add 11%
        assert abs(used - store.nbytes) < 0.1 * store.nbytes + 64 * 2**20, (used, store.nbytes)
    finally:
        torch.cuda.synchronize()
        store.free()


@pytest.mark.gpu
def test_gpu_reads_offloaded_expert_values_written_by_the_host(gpu_store):
    m = ExpertOffloadManager([gpu_store], ExpertOffloadConfig(num_resident=8))
    m.synchronize()
    host = host_array(gpu_store)
    rng = np.random.default_rng()
    expert = 40  # offloaded
    ptr, nbytes = gpu_store.expert_range(expert)
    start = ptr - gpu_store.base_ptr
    w2_elems = 4096 * 1024
    w2_offset = gpu_store.specs["w2"].offset
    values = rng.standard_normal(w2_elems).astype(np.float32)
    bf16 = torch.from_numpy(values).bfloat16().view(torch.int16).numpy().view(np.uint8)
    host[start + w2_offset : start + w2_offset + bf16.size] = bf16  # plain CPU stores
    got = gpu_store["w2"][expert].float().cpu().flatten()  # read by a GPU kernel in place
    assert torch.equal(got, torch.from_numpy(values).bfloat16().float())
    assert uvm.preferred_location(ptr, nbytes) == uvm.CPU


@pytest.mark.gpu
def test_guard_refuses_oversized_request_on_the_gpu():
    free, total = uvm.mem_get_info(0)
    live = uvm.live_managed_bytes(0)
    with pytest.raises(uvm.OversubscriptionError, match="refusing to allocate"):
        uvm.ManagedBuffer(free + GiB, 0)
    assert uvm.live_managed_bytes(0) == live
    assert uvm.mem_get_info(0)[0] >= free - 256 * 2**20


@pytest.mark.gpu
def test_buffer_frees_exactly_once():
    buf = uvm.ManagedBuffer(64 * 2**20, 0)
    live = uvm.live_managed_bytes(0)
    buf.free()
    buf.free()
    assert buf.freed and uvm.live_managed_bytes(0) == live - 64 * 2**20


def test_gpu_without_cuda_bindings_is_an_error_not_a_silent_cpu_fallback(monkeypatch):
    monkeypatch.setattr(uvm, "_rt", None)
    monkeypatch.setattr(uvm, "_IMPORT_ERROR", ImportError("No module named 'cuda'"))
    monkeypatch.setattr(uvm.torch.cuda, "is_available", lambda: True)
    with pytest.raises(uvm.UVMError, match="cuda-bindings>=12.9.1"):
        uvm.available()
    monkeypatch.setattr(uvm.torch.cuda, "is_available", lambda: False)
    assert not uvm.available()
