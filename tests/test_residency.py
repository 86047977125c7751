"""Residency policies against brute-force references on small random counts."""

import itertools

import numpy as np
import pytest
import torch

from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.policies.plan import ResidencyPlan, plan_residency
from moe_uvm.policies.residency import (
    ResidentBudget,
    first_n,
    frequency,
    global_split,
    manual,
    resident_lists,
    select_resident,
)


def top_n_reference(counts, sizes):
    """Per layer: sort experts by (-count, id) and take the first n."""
    mask = np.zeros(counts.shape, bool)
    for layer, row in enumerate(counts):
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        mask[layer, order[: sizes[layer]]] = True
    return mask


def best_total_by_enumeration(counts, total, min_per_layer):
    """Max routings covered by any `total` (layer, expert) pairs with >= min_per_layer per layer."""
    L, E = counts.shape
    pairs = [(layer, e) for layer in range(L) for e in range(E)]
    best = -1
    for chosen in itertools.combinations(pairs, total):
        per_layer = np.bincount([layer for layer, _ in chosen], minlength=L)
        if per_layer.min() >= min_per_layer:
            best = max(best, sum(counts[layer, e] for layer, e in chosen))
    return best


def test_first_n_keeps_the_lowest_ids_per_layer():
    mask = first_n(6, [0, 2, 6])
    assert resident_lists(mask) == [[], [0, 1], [0, 1, 2, 3, 4, 5]]


def test_manual_keeps_exactly_the_given_ids():
    assert resident_lists(manual(5, [[4, 0], [], [2]])) == [[0, 4], [], [2]]


@pytest.mark.parametrize("ids", [[[5]], [[-1]], [[1, 1]]])
def test_manual_refuses_out_of_range_or_duplicate_ids(ids):
    with pytest.raises(ValueError, match="distinct and in"):
        manual(5, ids)


@pytest.mark.parametrize("trial", range(20))
def test_frequency_matches_sort_reference_with_ties(trial):
    rng = np.random.default_rng(trial)
    L, E = rng.integers(1, 5), rng.integers(1, 9)
    counts = rng.integers(0, 4, size=(L, E))  # small range: many ties
    sizes = rng.integers(0, E + 1, size=L)
    np.testing.assert_array_equal(frequency(counts, sizes), top_n_reference(counts, sizes))


def test_frequency_accepts_torch_counts():
    counts = torch.tensor([[1.0, 5.0, 3.0], [2.0, 2.0, 9.0]])
    assert resident_lists(frequency(counts, [1, 2])) == [[1], [0, 2]]


@pytest.mark.parametrize("counts", [[[1, -1]], [[np.nan, 1]], [1, 2]])
def test_frequency_refuses_negative_nan_or_1d_counts(counts):
    with pytest.raises(ValueError, match="counts"):
        frequency(np.array(counts, dtype=float), [1])


def test_frequency_refuses_sizes_beyond_the_experts():
    with pytest.raises(ValueError, match=r"in \[0, 3\]"):
        frequency(np.ones((2, 3)), [1, 4])


@pytest.mark.parametrize("trial", range(25))
def test_global_split_is_optimal_by_enumeration(trial):
    rng = np.random.default_rng(100 + trial)
    L, E = rng.integers(1, 4), rng.integers(1, 4)
    counts = rng.integers(0, 6, size=(L, E))
    min_per_layer = int(rng.integers(0, E + 1))
    total = int(rng.integers(L * min_per_layer, L * E + 1))
    sizes = global_split(counts, total, min_per_layer)
    assert sizes.sum() == total and sizes.min() >= min_per_layer and sizes.max() <= E
    covered = (counts * frequency(counts, sizes)).sum()
    assert covered == best_total_by_enumeration(counts, total, min_per_layer)


def test_global_split_gives_flat_layers_more_experts():
    skewed = [100, 90, 1, 1, 1, 1]
    flat = [30, 30, 30, 30, 30, 30]
    sizes = global_split(np.array([skewed, flat]), 6)
    assert sizes.tolist() == [2, 4]


