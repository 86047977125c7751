"""Dense-layer group-wise prefetch offloader: config, buffer schedule, name selection, outputs
equal to no offload (CPU path here; eager, CUDA graph and compiled runs on the GPU)."""

import copy
import gc
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_uvm.dense as dense
from moe_uvm.dense import DenseOffloadConfig, DenseOffloader, buffer_slots
from moe_uvm.dense_select import name_matches, parse_param_patterns, select_param_names


class Block(nn.Module):
    """A gated dense MLP block with a residual, like a decoder layer's MLP."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * intermediate)
        self.down = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Stack(nn.Module):
    def __init__(self, num_layers: int, hidden: int = 16, intermediate: int = 24) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(hidden, intermediate) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Attention(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.v_proj, self.o_proj = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o_proj(F.silu(self.q_proj(x)) * self.k_proj(x) + self.v_proj(x))


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.w13_weight = nn.Parameter(torch.randn(num_experts, 2 * intermediate, hidden) / 4)
        self.w2_weight = nn.Parameter(torch.randn(num_experts, hidden, intermediate) / 4)

    def forward(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        gate, up = torch.einsum("th,eih->eti", x, self.w13_weight).chunk(2, dim=-1)
        out = torch.einsum("eti,ehi->eth", F.silu(gate) * up, self.w2_weight)
        return torch.einsum("eth,te->th", out, probs)


class SharedExperts(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden, intermediate)
        self.shared_experts = SharedExperts(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.gate(x).softmax(dim=-1)
        return self.experts(x, probs) + self.shared_experts(x)


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int = 16, intermediate: int = 8, num_experts: int = 4) -> None:
        super().__init__()
        self.self_attn = Attention(hidden)
        self.mlp = MoE(num_experts, hidden, intermediate)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
        # Pre-norm, as real decoders do: without it the quadratic attention stand-in overflows
        # to inf/nan over 8 layers for some random draws.
        x = hidden_states + self.self_attn(F.layer_norm(hidden_states, hidden_states.shape[-1:]))
        return x + self.mlp(F.layer_norm(x, x.shape[-1:])), None


class MoEModel(nn.Module):
    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer() for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x, _ = layer(hidden_states=x)
        return x


def offloaded_copy(model: nn.Module, config: DenseOffloadConfig):
    model = copy.deepcopy(model)
    return model, DenseOffloader(model.layers, config)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        ((0, 1, 0), "offload_group_size must be >= 1 (layers per group), got 0"),
        ((4, 0, 0), "offload_num_in_group must be between 1 and offload_group_size=4, got 0"),
        ((4, 5, 1), "offload_num_in_group must be between 1 and offload_group_size=4, got 5"),
        ((4, 1, -1), "offload_prefetch_step must be >= 0 (0 = synchronous copy), got -1"),
        ((True, 1, 1), "offload_group_size must be an integer, got True"),
        ((4, 1.5, 1), "offload_num_in_group must be an integer, got 1.5"),
        ((4, 1, "two"), "offload_prefetch_step must be an integer, got 'two'"),
    ],
)
def test_config_rejects_bad_values_saying_what_is_allowed(fields, message):
    with pytest.raises(ValueError) as info:
        DenseOffloadConfig(*fields)
    assert str(info.value) == message


def test_from_kwargs_takes_cli_names_strings_and_lists():
    config = DenseOffloadConfig.from_kwargs(
        offload_group_size="4",
        offload_num_in_group=1,
        offload_prefetch_step="2",
        offload_params=" mlp.experts, ,self_attn.o_proj,mlp.experts",
    )
    assert config == DenseOffloadConfig(4, 1, 2, ("mlp.experts", "self_attn.o_proj"))
    plain = DenseOffloadConfig.from_kwargs(
        group_size=2, num_in_group=2, prefetch_step=0, params=["shared_experts"]
    )
    assert plain == DenseOffloadConfig(2, 2, 0, ("shared_experts",))
    with pytest.raises(ValueError, match=r"unknown dense offload fields \['offload_group'\]"):
        DenseOffloadConfig.from_kwargs(offload_group=4, num_in_group=1, prefetch_step=1)
    with pytest.raises(ValueError, match=r"needs \['offload_prefetch_step'\]"):
        DenseOffloadConfig.from_kwargs(offload_group_size=4, offload_num_in_group=1)


@pytest.mark.parametrize("bad", ["mlp..experts", ".mlp", "mlp.*", "self attn", "experts."])
def test_malformed_param_patterns_are_errors(bad):
    with pytest.raises(ValueError, match="is not a dotted parameter name"):
        DenseOffloadConfig(4, 1, 1, params=("mlp", bad))
    with pytest.raises(ValueError, match="not a string"):
        parse_param_patterns(["mlp", 3])


def test_offloaded_layers_are_the_first_n_of_each_group():
    assert DenseOffloadConfig(4, 1, 0).offloaded_layers(10) == [0, 4, 8]
    assert DenseOffloadConfig(3, 2, 0).offloaded_layers(7) == [0, 1, 3, 4, 6]
    assert DenseOffloadConfig(2, 2, 0).offloaded_layers(3) == [0, 1, 2]


# --- buffer schedule --------------------------------------------------------------------------


def test_buffer_slots_give_any_p_plus_1_cyclic_neighbours_distinct_buffers():
    for count in range(2, 25):
        for step in range(count // 2):
            slots = buffer_slots(count, step)
            assert len(slots) == count
            for start in range(count):
                window = [slots[(start + k) % count] for k in range(step + 1)]
                assert len(set(window)) == step + 1, (count, step, start, slots)
            assert max(slots) + 1 == math.ceil(count / (count // (step + 1)))
            if count % (step + 1) == 0:
                assert max(slots) + 1 == step + 1


def test_buffer_slots_use_the_fewest_buffers_possible():
    for count in range(2, 8):
        for step in range(count // 2):
            fewer = max(buffer_slots(count, step))
            for colouring in itertools.product(range(fewer), repeat=count):
                assert any(
                    len({colouring[(s + k) % count] for k in range(step + 1)}) < step + 1
                    for s in range(count)
                ), (count, step, colouring)


def test_prefetch_step_that_would_keep_every_layer_on_device_is_an_error():
    with pytest.raises(ValueError, match=r"step=3 with 6 .* use offload_prefetch_step <= 2"):
        buffer_slots(6, 3)
    with pytest.raises(ValueError, match="offload at least 2 layers"):
        buffer_slots(1, 0)
    with pytest.raises(ValueError, match="prefetch_step=2 with 4 offloaded"):
        DenseOffloader(Stack(8).layers, DenseOffloadConfig(2, 1, 2))


# --- outputs, buffers and schedule on the CPU path --------------------------------------------


GNP = [(2, 1, 0), (2, 1, 1), (2, 1, 2), (3, 2, 1), (4, 3, 2), (1, 1, 5)]


@pytest.mark.parametrize("group, num, step", GNP)
def test_outputs_equal_without_offload(seed, group, num, step):
    ref = Stack(12)
    model, offloader = offloaded_copy(ref, DenseOffloadConfig(group, num, step))
    assert offloader.offloaded_layers == tuple(
        DenseOffloadConfig(group, num, step).offloaded_layers(12)
    )
    with torch.inference_mode():
        for _ in range(3):
            x = torch.randn(5, 16)
            assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("group, num, step", GNP)
def test_buffers_are_reused_with_static_addresses(group, num, step):
    ref = Stack(12)
    model, offloader = offloaded_copy(ref, DenseOffloadConfig(group, num, step))
    pool = offloader.pool
    row = pool.shape[1]
    # Every (G, N, P) here offloads a multiple of P + 1 layers: the pool is exactly P + 1.
    assert offloader.num_buffers == max(offloader.slots) + 1 == step + 1
    assert offloader.pool_bytes == offloader.num_buffers * row
    offloaded = sum(
        p.nbytes for i in offloader.offloaded_layers for p in ref.layers[i].parameters()
    )
    assert offloader.offloaded_bytes == offloaded
    assert offloader.device_bytes_saved == offloaded - offloader.pool_bytes

    def addresses():
        return [p.data_ptr() for p in model.parameters()]

    before = addresses()
    for position, index in enumerate(offloader.offloaded_layers):
        start = pool.data_ptr() + offloader.slots[position] * row
        for param in model.layers[index].parameters():
            assert start <= param.data_ptr() < start + row
            assert (param.data_ptr() - pool.data_ptr()) % dense.ALIGN_BYTES == 0
    for index in set(range(12)) - set(offloader.offloaded_layers):
        assert all(
            not pool.data_ptr() <= p.data_ptr() < pool.data_ptr() + offloader.pool_bytes
            for p in model.layers[index].parameters()
        )
    with torch.inference_mode():
        for _ in range(2):
            model(torch.randn(3, 16))
    assert addresses() == before


@pytest.mark.parametrize("group, num, step", GNP)
def test_each_layer_finds_itself_and_the_next_p_offloaded_layers_loaded(group, num, step):
    """Right after the offloader's pre-hook of offloaded layer i, the buffers hold layers
    i..i+P (cyclically): its own weights, and those copied P offloaded layers ahead."""
    model, offloader = offloaded_copy(Stack(12), DenseOffloadConfig(group, num, step))
    count = len(offloader.offloaded_layers)
    seen: list[int] = []

    def check(position):
        def hook(module, args):
            for k in range(step + 1):
                ahead = (position + k) % count
                held = offloader.pool[offloader.slots[ahead], : offloader._host[ahead].numel()]
                assert torch.equal(held, offloader._host[ahead]), (position, ahead)
            seen.append(position)

        return hook

    for position, index in enumerate(offloader.offloaded_layers):
        model.layers[index].register_forward_pre_hook(check(position))
    with torch.inference_mode():
        for _ in range(2):
            model(torch.randn(2, 16))
    assert seen == list(range(count)) * 2


def test_too_few_buffers_would_corrupt_outputs(monkeypatch):
    """The CPU path runs the real schedule, so a buffer shared within a prefetch window shows
    up as wrong outputs (what the equality tests above rely on)."""

    def round_robin(count, step):
        return tuple(i % step for i in range(count))

    monkeypatch.setattr(dense, "buffer_slots", round_robin)
    ref = Stack(12)
    model, _ = offloaded_copy(ref, DenseOffloadConfig(2, 1, 2))
    with torch.inference_mode():
        x = torch.randn(4, 16)
        assert rel_err(model(x), ref(x)) > 1e-3


def test_prime_restores_the_buffers_after_a_partial_step():
    ref = Stack(12)
    model, offloader = offloaded_copy(ref, DenseOffloadConfig(2, 1, 2))
    x = torch.randn(4, 16)
    with torch.inference_mode():
        for layer in model.layers[:7]:
            layer(x)
        assert rel_err(model(x), ref(x)) > 1e-3
        for layer in model.layers[:7]:
            layer(x)
        offloader.prime()
        assert torch.equal(model(x), ref(x))


def test_compiled_fullgraph_matches_without_offload(seed):
    """Dynamo traces the hooks and custom ops without a graph break, and keeps the copies
    (if it dropped them, the buffers would hold the wrong layers and outputs would differ)."""
    ref = Stack(8)
    model, _ = offloaded_copy(ref, DenseOffloadConfig(2, 1, 1))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        for _ in range(2):
            x = torch.randn(3, 16)
            assert torch.equal(compiled(x), ref(x))


def test_layer_called_without_a_tensor_is_an_error():
    class Keyless(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, scale: float = 1.0):
            return self.proj.weight.sum() * scale

    layers = nn.ModuleList(Keyless() for _ in range(4))
    DenseOffloader(layers, DenseOffloadConfig(2, 1, 0))
    with pytest.raises(TypeError, match=r"offloaded layer 0 \(Keyless\) got no tensor"):
        layers[0](scale=2.0)


def test_shared_parameter_is_an_error():
    layers = Stack(4).layers
    layers[2].down.weight = layers[0].down.weight
    with pytest.raises(ValueError, match=r"parameter 0.down.weight is shared by layers \[0, 2\]"):
        DenseOffloader(layers, DenseOffloadConfig(2, 1, 0))


# --- selection by name ------------------------------------------------------------------------


MOE_NAMES = [
    "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate.weight",
    "layers.0.mlp.experts.w13_weight",
    "layers.0.mlp.experts.w2_weight",
    "layers.0.mlp.shared_experts.gate_proj.weight",
    "layers.1.self_attn.o_proj.weight",
    "layers.1.mlp.experts.w13_weight",
]


@pytest.mark.parametrize(
    "patterns, picked",
    [
        (("experts",), [2, 3, 6]),
        (("mlp.experts",), [2, 3, 6]),
        (("shared_experts",), [4]),
        (("self_attn.o_proj",), [0, 5]),
        (("o_proj.weight",), [0, 5]),
        (("experts.w13_weight",), [2, 6]),
        (("gate",), [1]),
        (("self_attn", "shared_experts"), [0, 4, 5]),
        (("layers.1",), [5, 6]),
        ((), list(range(7))),
    ],
)
def test_patterns_match_whole_dot_separated_segments(patterns, picked):
    assert select_param_names(MOE_NAMES, patterns) == [MOE_NAMES[i] for i in picked]


def test_segment_matching_is_not_substring_matching():
    assert not name_matches("mlp.shared_experts.gate_proj.weight", "experts")
    assert not name_matches("mlp.experts.w13_weight", "mlp.exp")
    assert not name_matches("mlp.experts", "mlp.experts.w13_weight")
    assert name_matches("mlp.experts.w13_weight", "mlp.experts.w13_weight")


def test_pattern_that_matches_nothing_is_an_error_listing_what_exists():
    with pytest.raises(ValueError) as info:
        select_param_names(MOE_NAMES, ("mlp.experts", "mlp.expert", "proj"))
    text = str(info.value)
    assert "['mlp.expert', 'proj'] match no parameter" in text
    assert "layers.*.mlp.experts.w13_weight" in text
    assert "layers.*.mlp.shared_experts.gate_proj.weight" in text
    assert text.count("layers.*.self_attn.o_proj.weight") == 1


@pytest.mark.parametrize("group, num, step", GNP)
def test_planned_pool_bytes_equal_the_pool_allocated(group, num, step):
    """Counted on the meta device, before any weight exists, and after mixed dtypes."""
    config = DenseOffloadConfig(group, num, step, params="self_attn,shared_experts")
    with torch.device("meta"):
        planned = DenseOffloader.planned_pool_bytes(MoEModel(12).layers, config)
    model = MoEModel(12)
    for layer in model.layers[::3]:
        layer.self_attn.to(torch.float64)  # layers of different sizes: the largest sets the row
    doubled = {id(p) for layer in model.layers[::3] for p in layer.self_attn.parameters()}
    as_loaded = DenseOffloader.planned_pool_bytes(model.layers, config)
    with torch.device("meta"):
        meta = MoEModel(12)
    meta_doubled = {id(p) for layer in meta.layers[::3] for p in layer.self_attn.parameters()}
    assert DenseOffloader.planned_pool_bytes(
        meta.layers, config, lambda p: p.nbytes * (2 if id(p) in meta_doubled else 1)
    ) == as_loaded
    assert doubled and as_loaded > planned
    offloader = DenseOffloader(model.layers, config)
    assert offloader.pool_bytes == as_loaded
    assert DenseOffloader(MoEModel(12).layers, config).pool_bytes == planned


def test_meta_parameters_are_refused_by_the_offloader():
    with torch.device("meta"):
        model = Stack(4)
    with pytest.raises(ValueError, match=r"layers \[0, 2\] have selected parameters on the meta"):
        DenseOffloader(model.layers, DenseOffloadConfig(2, 1, 0))


def test_moe_attention_and_shared_experts_offloaded_routed_experts_left_alone(seed):
    """How the dense path sits beside the expert offload: attention and shared-expert weights
    stream through the pool, routed experts (and the router) keep their own storage."""
    ref = MoEModel(8)
    config = DenseOffloadConfig.from_kwargs(
        offload_group_size=2,
        offload_num_in_group=1,
        offload_prefetch_step=1,
        offload_params="self_attn,shared_experts",
    )
    model = copy.deepcopy(ref)
    kept = {
        n: p.data_ptr() for n, p in model.named_parameters() if ".experts." in n or "gate." in n
    }
    offloader = DenseOffloader(model.layers, config)
    pool_start = offloader.pool.data_ptr()
    pool_end = pool_start + offloader.pool_bytes
    for name, param in model.named_parameters():
        in_pool = pool_start <= param.data_ptr() < pool_end
        index = int(name.split(".")[1])
        offloaded = index in offloader.offloaded_layers and (
            ".self_attn." in name or ".shared_experts." in name
        )
        assert in_pool == offloaded, name
        if name in kept:
            assert param.data_ptr() == kept[name], name
    assert offloader.offloaded_bytes == sum(
        p.nbytes
        for i in (0, 2, 4, 6)
        for n, p in ref.layers[i].named_parameters()
        if n.startswith(("self_attn.", "mlp.shared_experts."))
    )
    with torch.inference_mode():
        for _ in range(2):
            x = torch.randn(6, 16)
            assert torch.equal(model(x), ref(x))


def test_unknown_pattern_on_a_model_lists_its_parameters():
    with pytest.raises(ValueError) as info:
        DenseOffloader(MoEModel(4).layers, DenseOffloadConfig(2, 1, 0, params=("attn",)))
    assert "['attn'] match no parameter" in str(info.value)
    assert "*.self_attn.q_proj.weight" in str(info.value)


# --- GPU: eager, CUDA graph, torch.compile, memory ---------------------------------------------


def gpu_stack(num_layers: int, hidden: int, intermediate: int, dtype: torch.dtype) -> Stack:
    model = Stack(num_layers, hidden, intermediate)
    for param in model.parameters():
        param.data = param.data.to("cuda", dtype)
    return model


@pytest.mark.gpu
@pytest.mark.parametrize("group, num, step", [(2, 1, 0), (2, 1, 1), (2, 1, 2), (4, 2, 2)])
def test_gpu_eager_matches_without_offload_bitwise(seed, group, num, step):
    ref = gpu_stack(12, 256, 512, torch.bfloat16)
    model, offloader = offloaded_copy(ref, DenseOffloadConfig(group, num, step))
    assert offloader.pool.is_cuda and all(h.is_pinned() for h in offloader._host)
    with torch.inference_mode():
        for _ in range(4):
            x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
            assert torch.equal(model(x), ref(x))


def capture(model: nn.Module, static_x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm up (compiling, if compiled) and capture on the same side stream, so nothing that a
    compiled model might guard on differs between warm-up and capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side), torch.inference_mode():
        static_out = model(static_x)
    return graph, static_out


@pytest.mark.gpu
@pytest.mark.parametrize("step", [0, 1, 2])
def test_gpu_cuda_graph_replays_match_without_offload_bitwise(seed, step):
    ref = gpu_stack(12, 256, 512, torch.bfloat16)
    model, _ = offloaded_copy(ref, DenseOffloadConfig(2, 1, step))
    x_ref = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    x_off = x_ref.clone()
    graph_ref, out_ref = capture(ref, x_ref)
    graph_off, out_off = capture(model, x_off)
    for _ in range(4):
        x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
        x_ref.copy_(x)
        x_off.copy_(x)
        graph_ref.replay()
        graph_off.replay()
        assert torch.equal(out_off, out_ref)
    with torch.inference_mode():
        x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(model(x), ref(x)), "eager steps after replays"


@pytest.mark.gpu
@pytest.mark.parametrize("step", [0, 2])
def test_gpu_compiled_matches_without_offload(seed, step):
    ref = gpu_stack(12, 256, 512, torch.float32)
    model, _ = offloaded_copy(ref, DenseOffloadConfig(2, 1, step))
    compiled = torch.compile(model, fullgraph=True)
    with torch.inference_mode():
        for _ in range(3):
            x = torch.randn(8, 256, device="cuda")
            assert rel_err(compiled(x), ref(x)) < 1e-4


@pytest.mark.gpu
def test_gpu_compiled_model_captured_in_cuda_graph_matches(seed):
    ref = gpu_stack(12, 256, 512, torch.float32)
    model, _ = offloaded_copy(ref, DenseOffloadConfig(2, 1, 1))
    compiled = torch.compile(model, fullgraph=True)
    static_x = torch.randn(8, 256, device="cuda")
    graph, static_out = capture(compiled, static_x)
    for _ in range(3):
        static_x.copy_(torch.randn(8, 256, device="cuda"))
        graph.replay()
        with torch.inference_mode():
            assert rel_err(static_out, ref(static_x)) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("step", [0, 1])
def test_gpu_memory_drops_by_offloaded_bytes_minus_pool(step):
    model = gpu_stack(12, 1024, 2048, torch.float32)
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    offloader = DenseOffloader(model.layers, DenseOffloadConfig(2, 1, step))
    gc.collect()
    torch.cuda.synchronize()
    dropped = before - torch.cuda.memory_allocated()
    per_layer = sum(p.nbytes for p in model.layers[1].parameters())
    assert offloader.offloaded_bytes == 6 * per_layer
    assert offloader.num_buffers == step + 1
    assert offloader.pool_bytes < (step + 1) * (per_layer + 4 * dense.ALIGN_BYTES)
    assert abs(dropped - offloader.device_bytes_saved) <= 2**20, (dropped, offloader.summary())
