"""Slot-cache planning, predictors and prefetch metrics against plain-Python references on random
pools, invariants over random call sequences, and (GPU) CUDA-graph replay without host sync."""

import numpy as np
import pytest
import torch

from moe_uvm.kernels.slot_plan_reference import (
    EMPTY_STAMP,
    commit_fill,
    count_prefetch,
    empty_slot_state,
    plan_fill,
    plan_prefetch,
    predicted_mask,
    top_offloaded,
)
from moe_uvm.policies.prefetch import (
    frequency_scores,
    lookahead_scores,
    speculative_scores,
    update_cooccurrence,
)
from moe_uvm.profile import Profile
from moe_uvm.slots import PrefetchStats
from moe_uvm.trace import synthetic_trace

# --- plain-Python reference of one pool ------------------------------------------------------


class RefPool:
    def __init__(self, expert_slot, slot_expert, slot_stamp):
        self.expert_slot = [int(x) for x in expert_slot]
        self.slot_expert = [int(x) for x in slot_expert]
        self.stamp = [int(x) for x in slot_stamp]

    def victims(self, protected):
        free = [s for s in range(len(self.stamp)) if s not in protected]
        return sorted(free, key=lambda s: (self.stamp[s], s))

    def place(self, e, s, step):
        old = self.slot_expert[s]
        if old >= 0:
            self.expert_slot[old] = -1
        self.slot_expert[s] = e
        self.stamp[s] = step

    def plan_fill(self, ids, resident, step):
        needed = sorted({int(e) for e in np.ravel(ids) if e >= 0})
        in_use = {s for s, e in enumerate(self.slot_expert) if e in needed}
        missing = [e for e in needed if not resident[e] and self.expert_slot[e] < 0]
        fill = [-1] * len(self.expert_slot)
        for e, s in zip(missing, self.victims(in_use), strict=False):
            self.place(e, s, step)
            fill[e] = s
        for s in in_use:
            self.stamp[s] = step
        return fill

    def commit(self, fill):
        for e, s in enumerate(fill):
            if s >= 0:
                self.expert_slot[e] = s

    def plan_prefetch(self, scores, resident, step, m):
        chosen = ref_top(scores, resident, m)
        cached = {self.expert_slot[e] for e in chosen if e >= 0 and self.expert_slot[e] >= 0}
        victims = iter(self.victims(cached))
        experts, slots = [], []
        for e in chosen:
            if e < 0 or self.expert_slot[e] >= 0:
                experts.append(-1)
                slots.append(-1)
                continue
            s = next(victims)
            self.place(e, s, step)
            self.expert_slot[e] = s
            experts.append(e)
            slots.append(s)
        for s in cached:
            self.stamp[s] = step
        return experts, slots


def ref_top(scores, resident, m):
    cands = [e for e in range(len(scores)) if scores[e] > 0 and not resident[e]]
    cands.sort(key=lambda e: (-float(scores[e]), e))
    return cands[:m] + [-1] * (m - len(cands[:m]))


def random_pool(rng, E, S, resident):
    """A consistent pool: random offloaded experts in random slots, stamps with ties."""
    offloaded = np.flatnonzero(~resident)
    held = rng.choice(offloaded, size=min(rng.integers(0, S + 1), len(offloaded)), replace=False)
    slots = rng.choice(S, size=len(held), replace=False)
    expert_slot, slot_expert = np.full(E, -1), np.full(S, -1)
    stamp = np.full(S, EMPTY_STAMP, np.int64)
    expert_slot[held], slot_expert[slots] = slots, held
    stamp[slots] = rng.integers(0, 4, size=len(slots))
    as_int32 = lambda a: torch.tensor(a, dtype=torch.int32)
    return as_int32(expert_slot), as_int32(slot_expert), torch.tensor(stamp)


def random_case(rng, max_e=12, max_s=6):
    E, S = int(rng.integers(2, max_e + 1)), int(rng.integers(1, max_s + 1))
    T, k = int(rng.integers(1, 4)), int(rng.integers(1, min(E, 3) + 1))
    resident = rng.random(E) < rng.random() * 0.6
    return E, S, torch.tensor(resident), random_ids(rng, E, T, k), random_scores(rng, E)


def random_ids(rng, E, T, k):
    """[T, k] distinct experts per token, some padding."""
    ids = np.stack([rng.choice(E, size=k, replace=False) for _ in range(T)])
    ids[rng.random(ids.shape) < 0.15] = -1
    return torch.tensor(ids)


