"""Runtime safety on the GPU (issue 13): CUDA-graph capture while the worker re-advises, graph
replays bitwise equal to an all-resident model after re-advice, managers that give back every
thread and byte on close, and a re-advise that fails halfway leaving the advice as it was."""

import gc
import threading

import pytest
import torch

from moe_uvm import uvm
from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.layer import FusedMoE
from moe_uvm.manager import ReadviseError
from moe_uvm.offload import offload_experts

from helpers import random_moe

# DeepSeek-V2-Lite's routing (64 experts, top-6, H=2048) with half its intermediate size, so the
# offloaded model and its all-resident twin stay at 2.2 GB of managed memory each.
LAYERS, EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 4, 64, 6, 2048, 704
RESIDENT, SLOTS, PREFILL = 16, 8, 64


def twin_models(num_layers, experts, top_k, hidden, intermediate, config, seed=0):
    """The same random weights offloaded under `config` and all resident (the reference):
    layers built on the meta device, stores filled one layer at a time from the GPU."""
    models = []
    for cfg in (config, ExpertOffloadConfig(num_resident=-1)):
        layers = [FusedMoE(experts, top_k, hidden, intermediate, dtype=torch.bfloat16,
                           device="meta") for _ in range(num_layers)]
        models.append((layers, offload_experts(layers, cfg, device="cuda")))
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for layer in range(num_layers):
        w13 = torch.randn((experts, 2 * intermediate, hidden), generator=gen, device="cuda",
                          dtype=torch.bfloat16).mul_(hidden**-0.5)
        w2 = torch.randn((experts, hidden, intermediate), generator=gen, device="cuda",
                         dtype=torch.bfloat16).mul_(intermediate**-0.5)
        for layers, _ in models:
            layers[layer].w13_weight.data.copy_(w13)
            layers[layer].w2_weight.data.copy_(w2)
    torch.cuda.synchronize()
    return models


def decode(layers, x, logits):
    """Residual stack: h += moe_l(h, logits[l]) for each layer."""
    h = x
    for layer, moe in enumerate(layers):
        h = h + moe(h, logits[layer])
    return h


def hot_logits(num_tokens, hot, num_layers=LAYERS, experts=EXPERTS):
    """Router logits whose top-k falls inside the `hot` experts of every layer."""
    logits = torch.randn(num_layers, num_tokens, experts, device="cuda")
    logits[:, :, list(hot)] += 20.0
    return logits


