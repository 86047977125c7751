"""The slot-cache executor: outputs never depend on the cache or its predictions (bitwise, eager
and CUDA graph, including deliberately wrong predictions), and the cache fills and hits."""

import pytest
import torch

from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.offload import offload_experts
from moe_uvm.slots import SlotCache

from helpers import TinyMoEModel


def routed_model(device, dtype, layers=3, **shape):
    torch.manual_seed(torch.seed() % 2**31)
    return TinyMoEModel(layers, dtype=dtype, device=device, **shape)


def steps_of(model, inputs):
    with torch.no_grad():
        return [model(x) for x in inputs]


@pytest.mark.parametrize("mode", ["none", "speculative", "frequency"])
def test_cached_model_equals_uncached_over_steps(mode, tmp_path):
    plain = routed_model("cpu", torch.float32, E=8, k=2, H=32, I=16)
    cached = routed_model("cpu", torch.float32, E=8, k=2, H=32, I=16)
    cached.load_state_dict(plain.state_dict())
    inputs = [torch.randn(2, 32) for _ in range(5)]
    offload_experts(plain, ExpertOffloadConfig(num_resident=2), device="cpu")
    expect = steps_of(plain, inputs)
    profile = None
    if mode == "frequency":
        manager = offload_experts(routed_model("cpu", torch.float32, E=8, k=2, H=32, I=16),
                                  ExpertOffloadConfig(num_resident=2, min_batch_tokens=1),
                                  device="cpu")
        manager.record(0, torch.tensor([[6, 7]]))  # counts that mispredict on purpose
        for layer in range(1, 3):
            manager.record(layer, torch.tensor([[6, 7]]))
        profile = tmp_path / "wrong.json"
        manager.save_profile(str(profile))
    cfg = ExpertOffloadConfig(num_resident=2, prefetch=mode, prefetch_slots=3,
                              profile_path=str(profile) if profile else None)
    manager = offload_experts(cached, cfg, device="cpu")
    cache = manager.slot_cache
    assert isinstance(cache, SlotCache) and cached.moes[0].slot_cache is cache
    got = steps_of(cached, inputs)
    for step, (a, b) in enumerate(zip(got, expect, strict=True)):
        assert torch.equal(a, b), step
    stats = cache.stats.summary()
    assert stats["needed_offloaded"] > 0
    # whatever the predictions, every slot the maps name holds its expert's exact weights
    for layer, pool in enumerate(cache.layers):
        store = manager.stores[layer]
        for e, s in enumerate(pool.expert_slot.tolist()):
            if s >= 0:
                assert torch.equal(pool.w13_slots[s], store["w13"][e])
                assert torch.equal(pool.w2_slots[s], store["w2"][e])


def test_fill_on_read_turns_repeated_experts_into_slot_hits():
    model = routed_model("cpu", torch.float32, layers=2, E=8, k=2, H=32, I=16)
    manager = offload_experts(model, ExpertOffloadConfig(num_resident=0, prefetch_slots=8),
                              device="cpu")
    x = torch.randn(1, 32)
    steps_of(model, [x, x, x])  # same token: same experts every step
    stats = manager.slot_cache.stats.summary()
    assert stats["needed_offloaded"] == 3 * 2 * 2
    assert stats["slot_hits"] == 2 * 2 * 2  # all but the first step read from slots


def test_readvise_updates_what_the_cache_treats_as_resident():
    model = routed_model("cpu", torch.float32, layers=2, E=8, k=2, H=32, I=16)
    manager = offload_experts(model, ExpertOffloadConfig(num_resident=2, prefetch_slots=2),
                              device="cpu")
    manager.readvise(1, [5, 6])
    assert manager.slot_cache.layers[1].resident.nonzero().flatten().tolist() == [5, 6]


QWEN3 = dict(E=64, k=8, H=2048, I=768)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["none", "speculative"])
def test_gpu_graph_and_eager_with_cache_equal_plain(mode):
    plain = routed_model("cuda", torch.bfloat16, layers=4, **QWEN3)
    cached = routed_model("cuda", torch.bfloat16, layers=4, **QWEN3)
    cached.load_state_dict(plain.state_dict())
    offload_experts(plain, ExpertOffloadConfig(num_resident=16)).synchronize()
    cfg = ExpertOffloadConfig(num_resident=16, prefetch=mode, prefetch_slots=16,
                              prefetch_experts=8)
    manager = offload_experts(cached, cfg)
    manager.synchronize()
    inputs = [torch.randn(4, QWEN3["H"], device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    expect = steps_of(plain, inputs)
    assert all(torch.equal(a, b) for a, b in zip(steps_of(cached, inputs), expect, strict=True))
    static_x = inputs[0].clone()
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            cached(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = cached(static_x)
        for step, x in enumerate(inputs):
            static_x.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static_out, expect[step]), step
    stats = manager.slot_cache.stats.summary()
    assert stats["slot_hits"] > 0
