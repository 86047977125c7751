"""The CPU/GPU hybrid (moe_uvm/hybrid.py): the split of offloaded experts between the two sides,
the grouping of the CPU's pairs, the costs following observed times, the auto switch, and, on a
GPU, a layer whose experts live in a managed store computed partly by the CPU kernel from the
managed pages, against the GPU-only kernel on device copies.

Tolerance with the hybrid on: the CPU's fp32 sum is added to the GPU's output in fp32 and
rounded once, so the result differs from the GPU-only path by bf16 rounding:
||out - ref|| / ||ref|| < 1e-2 (the bf16 kernels' own tolerance against the fp32 reference).
On the CPU (the grouping test) the two halves sum in fp32: < 1e-5."""

import numpy as np
import pytest
import torch

from moe_uvm.hybrid import (
    CpuShare,
    ExpertCosts,
    choose_cpu_experts,
    group_pairs,
    host_alias,
    predicted_layer_us,
    split_offloaded,
)
from moe_uvm.kernels import cpu_experts as cpu_module
from moe_uvm.kernels import fp8, fused_moe
from moe_uvm.kernels.reference import fused_moe_reference

from helpers import make_inputs, rel_err

MB = 1_000_000


def costs(gpu_gbps=50.0, cpu_gbps=50.0, **kw):
    kw.setdefault("gpu_fixed_us", 0.0)
    kw.setdefault("cpu_fixed_us", 0.0)
    return ExpertCosts.from_bandwidths(10 * MB, gpu_gbps, cpu_gbps, **kw)


I_SPLIT = 768  # Qwen3-30B-A3B's expert width: 12 steps of COL_GRANULE


def share(tokens, c, intermediate=I_SPLIT):
    return split_offloaded(tokens, c, intermediate)


def test_split_balances_the_two_sides():
    tokens = dict.fromkeys(range(8), 1)
    assert share(tokens, costs()) == {0: 768, 1: 768, 2: 768, 3: 768}  # equal speeds: half each
    # A CPU half as fast: a third of the 8 experts (2.67: two whole, 2/3 of the third).
    assert share(tokens, costs(cpu_gbps=25)) == {0: 768, 1: 768, 2: 512}
    # Three experts at equal speeds: one and a half each, the split one cut in the middle
    # (whole experts could only give 1 : 2).
    assert share(dict.fromkeys(range(3), 1), costs()) == {0: 768, 1: 384}
    # A fixed cost larger than the whole GPU time: the CPU takes nothing.
    assert share(tokens, costs(cpu_fixed_us=1e6)) == {}
    assert share({}, costs()) == {}
    # A much faster CPU takes everything (the GPU's fixed cost is saved too).
    assert share(tokens, costs(cpu_gbps=1e4, gpu_fixed_us=10)) == dict.fromkeys(range(8), 768)


def _sides(c, m, cpu_tokens, x):
    """(CPU, GPU) time of a layer with m offloaded experts, x of them (fractional) on the CPU
    with cpu_tokens routed pairs."""
    cpu = c.cpu_fixed_us + x * c.cpu_expert_us + c.cpu_pair_us * cpu_tokens if x else 0.0
    gpu = c.gpu_fixed_us + (m - x) * c.gpu_expert_us if x < m else 0.0
    return cpu, gpu


def test_split_makes_both_sides_finish_together(seed):
    """On random costs and token counts: at most one expert split, by whole granules; experts
    taken in order; never slower than the best split into whole experts; with an expert split,
    the two sides within one granule's time of each other; nothing where the CPU would not
    help."""
    from moe_uvm.hybrid import COL_GRANULE

    rng = np.random.default_rng(seed)
    for _ in range(300):
        m = int(rng.integers(1, 12))
        tokens = {int(e): int(rng.integers(1, 6)) for e in rng.choice(64, m, replace=False)}
        c = costs(gpu_gbps=float(rng.uniform(20, 80)), cpu_gbps=float(rng.uniform(10, 80)),
                  gpu_fixed_us=float(rng.uniform(0, 100)), cpu_fixed_us=float(rng.uniform(0, 100)),
                  cpu_pair_us=float(rng.uniform(0, 30)))
        got = share(tokens, c)
        order = sorted(tokens, key=lambda e: (tokens[e], e))
        gpu_only = c.gpu_fixed_us + m * c.gpu_expert_us
        whole_best = min(max(_sides(c, m, sum(tokens[e] for e in order[:n]), n))
                         for n in range(m + 1))
        if not got:
            assert whole_best >= gpu_only
            continue
        assert list(got) == sorted(got)
        assert sorted(got, key=order.index) == order[:len(got)]  # in order, the split one last
        split = [e for e, cols in got.items() if cols < I_SPLIT]
        assert len(split) <= 1 and all(cols % COL_GRANULE == 0 for cols in got.values())
        x = sum(got.values()) / I_SPLIT
        cpu, gpu = _sides(c, m, sum(tokens[e] * cols / I_SPLIT for e, cols in got.items()), x)
        assert max(cpu, gpu) < gpu_only
        assert max(cpu, gpu) <= whole_best + 1e-9
        if split:
            step = COL_GRANULE / I_SPLIT * (c.cpu_expert_us + c.gpu_expert_us
                                            + c.cpu_pair_us * tokens[split[0]])
            assert abs(cpu - gpu) <= step + 1e-9


