"""The CPU/GPU hybrid (moe_uvm/hybrid.py): the split of offloaded experts between the two sides,
and, on a GPU, a layer whose experts live in a managed store computed partly by the CPU kernel
from the managed pages, against the GPU-only kernel on device copies.

Tolerance with the hybrid on: the CPU's fp32 sum is added to the GPU's bf16 output, so the
result differs from the GPU-only path by bf16 rounding: ||out - ref|| / ||ref|| < 1e-2 (the
bf16 kernels' own tolerance against the fp32 reference)."""

import pytest
import torch

from moe_uvm.hybrid import CpuShare, host_alias, split_offloaded
from moe_uvm.kernels import cpu_experts as cpu_module
from moe_uvm.kernels import fp8, fused_moe

from helpers import make_inputs, rel_err

MB = 1_000_000


def test_split_balances_the_two_sides():
    tokens = dict.fromkeys(range(8), 1)
    # Equal bandwidths: half each; no fixed cost.
    assert len(split_offloaded(tokens, 10 * MB, gpu_gbps=50, cpu_gbps=50)) == 4
    # A CPU half as fast takes a third.
    assert len(split_offloaded(tokens, 10 * MB, gpu_gbps=50, cpu_gbps=25)) in (2, 3)
    # A fixed cost larger than the whole GPU time: the CPU takes nothing.
    assert split_offloaded(tokens, 10 * MB, gpu_gbps=50, cpu_gbps=50, cpu_fixed_s=1.0) == []
    assert split_offloaded({}, 10 * MB, gpu_gbps=50, cpu_gbps=50) == []


def test_split_gives_the_cpu_the_experts_with_fewest_tokens():
    tokens = {3: 5, 7: 1, 9: 2, 11: 1}
    cpu = split_offloaded(tokens, 10 * MB, gpu_gbps=50, cpu_gbps=50)
    assert cpu == [7, 11]  # the two one-token experts, ties by id


def test_host_alias_refuses_what_the_cpu_cannot_read_in_place():
    with pytest.raises(ValueError, match="CUDA tensor in managed memory"):
        host_alias(torch.zeros(4))


@pytest.mark.gpu
@pytest.mark.parametrize("weight_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("num_tokens", [1, 4])
def test_gpu_hybrid_layer_matches_the_gpu_kernel(seed, weight_dtype, num_tokens):
    built, why = cpu_module.available()
    if not built:
        pytest.skip(f"CPU expert kernel unavailable: {why}")
    from moe_uvm.store import ManagedExpertStore

    E, k, H, I = 16, 4, 256, 128
    x, w13, w2, topk_weights, topk_ids = make_inputs(num_tokens, E, k, H, I, torch.bfloat16,
                                                     "cuda")
    quant = {}
    if weight_dtype == "fp8":
        w13, s13 = fp8.quantize(w13, (128, 128), halves=2)
        w2, s2 = fp8.quantize(w2, (128, 128))
        quant = dict(w13_scale=s13, w2_scale=s2, block_shape=(128, 128))
    expected = fused_moe(x, w13, w2, topk_weights, topk_ids, **quant)
    store = ManagedExpertStore(E, {"w13": ((2 * I, H), w13.dtype), "w2": ((H, I), w2.dtype)},
                               device="cuda:0")
    try:
        store.advise_offloaded(range(E))
        store["w13"].copy_(w13)
        store["w2"].copy_(w2)
        resident = list(range(0, E, 4))  # a few resident: the GPU computes those itself
        store.advise_resident(resident)
        torch.cuda.synchronize()
        share = CpuShare(store["w13"], store["w2"], lambda: resident, quant=quant,
                         gpu_gbps=1.0, cpu_gbps=1.0, cpu_fixed_us=0.0, threads=2)
        out = share(x, topk_weights, topk_ids)
        assert share.stats.cpu_experts > 0
        assert out.dtype == x.dtype and rel_err(out, expected) < 1e-2
        # All resident: nothing offloaded, the GPU kernel alone.
        everything = CpuShare(store["w13"], store["w2"], lambda: range(E), quant=quant,
                              gpu_gbps=1.0, cpu_gbps=1.0, cpu_fixed_us=0.0)
        assert torch.equal(everything(x, topk_weights, topk_ids),
                           fused_moe(x, store["w13"], store["w2"], topk_weights, topk_ids,
                                     **quant))
        assert everything.stats.cpu_experts == 0
        del share, everything  # the aliases go before the store's memory
    finally:
        store.free()
