"""The planner as the default under a budget (ExpertOffloadConfig with gpu_budget_gb alone):
offload_experts fills in its split, which fits the budget; explicit fields turn it off; the
Hugging Face loader takes the non-expert weights out of the budget first."""

import os

import numpy as np
import pytest
import torch

from moe_uvm import offload_experts
from moe_uvm.config import ExpertOffloadConfig
from moe_uvm.offload import _expert_specs, resolve_config, store_alignment
from moe_uvm.profile import Profile
from moe_uvm.store import EXPERT_ALIGNMENT, PACKED_ALIGNMENT, ManagedExpertStore

from helpers import random_moe, rel_err, tiny_model

L, E, K, H, I = 3, 16, 2, 32, 16


def layers(seed=0, hidden=H, inter=I):
    torch.manual_seed(seed)
    return [random_moe(E, K, hidden, inter) for _ in range(L)]


def resident_nbytes(hidden=H, inter=I, alignment=EXPERT_ALIGNMENT):
    spec = {"w13": ((2 * inter, hidden), torch.float32), "w2": ((hidden, inter), torch.float32)}
    return ManagedExpertStore.planned_nbytes(1, spec, alignment)


@pytest.mark.parametrize("budget_experts", [0.5, 6, 20, 48])
def test_a_budget_alone_is_split_by_the_planner_within_the_budget(budget_experts):
    mods = layers()
    budget = budget_experts * resident_nbytes()
    config = ExpertOffloadConfig(gpu_budget_gb=budget / 1e9)
    assert config.wants_auto_split
    chosen, split = resolve_config(mods, config, "cpu")
    assert split is not None and isinstance(chosen.prefetch_slots, int)
    assert split.device_bytes <= budget
    assert not chosen.wants_auto_split  # a chosen config is not planned again
    x, logits = torch.randn(5, H), torch.randn(5, E)
    refs = [m(x, logits) for m in mods]
    with offload_experts(mods, config, device="cpu") as manager:
        assert manager.split == split and manager.config == chosen
        assert manager.resident_bytes() + split.slot_bytes <= budget
        if budget_experts >= L * E:  # everything fits: all resident, no slots
            assert split.slots == 0 and sum(split.resident) == L * E
        for m, ref in zip(mods, refs, strict=True):
            assert rel_err(m(x, logits), ref) < 1e-5


def test_a_budget_of_exactly_the_expert_bytes_holds_every_expert_packed():
    """The experts' dense bytes (no 2 MiB padding) are enough for all of them resident: the
    planner picks that split and the stores are packed; explicit all-resident configs under a
    budget are packed too; anything with slots or offloaded experts keeps the 2 MiB alignment."""
    mods = layers()
    packed = resident_nbytes(alignment=PACKED_ALIGNMENT)
    assert packed < resident_nbytes()
    budget = L * E * packed
    x, logits = torch.randn(5, H), torch.randn(5, E)
    refs = [m(x, logits) for m in mods]
    config = ExpertOffloadConfig(gpu_budget_gb=budget / 1e9)
    chosen, split = resolve_config(mods, config, "cpu")
    assert split.slots == 0 and split.resident == (E,) * L and split.device_bytes == budget
    assert store_alignment(chosen, L, E, _expert_specs(mods[0])) == PACKED_ALIGNMENT
    with offload_experts(mods, config, device="cpu") as manager:
        assert all(s.slot_nbytes == packed for s in manager.stores)
        assert manager.resident_bytes() == budget
        for m, ref in zip(mods, refs, strict=True):
            assert rel_err(m(x, logits), ref) < 1e-5
    spec = _expert_specs(mods[0])
    budget_gb = budget / 1e9
    for fields, expected in (
        (dict(num_resident=E), PACKED_ALIGNMENT),
        (dict(prefetch_slots=0), PACKED_ALIGNMENT),  # the budget holds all at packed size
        (dict(resident_selection="manual", resident_ids=tuple(range(E))), PACKED_ALIGNMENT),
        (dict(num_resident=E - 1), EXPERT_ALIGNMENT),
        (dict(num_resident=E, prefetch_slots=1), EXPERT_ALIGNMENT),
        (dict(resident_selection="manual", resident_ids=(0, 1)), EXPERT_ALIGNMENT),
    ):
        assert store_alignment(ExpertOffloadConfig(gpu_budget_gb=budget_gb, **fields),
                               L, E, spec) == expected, fields
    assert store_alignment(ExpertOffloadConfig(gpu_budget_gb=(budget - 1) / 1e9,
                                               prefetch_slots=0), L, E, spec) == EXPERT_ALIGNMENT
    assert store_alignment(ExpertOffloadConfig(), L, E, spec) == EXPERT_ALIGNMENT  # no budget


