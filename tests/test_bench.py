"""The decode-benchmark harness on the CPU path (tiny shapes; timings mean nothing here) and the
`moe-uvm bench` simulation fallback."""

import json

import numpy as np
import pytest

from moe_uvm import bench_sweep, cli
from moe_uvm.bench import METHODS, managed_residency
from moe_uvm.trace import synthetic_trace


@pytest.fixture
def small_trace(tmp_path):
    trace = synthetic_trace(num_layers=3, num_experts=8, top_k=2, num_sequences=4,
                            tokens_per_sequence=16, seed=np.random.randint(1 << 30))
    path = tmp_path / "trace.npz"
    trace.save(path)
    return path


def test_harness_runs_every_method_with_identical_outputs(small_trace, tmp_path):
    cfg = bench_sweep.BenchConfig(trace=str(small_trace), resident="0,4,8", batches=(1, 3),
                                  steps=2, device="cpu", tiny=True)
    result = bench_sweep.sweep(cfg, progress=lambda line: None)
    assert result["note"] == bench_sweep.CPU_NOTE
    recs = result["records"]
    methods = {r["method"] for r in recs}
    assert methods == set(METHODS)
    # device once per batch, every other method at every resident count
    assert len(recs) == 2 * (1 + 3 * (len(METHODS) - 1))
    assert all(r["exact"] for r in recs), [r for r in recs if not r["exact"]]
    for r in recs:
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0
        if r["method"] not in ("device", "lru") and r["resident"] == 8:
            assert r["offloaded_mb_per_step"] == 0
        if r["method"] in ("uva", "lru", "first_n") and r["resident"] == 0:
            assert r["offloaded_mb_per_step"] > 0
    paths = bench_sweep.write_outputs(result, tmp_path)
    assert json.loads(paths[0].read_text())["records"] == json.loads(json.dumps(recs))
    assert paths[1].stat().st_size > 0
    table = bench_sweep.markdown_table(result)
    assert table.count("\n") == len(recs) + 1


def test_slot_cache_methods_keep_outputs_and_report_prefetch_metrics(small_trace):
    cfg = bench_sweep.BenchConfig(trace=str(small_trace), resident="2", batches=(2,), steps=3,
                                  device="cpu", tiny=True, methods=("profile",), slots=(3,),
                                  prefetch=("none", "speculative"))
    recs = bench_sweep.sweep(cfg, progress=lambda line: None)["records"]
    cached = {r["method"]: r for r in recs if "slots" in r}
    assert set(cached) == {"cache3", "speculative3"}
    for rec in cached.values():
        assert rec["exact"] and 0 <= rec["slot_hit_rate"] <= 1
    assert cached["cache3"]["copies_per_step"] == 0
    assert cached["speculative3"]["prefetch_precision"] is not None


def test_floor_counts_distinct_experts_per_layer():
    touched = np.zeros((2, 1, 4), bool)
    touched[0, 0, [0, 1]] = True  # step 0 reads experts 0 and 1
    touched[1, 0, [1, 2, 3]] = True
    resident = np.array([[True, True, False, False]])
    floor, off = bench_sweep._floor(touched, resident, eb=10**9, hbm=1000, pcie=10)
    # step 0: 2 GB at 1000 GB/s = 2 ms; step 1: 1 GB HBM (1 ms) + 2 GB PCIe (200 ms)
    assert floor == pytest.approx(np.median([2.0, 201.0]))
    assert off == pytest.approx(1e9)


def test_managed_policies_pick_the_profiles_experts(small_trace):
    cfg = bench_sweep.BenchConfig(trace=str(small_trace), device="cpu", tiny=True)
    work = bench_sweep.make_workload(cfg)
    counts = work.profile.counts
    sets = managed_residency(work, "profile", 3)
    for layer, ids in enumerate(sets):
        assert sorted(ids) == sorted(np.argsort(-counts[layer], kind="stable")[:3].tolist())
    total = sum(len(s) for s in managed_residency(work, "global", 3))
    assert total == 3 * work.num_layers
    assert managed_residency(work, "first_n", 2) == [[0, 1]] * work.num_layers


def test_bench_without_gpu_simulates_and_says_so(capsys, monkeypatch):
    monkeypatch.setattr(cli.uvm, "available", lambda: False)
    assert cli.main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "No CUDA GPU here: running the CPU policy simulation" in out
    assert "| first_n |" in out and "| oracle |" in out


def test_bench_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown methods"):
        bench_sweep.BenchConfig(methods=("device", "magic"))