def random_scores(rng, E):
    """Integer-valued scores: many ties, zeros and negatives (which never qualify)."""
    return torch.tensor(rng.integers(-2, 4, size=E), dtype=torch.float32)


def check_consistent(expert_slot, slot_expert, resident):
    """expert_slot and slot_expert are inverse maps on filled slots; no resident expert held."""
    es, se = expert_slot.tolist(), slot_expert.tolist()
    for e, s in enumerate(es):
        assert s < 0 or se[s] == e, (es, se)
    for s, e in enumerate(se):
        assert e < 0 or es[e] == s, (es, se)
        assert e < 0 or not resident[e], (se, resident)


def state_lists(*tensors):
    return [t.tolist() for t in tensors]


# --- plan_fill / commit_fill -----------------------------------------------------------------


def test_plan_fill_matches_reference_on_random_pools(seed):
    rng = np.random.default_rng(seed)
    for _ in range(300):
        E, S, resident, ids, _ = random_case(rng)
        state = random_pool(rng, E, S, resident.numpy())
        ref = RefPool(*state)
        step = int(rng.integers(4, 8))
        before = state[0].clone()
        fill = plan_fill(ids, resident, *state, torch.tensor(step))
        expected = ref.plan_fill(ids.numpy(), resident.tolist(), step)
        assert fill.dtype == torch.int32 and fill.tolist() == expected
        # Newly filled experts stay invisible to the kernel until commit_fill.
        assert torch.all(state[0][fill >= 0] == -1) and torch.all(before[fill >= 0] == -1)
        assert state_lists(state[1], state[2]) == [ref.slot_expert, ref.stamp]
        commit_fill(fill, state[0])
        ref.commit(expected)
        assert state[0].tolist() == ref.expert_slot
        check_consistent(state[0], state[1], resident.tolist())


def test_hits_refresh_stamps_and_fill_nothing():
    expert_slot, slot_expert, stamp = empty_slot_state(6, 3)
    expert_slot[[4, 5]] = torch.tensor([2, 0], dtype=torch.int32)
    slot_expert[[0, 2]] = torch.tensor([5, 4], dtype=torch.int32)
    stamp[[0, 2]] = torch.tensor([3, 1])
    fill = plan_fill(torch.tensor([[4, 5]]), torch.zeros(6, dtype=torch.bool), expert_slot,
                     slot_expert, stamp, torch.tensor(9))
    assert fill.tolist() == [-1] * 6
    assert stamp.tolist() == [9, EMPTY_STAMP, 9]
    assert slot_expert.tolist() == [5, -1, 4] and expert_slot.tolist() == [-1] * 4 + [2, 0]


def test_misses_take_empty_then_oldest_slots_and_never_one_in_use():
    expert_slot, slot_expert, stamp = empty_slot_state(8, 4)
    slot_expert[:3] = torch.tensor([0, 1, 2], dtype=torch.int32)
    expert_slot[:3] = torch.tensor([0, 1, 2], dtype=torch.int32)
    stamp[:3] = torch.tensor([5, 2, 1])
    # Needed: 2 (a hit in the oldest slot, protected) and misses 5, 6, 7.
    fill = plan_fill(torch.tensor([[7, 2], [5, 6]]), torch.zeros(8, dtype=torch.bool),
                     expert_slot, slot_expert, stamp, torch.tensor(6))
    # Victims: empty slot 3 first, then slot 1 (stamp 2), then slot 0 (stamp 5); never slot 2.
    assert fill.tolist() == [-1] * 5 + [3, 1, 0]
    assert slot_expert.tolist() == [7, 6, 2, 5] and stamp.tolist() == [6, 6, 6, 6]
    assert expert_slot.tolist()[:3] == [-1, -1, 2]


def test_misses_beyond_free_slots_read_through_without_a_slot():
    expert_slot, slot_expert, stamp = empty_slot_state(8, 2)
    resident = torch.zeros(8, dtype=torch.bool)
    resident[3] = True
    fill = plan_fill(torch.tensor([[6, 3, 1, 4]]), resident, expert_slot, slot_expert, stamp,
                     torch.tensor(0))
    # Lower ids claim the victims first; resident expert 3 never takes a slot.
    assert fill.tolist() == [-1, 0, -1, -1, 1, -1, -1, -1]


# --- plan_prefetch ---------------------------------------------------------------------------


