"""Expert ids outside [0, E): only -1 is padding. Any other id is computed as padding (nothing
downstream reads out of bounds), noted on the device without a host sync, and raised as
RoutingError where the runtime syncs anyway, or in the forward itself in debug mode."""

import numpy as np
import pytest
import torch

from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.kernels import fused_moe_reference
from moe_uvm.kernels.expert_ids import screen_expert_ids, screen_expert_ids_reference
from moe_uvm.layer import CHECK_IDS_ENV, FusedMoE, RoutingError
from moe_uvm.offload import offload_experts

from helpers import TinyMoEModel, random_moe, rel_err

E, K, H, I = 8, 2, 32, 16
BAD_IDS = [E, E + 5, 2**31 - 1, -2, -1000]


def routing(tokens, generator, padding=0.0):
    """Random top-k routing [tokens, K] (int32 ids, some -1 with `padding`) and its weights."""
    ids = torch.rand(tokens, E, generator=generator).topk(K, dim=-1).indices.to(torch.int32)
    ids[torch.rand(tokens, K, generator=generator) < padding] = -1
    return torch.rand(tokens, K, generator=generator), ids


def with_bad_id(ids, bad, generator):
    """`ids` with one random entry set to `bad`, and the same ids with -1 there instead."""
    where = torch.randint(ids.numel(), (1,), generator=generator)
    bad_ids, padded = ids.clone(), ids.clone()
    bad_ids.view(-1)[where] = bad
    padded.view(-1)[where] = -1
    return bad_ids, padded


def message(bad, layer=None):
    where = "FusedMoE" if layer is None else f"FusedMoE layer {layer}"
    return rf"{where}: the router gave expert id {bad}; ids must be in \[0, {E}\) or -1"


