"""Runtime safety of the manager on the CPU path: fault injection at every advice call of a
re-advise (advice, residency and policy as before), worker failures, adaptive residency
following a routing shift in batch-1 decode, a decode thread that never waits on advice, and
close()."""

import gc
import threading
import time

import numpy as np
import pytest
import torch

from moe_uvm import uvm
from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.layer import FusedMoE
from moe_uvm.manager import ExpertOffloadManager, ReadviseError
from moe_uvm.offload import offload_experts
from moe_uvm.policies.warmup import AdaptiveSettings, tokens_to_follow_shift
from moe_uvm.store import ManagedExpertStore, Pace

from helpers import feed, routed


def stores(num_layers=2, num_experts=8):
    specs = {"w13": ((16, 8), torch.float16), "w2": ((8, 8), torch.float16)}
    return [
        ManagedExpertStore(num_experts, specs, "cpu", alignment=4096) for _ in range(num_layers)
    ]


class FakeDriver:
    """The advice state of every expert slot as a driver would keep it, from the three calls
    the stores make; raises UVMError on call number `fail_at` (0-based)."""

    def __init__(self, monkeypatch, store_list, fail_at=None, error=uvm.UVMError):
        self.stores = store_list
        self.fail_at, self.error, self.calls = fail_at, error, 0
        self.state = {}  # (layer, expert) -> [preferred, accessed_by, location]
        for store in store_list:
            store.is_managed = True  # advice now reaches the (fake) driver
            store.device = torch.device("cuda", 0)
        monkeypatch.setattr(uvm, "set_preferred_location", self._call(0))
        monkeypatch.setattr(uvm, "set_accessed_by", self._call(1))
        monkeypatch.setattr(uvm, "prefetch", self._call(2))

    def _experts(self, ptr, nbytes):
        for layer, store in enumerate(self.stores):
            first, rest = divmod(ptr - store.base_ptr, store.slot_nbytes)
            if 0 <= first < store.num_experts and rest == 0:
                return [(layer, first + i) for i in range(nbytes // store.slot_nbytes)]
        raise AssertionError(f"advice on an unknown range 0x{ptr:x}")

    def _call(self, field):
        def call(ptr, nbytes, location, *args):
            if self.calls == self.fail_at:
                self.calls += 1
                raise self.error("cudaMemAdvise failed: cudaErrorInvalidValue (injected)")
            self.calls += 1
            for key in self._experts(ptr, nbytes):
                entry = self.state.setdefault(key, [None, None, None])
                entry[field] = location
        return call

    def snapshot(self):
        return {key: tuple(value) for key, value in self.state.items()}


def resident_of(driver, layer, num_experts):
    return tuple(e for e in range(num_experts) if driver.state[(layer, e)][0] == 0)


def managed(monkeypatch, config, num_layers=2, num_experts=8):
    """A manager whose stores talk to a FakeDriver, with its initial advice applied there."""
    s = stores(num_layers, num_experts)
    m = ExpertOffloadManager(s, config)
    driver = FakeDriver(monkeypatch, s)
    for layer in range(num_layers):
        m._apply_all(layer, m.resident_ids(layer))
    return m, driver


def test_every_advice_state_sets_accessed_by_so_undo_is_exact(monkeypatch):
    m, driver = managed(monkeypatch, ExpertOffloadConfig(num_resident=3))
    for layer in range(2):
        for e in range(8):
            preferred, accessed, location = driver.state[(layer, e)]
            assert accessed == 0  # both states keep the GPU mapped: no page faults
            assert preferred == location == (0 if e < 3 else uvm.CPU)
    m.close()


def test_a_failure_at_any_advice_call_leaves_everything_as_before(monkeypatch):
    m, driver = managed(monkeypatch, ExpertOffloadConfig(num_resident=3))
    before = driver.snapshot()
    driver.calls = 0
    m.readvise(0, [1, 4, 6, 7])  # demote runs (0,), (2,); promote (4,), (6, 7): 12 calls
    total = driver.calls
    assert total == 12
    m.close()
    for fail_at in range(total):
        m, driver = managed(monkeypatch, ExpertOffloadConfig(num_resident=3))
        assert driver.snapshot() == before
        driver.calls, driver.fail_at = 0, fail_at
        with pytest.raises(ReadviseError, match=r"injected.*previous residency \(3 experts\) "
                                                r"restored"):
            m.readvise(0, [1, 4, 6, 7])
        assert driver.snapshot() == before, fail_at
        assert m.resident_ids(0) == (0, 1, 2) and m.resident_ids(1) == (0, 1, 2)
        assert m.warmup.resident[0].nonzero()[0].tolist() == [0, 1, 2]
        m.close()


def test_an_undo_that_fails_too_says_not_restored(monkeypatch):
    m, driver = managed(monkeypatch, ExpertOffloadConfig(num_resident=3))
    real = driver._call(0)
    calls = []

    def flaky(ptr, nbytes, location, *args):
        calls.append(location)
        if len(calls) >= 2:  # the first demote works, everything after it fails
            raise uvm.UVMError("cudaErrorLaunchFailure (injected)")
        real(ptr, nbytes, location)

    monkeypatch.setattr(uvm, "set_preferred_location", flaky)
    with pytest.raises(ReadviseError, match="NOT fully restored"):
        m.readvise(0, [1, 2, 5])
    assert m.resident_ids(0) == (0, 1, 2)  # the manager keeps the set it knows was advised
    m.close()


def test_a_failing_slot_mask_update_rolls_the_advice_back(monkeypatch):
    m, driver = managed(monkeypatch, ExpertOffloadConfig(num_resident=3))
    before = driver.snapshot()

    class BrokenCache:
        calls = []

        def set_layer_resident(self, layer, ids, stream=None):
            self.calls.append(tuple(ids))
            if len(self.calls) == 1:
                raise RuntimeError("slot mask copy failed")

    m.slot_cache = BrokenCache()
    with pytest.raises(ReadviseError, match="RuntimeError: slot mask copy failed.*restored"):
        m.readvise(1, [0, 5, 6])
    assert driver.snapshot() == before and m.resident_ids(1) == (0, 1, 2)
    assert BrokenCache.calls == [(0, 5, 6), (0, 1, 2)]  # the mask is put back too
    m.slot_cache = None
    m.close()


def test_worker_exceptions_are_caught_reported_and_the_policy_resynced(monkeypatch, caplog):
    cfg = ExpertOffloadConfig(num_resident=2, resident_selection="frequency", warmup_tokens=32,
                              adaptive=True)
    m = ExpertOffloadManager(stores(), cfg)

    def broken(fresh=True):
        m.warmup.resident[:] = True  # a half-done decision: the policy now disagrees
        raise RuntimeError("decision crashed")

    monkeypatch.setattr(m.warmup, "decide", broken)
    feed(m, routed(32, [5, 6]))
    with caplog.at_level("WARNING", logger="moe_uvm"):
        m.wait_idle()
    # each attempt (the copy the last eager step queued, the one wait_idle queued) failed
    assert m.failures and all("RuntimeError: decision crashed" in str(f) for f in m.failures)
    assert "decision crashed" in caplog.text
    assert m.resident_ids(0) == (0, 1)
    np.testing.assert_array_equal(m.warmup.resident[:, :2], True)  # resynced to what stands
    assert m.warmup.resident.sum() == 4
    monkeypatch.undo()
    assert m.readvise(0, [3, 4]).promoted == (3, 4)  # the worker is still alive
    m.close()


def test_adaptive_residency_follows_a_routing_shift_in_batch_one_decode():
    """Hot set A for `before` tokens, then hot set B, one token per step (top-2 of 4 hot
    experts: each routed 0.5 times per token). N, the tokens until B must be resident, comes
    from the half-life, the interval and the history (`tokens_to_follow_shift`)."""
    L, E, R, before = 2, 16, 4, 512
    settings = AdaptiveSettings()
    cfg = ExpertOffloadConfig(num_resident=R, resident_selection="frequency", warmup_tokens=64,
                              adaptive=True)
    m = ExpertOffloadManager(stores(L, E), cfg)
    hot_a, hot_b = [8, 9, 10, 11], [12, 13, 14, 15]
    for step in range(before):
        feed(m, routed(1, hot_a[2 * (step % 2):][:2]))
        m.wait_idle()
    assert all(m.resident_ids(layer) == tuple(hot_a) for layer in range(L))
    n = tokens_to_follow_shift(settings, before, rate=0.5)
    assert settings.interval_tokens < n < before  # neither instant nor never
    share = []
    for step in range(n):
        feed(m, routed(1, hot_b[2 * (step % 2):][:2]))
        m.wait_idle()
        share.append(min(len(set(m.resident_ids(layer)) & set(hot_b)) for layer in range(L)))
    assert share[-1] >= 0.8 * R, (n, share)
    assert share[0] == 0
    m.close()


def test_batch_one_decode_is_counted_by_default():
    cfg = ExpertOffloadConfig(num_resident=2, resident_selection="frequency", warmup_tokens=8)
    m = ExpertOffloadManager(stores(), cfg)
    for _ in range(8):
        feed(m, routed(1, [6, 7]))
    m.wait_idle()
    assert m.resident_ids(0) == (6, 7) and m.routing_counts()[0, 6] == 8
    m.close()


def test_the_decode_thread_never_waits_on_advice(monkeypatch):
    """Advice that takes 0.4 s on the worker: decode steps (record) go on meanwhile. (The
    routing counts run as plain torch here: in the Triton interpreter each launch alone takes
    milliseconds, which says nothing about waiting.)"""
    from helpers import use_reference_kernels

    use_reference_kernels(monkeypatch)
    s = stores()
    cfg = ExpertOffloadConfig(num_resident=2, resident_selection="frequency", warmup_tokens=16,
                              adaptive=True, adaptive_interval_tokens=1)
    m = ExpertOffloadManager(s, cfg)
    started = threading.Event()

    def slow(ids, stream=None, pace=None):
        started.set()
        time.sleep(0.4)

    for store in s:
        monkeypatch.setattr(store, "advise_resident", slow)
    feed(m, routed(16, [5, 6]))  # the warmup decision: promotes 5, 6 in each layer
    assert started.wait(5)
    begin = time.perf_counter()
    for _ in range(200):
        feed(m, routed(1, [3, 4]))
    elapsed = time.perf_counter() - begin
    assert elapsed < 0.2, f"200 decode steps took {elapsed:.3f} s while advice ran"
    m.wait_idle()
    assert m.stats()["readvises"] >= 2 and not m.failures
    m.close()


def layers(num_layers=2, E=8, H=16, I=8):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(num_layers):
        layer = FusedMoE(E, 2, H, I, dtype=torch.float32)
        layer.w13_weight.data.copy_(torch.randn(layer.w13_weight.shape, generator=g))
        layer.w2_weight.data.copy_(torch.randn(layer.w2_weight.shape, generator=g))
        out.append(layer)
    return out


def workers():
    return [t for t in threading.enumerate() if t.name == "moe-uvm-readvise"]


def test_close_stops_the_worker_and_layers_refuse_to_run():
    mods = layers()
    with offload_experts(mods, ExpertOffloadConfig(num_resident=2), device="cpu") as m:
        assert m._thread in workers()
        x = torch.randn(3, 16)
        mods[0](x, torch.randn(3, 8))
    assert m.closed and m._thread not in workers()
    with pytest.raises(RuntimeError, match="offload manager was closed"):
        mods[0](x, torch.randn(3, 8))
    with pytest.raises(ReadviseError, match="closed"):
        m.readvise(0, [1])
    m.close()  # idempotent
    m.wait_idle()  # nothing to wait for
    assert "closed" in m.summary()


def test_twenty_managers_built_and_closed_leave_no_threads():
    base = set(workers())
    for _ in range(20):
        cfg = ExpertOffloadConfig(num_resident=2, resident_selection="frequency",
                                  warmup_tokens=8, adaptive=True)
        m = offload_experts(layers(), cfg, device="cpu")
        feed(m, routed(8, [4, 5]))
        m.wait_idle()
        m.close()
    assert set(workers()) <= base  # (threads of other tests' managers may end meanwhile)


def test_an_unreferenced_manager_stops_its_worker():
    m = ExpertOffloadManager(stores(), ExpertOffloadConfig(num_resident=2))
    thread = m._thread
    del m
    gc.collect()
    thread.join(5)
    assert not thread.is_alive()


def test_paced_migration_moves_chunks_one_at_a_time(monkeypatch):
    store = stores(1)[0]
    store.is_managed, store.device = True, torch.device("cuda", 0)
    calls = []
    monkeypatch.setattr(uvm, "set_preferred_location", lambda p, n, loc: calls.append("pref"))
    monkeypatch.setattr(uvm, "set_accessed_by", lambda p, n, d: calls.append("access"))
    monkeypatch.setattr(uvm, "prefetch",
                        lambda p, n, loc, s=None: calls.append(("fetch", p - store.base_ptr, n)))
    monkeypatch.setattr(uvm, "stream_synchronize", lambda s: calls.append(("sync", s)))
    slot = store.slot_nbytes
    chunk = slot // 2 + 4096  # not a divisor: the last chunk is short
    store.advise_resident([1, 2], stream=7, pace=Pace(chunk))
    fetches = [c for c in calls if c[0] == "fetch"]
    assert calls[:2] == ["pref", "access"]  # advice for the whole run first
    assert [c[1] for c in fetches] == list(range(slot, 3 * slot, chunk))
    assert sum(c[2] for c in fetches) == 2 * slot
    assert all(calls[i + 1] == ("sync", 7) for i, c in enumerate(calls) if c[0] == "fetch")
    calls.clear()
    store.advise_offloaded([3], stream=7)  # no pace: one call per run, not waited for
    assert calls == ["pref", "access", ("fetch", 3 * slot, slot)]
    with pytest.raises(ValueError, match="chunk_bytes > 0"):
        Pace(0)
