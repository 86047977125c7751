"""FusedMoE (routing, weight loading, forward) and offload_experts: CPU tests run the kernel in
the Triton interpreter; GPU tests check placement never changes outputs, CUDA graphs, compile."""

import pytest
import torch
from torch import nn

from moe_uvm import uvm
from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.kernels import fused_moe_reference
from moe_uvm.layer import FusedMoE
from moe_uvm.manager import ExpertOffloadManager
from moe_uvm.offload import find_moe_layers, offload_experts

from helpers import TinyMoEModel, random_moe, rel_err


def test_route_is_softmax_topk_renormalized():
    moe = random_moe(E=8, k=3)
    logits = torch.randn(5, 8)
    weights, ids = moe.route(logits)
    probs = torch.softmax(logits, -1)
    ref_w, ref_ids = probs.topk(3, -1)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(weights, ref_w / ref_w.sum(-1, keepdim=True))
    moe.renormalize = False
    torch.testing.assert_close(moe.route(logits)[0], ref_w)


def test_weight_loader_places_w1_w3_w2():
    moe = FusedMoE(4, 2, 6, 5)
    w1, w3, w2 = torch.randn(5, 6), torch.randn(5, 6), torch.randn(6, 5)
    moe.w13_weight.weight_loader(moe.w13_weight, w1, 2, "w1")
    moe.w13_weight.weight_loader(moe.w13_weight, w3, 2, "w3")
    moe.w2_weight.weight_loader(moe.w2_weight, w2, 2, "w2")
    assert torch.equal(moe.w13_weight[2, :5], w1) and torch.equal(moe.w13_weight[2, 5:], w3)
    assert torch.equal(moe.w2_weight[2], w2)


@pytest.mark.parametrize(
    "args, message",
    [
        (("w13", torch.zeros(5, 7), 0, "w1"), r"expected shape \(5, 6\), got \(5, 7\)"),
        (("w13", torch.zeros(5, 6), 4, "w1"), r"expert_id 4 out of range \[0, 4\)"),
        (("w13", torch.zeros(5, 6), 0, "gate"), "shard must be one of"),
        (("w2", torch.zeros(5, 6), 0, "w1"), "loads into w13_weight"),
        (("w13", torch.zeros(6, 5), 0, "w2"), "loads into w2_weight"),
    ],
)
def test_weight_loader_rejects_mismatches(args, message):
    moe = FusedMoE(4, 2, 6, 5)
    param = moe.w13_weight if args[0] == "w13" else moe.w2_weight
    with pytest.raises(ValueError, match=message):
        moe.weight_loader(param, *args[1:])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_experts=0, top_k=1, hidden_size=4, intermediate_size=4), "num_experts must be"),
        (dict(num_experts=4, top_k=5, hidden_size=4, intermediate_size=4), "cannot exceed"),
    ],
)
def test_bad_layer_shapes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedMoE(**kwargs)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_forward_matches_reference(dtype, tol):
    moe = random_moe(E=8, k=2, H=32, I=16, dtype=dtype)
    x = torch.randn(7, 32).to(dtype)
    logits = torch.randn(7, 8)
    weights, ids = moe.route(logits)
    ref = fused_moe_reference(x, moe.w13_weight, moe.w2_weight, weights, ids)
    assert rel_err(moe(x, logits), ref) < tol


@pytest.mark.parametrize(
    "x_shape, logits_shape, message",
    [
        ((3, 32), (3, 8), r"router_logits has shape \(3, 8\): expected \[3, 16\].*num_experts=16"),
        ((3, 32), (4, 16), r"router_logits has shape \(4, 16\): expected \[3, 16\]"),
        ((3, 24), (3, 16), r"hidden_states has shape \(3, 24\), H=24: .* hidden_size, 32"),
        ((2, 3, 32), (6, 16), r"shape \(2, 3, 32\), H=32: this layer takes \[T, H\]"),
    ],
)
def test_forward_refuses_mismatched_shapes_naming_them(x_shape, logits_shape, message):
    moe = random_moe(E=16, k=2, H=32, I=16)
    with pytest.raises(ValueError, match=message):
        moe(torch.randn(x_shape), torch.randn(logits_shape))


@pytest.mark.parametrize(
    "ids, weights_shape, message",
    [
        (torch.zeros(3, 2, dtype=torch.float32), (3, 2), r"topk_ids is torch.float32 .* \[3, k\]"),
        (torch.zeros(4, 2, dtype=torch.int32), (4, 2), r"topk_ids is .* shape \(4, 2\)"),
        (torch.zeros(3, 2, dtype=torch.int64), (3, 1), r"topk_weights has shape \(3, 1\)"),
    ],
)
def test_experts_refuses_mismatched_routing_naming_it(ids, weights_shape, message):
    moe = random_moe(E=8, k=2, H=32, I=16)
    with pytest.raises(ValueError, match=message):
        moe.experts(torch.randn(3, 32), torch.rand(weights_shape), ids)