def test_split_gives_the_cpu_the_experts_with_fewest_tokens():
    tokens = {3: 5, 7: 1, 9: 2, 11: 1}
    got = share(tokens, costs())
    assert list(got)[:2] == [7, 11] and got[7] == got[11] == I_SPLIT  # one-token ones first
    assert set(got) <= {7, 9, 11}  # the 5-token expert stays on the GPU


def test_split_charges_the_cpu_per_token():
    # At large batches each expert has many tokens: a per-pair cost far above the expert's
    # stream time leaves the GPU (whose read-through hardly depends on tokens) everything.
    tokens = dict.fromkeys(range(32), 16)
    assert share(tokens, costs(cpu_pair_us=1000.0)) == {}
    assert share(tokens, costs(cpu_pair_us=0.0))


def test_costs_are_validated():
    with pytest.raises(ValueError, match="bandwidths must be > 0"):
        ExpertCosts.from_bandwidths(MB, 0.0, 10.0)
    with pytest.raises(ValueError, match="finite"):
        ExpertCosts(1.0, float("nan")).check()
    with pytest.raises(ValueError, match="finite"):
        ExpertCosts(1.0, 1.0, cpu_fixed_us=-1.0).check()


def test_group_pairs_and_the_gpu_share_sum_to_the_whole_layer(seed):
    built, why = cpu_module.available()
    if not built:
        pytest.skip(f"CPU expert kernel unavailable: {why}")
    E, k, H, I, T = 12, 4, 64, 32, 5
    x, w13, w2, topk_weights, topk_ids = make_inputs(T, E, k, H, I, torch.float32, "cpu")
    topk_ids[0, 1] = -1  # padding stays padding on both sides
    w13, w2 = w13.bfloat16(), w2.bfloat16()
    ids = topk_ids.reshape(-1).to(torch.int64).numpy()
    on_cpu = np.isin(ids, [1, 4, 5, 9])
    (experts, offsets, tokens, weights), gpu_ids = group_pairs(
        ids, on_cpu, topk_weights.reshape(-1).numpy(), k)
    assert list(experts) == sorted(set(ids[on_cpu].tolist()))
    assert offsets[-1] == on_cpu.sum() and np.all(np.diff(offsets) > 0)
    assert np.all(gpu_ids[on_cpu] == -1) and np.all(gpu_ids[~on_cpu] == ids[~on_cpu])
    kernel = cpu_module.GroupedExperts(w13, w2)
    out = torch.zeros(T, H)
    kernel(x, experts, offsets, tokens, weights, torch.empty(len(tokens), 2 * I), out, 2)
    gpu_part = fused_moe_reference(x, w13.float(), w2.float(), topk_weights,
                                   torch.from_numpy(gpu_ids).view(T, k))
    whole = fused_moe_reference(x, w13.float(), w2.float(), topk_weights, topk_ids)
    assert rel_err(out + gpu_part, whole) < 1e-5
    # The same pairs through cpu_experts (which groups them itself) give the same bits.
    cpu_ids = torch.where(torch.from_numpy(on_cpu).view(T, k), topk_ids, -1)
    assert torch.equal(out, cpu_module.cpu_experts(x, w13, w2, topk_weights, cpu_ids, threads=3))


def _split(topk_ids, resident_mask, c, num_experts, intermediate):
    """split_on_device on CPU tensors (Triton's interpreter): (gpu_ids, cols, ids)."""
    from moe_uvm.kernels.hybrid_split import COSTS, split_on_device

    gpu_ids = torch.empty_like(topk_ids)
    cols = torch.empty(num_experts, dtype=torch.int32)
    gpu_cols = torch.empty(num_experts, dtype=torch.int32)
    ids = torch.empty(topk_ids.numel(), dtype=torch.int64)
    costs_vec = torch.tensor([getattr(c, name) for name in COSTS], dtype=torch.float64)
    split_on_device(topk_ids, num_experts, intermediate, resident_mask, costs_vec, gpu_ids, ids,
                    cols, gpu_cols)
    assert torch.equal(cols, gpu_cols)
    return gpu_ids, cols, ids


@pytest.mark.parametrize("num_experts, top_k, num_tokens", [(16, 4, 1), (128, 8, 1),
                                                            (128, 8, 4), (60, 6, 16),
                                                            (256, 8, 3)])
