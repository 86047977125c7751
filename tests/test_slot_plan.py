"""The one-launch slot planners (plan_fill_fused, plan_prefetch_fused) against the torch
references in moe_uvm.kernels.slot_plan_reference: the same plans, pool state and counters bitwise,
on random pools (stamp ties, empty slots, resident experts, padding and repeated ids, score
ties, zero, negative and non-finite scores), over random call sequences, and (GPU) inside CUDA-graph
replay at Qwen3-like sizes and at the largest supported sizes."""

import numpy as np
import pytest
import torch

from moe_uvm.kernels.slot_plan import plan_fill_fused, plan_prefetch_fused
from moe_uvm.kernels.slot_plan_reference import (
    EMPTY_STAMP,
    METRICS,
    commit_fill,
    count_prefetch,
    empty_slot_state,
    plan_fill,
    plan_prefetch,
    predicted_mask,
)

# Unmarked tests run the kernels in the interpreter on CPU, and compiled where CUDA is present.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# --- random inputs ------------------------------------------------------------------------------


def random_pool(rng, E, S, resident, device=DEVICE):
    """A consistent pool: random offloaded experts in random slots, some slots empty, stamps
    with ties (empty slots hold EMPTY_STAMP)."""
    offloaded = np.flatnonzero(~resident)
    held = rng.choice(offloaded, size=min(int(rng.integers(0, S + 1)), len(offloaded)),
                      replace=False)
    slots = rng.choice(S, size=len(held), replace=False)
    expert_slot, slot_expert = np.full(E, -1), np.full(S, -1)
    stamp = np.full(S, EMPTY_STAMP, np.int64)
    expert_slot[held], slot_expert[slots] = slots, held
    stamp[slots] = rng.integers(0, 4, size=len(slots))
    return (torch.tensor(expert_slot, dtype=torch.int32, device=device),
            torch.tensor(slot_expert, dtype=torch.int32, device=device),
            torch.tensor(stamp, device=device))


def random_ids(rng, E, T, k, device=DEVICE):
    """[T, k] routing ids: distinct per token, repeated across tokens, ~15% padding (-1)."""
    ids = np.stack([rng.choice(E, size=k, replace=False) for _ in range(T)])
    ids[rng.random(ids.shape) < 0.15] = -1
    dtype = torch.int32 if rng.random() < 0.5 else torch.int64
    return torch.tensor(ids, dtype=dtype, device=device)


def random_scores(rng, E, device=DEVICE):
    """Mostly small integers (many ties, zeros, negatives), a few inf / nan / tiny positives."""
    scores = rng.integers(-2, 5, size=E).astype(np.float32)
    special = rng.random(E)
    scores[special < 0.05] = np.inf
    scores[(special >= 0.05) & (special < 0.08)] = np.nan
    scores[(special >= 0.08) & (special < 0.12)] = 1e-40  # a float32 subnormal: > 0
    return torch.tensor(scores, device=device)


