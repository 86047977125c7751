"""The one-knob planner (moe_uvm.autosplit): its choice at budgets that fit everything or
nothing, on skewed against flat routing, its cost model and the cost cache, and `moe-uvm plan`."""

import json

import numpy as np
import pytest

from moe_uvm import autosplit
from moe_uvm.autosplit import Costs, fit_kernel_costs, load_costs, plan_split, save_costs
from moe_uvm.cli import main
from moe_uvm.profile import Profile
from moe_uvm.trace import synthetic_trace

EB = 1 << 20  # one expert: 1 MiB dense
RB = 2 << 20  # resident: 2 MiB aligned


def trace(zipf, topic, seed=0):
    return synthetic_trace(num_layers=3, num_experts=16, top_k=2, num_sequences=8,
                           tokens_per_sequence=64, zipf_exponent=zipf, topic_strength=topic,
                           seed=seed)


def test_a_budget_that_fits_every_expert_keeps_them_all_resident():
    t = trace(1.0, 1.0)
    best, candidates = plan_split(t, 3 * 16 * RB, resident_nbytes=RB, slot_nbytes=EB)
    assert best.resident == (16, 16, 16) and best.slots == 0
    assert best.pcie_bytes_per_token == 0 and best.hit_rate == 1
    assert best.device_bytes == 3 * 16 * RB
    # All resident is the fastest split there is: no candidate predicts less.
    assert best.predicted_step_ms == min(c.predicted_step_ms for c in candidates)


def test_a_budget_that_fits_nothing_reads_every_expert_over_pcie():
    t = trace(1.0, 1.0)
    best, candidates = plan_split(t, RB - 1, resident_nbytes=RB, slot_nbytes=EB)
    assert len(candidates) == 1
    assert best.resident == (0, 0, 0) and best.slots == 0 and best.hit_rate == 0
    costs = Costs()
    # Every step reads each distinct routed expert of every layer over PCIe: k = 2 per layer.
    assert best.pcie_bytes_per_token == pytest.approx(3 * 2 * EB)
    assert best.predicted_step_ms == pytest.approx(costs.step_ms(3, 0, 3 * 2 * EB,
                                                                 expert_nbytes=EB))


def test_the_split_never_exceeds_the_budget_and_skewed_routing_plans_faster_than_flat():
    budget = 3 * 8 * EB
    skewed, _ = plan_split(trace(1.5, 1.5), budget, resident_nbytes=RB, slot_nbytes=EB)
    flat, candidates = plan_split(trace(0.0, 0.0), budget, resident_nbytes=RB, slot_nbytes=EB)
    for c in candidates + [skewed]:
        assert c.device_bytes <= budget
    assert skewed.tokens_per_s > 1.2 * flat.tokens_per_s
    assert skewed.hit_rate > flat.hit_rate + 0.1


def test_a_profile_splits_resident_experts_toward_its_skewed_layers():
    counts = np.ones((2, 16))
    counts[0, :4] = 900  # layer 0: four hot experts; layer 1 flat
    profile = Profile(2, 16, 2, 2000, counts.astype(np.int64))
    routing = autosplit.trace_from_profile(profile, tokens=256)
    best, candidates = plan_split(routing, 8 * RB, resident_nbytes=RB, slot_nbytes=EB,
                                  profile=profile)
    static = [c for c in candidates if c.slots == 0][0]
    assert sum(static.resident) == 8 and static.resident[0] >= 4
    assert best.predicted_step_ms <= static.predicted_step_ms


def test_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="finite number of bytes >= 0"):
        plan_split(trace(1, 1), float("nan"), resident_nbytes=RB, slot_nbytes=EB)
    with pytest.raises(ValueError, match="need resident_nbytes"):
        plan_split(trace(1, 1), 1e9, resident_nbytes=0, slot_nbytes=EB)


def test_cost_model_and_its_fit():
    costs = Costs(hbm_gbps=1000, read_through_gbps=10, kernel_hbm_gbps=500, launch_us=10)
    assert costs.step_ms(4, 1e9, 1e8) == pytest.approx(0.04 + 2.0 + 10.0)
    assert costs.step_ms(4, 1e9, 1e8, batch=16) == pytest.approx(0.04 + max(2.0, 10.0))
    assert costs.floor_ms(1e9, 1e8) == pytest.approx(1.0 + 10.0)
    # Two all-resident points on the line ms = 8 layers x 12 us + bytes / 2000 GB/s.
    points = [(b, 8 * 12e-3 + b / 2e9) for b in (1e8, 9e8)]
    launch, rate = fit_kernel_costs(8, points)
    assert launch == pytest.approx(12, rel=1e-6) and rate == pytest.approx(2000, rel=1e-6)
    launch, rate = fit_kernel_costs(8, points[:1])
    assert rate == Costs.kernel_hbm_gbps and launch >= 0
    with pytest.raises(ValueError, match="read_through_gbps must be a finite number > 0"):
        Costs(read_through_gbps=0)