def test_split_kernel_is_split_offloaded(seed, num_experts, top_k, num_tokens):
    """The GPU split (kernels/hybrid_split.py, under the interpreter) against split_offloaded on
    fresh random routings (padding included; an id listed twice for a token counts twice),
    resident sets, costs and widths: the same columns of the same experts, the GPU's ids the
    rest (a split expert's pairs stay), the ids copied."""
    rng = np.random.default_rng(seed)
    E, k, T = num_experts, top_k, num_tokens
    for trial in range(8):
        ids = np.stack([rng.choice(E, k, replace=False) for _ in range(T)])
        ids[rng.random(ids.shape) < 0.1] = -1
        resident = rng.choice(E, int(rng.integers(0, E)), replace=False)
        mask = torch.zeros(E, dtype=torch.uint8)
        mask[torch.from_numpy(resident)] = 1
        c = costs(gpu_gbps=float(rng.uniform(20, 80)), cpu_gbps=float(rng.uniform(10, 80)),
                  gpu_fixed_us=float(rng.uniform(0, 200)), cpu_fixed_us=float(rng.uniform(0, 200)),
                  cpu_pair_us=float(rng.uniform(0, 100)) if trial % 2 else 0.0)
        topk_ids = torch.from_numpy(ids).to(torch.int32 if trial % 3 == 0 else torch.int64)
        intermediate = int(rng.choice([768, 1408, 96, 40]))
        gpu_ids, cols, copied = _split(topk_ids, mask, c, E, intermediate)
        flat = ids.reshape(-1)
        offloaded = [e for e in flat.tolist() if e >= 0 and not mask[e]]
        want = split_offloaded({e: offloaded.count(e) for e in set(offloaded)}, c, intermediate)
        got = {e: int(cols[e]) for e in np.flatnonzero(cols.numpy()).tolist()}
        assert got == want
        whole = [e for e, n in want.items() if n == intermediate]
        assert gpu_ids.dtype == topk_ids.dtype
        assert np.array_equal(gpu_ids.numpy(), np.where(np.isin(ids, whole), -1, ids))
        assert np.array_equal(copied.numpy(), flat)


@pytest.mark.parametrize("num_tokens", [1, 4, 16])
def test_host_function_computes_the_cpu_share_as_the_reference(seed, num_tokens):
    """The split kernel writes into a HostStep's buffers, as on the GPU, and the C host function
    groups the CPU's pairs as group_pairs does and sums them bitwise as GroupedExperts does
    with the split's columns; with the GPU's part (the reference from first_col on) the whole
    layer comes out."""
    from moe_uvm.hybrid import HostStep

    built, why = cpu_module.available()
    if not built:
        pytest.skip(f"CPU expert kernel unavailable: {why}")
    E, k, H, I, T = 16, 4, 64, 256, num_tokens  # I: 4 granules, so experts get split
    rng = np.random.default_rng(seed)
    _, w13, w2, _, _ = make_inputs(T, E, k, H, I, torch.float32, "cpu")
    w13, w2 = w13.bfloat16(), w2.bfloat16()
    kernel = cpu_module.GroupedExperts(w13, w2)
    resident_mask = torch.zeros(E, dtype=torch.uint8)
    c = costs(cpu_gbps=float(rng.uniform(20, 80)), gpu_fixed_us=15.0, cpu_fixed_us=30.0,
              cpu_pair_us=float(rng.uniform(0, 50)))
    step = HostStep(kernel, T, k, resident_mask, c, threads=3, adapt=False, pin=False)
    took, timed, split = 0.0, 0, 0
    for _ in range(6):
        x, _, _, topk_weights, topk_ids = make_inputs(T, E, k, H, I, torch.float32, "cpu")
        topk_ids[torch.from_numpy(rng.random(topk_ids.shape) < 0.1)] = -1
        resident_mask.zero_()
        resident_mask[torch.from_numpy(rng.choice(E, int(rng.integers(0, E)), replace=False))] = 1
        from moe_uvm.kernels.hybrid_split import split_on_device

        gpu_ids = torch.empty_like(topk_ids)
        gpu_cols = torch.empty(E, dtype=torch.int32)
        split_on_device(topk_ids, E, I, resident_mask, step.costs, gpu_ids, step.ids, step.cols,
                        gpu_cols)
        step.weights.copy_(topk_weights.reshape(-1))
        step.x.copy_(x)
        step.compute()
        ids = topk_ids.reshape(-1).to(torch.int64).numpy()
        cols = step.cols.numpy()
        on_cpu = (cols[np.maximum(ids, 0)] > 0) & (ids >= 0)
        whole = (cols[np.maximum(ids, 0)] == I) & (ids >= 0)
        groups, _ = group_pairs(ids, on_cpu, topk_weights.reshape(-1).numpy(), k)
        for got, want in zip(step.groups(), groups, strict=True):
            assert np.array_equal(got, want)
        assert np.array_equal(step.group_cols(), cols[groups[0]])
        assert np.array_equal(gpu_ids.reshape(-1).numpy(), np.where(whole, -1, ids))
        expected = torch.zeros(T, H)
        kernel(x, *groups, torch.empty(len(groups[2]), 2 * I), expected, 2,
               cols=cols[groups[0]].astype(np.int64))
        assert torch.equal(step.out, expected)
        gpu_part = fused_moe_reference(x, w13.float(), w2.float(), topk_weights, gpu_ids,
                                       first_col=gpu_cols)
        whole_layer = fused_moe_reference(x, w13.float(), w2.float(), topk_weights, topk_ids)
        assert rel_err(step.out + gpu_part, whole_layer) < 1e-5
        took += float(cols[groups[0]].sum()) / I
        timed += bool(len(groups[0]))
        split += bool(((cols > 0) & (cols < I)).any())
    stats = step.stats()
    assert stats.steps == 6 and abs(stats.cpu_experts - took) < 1e-9 and took > 0
    assert len(stats.cpu_ms) == timed  # the CPU side is timed when it has experts
    assert step.current_costs() == c  # adapt=False: the costs stay


