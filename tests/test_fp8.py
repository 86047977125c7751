"""FP8 (e4m3) expert weights: quantisation helpers, the W8A16 grouped kernels against the
dequantised fp32 reference, slots and fill-on-read with FP8 pools, and the input checks.

Unmarked tests run on DEVICE (CUDA, else the CPU under the Triton interpreter, which converts
e4m3 exactly): activations fp32/fp16 there, bf16 only on the GPU. Tolerances are relative
Frobenius errors against `fused_moe_reference` given the same FP8 weights and scales (it
dequantises them to fp32), so they measure the kernels, not the quantisation; the quantisation
error itself is reported by test_quantisation_error_is_what_e4m3_allows.
"""

import pytest
import torch
import triton
import triton.language as tl

from moe_uvm.kernels import fp8, fused_moe, fused_moe_reference
from moe_uvm.kernels.fp8_widen import widen_bf16
from moe_uvm.kernels.fused_moe import MoeBlockConfig, MoeDecodeConfig, fused_moe_triton

from helpers import DEVICE, make_inputs, rel_err, store_layout

# Small tiles so K loops cross several scale blocks and N/K edges are masked.
SMALL = MoeBlockConfig(gate_up_block_n=16, gate_up_block_k=32, down_block_n=32,
                       down_block_k=16, down_split_k=2)
# Activations are the only rounding the kernel adds (fp16 act between the GEMMs).
FP8_TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def quantized_inputs(num_tokens, num_experts, top_k, hidden, intermediate, dtype, block_shape,
                     device=DEVICE):
    x, w13, w2, topk_weights, topk_ids = make_inputs(num_tokens, num_experts, top_k, hidden,
                                                     intermediate, dtype, device)
    q13, s13 = fp8.quantize(w13, block_shape, halves=2)
    q2, s2 = fp8.quantize(w2, block_shape)
    return x, q13, q2, topk_weights, topk_ids, dict(w13_scale=s13, w2_scale=s2,
                                                    block_shape=block_shape)


@pytest.mark.parametrize("block_shape", [(16, 32), None], ids=["block", "channel"])
def test_quantisation_round_trips_within_what_e4m3_allows(seed, block_shape):
    w = torch.randn(3, 2 * 40, 80) * 0.05
    w[1, :16, :32] = 0  # an all-zero block (and rows) gets scale 1, not a division by zero
    q, scale = fp8.quantize(w, block_shape, halves=2)
    assert q.dtype == fp8.FP8_DTYPE and scale.dtype == torch.float32
    assert tuple(scale.shape) == fp8.scale_shape(3, 80, 80, block_shape, halves=2)
    back = fp8.dequantize(q, scale, block_shape, halves=2)
    # e4m3 keeps 3 mantissa bits: each value within 2^-4 of itself relative, plus subnormals.
    assert rel_err(back, w) < 0.04
    assert torch.equal(back[1, :16, :32], torch.zeros(16, 32))
    # The largest magnitude of each block maps to 448 exactly.
    assert float(q.float().abs().max()) == fp8.FP8_MAX


def test_block_scales_of_w13_stack_w1_then_w3_when_i_is_not_a_block_multiple():
    """I = 40 with 16-row blocks: w1 has 3 block rows (the last one partial), w3 3 more."""
    w = torch.zeros(1, 80, 32)
    w[0, :40] = 1.0  # w1
    w[0, 40:] = 2.0  # w3
    q, scale = fp8.quantize(w, (16, 32), halves=2)
    assert tuple(scale.shape) == (1, 6, 1)
    assert torch.allclose(scale[0, :3, 0], torch.full((3,), 1 / 448))
    assert torch.allclose(scale[0, 3:, 0], torch.full((3,), 2 / 448))
    assert torch.equal(fp8.dequantize(q, scale, (16, 32), halves=2), w)