def test_the_kernel_cost_scales_with_the_expert_size_through_a_fixed_cost_per_expert():
    """kernel_hbm_gbps holds at the size it was measured at; its shortfall against the HBM
    ceiling is a fixed cost per expert read, so experts 32x larger read near the ceiling and
    32x smaller ones mostly pay the fixed cost (HBM and PCIe reads alike)."""
    size = 9e6
    costs = Costs(hbm_gbps=4000, read_through_gbps=50, kernel_hbm_gbps=3000, launch_us=0,
                  kernel_expert_nbytes=size)
    fixed = size / 3e9 - size / 4e9  # ms per expert
    assert costs.per_expert_ms == pytest.approx(fixed)
    assert costs.step_ms(1, 8 * size, 0) == pytest.approx(8 * size / 3e9)
    assert costs.step_ms(1, 8 * size, 0, expert_nbytes=size) == pytest.approx(8 * size / 3e9)
    big = 32 * size
    assert costs.step_ms(1, 2 * big, 0, expert_nbytes=big) == pytest.approx(
        2 * big / 4e9 + 2 * fixed)
    assert costs.step_ms(1, 0, 2 * big, expert_nbytes=big) == pytest.approx(
        2 * big / 5e7 + 2 * fixed)
    small = size / 32
    assert costs.step_ms(1, 64 * small, 0, expert_nbytes=small) == pytest.approx(
        64 * small / 4e9 + 64 * fixed)
    with pytest.raises(ValueError, match="expert_nbytes must be > 0"):
        costs.step_ms(1, 1e6, 0, expert_nbytes=0)


def test_a_split_replayed_at_a_larger_batch_reads_more_experts_per_step():
    """split_at_batch times the chosen split at another decode batch on the same routing:
    more distinct experts per step at batch 16, fewer per token."""
    profile = Profile(3, 16, 2, 1000, np.full((3, 16), 100, np.int64))
    routing = autosplit.trace_from_profile(profile, tokens=512)
    best, _ = plan_split(routing, 3 * 8 * RB, resident_nbytes=RB, slot_nbytes=EB,
                         profile=profile)
    again = autosplit.split_at_batch(best, profile, 1, slot_nbytes=EB)
    assert again.resident == best.resident and again.slots == best.slots
    assert again.predicted_step_ms == pytest.approx(best.predicted_step_ms, rel=0.15)
    wide = autosplit.split_at_batch(best, profile, 16, slot_nbytes=EB)
    assert wide.batch == 16 and wide.predicted_step_ms > best.predicted_step_ms
    assert wide.tokens_per_s > best.tokens_per_s
    with pytest.raises(ValueError, match="batch must be >= 1"):
        autosplit.split_at_batch(best, profile, 0, slot_nbytes=EB)


def test_costs_are_cached_per_device_and_a_damaged_cache_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_UVM_CACHE_DIR", str(tmp_path))
    assert autosplit.cache_file() == tmp_path / "costs.json"
    assert load_costs("GPU A").source.startswith("defaults (nothing measured for GPU A")
    measured = Costs(4000, 50, 3000, 11, "measured by moe-uvm bench")
    save_costs("GPU A", measured)
    save_costs("GPU B", Costs(source="other"))
    assert load_costs("GPU A") == measured
    assert load_costs(None).source.startswith("defaults (no GPU")
    (tmp_path / "costs.json").write_text("{not json")
    assert load_costs("GPU A").source.startswith("defaults")
    (tmp_path / "costs.json").write_text(json.dumps({"GPU A": {"hbm_gbps": -1}}))
    assert load_costs("GPU A").source.startswith("defaults")