def test_host_function_splits_an_expert_by_columns(seed):
    """Three offloaded experts at equal speeds: the CPU takes one and half of the next (the
    first 128 of 256 columns), the GPU the rest; the two parts sum to the whole layer."""
    from moe_uvm.hybrid import HostStep
    from moe_uvm.kernels.hybrid_split import split_on_device

    built, why = cpu_module.available()
    if not built:
        pytest.skip(f"CPU expert kernel unavailable: {why}")
    E, k, H, I = 8, 3, 64, 256
    x, w13, w2, topk_weights, _ = make_inputs(1, E, k, H, I, torch.float32, "cpu")
    topk_ids = torch.tensor([[6, 2, 5]])
    kernel = cpu_module.GroupedExperts(w13.bfloat16(), w2.bfloat16())
    step = HostStep(kernel, 1, k, torch.zeros(E, dtype=torch.uint8), costs(), threads=2,
                    adapt=False, pin=False)
    gpu_ids, gpu_cols = torch.empty_like(topk_ids), torch.empty(E, dtype=torch.int32)
    split_on_device(topk_ids, E, I, step.resident, step.costs, gpu_ids, step.ids, step.cols,
                    gpu_cols)
    assert step.cols.tolist() == [0, 0, I, 0, 0, I // 2, 0, 0]  # ties by id: 2 whole, 5 half
    assert gpu_ids.tolist() == [[6, -1, 5]]
    step.weights.copy_(topk_weights.reshape(-1))
    step.x.copy_(x)
    step.compute()
    assert step.stats().cpu_experts == 1.5 and step.stats().gpu_offloaded_experts == 1.5
    gpu_part = fused_moe_reference(x, w13.bfloat16().float(), w2.bfloat16().float(),
                                   topk_weights, gpu_ids, first_col=gpu_cols)
    whole = fused_moe_reference(x, w13.bfloat16().float(), w2.bfloat16().float(), topk_weights,
                                topk_ids)
    assert rel_err(step.out + gpu_part, whole) < 1e-5


def test_doorbell_thread_serves_each_requested_layer_as_the_host_function(seed):
    """The doorbell's thread (what the GPU's stream memory operations talk to) computes a
    state when its word reads 1, leaves 2, and touches no other state; results bitwise equal to
    calling the host function directly. Here the host writes the words the GPU would."""
    import time

    from moe_uvm.hybrid import Doorbell, HostStep
    from moe_uvm.kernels.hybrid_split import split_on_device

    built, why = cpu_module.available()
    if not built:
        pytest.skip(f"CPU expert kernel unavailable: {why}")
    E, k, H, I, T = 16, 4, 64, 32, 3
    _, w13, w2, _, _ = make_inputs(T, E, k, H, I, torch.float32, "cpu")
    kernel = cpu_module.GroupedExperts(w13.bfloat16(), w2.bfloat16())
    resident_mask = torch.zeros(E, dtype=torch.uint8)
    c = costs(cpu_gbps=200.0, cpu_fixed_us=0.0)  # the CPU takes experts
    bell = Doorbell()
    steps = [HostStep(kernel, T, k, resident_mask, c, threads=2, adapt=False, pin=False)
             for _ in range(3)]
    words = [bell.register(step) for step in steps]
    assert words == [0, 1, 2]

    def wait_done(word):
        deadline = time.monotonic() + 30
        while int(bell.words[word]) != Doorbell.DONE:
            assert time.monotonic() < deadline, "the doorbell thread did not answer in 30 s"
            time.sleep(1e-4)

    for _ in range(3):
        for step in steps:
            x, _, _, topk_weights, topk_ids = make_inputs(T, E, k, H, I, torch.float32, "cpu")
            gpu_ids = torch.empty_like(topk_ids)
            split_on_device(topk_ids, E, I, resident_mask, step.costs, gpu_ids, step.ids,
                            step.cols, torch.empty(E, dtype=torch.int32))
            step.weights.copy_(topk_weights.reshape(-1))
            step.x.copy_(x)
        served, before = bell.served(), [s.stats().steps for s in steps]
        bell.words[1] = Doorbell.REQUEST  # only the middle one
        wait_done(1)
        assert bell.served() == served + 1
        assert [s.stats().steps for s in steps] == [before[0], before[1] + 1, before[2]]
        got = steps[1].out.clone()
        assert steps[1].cols.any() and got.abs().sum() > 0
        steps[1].compute()  # the same state, computed directly
        assert torch.equal(got, steps[1].out)
        for word in (0, 2):
            bell.words[word] = Doorbell.REQUEST
        for word in (0, 2):
            wait_done(word)
    assert bell.served() == 9
    assert [s.stats().steps for s in steps] == [3, 6, 3]  # the direct computes count too
    bell.close()  # joins the thread
    bell.words[0] = Doorbell.REQUEST
    time.sleep(0.01)
    assert steps[0].stats().steps == 3 and int(bell.words[0]) == Doorbell.REQUEST
    with pytest.raises(RuntimeError, match="the doorbell is closed"):
        bell.register(steps[0])


def _adapting_step(cpu_expert_us, shared_costs=None):
    """A HostStep that adapts, over 8 experts of a tiny layer, routed 2 tokens x top-2."""
    from moe_uvm.hybrid import HostStep

    built, why = cpu_module.available()
    if not built:
        pytest.skip(f"CPU expert kernel unavailable: {why}")
    E, k, H, I, T = 8, 2, 64, 32, 2
    x, w13, w2, topk_weights, topk_ids = make_inputs(T, E, k, H, I, torch.float32, "cpu")
    kernel = cpu_module.GroupedExperts(w13.bfloat16(), w2.bfloat16())
    c = ExpertCosts(gpu_expert_us=1e9, cpu_expert_us=cpu_expert_us, gpu_fixed_us=0.0,
                    cpu_fixed_us=0.0)
    step = HostStep(kernel, T, k, torch.zeros(E, dtype=torch.uint8), c, threads=2, adapt=True,
                    pin=False, shared_costs=shared_costs)
    step.ids.copy_(topk_ids.reshape(-1))
    step.weights.copy_(topk_weights.reshape(-1))
    step.x.copy_(x)
    return step, topk_ids, I


def test_an_idle_cpu_drifts_back_to_its_calibrated_cost(seed):
    from moe_uvm.hybrid import _EMA

    step, _, _ = _adapting_step(cpu_expert_us=100.0)
    step.costs[1] = 1e6  # a slow spell pushed the estimate up; the split gives the CPU nothing
    step.cols.zero_()
    for _ in range(40):
        step.compute()
    rate = 1 - _EMA / 16
    assert step.current_costs().cpu_expert_us == pytest.approx(100 + (1e6 - 100) * rate**40,
                                                               rel=1e-12)
    assert step.stats().cpu_experts == 0 and step.stats().cpu_ms == []
    step.costs[1] = 50.0  # below the calibrated cost: idle steps leave it
    step.compute()
    assert step.current_costs().cpu_expert_us == 50.0


def test_a_share_under_one_expert_moves_the_estimate_in_proportion(seed):
    from moe_uvm.hybrid import _EMA

    # a start far above anything observed: one step moves it down by about ema x weight
    step, topk_ids, I = _adapting_step(cpu_expert_us=1e9)
    step.cols.zero_()
    step.cols[int(topk_ids[0, 0])] = I // 4  # a quarter of one routed expert
    step.compute()
    assert step.stats().cpu_experts == pytest.approx(0.25)
    moved = 1 - step.current_costs().cpu_expert_us / 1e9
    assert moved == pytest.approx(_EMA * 0.25, rel=1e-3)
    whole, topk_ids, I = _adapting_step(cpu_expert_us=1e9)
    whole.cols.zero_()
    whole.cols[int(topk_ids[0, 0])] = I
    whole.compute()
    assert 1 - whole.current_costs().cpu_expert_us / 1e9 == pytest.approx(_EMA, rel=1e-3)


def test_layers_sharing_costs_adapt_one_estimate(seed):
    from moe_uvm.hybrid import _EMA

    # Two layers over one cost buffer (CpuShare's cost_pool): each one's observation moves
    # the estimate the other's next split reads; the starting value is the first's.
    first, first_ids, I = _adapting_step(cpu_expert_us=1e9)
    second, second_ids, _ = _adapting_step(cpu_expert_us=5.0, shared_costs=first.costs)
    assert second.costs.data_ptr() == first.costs.data_ptr()
    for step, topk_ids in ((first, first_ids), (second, second_ids)):
        step.cols.zero_()
        step.cols[int(topk_ids[0, 0])] = I
    first.compute()
    second.compute()
    assert second.current_costs().cpu_expert_us == first.current_costs().cpu_expert_us
    moved = 1 - first.current_costs().cpu_expert_us / 1e9
    assert moved == pytest.approx(1 - (1 - _EMA) ** 2, rel=1e-3)
    with pytest.raises(ValueError, match="shared_costs must be float64"):
        _adapting_step(cpu_expert_us=5.0, shared_costs=first.costs.float())


def test_with_the_gpu_word_the_split_follows_which_side_finished_first(seed):
    # The doorbell's second word: 1 when the GPU's kernel was done before the CPU's share.
    step, topk_ids, I = _adapting_step(cpu_expert_us=100.0)
    word = torch.zeros(1, dtype=torch.int32)
    step.state.gpu_done = word.data_ptr()
    step.cols.zero_()
    step.cols[int(topk_ids[0, 0])] = I
    word[0] = 1  # the GPU first: the CPU had too much, its cost goes up
    step.compute()
    assert step.current_costs().cpu_expert_us == pytest.approx(102.0, rel=1e-12)
    word[0] = 0  # the CPU first: down
    step.compute()
    assert step.current_costs().cpu_expert_us == pytest.approx(102.0 * 0.98, rel=1e-12)
    step.cols.zero_()  # the GPU took every offloaded expert: the CPU counts as first
    step.compute()
    assert step.current_costs().cpu_expert_us == pytest.approx(102.0 * 0.98**2, rel=1e-12)
    stats = step.stats()
    assert (stats.balanced, stats.gpu_first, stats.summary()["gpu_first"]) == (3, 1, 1 / 3)
    summary = stats.summary()  # two steps gave the CPU work and were timed
    assert len(stats.cpu_ms) == 2 and summary["cpu_ms_p90"] == pytest.approx(
        np.percentile(stats.cpu_ms, 90)) and summary["cpu_ms_p90"] >= summary["cpu_ms_median"]
    for _ in range(300):  # within 16x of the calibrated cost either way
        step.compute()
    assert step.current_costs().cpu_expert_us == pytest.approx(100.0 / 16, rel=1e-12)
    step.resident.fill_(1)  # nothing offloaded: nothing to balance
    step.compute()
    assert step.current_costs().cpu_expert_us == pytest.approx(100.0 / 16, rel=1e-12)
    assert step.stats().balanced == 303
    step.reset_stats()
    assert step.stats().balanced == step.stats().gpu_first == 0


def test_cpu_calibration_reads_only_the_experts_it_is_given():
    from moe_uvm.hybrid import calibrate_cpu_us

    class Recording:  # GroupedExperts' call, recording which experts each call reads
        num_experts, hidden, intermediate = 16, 8, 4

        def __init__(self):
            self.read = set()
            self.calls = []

        def __call__(self, x, experts, offsets, tokens, weights, gate_up, out, threads):
            assert len(experts) == len(offsets) - 1 and threads == 2
            self.read.update(int(e) for e in experts)
            self.calls.append(tuple(int(e) for e in experts))

    kernel = Recording()
    per_expert, per_pair = calibrate_cpu_us(kernel, 2, experts=[3, 9, 12])
    assert kernel.read == {3, 9, 12} and per_expert > 0 and per_pair >= 0
    everything = Recording()
    everything.num_experts = 40
    calibrate_cpu_us(everything, 2, calls=20)
    assert len(everything.read) == 24  # default: all of the kernel's experts, three groups of 8
    # every expert a timed call reads was read by an untimed call before it (the CPU's first
    # touch of a page is not timed), and consecutive timed calls read different groups
    for batch in (everything.calls[:23], everything.calls[23:]):  # 1 token, then 8 per expert
        warm, timed = batch[:3], batch[3:]
        assert len(set(warm)) == 3 and all(call in warm for call in timed)
        assert all(a != b for a, b in zip(timed, timed[1:], strict=False))
    for bad in ([], [16], [-1, 2]):
        with pytest.raises(ValueError, match="non-empty subset of 0..15"):
            calibrate_cpu_us(Recording(), 2, experts=bad)


def test_host_function_adapts_the_cpu_cost_to_what_it_observes(seed):
    # A CPU cost 1e4 times too high at first: its observed time pulls the estimate down.
    step, _, I = _adapting_step(cpu_expert_us=1e5)
    step.cols.fill_(I)
    for _ in range(4):
        step.compute()
    assert step.stats().cpu_experts > 0 and len(step.stats().cpu_ms) == 4
    assert step.current_costs().cpu_expert_us < 0.5 * 1e5
    step.reset_stats()
    assert step.stats().steps == 0 and step.stats().cpu_ms == []


def test_the_auto_switch_measures_and_leaves_it_off_where_it_does_not_pay():
    c = costs(gpu_fixed_us=15.0, cpu_fixed_us=40.0)
    # Everything resident: nothing offloaded, nothing to split; off without measuring.
    assert predicted_layer_us(0, 1, c) == (0.0, 0.0)
    assert choose_cpu_experts("auto", offloaded_per_layer=0.0, tokens_per_expert=1.0,
                              costs=c) == (False, "no offloaded experts to share")
    # A large batch: ~16 tokens on each expert, the CPU's per-pair cost dominates.
    big = costs(gpu_fixed_us=15.0, cpu_fixed_us=40.0, cpu_pair_us=400.0)
    on, why = choose_cpu_experts("auto", offloaded_per_layer=64.0, tokens_per_expert=16.0,
                                 costs=big)
    assert not on and "predicted" in why
    # Decode with 8 offloaded experts a layer: predicted faster, then the measurement decides.
    on, _ = choose_cpu_experts("auto", offloaded_per_layer=8.0, tokens_per_expert=1.0, costs=c)
    assert on
    assert choose_cpu_experts("auto", offloaded_per_layer=8.0, tokens_per_expert=1.0, costs=c,
                              measured_ms=(10.0, 9.9))[0] is False  # < 5% faster: off
    assert choose_cpu_experts("auto", offloaded_per_layer=8.0, tokens_per_expert=1.0, costs=c,
                              measured_ms=(10.0, 7.0))[0] is True
    assert choose_cpu_experts("off", offloaded_per_layer=8.0, tokens_per_expert=1.0,
                              costs=c)[0] is False
    assert choose_cpu_experts("on", offloaded_per_layer=0.0, tokens_per_expert=1.0,
                              costs=c)[0] is True
    with pytest.raises(ValueError, match="cpu_experts must be one of"):
        choose_cpu_experts("yes", offloaded_per_layer=1.0, tokens_per_expert=1.0, costs=c)


def test_host_alias_refuses_what_the_cpu_cannot_read_in_place():
    with pytest.raises(ValueError, match="CUDA tensor in managed memory"):
        host_alias(torch.zeros(4))


@pytest.mark.gpu
def test_gpu_calibration_times_the_fused_kernel_in_a_graph(seed):
    from moe_uvm.hybrid import calibrate_gpu_us

    E, k, H, I = 16, 4, 256, 128
    _, w13, w2, _, _ = make_inputs(1, E, k, H, I, torch.bfloat16, "cuda")
    assert calibrate_gpu_us(w13, w2, [3], k) is None  # one offloaded expert: no line
    fixed, per_expert = calibrate_gpu_us(w13, w2, list(range(E)), k)
    assert np.isfinite(fixed) and fixed >= 0 and 0 < per_expert < 1e4
    assert not torch.cuda.is_current_stream_capturing()


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
                         costs=costs(), threads=2)
        for _ in range(3):  # the costs adapt between steps; the result stays within tolerance
            out = share(x, topk_weights, topk_ids)
            assert out.dtype == x.dtype and rel_err(out, expected) < 1e-2
        assert share.stats.cpu_experts > 0 and len(share.stats.cpu_ms) > 0
        # A CPU far faster than the GPU: it takes every offloaded expert; no GPU pair is left
        # when nothing routed is resident.
        greedy = CpuShare(store["w13"], store["w2"], lambda: [], quant=quant,
                          costs=costs(cpu_gbps=1e5, gpu_fixed_us=10), adapt=False, threads=2)
        assert rel_err(greedy(x, topk_weights, topk_ids), expected) < 1e-2
        assert greedy.stats.gpu_offloaded_experts == 0
        # All resident: nothing offloaded, the GPU kernel alone, bitwise.
        everything = CpuShare(store["w13"], store["w2"], lambda: range(E), quant=quant,
                              costs=costs())
        assert torch.equal(everything(x, topk_weights, topk_ids),
                           fused_moe(x, store["w13"], store["w2"], topk_weights, topk_ids,
                                     **quant))
        assert everything.stats.cpu_experts == 0
        del share, greedy, everything  # the aliases go before the store's memory
        torch.cuda.synchronize()
    finally:
        store.free()