def test_plan_prefetch_matches_reference_on_random_pools(seed):
    rng = np.random.default_rng(seed)
    for _ in range(300):
        E, S, resident, _, scores = random_case(rng)
        state = random_pool(rng, E, S, resident.numpy())
        ref = RefPool(*state)
        m, step = int(rng.integers(1, S + 1)), int(rng.integers(4, 8))
        experts, slots = plan_prefetch(scores, resident, *state, torch.tensor(step), m)
        expected = ref.plan_prefetch(scores.tolist(), resident.tolist(), step, m)
        assert [experts.tolist(), slots.tolist()] == [list(x) for x in expected]
        assert experts.dtype == slots.dtype == torch.int32
        assert state_lists(*state) == [ref.expert_slot, ref.slot_expert, ref.stamp]
        check_consistent(state[0], state[1], resident.tolist())


def test_prefetch_refreshes_cached_choices_and_copies_the_rest_into_oldest_slots():
    expert_slot, slot_expert, stamp = empty_slot_state(6, 3)
    slot_expert[:] = torch.tensor([0, 1, 2], dtype=torch.int32)
    expert_slot[:3] = torch.tensor([0, 1, 2], dtype=torch.int32)
    stamp[:] = torch.tensor([4, 1, 3])
    scores = torch.tensor([0.0, 5.0, 0.0, 0.0, 7.0, 7.0])
    experts, slots = plan_prefetch(scores, torch.zeros(6, dtype=torch.bool), expert_slot,
                                   slot_expert, stamp, torch.tensor(8), 3)
    # Ranked 4, 5 (tie to the lower id), 1 (cached: refreshed, no copy).
    assert experts.tolist() == [4, 5, -1] and slots.tolist() == [2, 0, -1]
    assert slot_expert.tolist() == [5, 1, 4] and stamp.tolist() == [8, 8, 8]
    assert expert_slot.tolist() == [-1, 1, -1, -1, 2, 0]


def test_top_offloaded_skips_resident_and_non_positive_scores():
    scores = torch.tensor([3.0, 0.0, -1.0, 3.0, float("nan"), 2.0, 3.0])
    resident = torch.tensor([False, False, False, True, False, False, False])
    assert top_offloaded(scores, resident, 5).tolist() == [0, 6, 5, -1, -1]
    assert predicted_mask(scores, resident, 2).tolist() == [True] + [False] * 5 + [True]
    assert top_offloaded(scores, resident, 9).tolist() == [0, 6, 5] + [-1] * 6
    with pytest.raises(ValueError, match="must be >= 1, got 0"):
        top_offloaded(scores, resident, 0)
    with pytest.raises(ValueError, match="need 1 <= m <= S"):
        plan_prefetch(scores, resident, *empty_slot_state(7, 2), torch.tensor(0), 3)


# --- invariants over random call sequences and batched pools --------------------------------