@pytest.mark.parametrize("num_tokens", [1, 5, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_shape", [(16, 32), None], ids=["block", "channel"])
@pytest.mark.parametrize("config", [SMALL, None], ids=["small-tiles", "selected"])
def test_fp8_kernels_match_the_dequantised_reference(seed, num_tokens, dtype, block_shape,
                                                     config):
    # H = 80 and I = 40: neither a multiple of the 32-wide K blocks nor of 16-row blocks.
    x, q13, q2, topk_weights, topk_ids, quant = quantized_inputs(num_tokens, 8, 2, 80, 40,
                                                                 dtype, block_shape)
    out = fused_moe_triton(x, q13, q2, topk_weights, topk_ids, config=config, **quant)
    ref = fused_moe_reference(x, q13, q2, topk_weights, topk_ids, **quant)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref) < FP8_TOLERANCE[dtype]


@pytest.mark.parametrize("num_tokens", [1, 5])
@pytest.mark.parametrize("block_shape", [(16, 32), None], ids=["block", "channel"])
def test_fp8_first_col_leaves_out_the_columns_below_it(seed, num_tokens, block_shape):
    x, q13, q2, topk_weights, topk_ids, quant = quantized_inputs(num_tokens, 8, 2, 80, 40,
                                                                 torch.float32, block_shape)
    first_col = torch.randint(0, 41, (8,), dtype=torch.int32, device=x.device)
    first_col[topk_ids[0, 0]] = 20  # a routed expert split: never all left out
    out = fused_moe_triton(x, q13, q2, topk_weights, topk_ids, config=SMALL, first_col=first_col,
                           **quant)
    ref = fused_moe_reference(x, q13, q2, topk_weights, topk_ids, first_col=first_col, **quant)
    assert rel_err(out, ref) < FP8_TOLERANCE[torch.float32]


def test_fp8_through_the_op_on_store_layout_weights_is_bitwise_equal_to_dense(seed):
    x, q13, q2, topk_weights, topk_ids, quant = quantized_inputs(9, 8, 2, 64, 32, torch.float32,
                                                                 (16, 32))
    strided13, strided2 = store_layout(q13, q2)
    dense = fused_moe(x, q13, q2, topk_weights, topk_ids, **quant)
    assert torch.equal(fused_moe(x, strided13, strided2, topk_weights, topk_ids, **quant), dense)
    assert rel_err(dense, fused_moe_reference(x, q13, q2, topk_weights, topk_ids, **quant)) < 1e-5


@pytest.mark.parametrize("num_tokens", [1, 11])
def test_fp8_slots_and_fill_on_read_copy_fp8_bytes_and_keep_the_output(seed, num_tokens):
    x, q13, q2, topk_weights, topk_ids, quant = quantized_inputs(num_tokens, 8, 2, 64, 32,
                                                                 torch.float16, (16, 32))
    q13, q2 = store_layout(q13, q2)
    plain = fused_moe_triton(x, q13, q2, topk_weights, topk_ids, config=SMALL, **quant)
    pool13, pool2 = store_layout(q13[:3].clone(), q2[:3].clone())
    pool13.view(torch.uint8).zero_()
    pool2.view(torch.uint8).zero_()
    routed = [e for e in topk_ids.unique().tolist() if e >= 0]
    fill_slot = torch.full((8,), -1, dtype=torch.int32, device=x.device)
    fill_slot[routed[0]], fill_slot[routed[1]] = 0, 2
    expert_slot = torch.full((8,), -1, dtype=torch.int32, device=x.device)
    slots = dict(expert_slot=expert_slot, w13_slots=pool13, w2_slots=pool2)
    filled = fused_moe_triton(x, q13, q2, topk_weights, topk_ids, **slots, fill_slot=fill_slot,
                              config=SMALL, **quant)
    assert torch.equal(filled, plain)
    for expert, slot in ((routed[0], 0), (routed[1], 2)):
        assert torch.equal(pool13[slot].view(torch.uint8), q13[expert].view(torch.uint8))
        assert torch.equal(pool2[slot].view(torch.uint8), q2[expert].view(torch.uint8))
    # Read from the slots now (scales stay indexed by expert): bitwise the same output.
    expert_slot[routed[0]], expert_slot[routed[1]] = 0, 2
    assert torch.equal(fused_moe_triton(x, q13, q2, topk_weights, topk_ids, **slots,
                                        config=SMALL, **quant), plain)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda q: q.update(w13_scale=None), "FP8 weights need w13_scale and w2_scale"),
        (lambda q: q.update(w2_scale=q["w2_scale"][:, :1]), "w2_scale is torch.float32 of shape"),
        (lambda q: q.update(w13_scale=q["w13_scale"].double()), "w13_scale is torch.float64"),
        (lambda q: q.update(block_shape=(16, 24)), "bk=24 must be a power of two"),
        (lambda q: q.update(block_shape=None), "expected float32 \\[8, 64\\]"),
    ],
)
def test_fp8_inputs_are_checked_before_any_launch(seed, change, message):
    x, q13, q2, topk_weights, topk_ids, quant = quantized_inputs(3, 8, 2, 64, 32, torch.float32,
                                                                 (16, 32))
    change(quant)
    with pytest.raises(ValueError, match=message):
        fused_moe(x, q13, q2, topk_weights, topk_ids, **quant)