@pytest.mark.gpu
@pytest.mark.parametrize("signal", ["doorbell", "host_node"])
def test_gpu_hybrid_in_a_cuda_graph_replays_the_eager_step_bitwise(seed, signal):
    """Fixed costs: the split depends only on the routing, so a graph's replay (memory-operation
    nodes and the doorbell thread, or host nodes) equals the eager step bitwise, on fresh
    routings copied into the captured inputs; a new GPU set given after capture is what the
    replays split by."""
    built, why = cpu_module.available()
    if not built:
        pytest.skip(f"CPU expert kernel unavailable: {why}")
    from moe_uvm import uvm
    from moe_uvm.store import ManagedExpertStore

    if signal == "doorbell":
        works, why = uvm.stream_memops_work(0)
        if not works:
            pytest.skip(f"stream memory operations do not work here: {why}")

    E, k, H, I, T = 16, 4, 256, 128, 2
    x, w13, w2, topk_weights, topk_ids = make_inputs(T, E, k, H, I, torch.bfloat16, "cuda")
    store = ManagedExpertStore(E, {"w13": ((2 * I, H), w13.dtype), "w2": ((H, I), w2.dtype)},
                               device="cuda:0")
    try:
        store.advise_offloaded(range(E))
        store["w13"].copy_(w13)
        store["w2"].copy_(w2)
        torch.cuda.synchronize()
        share = CpuShare(store["w13"], store["w2"], lambda: [], costs=costs(), adapt=False,
                         threads=2, signal=signal)
        share.follow_calls = False
        static = (x.clone(), topk_weights.clone(), topk_ids.clone())
        share(*static)  # the first call allocates its pinned buffers
        torch.cuda.synchronize()
        assert share.signal == signal
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = share(*static)
        share.reset_stats()
        for _ in range(3):
            fresh = make_inputs(T, E, k, H, I, torch.bfloat16, "cuda")
            for dst, src in zip(static, (fresh[0], fresh[3], fresh[4]), strict=True):
                dst.copy_(src)
            graph.replay()
            eager = share(*static)
            torch.cuda.synchronize()
            assert torch.equal(captured, eager)
            ref = fused_moe(fresh[0], store["w13"], store["w2"], fresh[3], fresh[4])
            assert rel_err(captured, ref) < 1e-2
        assert share.stats.cpu_experts > 0 and share.stats.steps == 6
        share.set_gpu_experts(range(E))  # everything the GPU's: no CPU share in the replays
        share.reset_stats()
        graph.replay()
        torch.cuda.synchronize()
        assert share.stats.cpu_experts == 0 and share.stats.steps == 1
        assert torch.equal(captured, fused_moe(*static[:1], store["w13"], store["w2"],
                                               *static[1:]))
        del graph, share
        torch.cuda.synchronize()
    finally:
        store.free()