def test_pool_stays_consistent_over_random_call_sequences(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        E, S, resident, _, _ = random_case(rng)
        state = empty_slot_state(E, S)
        ref = RefPool(*state)
        for step in range(12):
            ids = random_ids(rng, E, int(rng.integers(1, 4)), int(rng.integers(1, min(E, 3) + 1)))
            scores = random_scores(rng, E)
            if rng.random() < 0.5:
                m = int(rng.integers(1, S + 1))
                plan_prefetch(scores, resident, *state, torch.tensor(step), m)
                ref.plan_prefetch(scores.tolist(), resident.tolist(), step, m)
                check_consistent(state[0], state[1], resident.tolist())
            needed = {e for e in ids.ravel().tolist() if e >= 0}
            in_use = {s for s, e in enumerate(state[1].tolist()) if e in needed}
            held = state[1].clone()
            fill = plan_fill(ids, resident, *state, torch.tensor(step))
            assert all(state[1][s] == held[s] for s in in_use), "a slot in use was reused"
            commit_fill(fill, state[0])
            ref.commit(ref.plan_fill(ids.numpy(), resident.tolist(), step))
            check_consistent(state[0], state[1], resident.tolist())
            assert state_lists(*state) == [ref.expert_slot, ref.slot_expert, ref.stamp]


def test_batched_pools_equal_one_pool_at_a_time(seed):
    rng = np.random.default_rng(seed)
    L, E, S, T, k, m = 5, 16, 4, 3, 2, 3
    resident = torch.tensor(rng.random((L, E)) < 0.3)
    batched = empty_slot_state(E, S, (L,))
    single = [empty_slot_state(E, S) for _ in range(L)]
    for step in range(6):
        ids = torch.tensor(np.argsort(rng.random((L, T, E)), -1)[..., :k])
        scores = torch.tensor(rng.integers(0, 5, size=(L, E)), dtype=torch.float32)
        step_t = torch.tensor(step)
        out = plan_prefetch(scores, resident, *batched, step_t, m)
        fill = plan_fill(ids, resident, *batched, step_t)
        commit_fill(fill, batched[0])
        for layer in range(L):
            one = plan_prefetch(scores[layer], resident[layer], *single[layer], step_t, m)
            assert [o.tolist() for o in one] == [o[layer].tolist() for o in out]
            f = plan_fill(ids[layer], resident[layer], *single[layer], step_t)
            assert f.tolist() == fill[layer].tolist()
            commit_fill(f, single[layer][0])
            assert state_lists(*single[layer]) == [t[layer].tolist() for t in batched]


# --- predictors, online co-occurrence, metrics -----------------------------------------------


def test_speculative_scores_sum_rows_of_current_ids_ignoring_padding(seed):
    rng = np.random.default_rng(seed)
    for L in (None, 3):
        lead = () if L is None else (L,)
        cooc = torch.tensor(rng.integers(0, 50, size=(*lead, 9, 9)))
        ids = torch.tensor(rng.integers(-1, 9, size=(*lead, 4, 3)))
        out = speculative_scores(cooc, ids)
        ref = np.zeros((*lead, 9))
        for idx in np.ndindex(*lead):
            for a in ids[idx].ravel().tolist():
                if a >= 0:
                    ref[idx] += cooc[idx][a].numpy()
        assert out.dtype == torch.float32
        assert np.array_equal(out.numpy(), ref)


def test_lookahead_scores_sum_next_router_softmax_over_real_tokens(seed):
    rng = np.random.default_rng(seed)
    hidden, gate = rng.standard_normal((5, 16)), rng.standard_normal((12, 16))
    mask = np.array([True, True, False, True, False])
    logits = hidden @ gate.T
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for token_mask, ref in ((None, probs.sum(0)), (mask, probs[mask].sum(0))):
        out = lookahead_scores(torch.tensor(hidden, dtype=torch.float16), torch.tensor(gate),
                               None if token_mask is None else torch.tensor(token_mask))
        # fp16 hidden states: the tolerance covers their rounding.
        err = np.linalg.norm(out.numpy() - ref) / np.linalg.norm(ref)
        assert out.dtype == torch.float32 and err < 1e-2


def test_frequency_scores_are_the_counts_as_float():
    counts = torch.tensor([[4, 0, 7], [1, 2, 3]])
    scores = frequency_scores(counts)
    assert scores.dtype == torch.float32 and scores.tolist() == [[4, 0, 7], [1, 2, 3]]


def test_online_cooccurrence_equals_the_profile_count(seed):
    trace = synthetic_trace(4, 16, 3, num_sequences=2, tokens_per_sequence=20, seed=seed % 1000)
    ids = trace.topk_ids.astype(np.int64)
    ids[np.random.default_rng(seed).random(ids.shape) < 0.1] = -1
    profile = Profile.from_trace(type(trace)(ids, 16, 3, trace.seq_starts), cooccurrence=True)
    ids = torch.tensor(ids)
    batched = torch.zeros(3, 16, 16, dtype=torch.int64)
    single = torch.zeros(3, 16, 16)
    for first in range(0, 40, 7):
        block = ids[:, first : first + 7]
        update_cooccurrence(batched, block[:-1], block[1:])
        for layer in range(3):
            update_cooccurrence(single[layer], block[layer], block[layer + 1])
    assert np.array_equal(batched.numpy(), profile.cooccurrence)
    assert np.array_equal(single.numpy(), profile.cooccurrence)


def test_count_prefetch_matches_reference(seed):
    rng = np.random.default_rng(seed)
    stats = PrefetchStats(2)
    totals = np.zeros(4, np.int64)
    for _ in range(50):
        E, S, resident, ids, scores = random_case(rng)
        expert_slot = random_pool(rng, E, S, resident.numpy())[0]
        predicted = None if rng.random() < 0.3 else torch.tensor(rng.random(E) < 0.4)
        stats.record(1, ids, resident, expert_slot, predicted)
        res, slot = resident.tolist(), expert_slot.tolist()
        needed = {e for e in ids.ravel().tolist() if e >= 0 and not res[e]}
        pred = set() if predicted is None else {
            e for e in range(E) if predicted[e] and not res[e]}
        totals += [len(pred), len(pred & needed), len(needed),
                   sum(slot[e] >= 0 for e in needed)]
    assert stats.counters[0].tolist() == [0, 0, 0, 0]
    assert stats.counters[1].tolist() == totals.tolist()
    summary = stats.summary()
    assert summary["precision"] == pytest.approx(totals[1] / totals[0])
    assert summary["recall"] == pytest.approx(totals[1] / totals[2])
    assert summary["slot_hit_rate"] == pytest.approx(totals[3] / totals[2])
    stats.reset()
    assert stats.summary()["precision"] is None


def test_batched_counters_add_per_pool():
    counters = torch.zeros(2, 4, dtype=torch.int64)
    resident = torch.tensor([[True, False, False], [False, False, False]])
    expert_slot = torch.tensor([[-1, 0, -1], [-1, -1, 1]], dtype=torch.int32)
    predicted = torch.tensor([[True, True, False], [False, False, True]])
    count_prefetch(counters, torch.tensor([[[0, 1]], [[2, -1]]]), resident, expert_slot,
                   predicted)
    assert counters.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]