def test_scales_with_16_bit_weights_and_fp8_on_the_gemv_path_are_refused(seed):
    x, w13, w2, topk_weights, topk_ids = make_inputs(1, 8, 2, 64, 32, torch.float32)
    scale = torch.ones(8, 64)
    with pytest.raises(ValueError, match="are for FP8"):
        fused_moe(x, w13, w2, topk_weights, topk_ids, w13_scale=scale, w2_scale=scale[:, :32])
    x, q13, q2, topk_weights, topk_ids, quant = quantized_inputs(1, 8, 2, 64, 32, torch.float32,
                                                                 None)
    with pytest.raises(ValueError, match="grouped kernels only"):
        fused_moe_triton(x, q13, q2, topk_weights, topk_ids, config=MoeDecodeConfig(), **quant)


def test_quantisation_error_is_what_e4m3_allows(seed):
    """The kernels add nothing to FP8's own error: against the unquantised layer the FP8
    output is off by the quantisation alone (~3-5% relative for Gaussian weights)."""
    x, w13, w2, topk_weights, topk_ids = make_inputs(16, 8, 2, 128, 64, torch.float32)
    for block_shape in ((32, 32), None):
        q13, s13 = fp8.quantize(w13, block_shape, halves=2)
        q2, s2 = fp8.quantize(w2, block_shape)
        out = fused_moe(x, q13, q2, topk_weights, topk_ids, w13_scale=s13, w2_scale=s2,
                        block_shape=block_shape)
        assert 0.005 < rel_err(out, fused_moe_reference(x, w13, w2, topk_weights, topk_ids)) < 0.06


# ---- GPU: bf16 activations, the real layer shapes (fewer experts), placements and graphs ----

QWEN3 = dict(num_experts=16, top_k=8, hidden=2048, intermediate=768)
MIXTRAL = dict(num_experts=4, top_k=2, hidden=4096, intermediate=14336)


def gpu_quantized(shape, num_tokens, block_shape):
    x, q13, q2, topk_weights, topk_ids, quant = quantized_inputs(
        num_tokens, shape["num_experts"], shape["top_k"], shape["hidden"],
        shape["intermediate"], torch.bfloat16, block_shape, device="cuda")
    return (x, *store_layout(q13, q2), topk_weights, topk_ids), quant


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 4, 16, 64, 256])
@pytest.mark.parametrize("block_shape", [(128, 128), None], ids=["block128", "channel"])
@pytest.mark.parametrize("shape", [QWEN3, MIXTRAL], ids=["qwen3", "mixtral"])
def test_gpu_fp8_matches_the_dequantised_reference(seed, shape, block_shape, num_tokens):
    args, quant = gpu_quantized(shape, num_tokens, block_shape)
    out = fused_moe(*args, **quant)
    assert rel_err(out, fused_moe_reference(*args, **quant)) < 1e-2