def test_signal_is_checked():
    from moe_uvm.hybrid import resolve_signal

    with pytest.raises(ValueError, match="signal must be one of auto, doorbell, host_node"):
        CpuShare(torch.zeros(2, 8, 4), torch.zeros(2, 4, 4), lambda: [], costs=costs(),
                 signal="bell")
    with pytest.raises(ValueError, match="signal must be one of"):
        resolve_signal("fast", 0)
    assert resolve_signal("host_node", 0) == ("host_node", "signal='host_node'")
    if not torch.cuda.is_available():
        assert resolve_signal("auto", 0) == ("host_node",
                                             "stream memory operations do not work: no CUDA "
                                             "device")
        with pytest.raises(RuntimeError, match="signal='doorbell': stream memory operations"):
            resolve_signal("doorbell", 0)


def test_cpu_experts_config_is_checked():
    from moe_uvm.config import ExpertOffloadConfig

    with pytest.raises(ValueError, match="cpu_experts must be one of off, on, auto"):
        ExpertOffloadConfig(cpu_experts="yes")
    with pytest.raises(ValueError, match="cpu_threads must be an int >= 1"):
        ExpertOffloadConfig(cpu_experts="on", cpu_threads=0)
    with pytest.raises(ValueError, match="does not combine with a slot cache"):
        ExpertOffloadConfig(cpu_experts="on", prefetch_slots=2)
    assert ExpertOffloadConfig().cpu_experts == "off"  # the bitwise promises hold by default