@pytest.mark.parametrize("tokens, k", [(0, 2), (1, 1), (1, 8), (7, 3), (300, 8)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("lowest", [-4, 2])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_screen_kernel_matches_reference(seed, tokens, k, dtype, strided, lowest, device):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(lowest, E + 4, (k, tokens) if strided else (tokens, k), generator=g)
    ids = (ids.t() if strided else ids).to(device, dtype)
    # the layer's start, or an empty range (the result is then exactly the ids' extremes)
    start = torch.tensor([-1, -1] if tokens % 2 else [E + 4, lowest - 1])
    id_range, ref_range = start.to(device), start.clone()
    out = screen_expert_ids(ids, E, id_range)
    ref = screen_expert_ids_reference(ids.cpu(), E, ref_range)
    assert out.dtype == dtype and out.is_contiguous() and torch.equal(out.cpu(), ref)
    assert torch.equal(id_range.cpu(), ref_range)


@pytest.mark.parametrize("bad", BAD_IDS)
@pytest.mark.parametrize("tokens", [1, 6])
def test_bad_id_computes_as_padding_and_check_routing_raises_once(seed, bad, tokens):
    g = torch.Generator().manual_seed(seed)
    moe = random_moe(E, K, H, I)
    x = torch.randn(tokens, H, generator=g)
    weights, ids = routing(tokens, g)
    bad_ids, padded = with_bad_id(ids, bad, g)
    out = moe.experts(x, weights, bad_ids)  # no error here: the forward makes no host sync
    assert torch.equal(out, moe.experts(x, weights, padded))
    ref = fused_moe_reference(x, moe.w13_weight, moe.w2_weight, weights, padded)
    assert rel_err(out, ref) < 1e-4
    with pytest.raises(RoutingError, match=message(bad)):
        moe.check_routing()
    moe.check_routing()  # reported once


def test_valid_ids_and_padding_never_raise(seed):
    g = torch.Generator().manual_seed(seed)
    moe = random_moe(E, K, H, I)
    moe.check_routing()  # before any forward
    for tokens in (1, 5, 0):
        x = torch.randn(tokens, H, generator=g)
        moe(x, torch.randn(tokens, E, generator=g))
        moe.experts(x, *routing(tokens, g, padding=0.3))
    moe.check_routing()


@pytest.mark.parametrize(
    "device, backend",
    [("cpu", "aot_eager"), pytest.param("cuda", "inductor", marks=pytest.mark.gpu)],
)
def test_compiled_layer_screens_ids_like_eager(seed, device, backend):
    g = torch.Generator().manual_seed(seed)
    moe = random_moe(E, K, H, I, device=device)
    weights, ids = routing(4, g)
    bad_ids, padded = with_bad_id(ids, E + 1, g)
    x, weights = torch.randn(4, H, generator=g).to(device), weights.to(device)
    eager = moe.experts(x, weights, padded.to(device))
    compiled = torch.compile(moe.experts, fullgraph=True, backend=backend)
    out = compiled(x, weights, bad_ids.to(device))
    assert rel_err(out, eager) < 1e-5
    with pytest.raises(RoutingError, match=message(E + 1)):
        moe.check_routing()
    compiled(x, weights, ids.to(device))
    moe.check_routing()


def test_debug_mode_raises_in_the_forward(seed, monkeypatch):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, H, generator=g)
    weights, ids = routing(3, g)
    bad_ids, _ = with_bad_id(ids, E, g)
    monkeypatch.setenv(CHECK_IDS_ENV, "1")
    moe = random_moe(E, K, H, I)
    moe.experts(x, weights, ids)
    with pytest.raises(RoutingError, match=message(E)):
        moe.experts(x, weights, bad_ids)
    monkeypatch.setenv(CHECK_IDS_ENV, "0")
    assert not FusedMoE(E, K, H, I).check_ids and FusedMoE(E, K, H, I, check_ids=True).check_ids


def test_unknown_debug_switch_value_is_refused(monkeypatch):
    monkeypatch.setenv(CHECK_IDS_ENV, "yes")
    with pytest.raises(ValueError, match=f"{CHECK_IDS_ENV} must be 1 .* got 'yes'"):
        FusedMoE(E, K, H, I)


def run_layers(model, x, routings):
    """A step through the model's MoE layers with routing computed elsewhere (custom routers)."""
    with torch.no_grad():
        for moe, (weights, ids) in zip(model.moes, routings, strict=True):
            x = x + moe.experts(x, weights, ids)
    return x


@pytest.mark.parametrize("bad", [E, E + 3, -2])
def test_bad_id_with_a_speculative_slot_cache_never_reads_out_of_bounds(seed, bad):
    g = torch.Generator().manual_seed(seed)
    models = [TinyMoEModel(3, E, K, H, I) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cfg = ExpertOffloadConfig(num_resident=2, prefetch="speculative", prefetch_slots=3)
    managers = [offload_experts(m, cfg, device="cpu") for m in models]
    for step in range(3):
        x = torch.randn(2, H, generator=g)
        routings = [routing(2, g) for _ in range(3)]
        padded = list(routings)
        if step == 1:  # layer 1 is given the bad id; the other model -1 in its place
            bad_ids, padded_ids = with_bad_id(routings[1][1], bad, g)
            routings[1], padded[1] = (routings[1][0], bad_ids), (routings[1][0], padded_ids)
        assert torch.equal(run_layers(models[0], x, routings), run_layers(models[1], x, padded))
    with pytest.raises(RoutingError, match=message(bad, layer=1)):
        managers[0].wait_idle()
    for manager in managers:
        manager.wait_idle()


def counts(ids_per_layer):
    return np.stack([np.bincount(ids[ids >= 0].numpy(), minlength=E) for ids in ids_per_layer])


def test_bad_id_is_not_counted_and_raises_at_wait_idle(seed):
    """Decisions run on the worker from asynchronous copies of the counts (no host sync in the
    forward): a bad id is not counted, the decision goes on with the valid counts, and the
    error comes at the next point that syncs anyway."""
    g = torch.Generator().manual_seed(seed)
    model = TinyMoEModel(3, E, K, H, I)
    cfg = ExpertOffloadConfig(
        num_resident=2, resident_selection="frequency", warmup_tokens=8, min_batch_tokens=1
    )
    manager = offload_experts(model, cfg, device="cpu")
    first = [routing(4, g) for _ in range(3)]
    run_layers(model, torch.randn(4, H, generator=g), first)
    second = [routing(4, g) for _ in range(3)]  # reaches warmup_tokens: a decision is due
    bad_ids, padded = with_bad_id(second[0][1], E + 3, g)
    run_layers(model, torch.randn(4, H, generator=g), [(second[0][0], bad_ids), *second[1:]])
    with pytest.raises(RoutingError, match=message(E + 3, layer=0)):
        manager.wait_idle()
    expected = counts([ids for _, ids in first]) + counts([padded, second[1][1], second[2][1]])
    np.testing.assert_array_equal(manager.routing_counts(), expected)
    assert manager.stats()["decisions"] == 1
    for layer in range(3):
        row, chosen = expected[layer], list(manager.resident_ids(layer))
        assert row[chosen].sum() == np.sort(row)[-2:].sum()  # the two most-routed
    manager.close()


def test_manager_check_routing_names_the_layer(seed):
    g = torch.Generator().manual_seed(seed)
    model = TinyMoEModel(3, E, K, H, I)
    manager = offload_experts(model, ExpertOffloadConfig(num_resident=4), device="cpu")
    routings = [routing(3, g) for _ in range(3)]
    routings[2] = (routings[2][0], with_bad_id(routings[2][1], -3, g)[0])
    run_layers(model, torch.randn(3, H, generator=g), routings)
    with pytest.raises(RoutingError, match=message(-3, layer=2)):
        manager.check_routing()
    manager.check_routing()


# --- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 4])
def test_screening_makes_no_host_sync_and_replays_in_a_cuda_graph(seed, tokens):
    g = torch.Generator().manual_seed(seed)
    moe = random_moe(E, K, H, I, device="cuda", dtype=torch.bfloat16)
    moe.check_ids = True  # debug mode must not sync while a graph is captured either
    weights, ids = (t.cuda() for t in routing(tokens, g))
    bad_ids, padded = (t.cuda() for t in with_bad_id(ids.cpu(), E, g))
    x = torch.randn(tokens, H, generator=g).to("cuda", torch.bfloat16)
    static_ids = ids.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        moe.experts(x, weights, static_ids)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = moe.experts(x, weights, static_ids)
    moe.check_ids = False
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = moe.experts(x, weights, bad_ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(RoutingError, match=message(E)):
        moe.check_routing()
    graph.replay()
    moe.check_routing()
    static_ids.copy_(bad_ids)
    graph.replay()
    assert torch.equal(static_out, eager) and torch.equal(eager, moe.experts(x, weights, padded))
    with pytest.raises(RoutingError, match=message(E)):
        moe.check_routing()


@pytest.mark.parametrize("tokens, k, experts", [(0, 2, 8), (1, 8, 128), (3, 2, 8), (64, 8, 128),
                                                 (300, 6, 60), (17, 2, 256)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_count_distinct_matches_reference(seed, tokens, k, experts, dtype, device):
    """The read counter of `moe_uvm.generate`: each expert used at least once counts 1, padding
    (-1) and out-of-range ids nothing, added onto what the counts held."""
    from moe_uvm.kernels.expert_ids import count_distinct_experts, count_distinct_experts_reference

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, experts + 2, (tokens, k), generator=g)
    start = torch.randint(0, 50, (experts,), generator=g)
    reads, ref = start.clone().to(device), start.clone()
    count_distinct_experts(ids.to(device, dtype), reads)
    count_distinct_experts_reference(ids, ref)
    assert torch.equal(reads.cpu(), ref)
    used = {int(i) for i in ids.reshape(-1) if 0 <= i < experts}
    assert int((ref - start).sum()) == len(used)  # the reference itself, checked by hand


@pytest.mark.parametrize("tokens, k, experts", [(0, 2, 8), (1, 8, 128), (5, 2, 8), (300, 8, 128),
                                                 (1000, 6, 60)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_count_routing_matches_reference(seed, tokens, k, experts, dtype, device):
    """The warm-up policy's counters: one count per id at its expert, padding and out-of-range
    ids in the last column, added onto what the counts held."""
    from moe_uvm.kernels.expert_ids import count_routing, count_routing_reference

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-3, experts + 3, (tokens, k), generator=g)
    start = torch.randint(0, 50, (experts + 1,), generator=g, dtype=torch.int32)
    counts, ref = start.clone().to(device), start.clone()
    count_routing(ids.to(device, dtype), counts)
    count_routing_reference(ids, ref)
    assert torch.equal(counts.cpu(), ref)
    inside = ids[(ids >= 0) & (ids < experts)]
    want = start.clone()
    want[:experts] += torch.bincount(inside, minlength=experts).int()
    want[experts] += ids.numel() - inside.numel()
    assert torch.equal(ref, want)  # the reference itself, against bincount