@pytest.mark.parametrize(
    "config, message",
    [
        (ExpertOffloadConfig(gpu_budget_gb=0.01, num_resident=4), "num_resident=4 needs"),
        (ExpertOffloadConfig(num_resident=4, prefetch_slots=100), "the maximum is 4"),
    ],
)
def test_offload_refuses_conflicting_config_and_leaves_layers_untouched(config, message):
    model = TinyMoEModel()  # 3 layers x 8 experts of one 2 MiB slot each
    x = torch.randn(5, 32)
    before = model(x)
    params = [p for m in model.moes for p in (m.w13_weight, m.w2_weight)]
    with pytest.raises(ValueError, match=message):
        offload_experts(model, config, device="cpu")
    after = [p for m in model.moes for p in (m.w13_weight, m.w2_weight)]
    assert all(a is b for a, b in zip(after, params, strict=True))
    assert all(m.record_routing is None and m.slot_cache is None for m in model.moes)
    assert torch.equal(model(x), before)


def test_offload_moves_params_into_stores_and_keeps_outputs():
    model = TinyMoEModel()
    x = torch.randn(5, 32)
    before = model(x)
    manager = offload_experts(model, ExpertOffloadConfig(num_resident=3), device="cpu")
    assert manager.layers == find_moe_layers(model) and manager.num_layers == 3
    for layer, moe in enumerate(model.moes):
        store = manager.stores[layer]
        assert moe.w13_weight.data_ptr() == store["w13"].data_ptr()
        assert moe.w2_weight.data_ptr() == store["w2"].data_ptr()
        assert manager.resident_ids(layer) == (0, 1, 2)
    assert torch.equal(model(x), before)


def test_recording_hook_receives_each_layers_topk_ids(monkeypatch):
    calls = []
    monkeypatch.setattr(
        ExpertOffloadManager, "record", lambda self, layer, ids: calls.append((layer, ids.shape))
    )
    model = TinyMoEModel()
    offload_experts(model, ExpertOffloadConfig(), device="cpu")
    model(torch.randn(4, 32))
    assert calls == [(0, (4, 2)), (1, (4, 2)), (2, (4, 2))]


def test_meta_layers_get_empty_stores_filled_by_weight_loader():
    with torch.device("meta"):
        moe = FusedMoE(4, 2, 8, 4)
    manager = offload_experts(moe, ExpertOffloadConfig(num_resident=2), device="cpu")
    assert moe.w13_weight.device.type == "cpu"
    w1 = torch.randn(4, 8)
    moe.w13_weight.weight_loader(moe.w13_weight, w1, 3, "w1")
    assert torch.equal(manager.stores[0]["w13"][3, :4], w1)


def test_offload_refuses_a_model_without_moe_layers():
    with pytest.raises(ValueError, match="no FusedMoE layer found"):
        offload_experts(nn.Linear(4, 4), device="cpu")


def test_whole_model_is_checked_before_any_store_is_allocated(monkeypatch):
    model = TinyMoEModel()
    monkeypatch.setattr(uvm, "mem_get_info", lambda device=0: (3 << 30, 80 << 30))
    created = []
    monkeypatch.setattr(uvm.ManagedBuffer, "__init__", lambda *a, **k: created.append(a))
    with pytest.raises(uvm.OversubscriptionError, match="refusing to allocate"):
        offload_experts(model, ExpertOffloadConfig(), device="cuda:0")
    assert created == []


# --- GPU ---------------------------------------------------------------------------------------

QWEN3 = dict(E=64, k=8, H=2048, I=768)  # Qwen3-30B-A3B layer shape, half the experts: ~0.6 GiB


def gpu_model(layers=3):
    torch.manual_seed(torch.seed() % 2**31)
    return TinyMoEModel(layers, dtype=torch.bfloat16, device="cuda", **QWEN3)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16])
def test_placement_never_changes_outputs(tokens):
    model = gpu_model()
    x = torch.randn(tokens, QWEN3["H"], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        device_out = model(x)
        manager = offload_experts(model, ExpertOffloadConfig(num_resident=-1))
        manager.synchronize()
        outs = {"resident": model(x)}
        for layer in range(manager.num_layers):
            manager.readvise(layer, [])
        manager.synchronize()
        outs["offloaded"] = model(x)
        for layer in range(manager.num_layers):
            manager.readvise(layer, range(0, QWEN3["E"], 3))
        manager.synchronize()
        outs["mixed"] = model(x)
    for name, out in outs.items():
        assert torch.equal(out, device_out), name


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager_and_readvise_between_replays():
    model = gpu_model(4)
    manager = offload_experts(model, ExpertOffloadConfig(num_resident=16))
    manager.synchronize()
    static_x = torch.randn(4, QWEN3["H"], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        for step in range(3):
            static_x.copy_(torch.randn_like(static_x))
            eager = model(static_x)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static_out, eager), step
            for layer in range(manager.num_layers):  # change residency between replays
                start = (step * 16) % QWEN3["E"]
                manager.readvise(layer, range(start, start + 16))
            manager.synchronize()


@pytest.mark.gpu
def test_compiled_model_matches_eager():
    model = gpu_model(2)
    offload_experts(model, ExpertOffloadConfig(num_resident=16)).synchronize()
    x = torch.randn(8, QWEN3["H"], device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager, out = model(x), compiled(x)
    assert rel_err(out, eager) < 1e-2
