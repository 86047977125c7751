"""The oversubscription guard counts every part a load puts on the GPU and reserves it atomically;
offload_experts and its Hugging Face callers convert everything or leave the model untouched.
CPU tests: the GPU is a mock (free memory, device attributes), no allocation reaches CUDA."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import moe_uvm.offload as offload
from moe_uvm import memory, uvm
from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.layer import FusedMoE
from moe_uvm.slots import SlotCache
from moe_uvm.store import ManagedExpertStore

from helpers import TinyMoEModel

GiB, MiB = 2**30, 2**20


class FakeRuntime:
    """Just enough of cuda.bindings.runtime for ManagedBuffer: allocations are recorded, never
    made."""

    class cudaError_t:
        cudaSuccess = 0

    cudaMemAttachGlobal = 1

    def __init__(self) -> None:
        self.allocated: list[int] = []
        self.freed: list[int] = []

    def cudaGetDevice(self):
        return 0, 0

    def cudaSetDevice(self, device):
        return (0,)

    def cudaMallocManaged(self, nbytes, flags):
        self.allocated.append(nbytes)
        return 0, 0x10000 * len(self.allocated)

    def cudaFree(self, ptr):
        self.freed.append(ptr)
        return (0,)


@pytest.fixture
def fake_gpu(monkeypatch):
    """A GPU with 40 GiB (so 2 GiB of default headroom) and `free` bytes free; returns the
    runtime mock so tests can see what was allocated."""
    runtime = FakeRuntime()
    state = {"free": 10 * GiB, "queries": 0}

    def mem_get_info(device=0):
        state["queries"] += 1
        return state["free"], 40 * GiB

    monkeypatch.setattr(uvm, "mem_get_info", mem_get_info)
    monkeypatch.setattr(uvm, "device_attribute", lambda name, device=0: 1)
    monkeypatch.setattr(uvm, "_concurrent_access_ok", set())
    monkeypatch.setattr(uvm, "_runtime", lambda: runtime)
    monkeypatch.setattr(uvm, "_live_managed_bytes", uvm.defaultdict(int))
    monkeypatch.setattr(uvm, "_reserved_bytes", uvm.defaultdict(int))
    runtime.state = state
    return runtime


def meta_layers(num_layers=4, E=8, H=1024, I=512, dtype=torch.bfloat16):
    """FusedMoE layers on the meta device: shapes without memory. Each expert is 3 MiB of bf16,
    a 4 MiB store slot."""
    return [FusedMoE(E, 2, H, I, dtype=dtype, device="meta") for _ in range(num_layers)]


# --- the plan and the reservation --------------------------------------------------------------


def test_slots_that_push_a_fitting_model_over_are_refused_before_any_allocation(fake_gpu):
    layers = meta_layers()
    config = ExpertOffloadConfig(num_resident=2, prefetch_slots=4)
    plan = offload.plan_memory(layers, config, "cuda:0")
    stores = plan.parts[memory.EXPERT_STORES]
    assert stores == 4 * 8 * 4 * MiB
    assert plan.parts[memory.SLOT_CACHES] > 4 * 4 * 3 * MiB  # slots and their maps
    # 2 GiB headroom + 150 MiB: the stores (128 MiB) fit alone, not with 48 MiB of slots.
    fake_gpu.state["free"] = 2 * GiB + 150 * MiB
    uvm.check_fits(stores, 0)
    before = [(m.w13_weight, m.w2_weight) for m in layers]
    with pytest.raises(uvm.OversubscriptionError) as refused:
        offload.offload_experts(layers, config, device="cuda:0")
    message = str(refused.value)
    assert "\n" not in message
    for part in (
        "managed expert stores 128.00 MiB",
        f"slot caches {uvm.format_bytes(plan.parts[memory.SLOT_CACHES])}",
        f"routing counters {uvm.format_bytes(plan.parts[memory.ROUTING_COUNTERS])}",
        "2.15 GiB free",
        "2.00 GiB are kept as headroom",
        "already holds 0 B of managed memory",
        "allow_oversubscription=True",
    ):
        assert part in message, (part, message)
    assert fake_gpu.allocated == []
    assert uvm.live_managed_bytes(0) == 0 and uvm.reserved_bytes(0) == 0
    assert [(m.w13_weight, m.w2_weight) for m in layers] == before


def test_managed_allocations_inside_a_reservation_draw_from_it(fake_gpu):
    with uvm.reserve({"managed expert stores": 3 * GiB, "slot caches": GiB}, 0) as held:
        queries = fake_gpu.state["queries"]
        buffer = uvm.ManagedBuffer(2 * GiB, 0)
        assert fake_gpu.state["queries"] == queries  # drawn, not checked again
        assert held.remaining == 2 * GiB and uvm.reserved_bytes(0) == 2 * GiB
        assert uvm.live_managed_bytes(0) == 2 * GiB
    assert uvm.reserved_bytes(0) == 0 and uvm.live_managed_bytes(0) == 2 * GiB
    assert fake_gpu.allocated == [2 * GiB]
    buffer.free()
    assert uvm.live_managed_bytes(0) == 0


def test_two_reservations_that_fit_alone_but_not_together_the_second_is_refused(fake_gpu):
    # 10 GiB free - 2 GiB headroom = 8 GiB for both
    def second():
        with uvm.reserve({"managed expert stores": 5 * GiB}, 0):
            return "reserved"

    with ThreadPoolExecutor(1) as other_thread:
        with uvm.reserve({"managed expert stores": 5 * GiB}, 0):
            with pytest.raises(uvm.OversubscriptionError, match=r"5\.00 GiB reserved by loads"):
                other_thread.submit(second).result()
            with pytest.raises(uvm.OversubscriptionError):
                uvm.check_fits(4 * GiB, 0)
        assert other_thread.submit(second).result() == "reserved"
    assert uvm.reserved_bytes(0) == 0


def test_reservation_is_atomic_across_threads(fake_gpu):
    """16 threads race for 1 GiB each of 8 GiB, winners holding theirs until every thread has
    tried: exactly 8 get it."""
    start, tried = threading.Barrier(16), threading.Barrier(17, timeout=10)

    def take():
        start.wait()
        try:
            with uvm.reserve({"managed expert stores": GiB}, 0):
                tried.wait()
                return True
        except uvm.OversubscriptionError:
            tried.wait()
            return False

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(take) for _ in range(16)]
        tried.wait()
        assert sum(f.result() for f in futures) == 8
    assert uvm.reserved_bytes(0) == 0


def test_nested_reservations_count_a_part_once_and_grow_by_what_is_new(fake_gpu):
    with uvm.reserve({"managed expert stores": 4 * GiB, "non-expert weights": GiB}, 0) as outer:
        with uvm.reserve({"managed expert stores": 4 * GiB}, 0) as inner:
            assert inner is outer and uvm.reserved_bytes(0) == 5 * GiB
        with uvm.reserve({"managed expert stores": 4 * GiB, "slot caches": 2 * GiB}, 0):
            assert uvm.reserved_bytes(0) == 7 * GiB
        with pytest.raises(uvm.OversubscriptionError, match=r"slot caches 3\.00 GiB"):
            with uvm.reserve({"slot caches": 5 * GiB}, 0):
                pass
    assert uvm.reserved_bytes(0) == 0


def test_a_failed_allocation_gives_its_bytes_back(fake_gpu, monkeypatch):
    def fail(nbytes, flags):
        return 2, 0

    monkeypatch.setattr(fake_gpu, "cudaMallocManaged", fail)
    monkeypatch.setattr(uvm, "_error_name", lambda err: "cudaErrorMemoryAllocation")
    with uvm.reserve({"managed expert stores": 2 * GiB}, 0):
        with pytest.raises(uvm.UVMError, match="cudaErrorMemoryAllocation"):
            uvm.ManagedBuffer(GiB, 0)
        assert uvm.reserved_bytes(0) == 2 * GiB and uvm.live_managed_bytes(0) == 0
    with pytest.raises(uvm.UVMError, match="cudaErrorMemoryAllocation"):
        uvm.ManagedBuffer(GiB, 0)
    assert uvm.live_managed_bytes(0) == 0


def test_opt_in_neither_checks_nor_reserves(fake_gpu):
    fake_gpu.state["free"] = 0
    plan = memory.MemoryPlan(torch.device("cuda", 0), {"managed expert stores": GiB})
    with plan.reserve(allow_oversubscription=True) as held:
        assert held is None
        buffer = uvm.ManagedBuffer(GiB, 0, allow_oversubscription=True)
    assert fake_gpu.state["queries"] == 0 and fake_gpu.allocated == [GiB]
    buffer.free()


def test_cpu_plans_are_computed_and_not_checked(monkeypatch):
    monkeypatch.setattr(uvm, "mem_get_info", lambda device=0: pytest.fail("no GPU is involved"))
    layers = meta_layers(num_layers=2)
    plan = offload.plan_memory(layers, ExpertOffloadConfig(), "cpu")
    assert set(plan.parts) == {memory.EXPERT_STORES, memory.ROUTING_COUNTERS}
    with plan.reserve() as held:
        assert held is None


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("with_counts", [False, True])
def test_slot_cache_size_equals_the_tensors_a_slot_cache_allocates(num_layers, with_counts):
    """Built over meta weights, so the cache's device tensors (on meta) stand apart from its
    host-side ones (on the CPU)."""
    E, H, I, S = 6, 16, 8, 3
    weights = [
        (torch.empty(E, 2 * I, H, dtype=torch.bfloat16, device="meta"),
         torch.empty(E, H, I, dtype=torch.bfloat16, device="meta"))
        for _ in range(num_layers)
    ]
    counts = torch.randint(0, 100, (num_layers, E)) if with_counts else None
    cache = SlotCache(weights, [[0]] * num_layers, S, top_k=2, counts=counts)
    inputs = {id(t) for pair in weights for t in pair}
    found = {}

    def collect(value):
        if isinstance(value, torch.Tensor):
            if id(value) not in inputs and value.device == cache.device:
                found[id(value)] = value
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)
        elif hasattr(value, "__dict__") and type(value).__module__.startswith("moe_uvm"):
            for item in vars(value).values():
                collect(item)

    collect(cache)
    assert cache.device.type == "meta" and len(found) > 5 * num_layers
    allocated = sum(t.nbytes for t in found.values())
    assert allocated == memory.slot_cache_nbytes(
        num_layers, E, S, (2 * I, H), (H, I), torch.bfloat16, with_counts
    )


# --- all or nothing ----------------------------------------------------------------------------


def snapshot(layers):
    return [
        (m.w13_weight, m.w2_weight, m.w13_weight.data_ptr(), m.w2_weight.data_ptr(),
         m.w13_weight.weight_loader, m.record_routing, m.slot_cache, m.layer_index,
         sorted(vars(m)))
        for m in layers
    ]


@pytest.fixture
def store_log(monkeypatch):
    """Every ManagedExpertStore made and every one freed (by id), and the threads alive now."""
    log = {"made": [], "freed": set(), "threads": set(threading.enumerate())}
    init, free = ManagedExpertStore.__init__, ManagedExpertStore.free

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        log["made"].append(self)

    def recording_free(self):
        log["freed"].add(id(self))
        free(self)

    monkeypatch.setattr(ManagedExpertStore, "__init__", recording_init)
    monkeypatch.setattr(ManagedExpertStore, "free", recording_free)
    return log


def assert_released(log):
    assert log["made"], "the failure was meant to come after an allocation"
    assert {id(s) for s in log["made"]} <= log["freed"]
    started = [t for t in threading.enumerate() if t not in log["threads"] and t.is_alive()]
    assert not [t for t in started if t.name.startswith("moe-uvm")], started


def fail_on_call(monkeypatch, owner, name, call):
    """Make owner.name raise on its `call`-th call (1-based); earlier calls run normally."""
    original = getattr(owner, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError(f"injected failure in {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def test_store_allocation_failing_on_layer_3_leaves_layers_untouched(monkeypatch, store_log):
    model = TinyMoEModel(layers=4)
    layers = list(model.moes)
    before = snapshot(layers)
    fail_on_call(monkeypatch, ManagedExpertStore, "__init__", 3)
    with pytest.raises(RuntimeError, match="injected failure in __init__"):
        offload.offload_experts(model, ExpertOffloadConfig(num_resident=2))
    assert snapshot(layers) == before
    assert len(store_log["made"]) == 2
    assert_released(store_log)


def test_weight_copy_failing_leaves_layers_untouched(store_log):
    model = TinyMoEModel(layers=4)
    layers = list(model.moes)
    # Layer 2's w2 is one column short: copying it into its store raises after layers 0 and 1
    # were re-pointed at theirs.
    E, H, I = 8, 32, 16
    layers[2].w2_weight = torch.nn.Parameter(torch.randn(E, H, I - 1), requires_grad=False)
    before = snapshot(layers)
    with pytest.raises(RuntimeError):
        offload.offload_experts(model, ExpertOffloadConfig(num_resident=2))
    assert snapshot(layers) == before
    assert_released(store_log)


def test_slot_cache_failing_leaves_layers_untouched(monkeypatch, store_log):
    model = TinyMoEModel(layers=3)
    layers = list(model.moes)
    before = snapshot(layers)
    fail_on_call(monkeypatch, SlotCache, "__init__", 1)
    config = ExpertOffloadConfig(num_resident=2, prefetch="speculative", prefetch_slots=2)
    with pytest.raises(RuntimeError, match="injected failure"):
        offload.offload_experts(model, config)
    assert snapshot(layers) == before
    assert_released(store_log)


@pytest.mark.parametrize("prefetch, message", [
    ("lookahead", r"prefetch='lookahead' needs next_gates.*first 2 of 3 layers, got none"),
    ("frequency", r"prefetch='frequency' needs routing counts: set profile_path"),
])
def test_slot_cache_inputs_are_checked_before_anything_is_allocated(prefetch, message, store_log):
    model = TinyMoEModel(layers=3)
    before = snapshot(model.moes)
    config = ExpertOffloadConfig(num_resident=2, prefetch=prefetch, prefetch_slots=2)
    with pytest.raises(ValueError, match=message):
        offload.offload_experts(model, config)
    assert snapshot(model.moes) == before
    assert store_log["made"] == []


def test_successful_offload_still_wires_every_layer():
    model = TinyMoEModel(layers=3)
    manager = offload.offload_experts(
        model, ExpertOffloadConfig(num_resident=2, prefetch="speculative", prefetch_slots=2)
    )
    assert manager.layers == list(model.moes)
    for index, module in enumerate(model.moes):
        assert module.layer_index == index and module.slot_cache is manager.slot_cache
        assert module.w13_weight.data_ptr() == manager.stores[index]["w13"].data_ptr()
    manager.close()
