"""The CPU expert kernel (kernels/cpu_experts.c, the CPU share of the CPU/GPU hybrid) against
the plain-torch reference: bf16 and FP8 (block and channel scales) weights in the expert store's
strided layout, padding ids, bitwise independence of the thread count, and input checks.

Tolerance: both sides compute in fp32 from the same weights and only the accumulation order
differs, so ||out - ref|| / ||ref|| < 1e-5 (measured ~3e-7). The kernel is compiled with the
machine's C compiler on first use; without one these tests skip, saying why.
"""

import pytest
import torch

from moe_uvm.kernels import cpu_experts as cpu_module
from moe_uvm.kernels import fp8, fused_moe_reference
from moe_uvm.kernels.cpu_experts import CpuKernelUnavailable, cpu_experts

from helpers import make_inputs, rel_err, store_layout

BUILT, WHY_NOT = cpu_module.available()
pytestmark = pytest.mark.skipif(not BUILT, reason=f"CPU expert kernel unavailable: {WHY_NOT}")

TOLERANCE = 1e-5


def inputs(num_tokens=7, num_experts=12, top_k=3, hidden=96, intermediate=40):
    x, w13, w2, topk_weights, topk_ids = make_inputs(num_tokens, num_experts, top_k, hidden,
                                                     intermediate, torch.float32, "cpu")
    return x, w13, w2, topk_weights, topk_ids


@pytest.mark.parametrize("num_tokens", [1, 4, 16])
def test_bf16_matches_the_reference_in_the_store_layout(seed, num_tokens):
    x, w13, w2, topk_weights, topk_ids = inputs(num_tokens)
    w13, w2 = store_layout(w13.bfloat16(), w2.bfloat16())
    ref = fused_moe_reference(x, w13, w2, topk_weights, topk_ids)
    out = cpu_experts(x.bfloat16(), w13, w2, topk_weights, topk_ids, threads=2)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert rel_err(out, fused_moe_reference(x.bfloat16().float(), w13, w2, topk_weights,
                                            topk_ids)) < TOLERANCE
    assert rel_err(out, ref) < 1e-2  # the input's bf16 rounding, nothing else


@pytest.mark.parametrize("block_shape", [(16, 32), None], ids=["block", "channel"])
def test_fp8_matches_the_dequantised_reference(seed, block_shape):
    # 40 and 96 are not multiples of the block: edge blocks are partial.
    x, w13, w2, topk_weights, topk_ids = inputs()
    q13, s13 = fp8.quantize(w13, block_shape, halves=2)
    q2, s2 = fp8.quantize(w2, block_shape)
    q13, q2 = store_layout(q13, q2)
    quant = dict(w13_scale=s13, w2_scale=s2, block_shape=block_shape)
    ref = fused_moe_reference(x, q13, q2, topk_weights, topk_ids, **quant)
    assert rel_err(cpu_experts(x, q13, q2, topk_weights, topk_ids, **quant), ref) < TOLERANCE


def test_every_finite_e4m3_code_widens_exactly(seed):
    """Weights drawn uniformly over the 254 finite e4m3 codes (subnormals, zeros and +-448
    among them, each hundreds of times): a wrong widening of any one code would move the
    output far more than the tolerance."""
    x, w13, w2, topk_weights, topk_ids = inputs()
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    finite = codes[(codes & 0x7F) != 0x7F]
    draw = lambda w: finite[torch.randint(finite.numel(), w.shape)].view(fp8.FP8_DTYPE)  # noqa: E731
    q13, q2 = draw(w13), draw(w2)
    quant = dict(w13_scale=torch.full((w13.shape[0], w13.shape[1]), 1 / 448 / 96),
                 w2_scale=torch.full((w2.shape[0], w2.shape[1]), 1 / 448 / 40), block_shape=None)
    ref = fused_moe_reference(x, q13, q2, topk_weights, topk_ids, **quant)
    assert rel_err(cpu_experts(x, q13, q2, topk_weights, topk_ids, **quant), ref) < TOLERANCE


def test_padding_and_out_of_range_ids_contribute_nothing(seed):
    x, w13, w2, topk_weights, topk_ids = inputs()
    w13, w2 = w13.bfloat16(), w2.bfloat16()
    topk_ids[0, 1] = -1
    topk_ids[3, :] = -1  # a token with no pair at all gets zeros
    topk_ids[5, 2] = w13.shape[0]
    out = cpu_experts(x, w13, w2, topk_weights, topk_ids)
    assert rel_err(out, fused_moe_reference(x, w13, w2, topk_weights, topk_ids)) < TOLERANCE
    assert torch.count_nonzero(out[3]) == 0
    none = torch.full_like(topk_ids, -1)
    assert torch.count_nonzero(cpu_experts(x, w13, w2, topk_weights, none)) == 0