def random_layer(rng, max_e=64, max_s=16, max_ids=64, device=DEVICE):
    E, S = int(rng.integers(2, max_e + 1)), int(rng.integers(1, max_s + 1))
    k = int(rng.integers(1, min(E, 8) + 1))
    T = int(rng.integers(1, max(max_ids // k, 1) + 1))
    resident = rng.random(E) < rng.random() * 0.6
    return (E, S, torch.tensor(resident, device=device),
            random_pool(rng, E, S, resident, device), random_ids(rng, E, T, k, device))


def random_counters(rng, device=DEVICE):
    return torch.tensor(rng.integers(0, 1000, size=len(METRICS)), device=device)


def clones(tensors):
    return [t.clone() for t in tensors]


def assert_same(fused, ref):
    for a, b in zip(fused, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (a, b)


# --- reference steps (what the executor ran before: torch ops) ----------------------------------


def reference_fill(ids, resident, pool, step, counters=None, predicted=None):
    if counters is not None:
        count_prefetch(counters, ids, resident, pool[0], predicted)
    return plan_fill(ids, resident, *pool, step)


def reference_prefetch(scores, resident, pool, step, m, predicted=None):
    if predicted is not None:
        predicted.copy_(predicted_mask(scores, resident, m))
    return plan_prefetch(scores, resident, *pool, step, m)


# --- any device (on CPU: the interpreter) --------------------------------------------------------


def test_fused_fill_equals_reference_plan_state_and_counters_on_random_pools(seed):
    rng = np.random.default_rng(seed)
    for _ in range(300):
        E, S, resident, pool, ids = random_layer(rng)
        ref_pool = clones(pool)
        step = torch.tensor(int(rng.integers(4, 8)), device=DEVICE)
        counters = None if rng.random() < 0.2 else random_counters(rng)
        ref_counters = None if counters is None else counters.clone()
        predicted = None if rng.random() < 0.3 else torch.tensor(rng.random(E) < 0.4,
                                                                 device=DEVICE)
        fill = plan_fill_fused(ids, resident, *pool, step, counters, predicted)
        expected = reference_fill(ids, resident, ref_pool, step, ref_counters, predicted)
        assert_same([fill, *pool], [expected, *ref_pool])
        if counters is not None:
            assert torch.equal(counters, ref_counters)


def test_fused_prefetch_equals_reference_plan_state_and_mask_on_random_pools(seed):
    rng = np.random.default_rng(seed)
    for _ in range(300):
        E, S, resident, pool, _ = random_layer(rng)
        ref_pool = clones(pool)
        scores = random_scores(rng, E)
        if rng.random() < 0.3:
            scores = scores.to(torch.float16 if rng.random() < 0.5 else torch.float64)
        m = int(rng.integers(1, S + 1))
        step = torch.tensor(int(rng.integers(4, 8)), device=DEVICE)
        mask = None if rng.random() < 0.3 else torch.tensor(rng.random(E) < 0.5, device=DEVICE)
        ref_mask = None if mask is None else mask.clone()
        out = plan_prefetch_fused(scores, resident, *pool, step, m, mask)
        expected = reference_prefetch(scores, resident, ref_pool, step, m, ref_mask)
        assert_same([*out, *pool], [*expected, *ref_pool])
        if mask is not None:
            assert torch.equal(mask, ref_mask)


def test_random_call_sequences_keep_fused_and_reference_pools_identical(seed):
    rng = np.random.default_rng(seed)
    for _ in range(30):
        E, S, resident, _, _ = random_layer(rng)
        pool = empty_slot_state(E, S, device=DEVICE)
        counters = torch.zeros(len(METRICS), dtype=torch.int64, device=DEVICE)
        mask = torch.zeros(E, dtype=torch.bool, device=DEVICE)
        ref_pool, ref_counters, ref_mask = clones(pool), counters.clone(), mask.clone()
        predicted = None
        for t in range(10):
            step = torch.tensor(t, device=DEVICE)
            if rng.random() < 0.6:
                m = int(rng.integers(1, S + 1))
                scores = random_scores(rng, E)
                out = plan_prefetch_fused(scores, resident, *pool, step, m, mask)
                expected = reference_prefetch(scores, resident, ref_pool, step, m, ref_mask)
                assert_same([*out, *pool, mask], [*expected, *ref_pool, ref_mask])
                predicted = mask
            k = int(rng.integers(1, min(E, 8) + 1))
            ids = random_ids(rng, E, int(rng.integers(1, 64 // k + 1)), k)
            fill = plan_fill_fused(ids, resident, *pool, step, counters, predicted)
            expected = reference_fill(ids, resident, ref_pool, step, ref_counters, predicted)
            assert_same([fill, *pool, counters], [expected, *ref_pool, ref_counters])
            commit_fill(fill, pool[0])
            commit_fill(expected, ref_pool[0])
            predicted = None


def test_more_misses_than_victims_fill_the_lowest_ids_into_the_oldest_slots():
    pool = empty_slot_state(10, 3)
    pool[0][[1, 4]] = torch.tensor([0, 2], dtype=torch.int32)
    pool[1][:] = torch.tensor([1, -1, 4], dtype=torch.int32)
    pool[2][:] = torch.tensor([5, EMPTY_STAMP, 2])
    pool = [t.to(DEVICE) for t in pool]
    resident = torch.arange(10, device=DEVICE) == 3
    ids = torch.tensor([[9, 3, 1], [8, 2, 6], [-1, 2, 1]], device=DEVICE)
    # Needed: 1 (a hit), resident 3, misses 2, 6, 8, 9 for 2 victims: empty slot 1, then slot 2.
    fill = plan_fill_fused(ids, resident, *pool, torch.tensor(7, device=DEVICE))
    assert fill.tolist() == [-1, -1, 1, -1, -1, -1, 2, -1, -1, -1]
    assert pool[1].tolist() == [1, 2, 6] and pool[2].tolist() == [7, 7, 7]
    assert pool[0].tolist() == [-1, 0] + [-1] * 8  # 4 evicted; 2 and 6 wait for commit_fill


def test_prefetch_takes_positive_scores_only_ties_to_the_lower_id():
    pool = empty_slot_state(8, 4, device=DEVICE)
    pool[0][5], pool[1][3], pool[2][3] = 3, 5, 1
    scores = torch.tensor([2.0, 0.0, 2.0, -3.0, float("nan"), 2.0, 1.0, 2.0], device=DEVICE)
    resident = torch.arange(8, device=DEVICE) == 2
    mask = torch.zeros(8, dtype=torch.bool, device=DEVICE)
    step = torch.tensor(9, device=DEVICE)
    experts, slots = plan_prefetch_fused(scores, resident, *pool, step, 4, mask)
    # Ranked 0, 5 (cached in slot 3: refreshed), 7, 6; slot 3 is protected.
    assert experts.tolist() == [0, -1, 7, 6] and slots.tolist() == [0, -1, 1, 2]
    assert mask.tolist() == [True, False, False, False, False, True, True, True]
    assert pool[1].tolist() == [0, 7, 6, 5] and pool[2].tolist() == [9, 9, 9, 9]


def test_fused_planners_equal_reference_at_sizes_that_need_several_chunks(seed):
    """E=300, S=200, 2,400 ids: every loop in both kernels runs more than one chunk."""
    rng = np.random.default_rng(seed)
    E, S, k = 300, 200, 8
    resident = rng.random(E) < 0.2
    pool = random_pool(rng, E, S, resident)
    resident = torch.tensor(resident, device=DEVICE)
    ref_pool = clones(pool)
    step = torch.tensor(5, device=DEVICE)
    scores = random_scores(rng, E)
    out = plan_prefetch_fused(scores, resident, *pool, step, S)
    assert_same([*out, *pool], [*reference_prefetch(scores, resident, ref_pool, step, S),
                                *ref_pool])
    counters = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    ref_counters = counters.clone()
    ids = random_ids(rng, E, 300, k)
    fill = plan_fill_fused(ids, resident, *pool, step, counters)
    expected = reference_fill(ids, resident, ref_pool, step, ref_counters)
    assert_same([fill, *pool, counters], [expected, *ref_pool, ref_counters])


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.update(expert_slot=a["expert_slot"].long()), "expert_slot is torch.int64"),
        (lambda a: a.update(slot_stamp=a["slot_stamp"][:2]), r"slot_stamp is .* \[3\]"),
        (lambda a: a.update(resident=a["resident"].int()), "resident is torch.int32"),
        (lambda a: a.update(step=torch.zeros(2, dtype=torch.int64)), "step is torch.int64 with 2"),
        (lambda a: a.update(expert_slot=a["expert_slot"][None]), "one layer's"),
        (lambda a: a.update(topk_ids=a["topk_ids"].float()), "topk_ids is torch.float32"),
        (lambda a: a.update(counters=torch.zeros(3, dtype=torch.int64)), r"counters is .* \[4\]"),
        (lambda a: a.update(predicted=torch.zeros(5, dtype=torch.bool)), "predicted is"),
    ],
)
def test_fill_rejects_bad_inputs(change, message):
    expert_slot, slot_expert, slot_stamp = empty_slot_state(6, 3)
    args = dict(topk_ids=torch.tensor([[1, 2]]), resident=torch.zeros(6, dtype=torch.bool),
                expert_slot=expert_slot, slot_expert=slot_expert, slot_stamp=slot_stamp,
                step=torch.tensor(1))
    change(args)
    with pytest.raises(ValueError, match=message):
        plan_fill_fused(**args)


def test_prefetch_rejects_bad_inputs():
    pool = empty_slot_state(6, 3)
    resident, step = torch.zeros(6, dtype=torch.bool), torch.tensor(1)
    with pytest.raises(ValueError, match="need 1 <= m <= S"):
        plan_prefetch_fused(torch.ones(6), resident, *pool, step, 4)
    with pytest.raises(ValueError, match="scores is torch.int64"):
        plan_prefetch_fused(torch.ones(6, dtype=torch.int64), resident, *pool, step, 2)
    with pytest.raises(ValueError, match=r"counters_predicted is torch.uint8"):
        plan_prefetch_fused(torch.ones(6), resident, *pool, step, 2,
                            torch.zeros(6, dtype=torch.uint8))


# --- GPU -----------------------------------------------------------------------------------------


def routing(gen, T, E, k):
    """Top-k of random logits per token (distinct per token), as the router gives them."""
    return torch.rand(T, E, generator=gen, device="cuda").topk(k, dim=-1).indices.int()


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16])
@pytest.mark.parametrize("num_slots,num_predicted", [(32, 8), (8, 8)])
def test_gpu_graph_replay_of_fused_planners_equals_eager_reference(seed, num_tokens, num_slots,
                                                                   num_predicted):
    """A Qwen3-like layer (E=128, top-8): prefetch plan, fill plan with counters and the
    predicted mask, commit, captured once and replayed over 30 steps of fresh routing and
    scores; after each replay the plans, pool and counters equal the torch references run
    eagerly on a twin pool."""
    E, k = 128, 8
    gen = torch.Generator(device="cuda").manual_seed(seed)
    resident = torch.rand(E, generator=gen, device="cuda") < 0.3
    pool = empty_slot_state(E, num_slots, device="cuda")
    ref_pool = clones(pool)
    ids = routing(gen, num_tokens, E, k)
    scores = torch.zeros(E, device="cuda")
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    counters = torch.zeros(len(METRICS), dtype=torch.int64, device="cuda")
    ref_counters = counters.clone()
    mask, ref_mask = (torch.zeros(E, dtype=torch.bool, device="cuda") for _ in range(2))

    def plan(pool, counters, mask):
        copies = plan_prefetch_fused(scores, resident, *pool, step, num_predicted, mask)
        fill = plan_fill_fused(ids, resident, *pool, step, counters, mask)
        commit_fill(fill, pool[0])
        return copies, fill

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture, on a throwaway pool
        plan(clones(pool), counters.clone(), mask.clone())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (experts, slots), fill = plan(pool, counters, mask)
    for _ in range(30):
        step.add_(1)
        ids.copy_(routing(gen, num_tokens, E, k))
        # Integer scores: many ties; a sparse spread like co-occurrence sums.
        scores.copy_(torch.randint(-1, 6, (E,), generator=gen, device="cuda").float())
        graph.replay()
        ref_copies = reference_prefetch(scores, resident, ref_pool, step, num_predicted,
                                        ref_mask)
        ref_fill = reference_fill(ids, resident, ref_pool, step, ref_counters, ref_mask)
        commit_fill(ref_fill, ref_pool[0])
        torch.cuda.synchronize()
        assert_same([experts, slots, fill, *pool, counters, mask],
                    [*ref_copies, ref_fill, *ref_pool, ref_counters, ref_mask])
    assert int(counters[METRICS.index("slot_hits")]) > 0  # the replays exercised hits


@pytest.mark.gpu
def test_gpu_fused_planners_equal_reference_at_the_largest_sizes(seed):
    """E=512, S=256, T*k=4096 (many threads share scratch: a missing barrier shows here)."""
    rng = np.random.default_rng(seed)
    E, S, k = 512, 256, 8
    for trial in range(8):
        resident = rng.random(E) < 0.25
        pool = random_pool(rng, E, S, resident, "cuda")
        resident = torch.tensor(resident, device="cuda")
        ref_pool = clones(pool)
        step = torch.tensor(5 + trial, device="cuda")
        scores = random_scores(rng, E, "cuda")
        mask, ref_mask = (torch.zeros(E, dtype=torch.bool, device="cuda") for _ in range(2))
        m = int(rng.integers(1, S + 1))
        out = plan_prefetch_fused(scores, resident, *pool, step, m, mask)
        expected = reference_prefetch(scores, resident, ref_pool, step, m, ref_mask)
        assert_same([*out, *pool, mask], [*expected, *ref_pool, ref_mask])
        counters = random_counters(rng, "cuda")
        ref_counters = counters.clone()
        ids = random_ids(rng, E, 4096 // k, k, "cuda")
        fill = plan_fill_fused(ids, resident, *pool, step, counters, mask)
        expected = reference_fill(ids, resident, ref_pool, step, ref_counters, ref_mask)
        assert_same([fill, *pool, counters], [expected, *ref_pool, ref_counters])


@pytest.mark.gpu
def test_gpu_cpu_tensors_outside_the_interpreter_take_the_reference(seed):
    rng = np.random.default_rng(seed)
    E, S, resident, pool, ids = random_layer(rng, device="cpu")
    ref_pool = clones(pool)
    step = torch.tensor(3)
    counters, ref_counters = torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)
    fill = plan_fill_fused(ids, resident, *pool, step, counters)
    expected = reference_fill(ids, resident, ref_pool, step, ref_counters)
    assert_same([fill, *pool, counters], [expected, *ref_pool, ref_counters])
    scores = random_scores(rng, E, device="cpu")
    out = plan_prefetch_fused(scores, resident, *pool, step, S)
    assert_same([*out, *pool], [*reference_prefetch(scores, resident, ref_pool, step, S),
                                *ref_pool])
