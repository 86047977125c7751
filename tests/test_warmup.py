"""Frequency warmup and adaptive residency: counting, the one-time decision, hysteresis swaps."""

import numpy as np
import pytest
import torch

from moe_uvm.policies.residency import ResidentBudget, frequency, resident_lists
from moe_uvm.policies.warmup import (
    AdaptiveSettings,
    FrequencyWarmup,
    swap_weakest,
    tokens_to_follow_shift,
)


def random_ids(tokens, k, num_experts, generator, padding=0.1):
    scores = torch.rand(tokens, num_experts, generator=generator)
    ids = scores.topk(k, dim=1).indices.to(torch.int32)
    ids[torch.rand(tokens, k, generator=generator) < padding] = -1
    return ids


def count_reference(batches, num_layers, num_experts):
    counts = np.zeros((num_layers, num_experts), np.int64)
    for layer, ids in batches:
        for e in ids.reshape(-1).tolist():
            if e >= 0:
                counts[layer, e] += 1
    return counts


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16])
def test_record_counts_match_reference_and_skip_padding(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    warmup = FrequencyWarmup(ResidentBudget(3, 10, per_layer=4), warmup_tokens=10**6)
    batches = [(layer, random_ids(7, 3, 10, g).to(dtype)) for layer in (0, 2, 1, 2, 0)]
    for layer, ids in batches:
        warmup.record(layer, ids)
    np.testing.assert_array_equal(warmup.host_counts(), count_reference(batches, 3, 10))
    assert warmup.tokens_recorded == 14  # layers 0 and 2 saw two batches of 7


def test_record_never_counts_or_indexes_with_ids_outside_the_experts(seed):
    g = torch.Generator().manual_seed(seed)
    warmup = FrequencyWarmup(ResidentBudget(2, 10, per_layer=4), warmup_tokens=10**6)
    bad = random_ids(9, 3, 10, g)
    where = torch.randperm(bad.numel(), generator=g)[:4]
    bad.view(-1)[where] = torch.tensor([10, 13, -2, 2**30], dtype=bad.dtype)
    warmup.record(1, bad)
    expected = count_reference([(1, torch.where((bad >= 0) & (bad < 10), bad, -1))], 2, 10)
    np.testing.assert_array_equal(warmup.host_counts(), expected)


def test_record_ignores_batches_below_min_batch_tokens(seed):
    g = torch.Generator().manual_seed(seed)
    warmup = FrequencyWarmup(
        ResidentBudget(2, 8, per_layer=2), warmup_tokens=100, min_batch_tokens=16
    )
    warmup.record(0, random_ids(15, 2, 8, g))
    assert warmup.tokens_recorded == 0 and warmup.host_counts().sum() == 0
    warmup.record(0, random_ids(16, 2, 8, g))
    assert warmup.tokens_recorded == 16


def test_record_counts_during_graph_capture_only_with_counters_made_before(monkeypatch, seed):
    """Counting is device work: captured into a graph, each replay counts. Counters that do not
    exist yet cannot be made inside a capture, so that capture counts nothing."""
    g = torch.Generator().manual_seed(seed)
    ids = random_ids(32, 2, 8, g)
    late = FrequencyWarmup(ResidentBudget(2, 8, per_layer=2), warmup_tokens=100)
    early = FrequencyWarmup(ResidentBudget(2, 8, per_layer=2), warmup_tokens=100, device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not late.record(0, ids) and early.record(0, ids)
    monkeypatch.undo()
    assert late.tokens_recorded == 0 and late.host_counts().sum() == 0
    assert early.tokens_recorded == 32
    np.testing.assert_array_equal(early.host_counts(), count_reference([(0, ids)], 2, 8))


def test_folds_take_wrap_safe_increases_only():
    warmup = FrequencyWarmup(ResidentBudget(1, 3, per_layer=1), warmup_tokens=100)
    near_wrap = np.array([[2**31 - 2, 5, 0, 0]], np.int32)
    warmup.fold(near_wrap)
    wrapped = np.array([[-(2**31) + 1, 5, 0, 0]], np.int32)  # 3 more increments, wrapped
    warmup.fold(wrapped)
    warmup.fold(near_wrap)  # an older copy arriving late: nothing goes backwards
    np.testing.assert_array_equal(warmup.host_counts(fresh=False), [[2**31 + 1, 5, 0]])


def test_tokens_to_follow_shift_grows_with_history_and_half_life():
    fast = AdaptiveSettings(half_life_tokens=16)
    slow = AdaptiveSettings(half_life_tokens=128)
    assert tokens_to_follow_shift(fast, 0, 0.5) <= tokens_to_follow_shift(fast, 4096, 0.5)
    assert tokens_to_follow_shift(fast, 1024, 0.5) < tokens_to_follow_shift(slow, 1024, 0.5)
    for n in (tokens_to_follow_shift(fast, 512, 0.5), tokens_to_follow_shift(slow, 512, 0.25)):
        assert n % fast.interval_tokens == 0 and n > fast.interval_tokens


def test_warmup_decides_exactly_once_at_the_threshold(seed):
    g = torch.Generator().manual_seed(seed)
    L, E = 3, 12
    warmup = FrequencyWarmup(ResidentBudget(L, E, per_layer=(2, 5, 12)), warmup_tokens=64)
    batches = []
    for step in range(8):
        for layer in range(L):
            ids = random_ids(16, 4, E, g)
            batches.append((layer, ids))
            warmup.record(layer, ids)
        assert warmup.decision_due() == (step == 3), step
        if warmup.decision_due():
            changes = warmup.decide()
            expected = frequency(count_reference(batches, L, E), [2, 5, 12])
            np.testing.assert_array_equal(warmup.resident, expected)
            changed = [l for l in range(L) if resident_lists(expected)[l] != list(range(
                [2, 5, 12][l]))]
            assert changes == {l: resident_lists(expected)[l] for l in changed}
    assert warmup.phase == "done" and warmup.decide() == {}
    # Counting goes on (a live profile) but no further decision is due.
    np.testing.assert_array_equal(warmup.host_counts(), count_reference(batches, L, E))
    assert warmup.tokens_recorded == 128


def test_host_counts_fold_device_counts_without_losing_any(seed):
    g = torch.Generator().manual_seed(seed)
    warmup = FrequencyWarmup(ResidentBudget(2, 6, per_layer=2), warmup_tokens=10**6)
    batches = [(i % 2, random_ids(9, 2, 6, g)) for i in range(6)]
    for i, (layer, ids) in enumerate(batches):
        warmup.record(layer, ids)
        if i % 2:
            np.testing.assert_array_equal(warmup.host_counts(),
                                          count_reference(batches[: i + 1], 2, 6))


def test_warmup_with_a_total_budget_splits_by_the_counts():
    L, E = 2, 6
    warmup = FrequencyWarmup(ResidentBudget(L, E, total=6), warmup_tokens=4)
    warmup.record(0, torch.tensor([[0, 1]] * 4))  # layer 0: two experts carry everything
    warmup.record(1, torch.tensor([[0, 1], [2, 3], [4, 5], [0, 2]]))
    warmup.decide()
    assert warmup.resident.sum(axis=1).tolist() == [2, 4]


def test_warmup_tokens_zero_needs_adaptive_settings():
    with pytest.raises(ValueError, match="adaptive"):
        FrequencyWarmup(ResidentBudget(1, 4, per_layer=1), warmup_tokens=0)


def swap_reference(scores, resident, margin, min_gain, max_swaps):
    """Greedy one swap at a time: over all layers, the best offloaded vs the weakest resident
    expert with the largest gain that clears the hysteresis."""
    resident = resident.copy()
    for _ in range(max_swaps):
        best = None
        for layer in range(scores.shape[0]):
            off, res = np.flatnonzero(~resident[layer]), np.flatnonzero(resident[layer])
            if len(off) == 0 or len(res) == 0:
                continue
            e_in = off[np.argmax(scores[layer, off])]
            e_out = res[np.argmin(scores[layer, res])]
            s_in, s_out = scores[layer, e_in], scores[layer, e_out]
            if s_in > (1 + margin) * s_out + min_gain and (best is None or
                                                           s_in - s_out > best[0]):
                best = (s_in - s_out, layer, e_in, e_out)
        if best is None:
            break
        _, layer, e_in, e_out = best
        resident[layer, e_in], resident[layer, e_out] = True, False
    return resident


@pytest.mark.parametrize("trial", range(30))
def test_swap_weakest_matches_greedy_reference(trial):
    rng = np.random.default_rng(trial)
    L, E = rng.integers(1, 5), rng.integers(2, 10)
    scores = rng.random((L, E)) * 10
    resident = rng.random((L, E)) < 0.5
    margin, min_gain = rng.choice([0.0, 0.25, 1.0]), rng.choice([0.0, 1.0])
    max_swaps = int(rng.integers(0, 8))
    got = swap_weakest(scores, resident, margin, min_gain, max_swaps)
    np.testing.assert_array_equal(got, swap_reference(scores, resident, margin, min_gain,
                                                      max_swaps))
    assert (got.sum(axis=1) == resident.sum(axis=1)).all()


def test_swap_weakest_keeps_near_equal_experts_in_place():
    scores = np.array([[10.0, 11.0, 12.0, 10.5]])
    resident = np.array([[True, True, False, False]])
    assert (swap_weakest(scores, resident, 0.25, 0.0, 10) == resident).all()
    assert swap_weakest(scores, resident, 0.0, 0.0, 10).tolist() == [[False, True, True, False]]


def adaptive_warmup(settings, **kwargs):
    L, E = 4, 16
    return FrequencyWarmup(ResidentBudget(L, E, per_layer=4), warmup_tokens=32,
                           adaptive=settings, **kwargs)


def test_adaptive_follows_a_shift_in_routing_within_the_swap_cap():
    settings = AdaptiveSettings(interval_tokens=16, half_life_tokens=16, max_swaps=3)
    warmup = adaptive_warmup(settings)
    for layer in range(4):
        warmup.record(layer, torch.tensor([[0, 1, 2, 3]] * 32))
    warmup.decide()
    assert resident_lists(warmup.resident) == [[0, 1, 2, 3]] * 4
    # Layer 2 moves to experts 8..11; the others keep routing as before.
    for _ in range(12):
        for layer in range(4):
            ids = [[8, 9, 10, 11]] if layer == 2 else [[0, 1, 2, 3]]
            warmup.record(layer, torch.tensor(ids * 16))
        assert warmup.decision_due()
        before = warmup.resident.copy()
        changes = warmup.decide()
        swaps = int((warmup.resident & ~before).sum())
        assert swaps <= 3 and set(changes) <= {2}
    assert resident_lists(warmup.resident) == [[0, 1, 2, 3]] * 2 + [[8, 9, 10, 11]] + [
        [0, 1, 2, 3]]


def test_adaptive_decides_every_interval_tokens():
    warmup = adaptive_warmup(AdaptiveSettings(interval_tokens=24))
    for layer in range(4):
        warmup.record(layer, torch.zeros(32, 2, dtype=torch.int64))
    warmup.decide()
    warmup.record(0, torch.zeros(23, 2, dtype=torch.int64))
    assert not warmup.decision_due()
    warmup.record(0, torch.zeros(1, 2, dtype=torch.int64))
    assert warmup.decision_due()


def test_adaptive_from_a_prior_starts_without_warmup_and_keeps_prior_sets():
    prior = np.zeros((4, 16))
    prior[:, 4:8] = 100
    settings = AdaptiveSettings(interval_tokens=8)
    warmup = FrequencyWarmup(
        ResidentBudget(4, 16, per_layer=4), warmup_tokens=0, adaptive=settings,
        resident=frequency(prior, [4] * 4), prior=prior, prior_tokens=100,
    )
    assert warmup.phase == "adaptive" and not warmup.decision_due()
    # Routing that agrees with the prior gives no reason to swap.
    for layer in range(4):
        warmup.record(layer, torch.tensor([[4, 5, 6, 7]] * 8))
    assert warmup.decision_due() and warmup.decide() == {}


def test_set_resident_overrides_the_tracked_set():
    warmup = adaptive_warmup(AdaptiveSettings())
    warmup.set_resident(1, [3, 5, 7, 9])
    assert resident_lists(warmup.resident)[1] == [3, 5, 7, 9]


def test_adaptive_settings_from_bytes_caps_swaps():
    settings = AdaptiveSettings.from_bytes(100 * 2**20, 9 * 2**20, interval_tokens=8)
    assert settings.max_swaps == 5 and settings.interval_tokens == 8


@pytest.mark.parametrize("field, value", [("interval_tokens", 0), ("half_life_tokens", 0.0),
                                          ("margin", -0.1), ("max_swaps", -1)])
def test_adaptive_settings_refuse_bad_values(field, value):
    with pytest.raises(ValueError, match="need"):
        AdaptiveSettings(**{field: value})


@pytest.mark.gpu
def test_record_on_cuda_makes_no_host_sync_and_counts_in_graph_replays(seed):
    g = torch.Generator().manual_seed(seed)
    warmup = FrequencyWarmup(ResidentBudget(2, 64, per_layer=8), warmup_tokens=10**6,
                             device="cuda")
    ids = random_ids(256, 8, 64, g).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        warmup.record(1, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        assert warmup.record(0, ids)  # captured: each replay counts
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    reference = count_reference([(0, ids.cpu())] * 3 + [(1, ids.cpu())], 2, 64)
    np.testing.assert_array_equal(warmup.host_counts(), reference)
    assert warmup.tokens_recorded == 3 * 256