def test_global_split_refuses_a_total_outside_the_feasible_range():
    with pytest.raises(ValueError, match=r"total resident experts must be in \[4, 6\]"):
        global_split(np.ones((2, 3)), 3, min_per_layer=2)


def test_budget_from_one_int_is_the_same_for_every_layer():
    assert ResidentBudget(3, 8, per_layer=5).layer_counts().tolist() == [5, 5, 5]


def test_budget_total_splits_evenly_without_counts_and_by_use_with_counts():
    budget = ResidentBudget(3, 4, total=7)
    assert budget.layer_counts().tolist() == [3, 2, 2]
    counts = np.array([[9, 9, 9, 9], [9, 0, 0, 0], [9, 9, 0, 0]])
    assert budget.layer_counts(counts).tolist() == [4, 1, 2]


def test_budget_from_bytes_holds_what_fits_and_clamps_to_all_experts():
    assert ResidentBudget.from_bytes(2, 4, 5 * 100 + 99, 100).total == 5
    assert ResidentBudget.from_bytes(2, 4, 10**12, 100).total == 8


def test_budget_from_bytes_below_the_per_layer_minimum_is_refused():
    with pytest.raises(ValueError, match="holds 1 experts"):
        ResidentBudget.from_bytes(2, 4, 150, 100, min_per_layer=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one"),
        ({"per_layer": 2, "total": 4}, "exactly one"),
        ({"per_layer": (1, 2, 3)}, "2 per-layer counts"),
        ({"per_layer": 9}, r"in \[0, 4\]"),
        ({"total": 9}, "total resident experts"),
    ],
)
def test_budget_refuses_bad_specs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ResidentBudget(2, 4, **kwargs)


def test_select_resident_with_a_total_takes_the_most_used_pairs():
    rng = np.random.default_rng(7)
    counts = rng.random((4, 6)) * rng.random((4, 1)) * 10
    mask = select_resident(counts, ResidentBudget(4, 6, total=10))
    assert mask.sum() == 10
    chosen = np.sort(counts[mask])
    assert chosen.min() >= np.sort(counts[~mask]).max()


def test_plan_from_config_without_a_manager():
    manual_cfg = ExpertOffloadConfig(resident_selection="manual", resident_ids=[[7, 1], "3"])
    plan = plan_residency(manual_cfg, 2, 8, slot_nbytes=100, expert_nbytes=90)
    assert plan.resident_ids(0) == (1, 7) and plan.resident_ids(1) == (3,)
    assert plan.adaptive is None and not plan.decides
    budget_cfg = ExpertOffloadConfig(gpu_budget_gb=5 * 100 / 1e9, resident_selection="frequency")
    plan = plan_residency(budget_cfg, 2, 8, slot_nbytes=100, expert_nbytes=90)
    assert resident_lists(plan.resident) == [[0, 1, 2], [0, 1]] and plan.decides


def test_adaptive_plan_from_a_profile_starts_adaptive_with_the_counts_as_prior():
    counts = np.zeros((2, 8))
    counts[0, [5, 6]] = counts[1, [2, 3]] = 10
    cfg = ExpertOffloadConfig(
        num_resident=2, resident_selection="profile", profile_path="p.json", adaptive=True,
        adaptive_readvise_mb=1e-3,
    )
    plan = plan_residency(cfg, 2, 8, 100, 90, counts=counts, counts_tokens=10)
    assert resident_lists(plan.resident) == [[5, 6], [2, 3]]
    assert plan.warmup_tokens == 0 and plan.prior is counts and plan.prior_tokens == 10
    assert plan.adaptive.max_swaps == 5  # 1000 bytes of re-advice, 2 x 100 per swap
    assert plan.counter().phase == "adaptive"
    with pytest.raises(ValueError, match="needs routing counts"):
        plan_residency(cfg, 2, 8, 100, 90)


def test_plan_refuses_a_resident_mask_of_another_shape():
    with pytest.raises(ValueError, match=r"bool mask of shape \(2, 8\)"):
        ResidencyPlan(
            ResidentBudget(2, 8, per_layer=(1, 1)), np.ones((2, 7), bool), warmup_tokens=1,
            min_batch_tokens=1, adaptive=None, decides=False,
        )