def test_without_managed_memory_auto_stays_off_and_on_is_refused_leaving_the_layer_intact():
    from moe_uvm.config import ExpertOffloadConfig
    from moe_uvm.layer import FusedMoE
    from moe_uvm.offload import offload_experts

    layer = FusedMoE(8, 2, 64, 32, dtype=torch.float32, device="cpu")
    torch.nn.init.normal_(layer.w13_weight)
    before = layer.w13_weight
    with pytest.raises(ValueError, match="cpu_experts='on': the experts are not in CUDA managed"):
        offload_experts(layer, ExpertOffloadConfig(num_resident=4, cpu_experts="on"),
                        device="cpu")
    assert layer.w13_weight is before and layer.cpu_share is None
    manager = offload_experts(layer, ExpertOffloadConfig(num_resident=4, cpu_experts="auto"),
                              device="cpu")
    assert manager.hybrid == (False, "the experts are not in CUDA managed memory (no GPU)")
    assert layer.cpu_share is None
    manager.close()


@pytest.mark.gpu
def test_gpu_auto_leaves_it_off_with_everything_resident_and_on_runs_the_share(seed):
    built, why = cpu_module.available()
    if not built:
        pytest.skip(f"CPU expert kernel unavailable: {why}")
    from moe_uvm.config import ExpertOffloadConfig
    from moe_uvm.layer import FusedMoE
    from moe_uvm.offload import offload_experts

    E, k, H, I, T = 16, 4, 256, 128, 4
    for resident, mode, expect in ((-1, "auto", False), (4, "on", True)):
        layer = FusedMoE(E, k, H, I, dtype=torch.bfloat16, device="cuda")
        torch.nn.init.normal_(layer.w13_weight, std=H**-0.5)
        torch.nn.init.normal_(layer.w2_weight, std=I**-0.5)
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(T, E, device="cuda")
        expected = layer(x, logits)
        manager = offload_experts(layer, ExpertOffloadConfig(num_resident=resident,
                                                             cpu_experts=mode, cpu_threads=2),
                                  device="cuda")
        try:
            assert manager.hybrid[0] is expect, manager.hybrid
            if not expect:
                assert manager.hybrid[1] == "no offloaded experts to share"
                assert torch.equal(layer(x, logits), expected)
            else:
                assert layer.cpu_share is not None
                assert rel_err(layer(x, logits), expected) < 1e-2
        finally:
            manager.close()
        assert layer.cpu_share is None


def test_finish_hybrid_runs_a_pending_attachment_once():
    """offload_experts leaves the hybrid pending for layers built on meta (calibrating on
    stores not yet written would time pages decode never reads); finish_hybrid runs the
    pending attachment once, sets and returns manager.hybrid, and is a no-op after."""
    from types import SimpleNamespace

    from moe_uvm.hybrid import PENDING
    from moe_uvm.offload import finish_hybrid

    calls = []
    manager = SimpleNamespace(hybrid=(False, PENDING),
                              pending_hybrid=lambda: calls.append(1) or (True, "measured"))
    assert finish_hybrid(manager) == (True, "measured") == manager.hybrid
    assert manager.pending_hybrid is None and calls == [1]
    assert finish_hybrid(manager) == (True, "measured") and calls == [1]
    idle = SimpleNamespace(hybrid=(False, "cpu_experts='off'"), pending_hybrid=None)
    assert finish_hybrid(idle) == (False, "cpu_experts='off'")