def rotating_hot(step):
    """A different quarter of the experts each step: every decision swaps whole resident sets."""
    first = RESIDENT * (step % (EXPERTS // RESIDENT))
    return range(first, first + RESIDENT)


def capture(fn):
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def warm_up_on_side_stream(fn, times=3):
    """What torch's CUDA-graph docs ask before a capture: lazy init and compiles run on a side
    stream, not inside the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(side)


@pytest.mark.gpu
def test_gpu_capture_succeeds_while_readvise_is_in_flight_and_replays_match_all_resident():
    config = ExpertOffloadConfig(
        num_resident=RESIDENT, resident_selection="frequency", warmup_tokens=PREFILL,
        min_batch_tokens=1, adaptive=True, adaptive_interval_tokens=PREFILL,
        adaptive_half_life_tokens=32, prefetch="speculative", prefetch_slots=SLOTS,
    )
    (layers, manager), (ref_layers, ref_manager) = twin_models(
        LAYERS, EXPERTS, TOP_K, HIDDEN, INTERMEDIATE, config)
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(LAYERS, 1, EXPERTS, device="cuda")
    with manager, ref_manager:
        prefill_x = torch.randn(PREFILL, HIDDEN, device="cuda", dtype=torch.bfloat16)
        decode(layers, prefill_x, hot_logits(PREFILL, rotating_hot(0)))
        warm_up_on_side_stream(lambda: decode(layers, x, logits))
        warm_up_on_side_stream(lambda: decode(ref_layers, x, logits))
        manager.wait_idle()
        failures, graph, out = [], None, None
        for step in range(1, 101):
            # The eager prefill makes a decision due; the capture starts while it is carried out.
            decode(layers, prefill_x, hot_logits(PREFILL, rotating_hot(step)))
            try:
                graph, out = capture(lambda: decode(layers, x, logits))
            except RuntimeError as exc:
                failures.append(f"step {step}: {exc}")
                graph = out = None
        manager.wait_idle()
        stats = manager.stats()
        print(f"\ncaptures during re-advise: {100 - len(failures)}/100 succeeded; {stats}")
        assert not failures, f"{len(failures)}/100 captures failed, first: {failures[0]}"
        assert stats["promoted"] >= 20 * RESIDENT, f"too few re-advises to test anything: {stats}"

        ref_graph, ref_out = capture(lambda: decode(ref_layers, x, logits))
        mismatches = []
        for step in range(101, 121):
            decode(layers, prefill_x, hot_logits(PREFILL, rotating_hot(step)))
            if step % 2:  # half the replays while the re-advise is still in flight
                manager.wait_idle()
            x.copy_(torch.randn_like(x))
            logits.copy_(torch.randn_like(logits))
            graph.replay()
            ref_graph.replay()
            torch.cuda.synchronize()
            if not torch.equal(out, ref_out):
                mismatches.append(step)
        manager.wait_idle()
        assert not mismatches, f"graph replays differ from all-resident at steps {mismatches}"
        assert manager.failures == [] and manager.stats()["failures"] == 0, manager.failures


def small_manager(device):
    layers = [random_moe(16, 2, 256, 128, torch.bfloat16, device) for _ in range(2)]
    config = ExpertOffloadConfig(
        num_resident=4, resident_selection="frequency", warmup_tokens=16, min_batch_tokens=1,
        adaptive=True, adaptive_interval_tokens=16, prefetch="speculative", prefetch_slots=4,
        adaptive_poll_ms=1.0,
    )
    return layers, offload_experts(layers, config, device=device)


def run_and_close(use_with: bool) -> list[FusedMoE]:
    layers, manager = small_manager("cuda")
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)

    def steps():
        for _ in range(4):
            decode(layers, x, torch.randn(len(layers), 16, 16, device="cuda"))
        manager.wait_idle()

    if use_with:
        with manager:
            steps()
    else:
        steps()
        manager.close()
    manager.close()  # idempotent
    return layers


def measure(device):
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return (threading.active_count(), torch.cuda.memory_allocated(),
            uvm.mem_get_info(device)[0], uvm.live_managed_bytes(device))


@pytest.mark.gpu
def test_gpu_twenty_managers_built_and_closed_give_back_threads_and_memory():
    device = torch.cuda.current_device()
    # One build/close first: lazy CUDA init, the Triton compiles and torch's allocator pools are
    # one-time costs, not leaks; the start is measured after them.
    layers = run_and_close(use_with=True)
    with pytest.raises((RuntimeError, ValueError), match="(?i)clos"):
        decode(layers, torch.randn(1, 256, device="cuda", dtype=torch.bfloat16),
               torch.randn(2, 1, 16, device="cuda"))
    del layers
    threads, allocated, free, managed = measure(device)
    for i in range(20):
        run_and_close(use_with=bool(i % 2))
    threads_end, allocated_end, free_end, managed_end = measure(device)
    assert threads_end == threads, f"threads {threads} -> {threads_end}"
    assert abs(allocated_end - allocated) <= 16 << 20, f"allocated {allocated} -> {allocated_end}"
    assert free - free_end <= 256 << 20, f"driver free {free} -> {free_end}"
    assert managed_end == managed, f"live managed bytes {managed} -> {managed_end}"


def advice(store):
    """(preferred location, accessed-by devices) of every expert's range, from the driver."""
    return [(uvm.preferred_location(*store.expert_range(e)),
             tuple(uvm.accessed_by(*store.expert_range(e)))) for e in range(store.num_experts)]


def fail_second_call(monkeypatch):
    """Make the 2nd uvm.set_accessed_by call (from any thread) raise UVMError; returns the call
    counter."""
    real, calls = uvm.set_accessed_by, []

    def flaky(ptr, nbytes, device):
        calls.append(ptr)
        if len(calls) == 2:
            raise uvm.UVMError("injected: cudaMemAdvise(SetAccessedBy) failed")
        real(ptr, nbytes, device)

    monkeypatch.setattr(uvm, "set_accessed_by", flaky)
    return calls


@pytest.mark.gpu
def test_gpu_readvise_failing_halfway_leaves_advice_and_residency_as_before(monkeypatch):
    device = torch.cuda.current_device()
    layers = [random_moe(16, 2, 256, 128, torch.bfloat16, "cuda")]
    config = ExpertOffloadConfig(resident_selection="manual", resident_ids=list(range(8)))
    manager = offload_experts(layers, config, device="cuda")
    with manager:
        store = manager.stores[0]
        x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(4, 16, device="cuda")
        before_out = layers[0](x, logits)
        manager.wait_idle()
        before, resident = advice(store), manager.resident_ids(0)
        assert before[0][0] == device and before[8][0] == uvm.CPU, before
        calls = fail_second_call(monkeypatch)
        # Demotes 0, 2, 4, 6 (four runs, one SetAccessedBy each) and promotes 8, 10, 12, 14.
        with pytest.raises(ReadviseError):
            manager.readvise(0, [1, 3, 5, 7, 8, 10, 12, 14])
        assert len(calls) >= 2, f"set_accessed_by was called {len(calls)} times, the test needs 2"
        monkeypatch.undo()
        manager.wait_idle()
        assert manager.resident_ids(0) == resident
        assert advice(store) == before
        assert torch.equal(layers[0](x, logits), before_out)


@pytest.mark.gpu
def test_gpu_worker_failure_is_recorded_and_advice_matches_residency(monkeypatch):
    device = torch.cuda.current_device()
    layers = [random_moe(16, 2, 256, 128, torch.bfloat16, "cuda")]
    config = ExpertOffloadConfig(num_resident=4, resident_selection="frequency",
                                 warmup_tokens=16, min_batch_tokens=1)
    manager = offload_experts(layers, config, device="cuda")
    with manager:
        manager.wait_idle()
        calls = fail_second_call(monkeypatch)
        # First-n residency is 0-3; routing on 1, 3, 9, 11 makes the warmup demote 0 and 2
        # (two runs: the 2nd SetAccessedBy fails) and promote 9 and 11.
        x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(16, 16, device="cuda")
        logits[:, [1, 3, 9, 11]] += 20.0
        for _ in range(2):
            layers[0](x, logits)
        manager.wait_idle()
        assert len(calls) >= 2, f"set_accessed_by was called {len(calls)} times, the test needs 2"
        assert manager.failures and all(isinstance(f, ReadviseError) for f in manager.failures)
        assert manager.stats()["failures"] >= 1
        resident = set(manager.resident_ids(0))
        for expert, (where, accessed) in enumerate(advice(manager.stores[0])):
            if expert in resident:
                assert where == device, f"resident expert {expert} prefers {where}"
            else:
                assert where == uvm.CPU and device in accessed, (
                    f"offloaded expert {expert}: preferred {where}, accessed by {accessed}")


@pytest.mark.gpu
def test_gpu_eager_steps_that_make_decisions_due_make_no_host_sync():
    """The decode thread hands counts to the worker by an asynchronous copy: eager steps that
    make warmup and adaptive decisions due run under torch's sync debug mode "error"."""
    layers, manager = small_manager("cuda")
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    with manager:
        decode(layers, x, torch.randn(len(layers), 16, 16, device="cuda"))  # compiles first
        manager.wait_idle()
        routings = [hot_logits(16, range(4 * (step % 4), 4 * (step % 4) + 4), 2, 16)
                    for step in range(8)]  # made before: indexing with a list syncs
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for routing in routings:  # 16 tokens each: a decision is due after every step
                decode(layers, x, routing)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        manager.wait_idle()
        assert manager.stats()["decisions"] >= 4 and not manager.failures, manager.stats()