@pytest.mark.parametrize("num_tokens", [1, 6])
def test_fp8_compiles_fullgraph_and_passes_opcheck(seed, num_tokens):
    x, q13, q2, topk_weights, topk_ids, quant = quantized_inputs(num_tokens, 8, 2, 32, 16,
                                                                 torch.float32, (16, 16))

    def moe_block(x, topk_weights, topk_ids):
        return x + fused_moe(2 * x, q13, q2, topk_weights, topk_ids, **quant)

    compiled = torch.compile(moe_block, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, topk_weights, topk_ids), moe_block(x, topk_weights, topk_ids))
    # test_schema is left out: it perturbs every input with arithmetic e4m3 tensors do not
    # have on CPU ("mul_cpu_reduced_float" not implemented); the 16-bit opcheck runs it.
    torch.library.opcheck(torch.ops.moe_uvm.fused_moe.default,
                          (x, q13, q2, topk_weights, topk_ids, None, None, None,
                           quant["w13_scale"], quant["w2_scale"], list(quant["block_shape"])),
                          test_utils=("test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16])
def test_gpu_fp8_graph_replay_equals_eager_bitwise(seed, num_tokens):
    (x, q13, q2, topk_weights, topk_ids), quant = gpu_quantized(QWEN3, num_tokens, (128, 128))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fused_moe(x, q13, q2, topk_weights, topk_ids, **quant)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_moe(x, q13, q2, topk_weights, topk_ids, **quant)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, fused_moe(x, q13, q2, topk_weights, topk_ids, **quant))


@pytest.mark.gpu
def test_gpu_fp8_managed_offloaded_and_slots_are_bitwise_equal_to_device(seed):
    from moe_uvm.store import ManagedExpertStore

    (x, q13, q2, topk_weights, topk_ids), quant = gpu_quantized(QWEN3, 16, (128, 128))
    expected = fused_moe(x, q13, q2, topk_weights, topk_ids, **quant)
    e, h, i = QWEN3["num_experts"], QWEN3["hidden"], QWEN3["intermediate"]
    store = ManagedExpertStore(e, {"w13": ((2 * i, h), fp8.FP8_DTYPE),
                                   "w2": ((h, i), fp8.FP8_DTYPE)}, device="cuda:0")
    try:
        store["w13"].copy_(q13)
        store["w2"].copy_(q2)
        for advise in (store.advise_resident, store.advise_offloaded):
            advise(range(e))
            torch.cuda.synchronize()
            out = fused_moe(x, store["w13"], store["w2"], topk_weights, topk_ids, **quant)
            assert torch.equal(out, expected)
        pool13, pool2 = store_layout(q13[:4].clone(), q2[:4].clone())
        routed = topk_ids.unique()[:4]
        expert_slot = torch.full((e,), -1, dtype=torch.int32, device="cuda")
        expert_slot[routed] = torch.arange(4, dtype=torch.int32, device="cuda")
        pool13.copy_(q13[routed])
        pool2.copy_(q2[routed])
        out = fused_moe(x, store["w13"], store["w2"], topk_weights, topk_ids,
                        expert_slot=expert_slot, w13_slots=pool13, w2_slots=pool2, **quant)
        assert torch.equal(out, expected)
    finally:
        store.free()


# ---- the FusedMoE layer with FP8 experts, and offload_experts ----

def fp8_layer(block_shape=(16, 32), E=8, k=2, H=64, I=32):
    from moe_uvm.layer import FusedMoE

    layer = FusedMoE(E, k, H, I, dtype=torch.float32, weight_dtype=fp8.FP8_DTYPE,
                     block_shape=block_shape)
    w13 = torch.randn(E, 2 * I, H) * H**-0.5
    w2 = torch.randn(E, H, I) * I**-0.5
    q13, s13 = fp8.quantize(w13, block_shape, halves=2)
    q2, s2 = fp8.quantize(w2, block_shape)
    with torch.no_grad():
        layer.w13_weight.copy_(q13)
        layer.w2_weight.copy_(q2)
        layer.w13_weight_scale.copy_(s13)
        layer.w2_weight_scale.copy_(s2)
    return layer


@pytest.mark.parametrize("block_shape", [(16, 32), None], ids=["block", "channel"])
def test_fp8_layer_matches_the_reference_and_offloads_unchanged(seed, block_shape):
    from moe_uvm.config import ExpertOffloadConfig
    from moe_uvm.memory import EXPERT_SCALES
    from moe_uvm.offload import offload_experts, plan_memory

    layer = fp8_layer(block_shape)
    assert layer.w13_weight.dtype == fp8.FP8_DTYPE and "fp8" in repr(layer)
    x, logits = torch.randn(7, 64), torch.randn(7, 8)
    topk_weights, topk_ids = layer.route(logits)
    before = layer(x, logits)
    ref = fused_moe_reference(x, layer.w13_weight, layer.w2_weight, topk_weights, topk_ids,
                              **layer.quantization())
    assert rel_err(before, ref) < FP8_TOLERANCE[torch.float32]
    config = ExpertOffloadConfig(num_resident=2)
    memory = plan_memory([layer], config)
    assert memory.parts[EXPERT_SCALES] == layer.expert_scale_nbytes() > 0
    manager = offload_experts(layer, config)
    try:
        store = manager.stores[0]
        assert store["w13"].dtype == fp8.FP8_DTYPE
        assert store.expert_nbytes == 3 * 64 * 32  # one byte per weight
        assert torch.equal(layer(x, logits), before)
    finally:
        manager.close()


def test_fp8_layer_refuses_what_it_cannot_hold():
    from moe_uvm.layer import FusedMoE

    with pytest.raises(ValueError, match="weight_dtype=torch.float16: allowed"):
        FusedMoE(8, 2, 64, 32, dtype=torch.float32, weight_dtype=torch.float16)
    with pytest.raises(ValueError, match="block_shape is for FP8"):
        FusedMoE(8, 2, 64, 32, block_shape=(128, 128))
    layer = FusedMoE(8, 2, 64, 32, dtype=torch.bfloat16, weight_dtype=fp8.FP8_DTYPE)
    with pytest.raises(ValueError, match="cannot load into torch.float8_e4m3fn"):
        layer.weight_loader(layer.w2_weight, torch.randn(64, 32, dtype=torch.bfloat16), 0, "w2")


# ---- quantise-at-load through the Hugging Face loader, on the trained tiny checkpoint ----

def _tiny():
    from helpers import tiny_checkpoint

    return tiny_checkpoint()


# Held-out text: bytes the checkpoint never saw (it was trained on a Python installation's files
# before this project's README and code existed): 257 of prose, 257 of Python.
HELD_OUT = (b"Offloaded experts live in host memory and the GPU reads them in place over PCIe; "
            b"the ones used most stay resident in HBM. A budget in gigabytes is all a user "
            b"gives: the planner replays routing from a profile and times each split with "
            b"costs measured on the machine, then the loader streams the shards.\n"
            b"def plan_prefetch(counts, slots, top_k):\n"
            b"    order = counts.argsort(descending=True)\n"
            b"    chosen = [int(e) for e in order[:slots] if counts[e] > 0]\n    if not chosen:\n"
            b"        return []\n    return sorted(chosen)[:top_k]\n\n\nclass SlotCache:\n"
            b"    def __init__(self, layers, slots):\n        self.layers = layers\n")


@pytest.mark.skipif(_tiny() is None, reason="the trained tiny checkpoint is not here "
                    "(../shared/models or local/models/tiny-qwen3moe-bytes)")
def test_quantise_at_load_keeps_the_tiny_checkpoints_predictions(monkeypatch):
    """Tolerance (stated in the README): over the held-out bytes, next-byte argmax agrees at
    >= 98% of positions and the mean KL(bf16 || fp8) of next-byte distributions is < 2e-3
    nats; 256 greedy bytes from a code prompt agree at >= 95% of positions (measured: 99.4%,
    4.9e-4 nats, 256 of 256)."""
    from moe_uvm.config import ExpertOffloadConfig
    from moe_uvm.integrations.hf_load import load_offloaded

    from helpers import use_reference_kernels

    tiny, ids = _tiny(), torch.tensor([list(HELD_OUT)])
    prompt = torch.tensor([list(b"def forward(self, x):\n")])
    runs = {}
    for name, config in (("bf16", ExpertOffloadConfig()),
                         ("fp8", ExpertOffloadConfig(quantize_experts="fp8"))):
        loaded = load_offloaded(tiny, config, device="cpu", dtype=torch.float32)
        use_reference_kernels(monkeypatch)  # after transformers has imported what it imports
        try:
            moe = loaded.manager.layers[0]
            assert (moe.w13_weight.dtype == fp8.FP8_DTYPE) == (name == "fp8")
            with torch.no_grad():
                logits = loaded.model(ids).logits[0]
                tokens = loaded.model.generate(prompt, max_new_tokens=256, do_sample=False)
            runs[name] = logits, tokens[0, prompt.shape[1]:]
        finally:
            loaded.manager.close()
    (ref, ref_tokens), (out, out_tokens) = runs["bf16"], runs["fp8"]
    log_p, log_q = ref.log_softmax(-1), out.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    agree = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
    assert agree >= 0.98 and kl < 2e-3, (agree, kl)
    assert (ref_tokens == out_tokens).float().mean().item() >= 0.95


@triton.jit
def _widen_both(src, alu_out, cvt_out, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    w = tl.load(src + offs, mask=offs < n, other=0.0)
    tl.store(alu_out + offs, widen_bf16(w), mask=offs < n)
    tl.store(cvt_out + offs, w.to(tl.bfloat16), mask=offs < n)


@pytest.mark.gpu
def test_gpu_alu_widening_is_exact_for_every_finite_e4m3_value():
    """moe_uvm/kernels/fp8_widen.py's integer widening gives the bf16 Triton's conversion gives, for
    all 254 finite e4m3 codes (subnormals, both zeros and +-448 included), in every lane
    position of its four-value packs."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = codes[(codes & 0x7F) != 0x7F]
    # Each code once in each of the four positions of a packed register.
    shifted = torch.cat([torch.roll(finite, r) for r in range(4)]).cuda()
    w = shifted.view(fp8.FP8_DTYPE)
    alu = torch.empty(w.shape, dtype=torch.bfloat16, device="cuda")
    cvt = torch.empty_like(alu)
    _widen_both[(1,)](w, alu, cvt, w.numel(), BLOCK=triton.next_power_of_2(w.numel()))
    assert torch.equal(alu.view(torch.int16), cvt.view(torch.int16))
    assert torch.equal(alu.float(), w.float())