# --- GPU: graph capture and no host sync ------------------------------------------------------


@pytest.mark.gpu
def test_planning_replays_in_a_cuda_graph_like_eager_without_host_sync(seed):
    dev = torch.device("cuda")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    E, S, T, k, m, H = 64, 8, 4, 4, 6, 32
    resident = (torch.rand(E, generator=gen) < 0.25).to(dev)
    counts = torch.randint(0, 100, (E,), generator=gen).to(dev)
    gate = torch.randn(E, H, generator=gen).to(dev)

    def fresh_ids():
        return torch.argsort(torch.rand(2, T, E, generator=gen), -1)[..., :k].to(dev)

    def body(state, cooc, counters, step, ids, hidden):
        prev, now = ids[0], ids[1]
        # Integer-valued scores: the plans must match exactly; lookahead is checked on its own.
        scores = speculative_scores(cooc, prev) + frequency_scores(counts)
        lookahead = lookahead_scores(hidden, gate)
        copies = plan_prefetch(scores, resident, *state, step, m)
        count_prefetch(counters, now, resident, state[0], predicted_mask(scores, resident, m))
        fill = plan_fill(now, resident, *state, step)
        commit_fill(fill, state[0])
        update_cooccurrence(cooc, prev, now)
        return (*copies, fill, lookahead)

    def new_buffers():
        return (empty_slot_state(E, S, device=dev), torch.zeros(E, E, device=dev),
                torch.zeros(4, dtype=torch.int64, device=dev),
                torch.zeros((), dtype=torch.int64, device=dev))

    steps = [(fresh_ids(), torch.randn(T, H, generator=gen).to(dev)) for _ in range(6)]
    eager_state, eager_cooc, eager_counters, eager_step = new_buffers()
    eager_out = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, (ids, hidden) in enumerate(steps):
            eager_step.fill_(i)
            eager_out.append([o.clone() for o in body(eager_state, eager_cooc, eager_counters,
                                                      eager_step, ids, hidden)])
    finally:
        torch.cuda.set_sync_debug_mode(0)

    state, cooc, counters, step = new_buffers()
    ids_in, hidden_in = steps[0][0].clone(), steps[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body(state, cooc, counters, step, ids_in, hidden_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = body(state, cooc, counters, step, ids_in, hidden_in)
    fresh = new_buffers()
    for dst, src in zip((*state, cooc, counters), (*fresh[0], fresh[1], fresh[2]), strict=True):
        dst.copy_(src)
    for i, (ids, hidden) in enumerate(steps):
        ids_in.copy_(ids)
        hidden_in.copy_(hidden)
        step.fill_(i)
        graph.replay()
        assert [o.tolist() for o in out[:3]] == [o.tolist() for o in eager_out[i][:3]]
        torch.testing.assert_close(out[3], eager_out[i][3], rtol=1e-5, atol=1e-6)
    assert [t.tolist() for t in state] == [t.tolist() for t in eager_state]
    assert torch.equal(cooc, eager_cooc) and torch.equal(counters, eager_counters)