@pytest.mark.parametrize("hidden,intermediate", [(96, 40), (70, 23)])
def test_bits_do_not_depend_on_the_thread_count(seed, hidden, intermediate):
    # odd sizes: the threads' shares of gate/up rows span two experts, and their ranges of
    # output columns differ in length
    x, w13, w2, topk_weights, topk_ids = inputs(num_tokens=9, hidden=hidden,
                                                intermediate=intermediate)
    w13, w2 = w13.bfloat16(), w2.bfloat16()
    runs = [cpu_experts(x, w13, w2, topk_weights, topk_ids, threads=n) for n in (1, 2, 3, 5)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    ref = fused_moe_reference(x, w13.float(), w2.float(), topk_weights, topk_ids)
    assert rel_err(runs[0], ref) < TOLERANCE


def test_bad_inputs_are_refused_by_name(seed):
    x, w13, w2, topk_weights, topk_ids = inputs()
    b13, b2 = w13.bfloat16(), w2.bfloat16()
    with pytest.raises(ValueError, match="bf16 or float8_e4m3fn"):
        cpu_experts(x, w13.half(), w2.half(), topk_weights, topk_ids)
    with pytest.raises(ValueError, match="not on the CPU"):
        cpu_experts(x.to("meta"), b13, b2, topk_weights, topk_ids)
    with pytest.raises(ValueError, match="contiguous rows"):
        cpu_experts(x, b13.transpose(1, 2).contiguous().transpose(1, 2), b2, topk_weights,
                    topk_ids)
    with pytest.raises(ValueError, match="shapes disagree"):
        cpu_experts(x[:, :-1], b13, b2, topk_weights, topk_ids)
    with pytest.raises(ValueError, match="topk_ids"):
        cpu_experts(x, b13, b2, topk_weights[:-1], topk_ids[:-1])
    q13, s13 = fp8.quantize(w13, (16, 32), halves=2)
    q2, s2 = fp8.quantize(w2, (16, 32))
    with pytest.raises(ValueError, match="need w13_scale"):
        cpu_experts(x, q13, q2, topk_weights, topk_ids)
    with pytest.raises(ValueError, match="w2_scale is"):
        cpu_experts(x, q13, q2, topk_weights, topk_ids, w13_scale=s13, w2_scale=s2[:, :-1],
                    block_shape=(16, 32))
    with pytest.raises(ValueError, match="threads=0"):
        cpu_experts(x, b13, b2, topk_weights, topk_ids, threads=0)


def test_a_missing_compiler_is_reported_not_crashed(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MOE_UVM_CACHE", str(tmp_path / "cache"))
    cpu_module._library.cache_clear()
    try:
        built, why = cpu_module.available()
        assert not built and "no-such-cc" in why
        x, w13, w2, topk_weights, topk_ids = inputs()
        with pytest.raises(CpuKernelUnavailable, match="does not run"):
            cpu_experts(x, w13.bfloat16(), w2.bfloat16(), topk_weights, topk_ids)
    finally:
        cpu_module._library.cache_clear()


def test_touch_reads_one_byte_of_every_page_of_the_experts_given():
    """GroupedExperts.touch (the hybrid's first touch of offloaded pages at load) reads byte 0,
    page, 2 page, ... of each given expert's w13 and w2 and nothing else: its sum equals the
    reference's over those bytes, for any expert order and thread count; other experts'
    bytes change nothing; bad arguments are refused."""
    w13 = torch.randn(6, 64, 48).bfloat16()
    w2 = torch.randn(6, 48, 32).bfloat16()
    kernel = cpu_module.GroupedExperts(w13, w2)

    def reference(experts, page):
        return sum(int(t[e].contiguous().view(torch.uint8).flatten()[::page].long().sum())
                   for e in experts for t in (w13, w2))

    for experts, page, threads in (([1, 4], 64, 2), ([5, 0, 3], 100, 1), ([2], 4096, 3)):
        assert kernel.touch(experts, threads, page) == reference(experts, page)
    before = kernel.touch([1, 4], 2, 64)
    w13[0].fill_(7)  # not touched
    assert kernel.touch([1, 4], 2, 64) == before
    assert kernel.touch([], 2) == 0
    with pytest.raises(ValueError, match="touch: experts must be in 0..5"):
        kernel.touch([6], 2)
    with pytest.raises(ValueError, match="touch: page and threads must be >= 1"):
        kernel.touch([0], 0)