def test_explicit_fields_override_the_planner():
    budget = 1.0
    for explicit in (dict(prefetch_slots=0), dict(num_resident=2), dict(
            resident_selection="manual", resident_ids=(0, 1))):
        config = ExpertOffloadConfig(gpu_budget_gb=budget, **explicit)
        assert not config.wants_auto_split
        assert resolve_config(layers(), config, "cpu") == (config, None)
    assert not ExpertOffloadConfig().wants_auto_split  # no budget: all resident, as before


def test_skewed_profile_plans_differently_from_flat(tmp_path):
    """With a profile the planner replays its routing: the choice is a valid config either way,
    and a profile with most tokens on few experts is predicted faster than flat routing.
    Experts of 3 MiB (4 MiB aligned): 12 resident ones hold a quarter of them, so the budget
    is not the all-resident packed split."""
    hidden, inter = 256, 1024
    budget = 12 * resident_nbytes(hidden, inter)
    assert budget < L * E * resident_nbytes(hidden, inter, PACKED_ALIGNMENT)
    rng = np.random.default_rng(0)
    counts = np.zeros((L, E), np.int64)
    counts[:, :4] = 400
    counts += rng.integers(0, 5, (L, E))
    skewed = Profile(L, E, K, 1000, counts)
    path = tmp_path / "p.json"
    skewed.save(path)
    config = ExpertOffloadConfig(gpu_budget_gb=budget / 1e9, resident_selection="profile",
                                 profile_path=str(path))
    mods = layers(hidden=hidden, inter=inter)
    _, with_profile = resolve_config(mods, config, "cpu")
    _, flat = resolve_config(mods, ExpertOffloadConfig(gpu_budget_gb=budget / 1e9), "cpu")
    assert with_profile.predicted_step_ms < flat.predicted_step_ms
    assert with_profile.hit_rate > flat.hit_rate


def test_slot_eviction_is_checked_and_reaches_the_cache():
    with pytest.raises(ValueError, match="slot_eviction must be one of lru, lfu, freq_lru"):
        ExpertOffloadConfig(slot_eviction="fifo")
    with pytest.raises(ValueError, match="fills slots on read only"):
        ExpertOffloadConfig(prefetch_slots=2, prefetch="speculative", slot_eviction="lfu")
    config = ExpertOffloadConfig(num_resident=4, prefetch_slots=3, slot_eviction="lfu")
    with offload_experts(layers(), config, device="cpu") as manager:
        assert manager.slot_cache.eviction == "lfu"


def test_hf_loader_takes_the_non_expert_weights_out_of_the_budget(tmp_path):
    pytest.importorskip("transformers")
    from moe_uvm.integrations import hf
    seed = int.from_bytes(os.urandom(4), "little")
    tiny_model("qwen3_moe", seed).save_pretrained(tmp_path)
    probe = hf.load_offloaded(tmp_path, device="cpu")
    fixed = sum(p.nbytes for n, p in probe.model.named_parameters() if ".experts." not in n)
    probe.manager.close()
    with pytest.raises(ValueError, match="non-expert weights"):
        hf.load_offloaded(tmp_path, ExpertOffloadConfig(gpu_budget_gb=fixed / 2 / 1e9),
                          device="cpu")
    budget = fixed + 200_000
    loaded = hf.load_offloaded(tmp_path, ExpertOffloadConfig(gpu_budget_gb=budget / 1e9),
                               device="cpu")
    with loaded.manager as manager:
        assert manager.split is not None
        assert manager.config.gpu_budget_gb * 1e9 <= budget - fixed + 1e-3
        assert manager.resident_bytes() + manager.split.slot_bytes <= budget - fixed


def test_cpu_experts_on_plans_without_slots_and_auto_measures_only_on_a_gpu(monkeypatch):
    """With cpu_experts='on' the planner's split has no slots (a slot cache and the hybrid do not
    go together; before, such a config failed at load); with auto off CUDA the CPU is never
    measured (the hybrid cannot run there) and the split is the one without the hybrid."""
    mods = layers(hidden=256, inter=336)  # ~1 MB experts: 2 MiB resident, 1 MB in a slot
    budget = 6 * resident_nbytes(256, 336)
    off, off_split = resolve_config(mods, ExpertOffloadConfig(gpu_budget_gb=budget / 1e9), "cpu")
    assert off_split.slots > 0  # the planner's best split here has slots
    chosen, split = resolve_config(
        mods, ExpertOffloadConfig(gpu_budget_gb=budget / 1e9, cpu_experts="on"), "cpu")
    assert split.slots == 0 and chosen.prefetch_slots == 0 and chosen.cpu_experts == "on"
    assert split.device_bytes <= budget and sum(split.resident) > 0

    def never(*args, **kwargs):
        raise AssertionError("the CPU kernel was measured off CUDA")

    monkeypatch.setattr("moe_uvm.offload.measure_cpu_gbps", never)
    _, auto_split = resolve_config(
        mods, ExpertOffloadConfig(gpu_budget_gb=budget / 1e9, cpu_experts="auto"), "cpu")
    assert auto_split == off_split