def test_plan_command_prints_the_split_and_the_prediction(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_UVM_CACHE_DIR", str(tmp_path))
    path = tmp_path / "t.npz"
    synthetic_trace(num_layers=2, num_experts=16, top_k=2, num_sequences=4,
                    tokens_per_sequence=64, seed=1).save(path)
    argv = ["plan", "--trace", str(path), "--gpu-budget-gb", "0.2", "--hidden-size", "512",
            "--moe-intermediate-size", "256"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "auto split of 0.2 GB (0 GB fixed) for 2 MoE layers" in out
    assert "predicted" in out and "tokens/s" in out and "PCIe" in out
    assert main([*argv, "--json", "--batch", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    auto = result["auto"]
    assert auto["batch"] == 4 and auto["model_device_gb"] <= 0.2
    assert auto["model_tokens_per_s"] == pytest.approx(4 / auto["model_step_ms"] * 1e3)
    assert main([*argv, "--fixed-gb", "0.3"]) == 2
    assert "--fixed-gb must be >= 0 and below --gpu-budget-gb" in capsys.readouterr().err


def test_plan_accounts_for_the_cpu_gpu_hybrid(capsys, monkeypatch, tmp_path):
    """--cpu-gbps: a CPU as fast as the read-through takes about half of the offloaded experts
    and the predicted step shortens; a slow one takes none; a bad value is refused."""
    monkeypatch.setenv("MOE_UVM_CACHE_DIR", str(tmp_path))
    argv = ["plan", "--trace", "flat", "--gpu-budget-gb", "10", "--json"]
    assert main([*argv, "--cpu-gbps", "50"]) == 0
    fast = json.loads(capsys.readouterr().out)["hybrid"]
    offloaded = fast["offloaded_per_layer"]
    assert offloaded > 2 and abs(fast["cpu_experts_per_layer"] - offloaded / 2) <= 1
    assert fast["hybrid_layer_us"] < 0.7 * fast["gpu_only_layer_us"]
    assert fast["saved_step_ms"] > 0
    assert main([*argv, "--cpu-gbps", "0.5"]) == 0
    slow = json.loads(capsys.readouterr().out)["hybrid"]
    assert slow["cpu_experts_per_layer"] == 0 and slow["saved_step_ms"] == 0
    assert slow["model_step_ms"] > fast["model_step_ms"]
    assert main([*argv, "--cpu-gbps", "fast"]) == 2
    assert "--cpu-gbps must be a number > 0 or 'measure'" in capsys.readouterr().err


def test_the_hybrid_runs_on_the_quickest_split_without_slots_where_it_is_predicted_faster():
    """cpu_experts and the planner: on takes the quickest split without slots (the hybrid and a
    slot cache do not go together); auto takes it only where the hybrid on it is predicted 5%
    quicker than the best split (a fast CPU), keeps the best one for a slow CPU or an unknown
    rate, and measures the CPU (a callable) only when the choice needs it; off changes nothing."""
    t = trace(0.0, 0.0)
    best, candidates = plan_split(t, 3 * 6 * EB, resident_nbytes=RB, slot_nbytes=EB)
    assert best.slots > 0  # slots cost half a resident expert here: the planner takes them
    plain = min((c for c in candidates if c.slots == 0), key=lambda c: c.predicted_step_ms)
    args = dict(read_through_gbps=Costs().read_through_gbps, expert_nbytes=EB, layers=3,
                top_k=2)
    calls = []

    def measured(gbps):
        return lambda: calls.append(gbps) or gbps

    choose = autosplit.choose_hybrid_split
    assert choose(best, candidates, "off", cpu_gbps=measured(1e3), **args)[0] == best
    assert choose(best, candidates, "on", cpu_gbps=None, **args)[0] == plain
    fast, why = choose(best, candidates, "auto", cpu_gbps=measured(1e3), **args)
    assert fast == plain and "predicted" in why
    plan = autosplit.hybrid_plan(autosplit.quickest_without_slots(candidates), cpu_gbps=1e3,
                                 **args)
    assert plan.split == plain and plan.predicted_step_ms < 0.95 * best.predicted_step_ms
    assert 0 < plan.cpu_experts_per_layer <= plan.offloaded_per_layer
    slow, why = choose(best, candidates, "auto", cpu_gbps=measured(0.01), **args)
    assert slow == best and "not 5% quicker" in why
    assert choose(best, candidates, "auto", cpu_gbps=None, **args)[0] == best
    assert calls == [1e3, 0.01]  # off and on never measure
    # A best split without slots is the hybrid's already: nothing to measure.
    everything, all_candidates = plan_split(t, 3 * 16 * RB, resident_nbytes=RB, slot_nbytes=EB)
    assert everything.slots == 0
    assert choose(everything, all_candidates, "auto", cpu_gbps=measured(1e3),
                  **args)[0] == everything
    assert calls == [1e3, 0.01]
    # A budget that fits no split without slots keeps the best one, even with on.
    assert choose(best, [best], "on", cpu_gbps=None, **args) == (
        best, "the budget fits no split without slots")
